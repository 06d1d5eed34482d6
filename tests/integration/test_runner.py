"""The shared Runner in-process against the real test broker, with scripted stages.

Each test builds a Runner around a fake stage, runs it in a thread and stops it
with runner.stop(). Outputs and dead letters are read by a collector that
tails the topics from the beginning; assertions wait on state, never on time.
"""

from __future__ import annotations

import struct
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from pipeline.devbroker import EmbeddedBroker, free_port
from pipeline.errors import PoisonRecord, TransientError
from pipeline.facelib.spec import spec_for
from pipeline.headers import CORRELATION, REPLY_PARTITION, REPLY_TOPIC
from pipeline.indexer.core import IndexerConfig, IndexerCore
from pipeline.indexer.stage import IndexerStage
from pipeline.kafka import Output, consumer_config, producer_config
from pipeline.metrics import Metrics, create_metrics
from pipeline.records import MatchReply, MatchRequest, now_ms
from pipeline.restore import read_to_end
from pipeline.runner import BaseStage, Control, Incoming, Outcome, Runner
from pipeline.serde import DEAD_LETTER, MATCH_REPLY, MATCH_REQUEST, SchemaRegistry
from pipeline.settings import IndexerSettings, KafkaSettings, RunnerSettings, TopicSettings
from pipeline.topics import create_topics, partition_for
from tests.integration.helpers import wait_for

SERDE = SchemaRegistry.load()
FAST = RunnerSettings(backoff_initial_s=0.05, backoff_max_s=0.2, stats_interval_ms=200,
                      flush_timeout_s=10, unknown_topic_timeout_ms=2000)


def kafka(bootstrap: str) -> KafkaSettings:
    """Quick rebalances on this broker (see conftest's stack_env)."""
    return KafkaSettings(bootstrap_servers=bootstrap, session_timeout_ms=6000, heartbeat_interval_ms=1000)


# -- a scripted stage ---------------------------------------------------------------
class Scripted(BaseStage):
    """Calls `script(item)` per record: it returns outputs or raises; counts what happened."""

    name = "scripted"

    def __init__(self, script: Callable[[Incoming], list[Output]]) -> None:
        self.script = script
        self.calls: Counter[bytes] = Counter()
        self.lock = threading.Lock()
        self.assigned: list[list[tuple[str, int]]] = []
        self.revoked: list[list[tuple[str, int]]] = []

    def handle(self, batch: Sequence[Incoming]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for item in batch:
            with self.lock:
                self.calls[item.value or b""] += 1
            try:
                outcomes.append(self.script(item))
            except (PoisonRecord, TransientError) as exc:
                outcomes.append(exc)
        return outcomes

    def after_assign(self, partitions: list[tuple[str, int]], control: Control) -> None:
        self.assigned.append(partitions)

    def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        self.revoked.append(partitions)


def echo_to(topic: str) -> Callable[[Incoming], list[Output]]:
    """Copy the record to `topic`, same partition, remembering where it came from."""
    def script(item: Incoming) -> list[Output]:
        return [Output(topic, item.key, item.value, item.partition,
                       headers=[("src.offset", str(item.offset).encode())])]
    return script


# -- plumbing -----------------------------------------------------------------------
class Running:
    """A Runner on a thread; `stop()` asks it to finish and re-raises what it raised."""

    def __init__(self, runner: Runner) -> None:
        self.runner, self.error = runner, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.runner.run()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> None:
        self.runner.stop()
        self.thread.join(60)
        assert not self.thread.is_alive(), "runner did not stop"
        if self.error is not None:
            raise self.error


@contextmanager
def running(stage: BaseStage, bootstrap: str, sources: list[str], group: str, dlq: str,
            settings: RunnerSettings = FAST, metrics: Metrics | None = None,
            consumer: dict[str, Any] | None = None, producer: dict[str, Any] | None = None) -> Iterator[Running]:
    """A Runner in a thread for the body of a `with`; stopped (graceful) on exit."""
    runner = Runner(stage, sources, consumer_config(kafka(bootstrap), group, settings, **(consumer or {})),
                    producer_config(kafka(bootstrap), **{"linger.ms": 0, **(producer or {})}),
                    dlq, settings, metrics or create_metrics(), SERDE)
    handle = Running(runner)
    try:
        yield handle
    finally:
        handle.stop()


class Collector:
    """Tails topics from the beginning on a thread; `records` grows as they arrive."""

    def __init__(self, bootstrap: str, partitions: dict[str, int]) -> None:
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"collector-{uuid.uuid4().hex}",
                                  "enable.auto.commit": False})
        self.consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING)
                              for t, n in partitions.items() for p in range(n)])
        self.records: list[Any] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self.consumer.poll(0.1)
            if msg is not None and not msg.error():
                self.records.append(msg)
        self.consumer.close()

    def on(self, topic: str) -> list[Any]:
        """Records seen so far on `topic`."""
        return [m for m in list(self.records) if m.topic() == topic]

    def values(self, topic: str) -> list[bytes]:
        """Values seen so far on `topic`."""
        return [m.value() for m in self.on(topic)]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(10)


