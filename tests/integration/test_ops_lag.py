"""Consumer lag on the real broker: the true backlog of a restarted indexer and of a paused member.

Lag comes from librdkafka's statistics (fetch watermarks minus the offset this
member stored), never from ListOffsets. Tests wait on /metrics, never on sleeps.
"""

from __future__ import annotations

import datetime as dt
import threading
import urllib.request
import uuid
from collections.abc import Sequence

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.devbroker import free_port
from pipeline.kafka import consumer_config, producer_config
from pipeline.metrics import create_metrics
from pipeline.records import now_ms
from pipeline.runner import Runner
from pipeline.serde import SchemaRegistry
from pipeline.settings import KafkaSettings, RunnerSettings
from pipeline.stack import ServiceProcess
from pipeline.stage_api import BaseStage, Control, Incoming, Outcome
from tests.integration.helpers import http, match, unit_vectors, wait_for

DIM = 512
EVENTS = [f"LAG{i}" for i in range(6)]
STATS = {"FACEMATCH_RUNNER_STATS_INTERVAL_MS": "200"}


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
    """Every sample of a /metrics page by (name, labels); None while the endpoint is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, rest = head.partition("{")
        labels = frozenset(tuple(pair.split("=", 1)) for pair in rest.rstrip("}").split(",") if pair)
        samples[(name, frozenset((k, v.strip('"')) for k, v in labels))] = float(value)
    return samples


class Service:
    """A service process with its own metrics port."""

    def __init__(self, proc: ServiceProcess, port: int) -> None:
        self.proc, self.port = proc, port

    def page(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """The current /metrics; {} while the endpoint is not up."""
        return scrape(self.port) or {}

    def value(self, name: str, **labels: str) -> float:
        """One sample; 0 when absent."""
        return self.page().get((name, frozenset(labels.items())), 0.0)


def faces_lag(page: dict, topic: str) -> tuple[float | None, float]:
    """(kafka_consumergroup_lag_sum of the faces topic or None, the sum of its partition series)."""
    total = next((v for (n, labels), v in page.items()
                  if n == "kafka_consumergroup_lag_sum" and ("topic", topic) in labels), None)
    parts = sum(v for (n, labels), v in page.items() if n == "kafka_consumergroup_lag" and ("topic", topic) in labels)
    return total, parts


def start_indexer(stack, name: str) -> Service:  # type: ignore[no-untyped-def]
    port = free_port()
    proc = stack.indexer(name, state_dir=stack.workdir / "indexer-state",
                         FACEMATCH_INDEXER_METRICS_PORT=str(port), **STATS)
    return Service(proc, port)


def ingest(base: str, vectors: np.ndarray, first: int, count: int) -> None:
    for k in range(first, first + count):
        event = EVENTS[k % len(EVENTS)]
        status, body = http("POST", f"{base}/api/v2/ingest",
                            {"event_id": event, "photo_id": f"p{k}", "embedding": vectors[k].tolist()})
        assert status == 202, body


def test_restarted_indexer_reports_its_backlog_and_drains_it(stack) -> None:
    faces_topic = stack.topics.faces
    indexer = start_indexer(stack, "indexer-1")
    embedder_port = free_port()
    stack.embedder(FACEMATCH_EMBEDDER_METRICS_PORT=str(embedder_port), **STATS)
    embedder = Service(stack.procs[-1], embedder_port)
    base = stack.bridge()  # ready: every partition's indexer has caught up, so what follows is live
    first, backlog = 12, 30
    vectors = unit_vectors(first + backlog, DIM, seed=41)

    ingest_started_ms = now_ms()
    ingest(base, vectors, 0, first)
    wait_for(lambda: indexer.value("facematch_index_faces") == first, 60, f"{first} faces indexed")
    wait_for(lambda: faces_lag(indexer.page(), faces_topic)[0] == 0, 30, "faces lag 0 once applied")
    page = indexer.page()
    total, parts = faces_lag(page, faces_topic)
    assert total == parts == 0
    # Every photo applied live was timed from its event to searchable.
    assert page[("facematch_time_to_searchable_seconds_count", frozenset())] >= first
    assert page[("process_resident_memory_bytes", frozenset())] > 0
    assert ("process_cpu_seconds_total", frozenset()) in page
    # Answers say how fresh they are: the newest photo event applied to the event's index.
    status, body = match(base, EVENTS[0], vectors[0])
    assert status == 200 and body["newest_face_at"].endswith("Z"), body
    newest = dt.datetime.fromisoformat(body["newest_face_at"].replace("Z", "+00:00"))
    assert newest.timestamp() * 1000 >= ingest_started_ms - 1  # stamped by the bridge when it published

    # Photos keep arriving while no indexer runs: they wait on the faces topic.
    assert indexer.proc.stop() == 0
    ingest(base, vectors, first, backlog)
    ok = {"stage": "embedder", "outcome": "ok"}
    wait_for(lambda: embedder.value("facematch_records_total", **ok) == first + backlog, 60,
             f"the embedder publishing faces of all {first + backlog} photos")

    restarted = start_indexer(stack, "indexer-2")
    seen: list[tuple[float, float]] = []

    def drained() -> bool:
        page = scrape(restarted.port)
        if not page:
            return False
        total, parts = faces_lag(page, faces_topic)
        if total is not None:
            seen.append((total, parts))
        replayed = page.get(("facematch_replay_records_total", frozenset()), 0)
        return replayed == backlog and total == 0 and page[("facematch_index_faces", frozenset())] == first + backlog
    wait_for(drained, 90, f"the restarted indexer applying the {backlog} waiting faces and reporting lag 0",
             interval_s=0.02)
    # It resumed from its snapshots: exactly the backlog was replayed, and the lag it
    # reported never exceeded that backlog nor disagreed with its partition series.
    assert all(0 <= total <= backlog and total == parts for total, parts in seen), seen
    # Replayed faces are not timed (their age measures the downtime, not the pipeline).
    assert restarted.value("facematch_time_to_searchable_seconds_count") == 0


# -- a paused member: the backlog held still, so its exact value can be checked -----

class PausingStage(BaseStage):
    """Starts partition `partition` at `start` (as a snapshot would), handles `before_pause` records, pauses."""

    name = "pausing"

    def __init__(self, topic: str, partition: int, start: int, before_pause: int) -> None:
        self.topic, self.partition, self.start, self.before_pause = topic, partition, start, before_pause
        self.handled = 0
        self.paused = False
        self.release = threading.Event()

    def on_assign(self, partitions: list[tuple[str, int]], control: Control) -> dict[tuple[str, int], int]:
        return {(self.topic, self.partition): self.start} if (self.topic, self.partition) in partitions else {}

    def handle(self, batch: Sequence[Incoming]) -> list[Outcome]:
        self.handled += len(batch)
        return [[] for _ in batch]

    def after_batch(self, control: Control) -> None:
        if not self.paused and self.handled >= self.before_pause and not self.release.is_set():
            control.pause(self.topic, self.partition)
            self.paused = True
        elif self.paused and self.release.is_set():
            control.resume(self.topic, self.partition)
            self.paused = False


def test_a_paused_member_reports_the_backlog_from_its_own_position(kafka_bootstrap: str, topics) -> None:
    """The lag is the partition end minus what this member applied, exactly, and the sum agrees.

    The member starts behind the group's committed offset, as a restarted
    indexer resumes from its snapshot's offset: the records in between count.
    """
    topic, partition, records, start, before_pause = topics.photo_events, 2, 40, 10, 5
    producer = Producer(producer_config(KafkaSettings(bootstrap_servers=kafka_bootstrap)))
    for i in range(records):
        producer.produce(topic, value=f"r{i}".encode(), partition=partition)
        producer.poll(0)
    assert producer.flush(30) == 0
    group = f"paused-{uuid.uuid4().hex[:8]}"
    # The group has committed everything (e.g. a previous owner), but this member's state covers only `start`.
    committer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    committer.commit(offsets=[TopicPartition(topic, partition, records)], asynchronous=False)
    committer.close()

    settings = RunnerSettings(batch_size=1, stats_interval_ms=100)
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap, session_timeout_ms=6000, heartbeat_interval_ms=1000)
    metrics = create_metrics()
    stage = PausingStage(topic, partition, start, before_pause)
    runner = Runner(stage, [topic], consumer_config(kafka, group, settings), producer_config(kafka), topics.dlq,
                    settings, metrics, SchemaRegistry.load())
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()

    def lag() -> tuple[float | None, float | None]:
        labels = {"consumergroup": group, "topic": topic}
        return (metrics.registry.get_sample_value("kafka_consumergroup_lag_sum", labels),
                metrics.registry.get_sample_value("kafka_consumergroup_lag", {**labels, "partition": str(partition)}))
    try:
        expected = records - start - before_pause
        wait_for(lambda: lag() == (expected, expected), 60, f"lag {expected} while paused after {before_pause} records")
        assert stage.handled == before_pause and runner.readiness().ok and runner.liveness().ok
        stage.release.set()
        wait_for(lambda: lag() == (0, 0), 60, "lag 0 once resumed and drained")
        assert stage.handled == records - start
    finally:
        runner.stop()
        thread.join(60)
    assert not thread.is_alive()
