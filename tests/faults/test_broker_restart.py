"""Scenario 2: the durable broker (S3 on SeaweedFS) is SIGKILLed mid-ingest and restarted.

Services reconnect by themselves. Ingest calls made while the broker is down
may fail with 5xx (or time out); the test retries those photos once the broker
is back, as a client would, and every photo ends up indexed exactly once.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request
import uuid

import pytest

from pipeline.devbroker import free_port, start_broker
from pipeline.settings import KafkaSettings, TopicSettings
from pipeline.topics import create_topics
from tests.conftest import Stack, stack_env
from tests.faults.common import (
    PHOTOS,
    Corpus,
    Progress,
    budget_s,
    call,
    health_ready,
    ingest,
    ingest_until_accepted,
    scaled,
    verify_exactly_once,
)
from tests.integration.helpers import wait_for

S3_PORT = 8333  # devbroker's SeaweedFS listens on this fixed port


class BridgeProducerFenced(AssertionError):
    """The original bridge never published again after the broker restart."""


def fenced_reason(stack: Stack, exc: AssertionError) -> str:
    """Why the bridge kept refusing photos: the known bug, or re-raise anything else."""
    bridge = next(p for p in stack.procs if p.name == "bridge")
    if "PRODUCER_FENCED" not in bridge.log_path.read_text(errors="replace"):
        raise exc
    return f"{exc}: the bridge answers 503 (PRODUCER_FENCED) to every ingest after the broker restart"


def diagnose(bootstrap: str, topics: TopicSettings, base: str) -> str:
    """Where match requests stand when answers stop: the indexer group's lag and the bridge's health."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topics.prefix}indexer"})
    try:
        parts = [TopicPartition(topics.match_requests, p) for p in range(topics.partitions)]
        committed = consumer.committed(parts, timeout=10)
        lag = {tp.partition: (tp.offset, consumer.get_watermark_offsets(tp, timeout=5)[1]) for tp in committed}
        replies = consumer.get_watermark_offsets(TopicPartition(topics.match_replies, 0), timeout=5)
        consumer.assign([TopicPartition(topics.match_replies, 0, 0)])
        offsets: list[int] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (not offsets or offsets[-1] < replies[1] - 1):
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error():
                offsets.append(msg.offset())
    finally:
        consumer.close()
    readable = f"{len(offsets)} readable by a fresh consumer, last offset {offsets[-1] if offsets else None}"
    return (f"requests (committed, high) {lag}; replies watermarks {replies}, {readable}; "
            f"health {call('GET', base + '/health')}")


def indexer_records(port: int) -> str:
    """The indexer's facematch_records_total lines (ok, expired, dead letters)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError as exc:
        return f"metrics unavailable: {exc}"
    return "; ".join(line for line in text.splitlines() if line.startswith("facematch_records_total"))


def s3_port_free() -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", S3_PORT)) != 0


@pytest.mark.skipif(bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS")),
                    reason="kills the embedded broker; an external KAFKA_BOOTSTRAP_SERVERS cannot be restarted")
@pytest.mark.skipif(os.environ.get("FACEMATCH_FAULT_DURABLE") != "1", reason=(
    "opt-in (FACEMATCH_FAULT_DURABLE=1, set by `make soak`): passes 2 runs in 3 on Tansu 0.6's S3 engine. "
    "In the failing run the indexer keeps answering (replies are on the reply partition, a fresh consumer "
    "reads them) but the bridge's assign()ed reply consumer stops receiving them some minutes after the "
    "broker restart, so matches time out; no photo is lost or duplicated in any run. "
    "tests/integration/test_durable_broker.py and test_bridge_broker_down.py cover restarts in `make test`."))
def test_durable_broker_sigkill_mid_ingest_then_client_retries_lose_nothing(tmp_path, request) -> None:
    # Another durable broker on this machine would own port 8333: wait for it rather than share its bucket.
    wait_for(s3_port_free, 120, f"port {S3_PORT} (SeaweedFS) to be free", 1.0)
    broker = start_broker(durable_dir=tmp_path / "s3", log_path=tmp_path / "broker.log")
    stack = None
    try:
        topics = TopicSettings(prefix=f"d{uuid.uuid4().hex[:8]}.", partitions=6, reply_partitions=1,
                               dlq_partitions=1)
        create_topics(KafkaSettings(bootstrap_servers=broker.bootstrap), topics)
        stack = Stack(broker.bootstrap, topics, tmp_path, stack_env(broker.bootstrap, topics))
        metrics_port = free_port()
        stack.indexer(FACEMATCH_INDEXER_METRICS_PORT=str(metrics_port))
        stack.embedder()
        base = stack.bridge()
        corpus = Corpus(PHOTOS, seed=202)
        progress = Progress()
        refused: list[int] = []

        def client() -> None:
            refused.extend(ingest(base, corpus, range(PHOTOS), workers=4, on_done=progress.record))
        ingesting = threading.Thread(target=client, daemon=True)
        ingesting.start()
        wait_for(lambda: progress.at_least(done=PHOTOS // 3), scaled(60), "a third of the photos sent")
        broker.process.kill()  # SIGKILL: nothing flushed on the way out
        broker.process.wait(10)
        accepted_before_kill = progress.done - progress.failed
        # The broker stays down until clients have seen it: at least one refused photo (or the end).
        wait_for(lambda: progress.at_least(failed=1) or not ingesting.is_alive(), scaled(90),
                 "an ingest call failing while the broker is down")
        broker.restart(hard=True)
        ingesting.join(budget_s(120))
        assert not ingesting.is_alive(), "ingest client hung"
        fenced = ""
        try:
            retried = ingest_until_accepted(base, corpus, refused, scaled(30)) if refused else 0
        except AssertionError as exc:
            fenced = fenced_reason(stack, exc)
            # Keep checking durability through a fresh bridge (what an operator would do), then fail.
            base = stack.bridge("bridge-fresh")
            retried = ingest_until_accepted(base, corpus, refused, scaled(60))

        wait_for(lambda: health_ready(base), scaled(90), "every partition answering after the restart", 0.5)
        verdict = verify_exactly_once(base, corpus, timeout_s=scaled(60))
        print(f"\n[broker] {verdict.line()} accepted_before_kill={accepted_before_kill} "
              f"refused_while_down={len(refused)} retried_calls={retried} broker_kills=1 "
              f"bridge_recovered_by_itself={not fenced}")
        assert verdict.ok, (f"{verdict.examples} diagnosis: {diagnose(broker.bootstrap, topics, base)}; "
                            f"indexer {indexer_records(metrics_port)}")
        if fenced:
            raise BridgeProducerFenced(fenced)
    finally:
        failed = getattr(request.node, "rep_call", None)
        if stack is not None:
            if failed is not None and failed.failed:
                print(stack.logs())
            stack.stop_all()
        broker.stop()