@contextmanager
def collecting(bootstrap: str, partitions: dict[str, int]) -> Iterator[Collector]:
    collector = Collector(bootstrap, partitions)
    try:
        yield collector
    finally:
        collector.close()


def produce(bootstrap: str, topic: str, records: Sequence[tuple[int, bytes]],
            headers: Sequence[list[tuple[str, bytes]]] | None = None) -> None:
    """Records (partition, value) in order; keyed by their value."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    for i, (partition, value) in enumerate(records):
        producer.produce(topic, value, key=value, partition=partition,
                         headers=headers[i] if headers else None)
    assert producer.flush(10) == 0


def drain(bootstrap: str, collector: Collector, topic: str, partitions: int) -> None:
    """Barrier: once a marker written after everything else shows up on every partition, all came in."""
    marker = f"marker-{uuid.uuid4().hex}".encode()
    produce(bootstrap, topic, [(p, marker) for p in range(partitions)])
    wait_for(lambda: collector.values(topic).count(marker) == partitions, 30, f"markers on {topic}")


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> list[int]:
    """The group's committed offsets (negative: none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return [tp.offset for tp in sorted(tps, key=lambda tp: tp.partition)]
    finally:
        consumer.close()


def headers_of(msg: Any) -> dict[str, str]:
    return {k: v.decode() for k, v in (msg.headers() or [])}


def group_id() -> str:
    return f"g-{uuid.uuid4().hex[:10]}"


# -- dead letters ---------------------------------------------------------------------
def test_poison_record_goes_to_the_dlq_with_headers_and_the_original_bytes(
        kafka_bootstrap: str, topics: TopicSettings) -> None:
    source, out = topics.photo_events, topics.faces
    echo = echo_to(out)

    def script(item: Incoming) -> list[Output]:
        if item.value == b"poison":
            raise PoisonRecord("bad_thing", "this record can never work")
        return echo(item)

    with (
        collecting(kafka_bootstrap, {out: topics.partitions, topics.dlq: 1}) as seen,
        running(Scripted(script), kafka_bootstrap, [source], group_id(), topics.dlq),
    ):
        produce(kafka_bootstrap, source, [(2, b"ok-1"), (2, b"poison"), (2, b"ok-2")])
        wait_for(lambda: len(seen.values(out)) == 2 and seen.on(topics.dlq), 30, "outputs and a dead letter")
    assert seen.values(out) == [b"ok-1", b"ok-2"]
    [letter] = seen.on(topics.dlq)
    headers = headers_of(letter)
    assert headers["dlq.reason"] == "bad_thing"
    assert headers["dlq.error_class"] == "PoisonRecord"
    assert headers["dlq.error_message"] == "this record can never work"
    assert headers["dlq.stage"] == "scripted"
    assert (headers["dlq.source_topic"], headers["dlq.source_partition"], headers["dlq.source_offset"]) \
        == (source, "2", "1")
    assert headers["dlq.attempts"] == "1"  # poison is not retried
    envelope = SERDE.decode(DEAD_LETTER, letter.value())
    assert envelope["value"] == b"poison" and envelope["key"] == b"poison"
    assert (envelope["source_topic"], envelope["source_partition"], envelope["source_offset"]) == (source, 2, 1)
    assert envelope["reason"] == "bad_thing" and envelope["attempts"] == 1


