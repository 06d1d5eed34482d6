"""A broker that comes back with a log that ends before what the group had read (Tansu after a crash).

Tansu's S3 engine, SIGKILLed, can restart with a partition log a few records shorter than what it
had served, while the group's committed offsets survive; it then answers fetches past the new end
with nothing (no OFFSET_OUT_OF_RANGE), and records appended at offsets the group had passed were
never read: CI lost 8 retried photos that way. A memory broker that restarts is the extreme case
(an empty log), which makes the hazard reproducible here: the shared Runner must read such records.
"""

from __future__ import annotations

import contextlib
import uuid

from confluent_kafka import Consumer, KafkaException, TopicPartition

from pipeline.devbroker import EmbeddedBroker
from pipeline.settings import KafkaSettings, TopicSettings
from pipeline.topics import create_topics
from tests.integration.helpers import wait_for
from tests.integration.test_runner import Scripted, echo_to, group_id, produce, running


def make_topics(bootstrap: str) -> TopicSettings:
    topics = TopicSettings(prefix=f"rw{uuid.uuid4().hex[:8]}.", partitions=1, reply_partitions=1, dlq_partitions=1)
    create_topics(KafkaSettings(bootstrap_servers=bootstrap), topics)
    return topics


def commit(bootstrap: str, group: str, topic: str, offset: int) -> None:
    """What the broker kept of the group: a committed offset from before the log was cut."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(topic, 0, offset)], asynchronous=False)
    finally:
        consumer.close()


def handled(stage: Scripted, values: list[bytes]) -> bool:
    with stage.lock:
        return all(stage.calls[v] >= 1 for v in values)


def test_a_group_whose_committed_offset_lies_past_the_logs_end_reads_the_log_from_its_start(
        private_broker: EmbeddedBroker) -> None:
    bootstrap = private_broker.bootstrap
    topics = make_topics(bootstrap)
    group = group_id()
    surviving = [f"kept-{i}".encode() for i in range(5)]
    produce(bootstrap, topics.photo_events, [(0, v) for v in surviving])
    commit(bootstrap, group, topics.photo_events, 20)  # the group had read 20 records of the old log
    stage = Scripted(echo_to(topics.faces))
    with running(stage, bootstrap, [topics.photo_events], group, topics.dlq) as run:
        wait_for(lambda: handled(stage, surviving), 60, "the records below the stale committed offset handled")
        later = [f"later-{i}".encode() for i in range(3)]
        produce(bootstrap, topics.photo_events, [(0, v) for v in later])
        wait_for(lambda: handled(stage, later), 60, "records appended afterwards handled")
        rewound = run.runner.metrics.registry.get_sample_value(
            "facematch_retries_total", {"stage": stage.name, "reason": "log_rewritten"})
    assert rewound is not None and rewound >= 1


def test_a_running_stage_reads_records_the_restarted_broker_put_at_offsets_it_had_passed(
        private_broker: EmbeddedBroker) -> None:
    bootstrap = private_broker.bootstrap
    topics = make_topics(bootstrap)
    group = group_id()
    before = [f"before-{i}".encode() for i in range(20)]
    produce(bootstrap, topics.photo_events, [(0, v) for v in before])
    stage = Scripted(echo_to(topics.faces))
    with running(stage, bootstrap, [topics.photo_events], group, topics.dlq):
        wait_for(lambda: handled(stage, before), 60, "the first 20 records handled")
        private_broker.restart()  # memory storage: it comes back empty
        create_topics(KafkaSettings(bootstrap_servers=bootstrap), topics)
        # The group's offsets as a durable broker keeps them; refused if the stage rejoined first,
        # and then it starts from the new log's start by itself.
        with contextlib.suppress(KafkaException):
            commit(bootstrap, group, topics.photo_events, 20)
        # More records than the stage had read: the new log's end passes its position at once.
        after = [f"after-{i}".encode() for i in range(30)]
        produce(bootstrap, topics.photo_events, [(0, v) for v in after])
        wait_for(lambda: handled(stage, after), 90, "every record of the new log handled")
