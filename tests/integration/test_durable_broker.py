"""Durable mode: the broker's storage (S3 on SeaweedFS) survives a broker SIGKILL; the pipeline carries on."""

from __future__ import annotations

import os

import pytest

from pipeline.devbroker import start_broker
from pipeline.settings import KafkaSettings, TopicSettings
from pipeline.topics import create_topics
from tests.conftest import Stack, stack_env
from tests.integration.helpers import http, match, unit_vectors, wait_for, wait_index_size

DIM = 512


@pytest.mark.skipif(bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS")),
                    reason="restarts the embedded broker; an external KAFKA_BOOTSTRAP_SERVERS cannot be restarted")
def test_pipeline_survives_a_broker_kill_in_durable_mode(tmp_path) -> None:
    broker = start_broker(durable_dir=tmp_path / "s3", log_path=tmp_path / "broker.log")
    stack = None
    try:
        topics = TopicSettings(prefix="dur.", partitions=3, reply_partitions=1, dlq_partitions=1)
        create_topics(KafkaSettings(bootstrap_servers=broker.bootstrap), topics)
        stack = Stack(broker.bootstrap, topics, tmp_path, stack_env(broker.bootstrap, topics))
        stack.indexer()
        stack.embedder()
        base = stack.bridge()
        vectors = unit_vectors(30, DIM, seed=9)
        for i in range(20):
            body = {"event_id": "DUR", "photo_id": f"p{i}", "embedding": vectors[i].tolist()}
            assert http("POST", f"{base}/api/v2/ingest", body)[0] == 202
        wait_index_size(base, "DUR", vectors[0], 20)

        broker.restart(hard=True)  # SIGKILL: nothing flushed on the way out

        def ingest_after_restart() -> bool:
            body = {"event_id": "DUR", "photo_id": "p20", "embedding": vectors[20].tolist()}
            return http("POST", f"{base}/api/v2/ingest", body)[0] == 202
        wait_for(ingest_after_restart, 60, "the bridge publishing again after the broker restart")
        wait_index_size(base, "DUR", vectors[0], 21, timeout_s=90)
        # A fresh indexer (no snapshot) rebuilds everything from the broker's durable log.
        stack.procs[0].stop()
        stack.indexer("indexer-fresh", state_dir=tmp_path / "fresh-state")
        wait_for(lambda: http("GET", f"{base}/health")[1].get("ready"), 90, "fresh indexer ready")
        for i in range(21):
            assert match(base, "DUR", vectors[i])[1]["matches"][0]["photo_id"] == f"p{i}"
    finally:
        if stack is not None:
            stack.stop_all()
        broker.stop()