def test_transient_errors_are_retried_then_succeed_or_are_dead_lettered_with_the_attempts(
        kafka_bootstrap: str, topics: TopicSettings) -> None:
    source, out = topics.photo_events, topics.faces
    echo = echo_to(out)
    stage: Scripted

    def script(item: Incoming) -> list[Output]:
        if item.value == b"always":
            raise TransientError("upstream_down", "still down")
        if item.value == b"flaky" and stage.calls[b"flaky"] <= 2:
            raise TransientError("timeout", "try again")
        return echo(item)

    stage = Scripted(script)
    settings = FAST.model_copy(update={"max_attempts": 4})
    with collecting(kafka_bootstrap, {out: topics.partitions, topics.dlq: 1}) as seen:
        with running(stage, kafka_bootstrap, [source], group_id(), topics.dlq, settings):
            produce(kafka_bootstrap, source, [(0, b"flaky"), (0, b"after-flaky"),
                                              (1, b"always"), (1, b"after-always")])
            wait_for(lambda: len(seen.values(out)) == 3 and seen.on(topics.dlq), 60, "outputs and a dead letter")
        drain(kafka_bootstrap, seen, out, topics.partitions)
    outputs = [v for v in seen.values(out) if not v.startswith(b"marker-")]
    assert sorted(outputs) == [b"after-always", b"after-flaky", b"flaky"]  # each exactly once
    assert outputs.index(b"flaky") < outputs.index(b"after-flaky")  # order within partition 0
    assert stage.calls[b"flaky"] == 3 and stage.calls[b"always"] == 4
    [letter] = seen.on(topics.dlq)
    headers = headers_of(letter)
    assert (headers["dlq.reason"], headers["dlq.error_class"], headers["dlq.attempts"]) \
        == ("upstream_down", "TransientError", "4")
    assert SERDE.decode(DEAD_LETTER, letter.value())["value"] == b"always"


def test_retries_hold_only_their_partition_and_keep_its_order(kafka_bootstrap: str, topics: TopicSettings) -> None:
    """A record failing for longer than max.poll.interval.ms holds its partition, not the consumer."""
    source, out = topics.photo_events, topics.faces
    echo = echo_to(out)
    others_done = threading.Event()
    first_failure: list[float] = []

    def script(item: Incoming) -> list[Output]:
        if item.value == b"p0-3":
            first_failure[:] = first_failure or [time.monotonic()]
            # Fails until the other partitions are through and the failure has
            # outlived max.poll.interval.ms: sleeping retries would get us evicted.
            if not others_done.is_set() or time.monotonic() - first_failure[0] < 8:
                raise TransientError("slow_url", "not yet")
        return echo(item)

    stage = Scripted(script)
    settings = FAST.model_copy(update={"max_attempts": 10_000, "max_poll_interval_ms": 7000})
    records = [(p, f"p{p}-{i}".encode()) for i in range(8) for p in range(4)]
    with collecting(kafka_bootstrap, {out: topics.partitions}) as seen:
        with running(stage, kafka_bootstrap, [source], group_id(), topics.dlq, settings):
            produce(kafka_bootstrap, source, records)

            def others_through() -> bool:
                values = set(seen.values(out))
                return all(f"p{p}-7".encode() in values for p in (1, 2, 3))
            wait_for(others_through, 60, "partitions 1-3 while partition 0 is held")
            assert [v for v in seen.values(out) if v.startswith(b"p0-")] == [b"p0-0", b"p0-1", b"p0-2"]
            others_done.set()
            wait_for(lambda: len(seen.values(out)) == len(records), 60, "every record")
            assert stage.revoked == [] and len(stage.assigned) == 1  # never evicted
        drain(kafka_bootstrap, seen, out, topics.partitions)
    outputs = [v for v in seen.values(out) if not v.startswith(b"marker-")]
    assert sorted(outputs) == sorted(v for _, v in records)  # each exactly once
    by_partition: dict[int, list[bytes]] = defaultdict(list)
    for value in outputs:
        by_partition[int(value[1:2])].append(value)
    for p in range(4):
        assert by_partition[p] == [f"p{p}-{i}".encode() for i in range(8)]
    assert stage.calls[b"p0-3"] > 2


