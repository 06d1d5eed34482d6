"""Lag sum, process metrics and the probe server (/metrics, /healthz, /readyz), without Kafka."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from pipeline.devbroker import free_port
from pipeline.metrics import Metrics, Probe, all_of, create_metrics, serve_metrics
from pipeline.runner import Runner
from pipeline.settings import RunnerSettings

GROUP = "g"


def stats(topic: str, partitions: dict[int, tuple[int, int]]) -> str:
    """librdkafka statistics: partition -> (consumer_lag_stored, consumer_lag)."""
    parts = {str(p): {"consumer_lag_stored": stored, "consumer_lag": committed}
             for p, (stored, committed) in partitions.items()}
    parts["-1"] = {"consumer_lag_stored": -1, "consumer_lag": -1}  # librdkafka's internal UA partition
    return json.dumps({"topics": {topic: {"partitions": parts}}})


def lag(metrics: Metrics, topic: str, partition: int | None = None) -> float | None:
    if partition is None:
        return metrics.registry.get_sample_value("kafka_consumergroup_lag_sum",
                                                 {"consumergroup": GROUP, "topic": topic})
    return metrics.registry.get_sample_value("kafka_consumergroup_lag",
                                             {"consumergroup": GROUP, "topic": topic, "partition": str(partition)})


def test_lag_sum_follows_the_partition_series_through_revokes() -> None:
    metrics = create_metrics()
    assert lag(metrics, "faces") is None  # no series before statistics arrive
    metrics.update_lag_from_stats(GROUP, stats("faces", {0: (3, 10), 1: (-1, 4), 2: (-1, -1)}))
    metrics.update_lag_from_stats(GROUP, stats("requests", {0: (1, 1)}))
    # Stored (applied) offsets win; the committed lag only before anything is stored; unknown is skipped.
    assert [lag(metrics, "faces", p) for p in (0, 1, 2)] == [3, 4, None]
    assert lag(metrics, "faces") == 7 and lag(metrics, "requests") == 1
    metrics.forget_partitions(GROUP, [("faces", 1), ("faces", 5)])  # 5: never reported
    assert lag(metrics, "faces") == 3
    metrics.forget_partitions(GROUP, [("faces", 0)])
    assert lag(metrics, "faces") is None and lag(metrics, "requests") == 1


def test_process_and_platform_metrics_are_in_every_registry() -> None:
    registry = create_metrics().registry
    assert (registry.get_sample_value("process_resident_memory_bytes") or 0) > 0
    assert registry.get_sample_value("process_cpu_seconds_total") is not None
    names = {family.name for family in registry.collect()}
    assert "python_info" in names
    create_metrics()  # a second registry: no clash with the first


@pytest.fixture
def server_port() -> Iterator[tuple[Metrics, int, dict[str, Probe]]]:
    metrics = create_metrics()
    answers = {"live": Probe(True, {"running": True}), "ready": Probe(False, {"assigned": []})}
    port = free_port()
    server = serve_metrics(metrics, port, lambda: answers["live"],
                           all_of(lambda: answers["ready"], lambda: Probe(True, {"replaying": []})),
                           host="127.0.0.1")
    assert server is not None
    try:
        yield metrics, port, answers
    finally:
        server.shutdown()
        server.server_close()


def get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_probe_server_serves_metrics_and_both_probes(server_port: tuple[Metrics, int, dict[str, Probe]]) -> None:
    metrics, port, answers = server_port
    metrics.snapshots.inc()
    status, content_type, body = get(port, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    assert b"facematch_snapshots_total 1.0" in body and b"process_resident_memory_bytes" in body
    status, content_type, body = get(port, "/healthz")
    assert (status, content_type, json.loads(body)) == (200, "application/json", {"status": "ok", "running": True})
    status, _, body = get(port, "/readyz")
    assert status == 503 and json.loads(body) == {"status": "unavailable", "assigned": [], "replaying": []}
    answers["ready"] = Probe(True, {"assigned": ["faces[0]"]})
    assert get(port, "/readyz")[0] == 200
    assert get(port, "/nothing")[0] == 404


def test_a_failing_probe_is_a_503_not_a_dropped_connection(server_port: tuple[Metrics, int, dict[str, Probe]]) -> None:
    metrics, port, answers = server_port
    answers.clear()  # the probes now raise KeyError
    status, _, body = get(port, "/healthz")
    assert status == 503 and "KeyError" in json.loads(body)["error"]


def test_serve_metrics_port_zero_serves_nothing() -> None:
    assert serve_metrics(create_metrics(), 0) is None


def test_a_runner_is_neither_alive_nor_ready_before_it_runs() -> None:
    from pipeline.stage_api import BaseStage

    runner = Runner(BaseStage(), ["t"], {"bootstrap.servers": "127.0.0.1:1", "group.id": GROUP},
                    {"bootstrap.servers": "127.0.0.1:1"}, "dlq", RunnerSettings(), create_metrics(), None)  # type: ignore[arg-type]
    try:
        assert runner.liveness_timeout_s == RunnerSettings().max_poll_interval_ms / 1000
        live, ready = runner.liveness(), runner.readiness()
        assert not live.ok and live.detail["running"] is False
        assert not ready.ok and ready.detail["assigned"] == [] and ready.detail["stage"] == "stage"
    finally:
        runner.consumer.close()
