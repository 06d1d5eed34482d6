"""Services refuse to start, loudly, when running would lose or misroute records."""

from __future__ import annotations

import uuid

from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.settings import KafkaSettings, TopicSettings
from pipeline.topics import create_topics, partition_count


def test_topics_create_is_idempotent(kafka_bootstrap: str) -> None:
    topics = TopicSettings(prefix=f"idem{uuid.uuid4().hex[:6]}.", partitions=3)
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    first, second = create_topics(kafka, topics), create_topics(kafka, topics)
    assert set(first.values()) == {"created"} and set(second.values()) == {"exists"}
    assert partition_count(AdminClient(kafka.to_librdkafka()), topics.faces) == 3


def test_indexer_refuses_topics_that_are_not_copartitioned(stack, kafka_bootstrap: str) -> None:
    prefix = f"skew{uuid.uuid4().hex[:6]}."
    skewed = TopicSettings(prefix=prefix)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.create_topics([NewTopic(skewed.faces, 6, 1), NewTopic(skewed.match_requests, 4, 1),
                                       NewTopic(skewed.dlq, 1, 1)]).values():
        future.result(30)
    indexer = stack.indexer(FACEMATCH_TOPIC_PREFIX=prefix)
    assert indexer.process.wait(60) == 2
    assert "co-partitioned" in indexer.log_tail()


def test_embedder_refuses_to_start_without_its_model_files(stack, tmp_path) -> None:
    embedder = stack.embedder(FACEMATCH_MODEL="sface", FACEMATCH_MODEL_ROOT=str(tmp_path / "empty"))
    assert embedder.process.wait(60) == 2
    assert "facematch models fetch" in embedder.log_tail()