def test_a_wrong_number_of_outcomes_loses_no_record(kafka_bootstrap: str, topics: TopicSettings) -> None:
    """Batches are redone one by one; a record that alone still breaks the contract is dead-lettered."""
    source, out = topics.photo_events, topics.faces

    class Short(Scripted):
        def handle(self, batch: Sequence[Incoming]) -> list[Outcome]:
            outcomes = super().handle(batch)
            return [o for item, o in zip(batch, outcomes) if item.value != b"bad-count"]

    values = [b"a", b"b", b"bad-count", b"c", b"d"]
    with (
        collecting(kafka_bootstrap, {out: topics.partitions, topics.dlq: 1}) as seen,
        running(Short(echo_to(out)), kafka_bootstrap, [source], group_id(), topics.dlq),
    ):
        produce(kafka_bootstrap, source, [(3, v) for v in values])
        wait_for(lambda: len(seen.values(out)) == 4 and seen.on(topics.dlq), 30, "outputs and a dead letter")
    assert sorted(seen.values(out)) == [b"a", b"b", b"c", b"d"]
    [letter] = seen.on(topics.dlq)
    assert headers_of(letter)["dlq.reason"] == "stage_contract"
    assert SERDE.decode(DEAD_LETTER, letter.value())["value"] == b"bad-count"


# -- delivery ---------------------------------------------------------------------------
def test_offsets_are_not_stored_when_delivery_fails(kafka_bootstrap: str, topics: TopicSettings) -> None:
    """Outputs that never reach a broker leave the record unconsumed for the group; the runner keeps trying."""
    source, group = topics.photo_events, group_id()
    stage = Scripted(echo_to(topics.faces))
    dead_broker = {"bootstrap.servers": f"127.0.0.1:{free_port()}", "message.timeout.ms": 1500}
    produce(kafka_bootstrap, source, [(0, b"undeliverable")])
    runner = Runner(stage, [source], consumer_config(kafka(kafka_bootstrap), group, FAST),
                    producer_config(kafka(kafka_bootstrap), **dead_broker), topics.dlq, FAST,
                    create_metrics(), SERDE)
    handle = Running(runner)
    # Broker trouble holds the record and handles it again after a backoff; nothing is stored meanwhile.
    wait_for(lambda: stage.calls[b"undeliverable"] >= 2, 60, "the record handled again after the failed delivery")
    assert handle.thread.is_alive() and handle.error is None
    assert committed(kafka_bootstrap, group, source, topics.partitions)[0] < 0
    runner.stop()
    handle.thread.join(60)
    assert not handle.thread.is_alive() and handle.error is None
    assert committed(kafka_bootstrap, group, source, topics.partitions)[0] < 0
    again = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                      "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "enable.auto.commit": False})
    again.subscribe([source])
    try:
        def redelivered() -> Any:
            msg = again.poll(0.5)
            return msg if msg is not None and not msg.error() else None
        msg = wait_for(redelivered, 60, "the record to be delivered to the group again", interval_s=0)
        assert (msg.value(), msg.partition(), msg.offset()) == (b"undeliverable", 0, 0)
    finally:
        again.close()


def test_a_broker_that_forgot_the_producer_id_gets_the_outputs_from_a_new_producer(
        private_broker: EmbeddedBroker) -> None:
    """A memory broker restarted empty no longer knows the runner's idempotent producer.

    librdkafka answers its UNKNOWN_PRODUCER_ID by bumping the epoch locally and sending again,
    forever, with no error reaching the runner (CI saw an indexer's replies stuck this way for
    minutes): a flush that ends with outputs unreported must start a new producer.
    """
    bootstrap = private_broker.bootstrap
    topics = TopicSettings(prefix=f"t{uuid.uuid4().hex[:10]}.", partitions=1, reply_partitions=1, dlq_partitions=1)
    create_topics(KafkaSettings(bootstrap_servers=bootstrap), topics)
    stage = Scripted(echo_to(topics.faces))
    settings = FAST.model_copy(update={"flush_timeout_s": 3.0})
    with running(stage, bootstrap, [topics.photo_events], group_id(), topics.dlq, settings):
        with collecting(bootstrap, {topics.faces: 1}) as collector:
            produce(bootstrap, topics.photo_events, [(0, b"before")])
            wait_for(lambda: b"before" in collector.values(topics.faces), 60, "the output before the restart")
        private_broker.restart()
        create_topics(KafkaSettings(bootstrap_servers=bootstrap), topics)
        with collecting(bootstrap, {topics.faces: 1}) as collector:
            # produce() is not idempotent: no producer id is handed out on the new broker.
            produce(bootstrap, topics.photo_events, [(0, b"after")])
            # librdkafka's own verdict (message.timeout.ms) would come after 300 s.
            wait_for(lambda: b"after" in collector.values(topics.faces), 120,
                     "the output after the restart, through a new producer")


def test_outputs_that_can_never_be_delivered_are_dead_lettered(kafka_bootstrap: str, topics: TopicSettings) -> None:
    """Unknown partition, unknown topic, too large: dead-lettered, offsets stored, the runner goes on."""
    source, out, group = topics.photo_events, topics.faces, group_id()

    def script(item: Incoming) -> list[Output]:
        target = item.headers["to"].decode()
        partition = int(item.headers["partition"])
        size = int(item.headers.get("size", b"0"))
        return [Output(target, item.key, item.value + b"x" * size, partition)]

    missing = f"missing-{uuid.uuid4().hex[:8]}"
    cases = [(b"no-partition", out, 99, 0), (b"no-topic", missing, 0, 0),
             (b"too-large", out, 0, 200_000), (b"fine", out, 0, 0)]
    headers = [[("to", t.encode()), ("partition", str(p).encode()), ("size", str(s).encode())]
               for _, t, p, s in cases]
    with (
        collecting(kafka_bootstrap, {out: topics.partitions, topics.dlq: 1}) as seen,
        running(Scripted(script), kafka_bootstrap, [source], group, topics.dlq,
                producer={"message.max.bytes": 100_000}),
    ):
        produce(kafka_bootstrap, source, [(4, v) for v, *_ in cases], headers)
        wait_for(lambda: len(seen.on(topics.dlq)) == 3 and seen.values(out), 60, "three dead letters, one output")
        wait_for(lambda: committed(kafka_bootstrap, group, source, topics.partitions)[4] == 4, 30,
                 "offsets stored past the dead letters")
    assert seen.values(out) == [b"fine"]
    letters = {SERDE.decode(DEAD_LETTER, m.value())["value"]: headers_of(m) for m in seen.on(topics.dlq)}
    assert {h["dlq.reason"] for h in letters.values()} == {"delivery_failed"}
    assert "_UNKNOWN_PARTITION" in letters[b"no-partition"]["dlq.error_message"]
    assert missing in letters[b"no-topic"]["dlq.error_message"]
    assert "UNKNOWN_TOPIC" in letters[b"no-topic"]["dlq.error_message"]
    assert "MSG_SIZE_TOO_LARGE" in letters[b"too-large"]["dlq.error_message"]


def test_match_request_with_a_bad_reply_address_is_dead_lettered_and_the_next_is_answered(
        kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path) -> None:
    spec = spec_for("none", 8)
    metrics = create_metrics()
    core = IndexerCore(IndexerConfig(spec.dim, spec.model_id, spec.default_threshold))
    stage = IndexerStage(core, SERDE, topics, topics.partitions, IndexerSettings(state_dir=tmp_path), metrics,
                         lambda tps: read_to_end({"bootstrap.servers": kafka_bootstrap}, tps))
    event = "EV"
    partition = partition_for(event, topics.partitions)
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    cases = [("no-topic", missing, 0), ("no-partition", topics.match_replies, 7),
             ("negative", topics.match_replies, -1), ("good", topics.match_replies, 1)]
    vector = np.ones(spec.dim, dtype=np.float32) / np.sqrt(spec.dim)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for request_id, reply_topic, reply_partition in cases:
        request = MatchRequest(request_id, event, vector, deadline_ms=now_ms() + 120_000)
        producer.produce(topics.match_requests, SERDE.encode(MATCH_REQUEST, request.to_avro()),
                         key=event.encode(), partition=partition,
                         headers=[(CORRELATION, request_id.encode()), (REPLY_TOPIC, reply_topic.encode()),
                                  (REPLY_PARTITION, struct.pack(">i", reply_partition))])
    assert producer.flush(10) == 0
    watched = {topics.match_replies: topics.reply_partitions, topics.dlq: 1}
    with (
        collecting(kafka_bootstrap, watched) as seen,
        running(stage, kafka_bootstrap, [topics.faces, topics.match_requests], group_id(), topics.dlq, metrics=metrics),
    ):
        wait_for(lambda: seen.on(topics.match_replies) and len(seen.on(topics.dlq)) == 3, 60,
                 "a reply and three dead letters")
    [reply] = seen.on(topics.match_replies)
    assert reply.partition() == 1 and headers_of(reply)[CORRELATION] == "good"
    assert MatchReply.from_avro(SERDE.decode(MATCH_REPLY, reply.value())).request_id == "good"
    # Dead letters of match requests never carry the selfie: the value is left out, the
    # position of the request says which one it was (fresh topic: offsets 0, 1, 2, 3).
    envelopes = [(SERDE.decode(DEAD_LETTER, m.value()), headers_of(m)) for m in seen.on(topics.dlq)]
    assert all(env["value"] is None and head["dlq.redacted"] == "value" for env, head in envelopes)
    names = [request_id for request_id, _, _ in cases]
    reasons = {names[env["source_offset"]]: head["dlq.reason"] for env, head in envelopes}
    assert reasons == {"no-topic": "delivery_failed", "no-partition": "delivery_failed",
                       "negative": "bad_reply_partition"}


# -- group behaviour and metrics --------------------------------------------------------
def test_stored_offsets_are_committed_when_partitions_are_revoked(
        kafka_bootstrap: str, topics: TopicSettings) -> None:
    """Auto-commit is off here, so only the revoke hook can commit before the second member joins."""
    source, group = topics.photo_events, group_id()
    first = Scripted(echo_to(topics.faces))
    no_auto_commit = {"enable.auto.commit": False}
    produce(kafka_bootstrap, source, [(p, f"r{p}-{i}".encode()) for p in range(topics.partitions) for i in range(3)])
    with running(first, kafka_bootstrap, [source], group, topics.dlq, consumer=no_auto_commit):
        wait_for(lambda: sum(first.calls.values()) == 3 * topics.partitions, 60, "the first member to handle all")
        assert max(committed(kafka_bootstrap, group, source, topics.partitions)) < 0
        second = Scripted(echo_to(topics.faces))
        with running(second, kafka_bootstrap, [source], group, topics.dlq, consumer=no_auto_commit):
            wait_for(lambda: committed(kafka_bootstrap, group, source, topics.partitions) == [3] * topics.partitions,
                     60, "the revoke to commit every partition")
            assert first.revoked
            wait_for(lambda: second.assigned and second.assigned[-1], 60, "the second member's share")
        assert sum(second.calls.values()) == 0  # nothing redone: the commit covered everything


def test_consumer_lag_is_exported_from_librdkafka_statistics(kafka_bootstrap: str, topics: TopicSettings) -> None:
    source, group = topics.photo_events, group_id()
    metrics = create_metrics()
    echo = echo_to(topics.faces)

    def slow(item: Incoming) -> list[Output]:
        time.sleep(0.02)  # work, so a backlog builds up
        return echo(item)

    def lag() -> float | None:
        return metrics.registry.get_sample_value(
            "kafka_consumergroup_lag", {"consumergroup": group, "topic": source, "partition": "5"})

    produce(kafka_bootstrap, source, [(5, f"v{i}".encode()) for i in range(150)])
    settings = FAST.model_copy(update={"batch_size": 1})
    with running(Scripted(slow), kafka_bootstrap, [source], group, topics.dlq, settings, metrics=metrics):
        wait_for(lambda: (lag() or 0) > 0, 60, "a positive lag while the backlog is worked off", interval_s=0.01)
        wait_for(lambda: lag() == 0, 60, "lag 0 once caught up")
