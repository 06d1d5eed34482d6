"""JSON log lines and the periodic summaries' math, on plain registries (no Kafka, no clock)."""

from __future__ import annotations

import json
import logging
import math

import pytest
from prometheus_client import CollectorRegistry

from pipeline.logs import JsonFormatter, setup_logging
from pipeline.metrics import create_metrics
from pipeline.summary import (
    SummaryLogger,
    bucket_deltas,
    counter_delta,
    format_summary,
    quantile,
    summary_fields,
    take_snapshot,
)


def test_quantile_interpolates_inside_the_bucket_like_promql() -> None:
    # 10 observations: 4 in (0, 1], 4 in (1, 2], 2 in (2, 5]
    buckets = [(1.0, 4.0), (2.0, 8.0), (5.0, 10.0), (math.inf, 10.0)]
    assert quantile(buckets, 0.5) == pytest.approx(1.25)  # rank 5: a quarter into (1, 2]
    assert quantile(buckets, 0.2) == pytest.approx(0.5)
    assert quantile(buckets, 0.99) == pytest.approx(2 + 3 * (9.9 - 8) / 2)
    assert quantile(buckets, 1.0) == pytest.approx(5.0)


def test_quantile_of_nothing_is_none_and_the_inf_bucket_answers_the_largest_bound() -> None:
    assert quantile([], 0.5) is None
    assert quantile([(1.0, 0.0), (math.inf, 0.0)], 0.5) is None
    assert quantile([(1.0, 0.0), (2.0, 1.0), (math.inf, 10.0)], 0.99) == 2.0
    assert quantile([(1.0, 0.0), (2.0, 0.0), (math.inf, 3.0)], 0.5) == 2.0


def test_percentiles_come_from_the_bucket_deltas_of_the_interval_only() -> None:
    metrics = create_metrics(CollectorRegistry())
    for _ in range(100):
        metrics.match_seconds.observe(0.5)  # slow history before the interval
    before = take_snapshot(metrics.registry)
    for _ in range(99):
        metrics.match_seconds.observe(0.0015)
    metrics.match_seconds.observe(0.04)
    after = take_snapshot(metrics.registry)
    buckets = bucket_deltas(before, after, "facematch_match_seconds")
    assert buckets[-1] == (math.inf, 100.0)
    p50 = quantile(buckets, 0.5)
    assert p50 is not None and 0.001 < p50 <= 0.002  # the 0.5 s history does not leak in
    p99 = quantile(buckets, 0.99)
    assert p99 is not None and p99 <= 0.002
    assert quantile(buckets, 0.999) == pytest.approx(0.02 + 0.03 * 0.9)


def test_counter_delta_sums_matching_labels_and_survives_a_reset() -> None:
    key_ok = ("facematch_records_total", (("outcome", "ok"), ("stage", "embedder")))
    key_dlq = ("facematch_records_total", (("outcome", "dead_letter"), ("stage", "embedder")))
    key_other = ("facematch_records_total", (("outcome", "ok"), ("stage", "indexer")))
    before = {key_ok: 10.0, key_dlq: 1.0, key_other: 500.0}
    after = {key_ok: 25.0, key_dlq: 3.0, key_other: 900.0}
    assert counter_delta(before, after, "facematch_records_total", stage="embedder") == 17.0
    assert counter_delta(before, after, "facematch_records_total", stage="embedder", outcome="ok") == 15.0
    assert counter_delta({key_ok: 40.0}, {key_ok: 5.0}, "facematch_records_total") == 5.0  # restarted
    assert counter_delta({}, {}, "facematch_records_total") == 0.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_embedder_summary_has_rates_percentiles_dead_letters_and_memory(caplog: pytest.LogCaptureFixture) -> None:
    metrics, clock = create_metrics(CollectorRegistry()), FakeClock()
    summaries = SummaryLogger("embedder", metrics.registry, 10, clock=clock)
    metrics.records.labels("embedder", "ok").inc(18)
    metrics.records.labels("embedder", "dead_letter").inc(2)
    metrics.dead_letters.labels("embedder", "fetch_http_404").inc(2)
    metrics.faces_embedded.inc(50)
    for _ in range(20):
        metrics.fetch_seconds.observe(0.015)
        metrics.embed_seconds.observe(0.15)
    clock.now += 10
    with caplog.at_level(logging.INFO, logger="pipeline.summary"):
        fields = summaries.tick()
    assert fields["summary"] == "embedder" and fields["interval_s"] == 10
    assert fields["photos_per_s"] == 2.0 and fields["faces_per_s"] == 5.0
    assert 10 < fields["fetch_p50_ms"] <= 20 and 10 < fields["fetch_p99_ms"] <= 20
    assert 100 < fields["embed_p50_ms"] <= 200
    assert fields["dead_letters"] == 2
    assert fields["rss_mb"] > 10  # this test process's resident memory
    line = caplog.records[-1]
    assert line.getMessage().startswith("summary embedder interval_s=10.0 photos_per_s=2.0 faces_per_s=5.0 ")
    assert line.fields == fields  # type: ignore[attr-defined]
    # The next interval starts where this one ended.
    clock.now += 10
    again = summaries.tick()
    assert again["photos_per_s"] == 0.0 and again["fetch_p50_ms"] is None and again["dead_letters"] == 0


def test_indexer_summary_separates_faces_from_matches() -> None:
    metrics = create_metrics(CollectorRegistry())
    before = take_snapshot(metrics.registry)
    metrics.records.labels("indexer", "ok").inc(130)  # 100 faces records + 30 answered/expired requests
    metrics.records.labels("indexer", "expired").inc(2)
    for _ in range(28):
        metrics.match_seconds.observe(0.0008)
    metrics.index_faces.set(1234)
    metrics.index_events.set(7)
    metrics.dead_letters.labels("indexer", "wrong_partition").inc()
    fields = summary_fields("indexer", "indexer", before, take_snapshot(metrics.registry), 4.0, 2**30)
    assert fields["faces_applied_per_s"] == 25.0 and fields["matches_per_s"] == 7.0
    assert 0 < fields["search_p50_ms"] <= 1 and fields["expired_requests"] == 2
    assert (fields["index_faces"], fields["index_events"], fields["dead_letters"]) == (1234, 7, 1)
    assert fields["rss_mb"] == 1024.0


def test_indexer_summary_counts_direct_queries_as_matches_but_not_as_settled_records() -> None:
    metrics = create_metrics(CollectorRegistry())
    before = take_snapshot(metrics.registry)
    metrics.records.labels("indexer", "ok").inc(6)  # 6 faces records, no request through Kafka
    for _ in range(13):  # answered directly: searched, never settled by the runner
        metrics.match_seconds.observe(0.0005)
        metrics.direct_queries.labels("answered").inc()
    metrics.direct_queries.labels("not_mine").inc(3)
    fields = summary_fields("indexer", "indexer", before, take_snapshot(metrics.registry), 1.0, 2**30)
    assert fields["faces_applied_per_s"] == 6.0 and fields["matches_per_s"] == 13.0


def test_bridge_summary_by_route_with_error_classes_and_api_latency_only() -> None:
    metrics = create_metrics(CollectorRegistry())
    before = take_snapshot(metrics.registry)
    for status, count in (("200", 16), ("422", 3), ("504", 1)):
        metrics.http_requests.labels("/api/v2/match", status).inc(count)
    metrics.http_requests.labels("/health", "200").inc(10)
    metrics.http_requests.labels("/api/v2/ingest", "503").inc(2)
    for _ in range(20):
        metrics.http_seconds.labels("/api/v2/match").observe(0.004)
        metrics.http_seconds.labels("/health").observe(1.5)  # slow probes are not request latency
    fields = summary_fields("bridge", "bridge", before, take_snapshot(metrics.registry), 2.0, 0)
    assert fields["requests_per_s"] == {"/api/v2/ingest": 1.0, "/api/v2/match": 10.0, "/health": 5.0}
    assert 2 < fields["latency_p50_ms"] <= 5 and fields["latency_p99_ms"] <= 5
    assert (fields["http_4xx"], fields["http_5xx"]) == (3, 3)
    text = format_summary(fields)
    assert "requests_per_s=/api/v2/ingest:1.0,/api/v2/match:10.0,/health:5.0" in text
    assert "http_4xx=3 http_5xx=3" in text


def test_unknown_summary_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="no summary"):
        SummaryLogger("mystery", CollectorRegistry(), 1)


def test_json_lines_carry_ts_level_logger_msg_pid_exception_and_fields() -> None:
    formatter = JsonFormatter()
    try:
        raise RuntimeError("broker gone")
    except RuntimeError:
        import sys
        record = logging.LogRecord("pipeline.runner", logging.ERROR, __file__, 1, "batch %d failed: %s",
                                   (7, "ünïcode \"quoted\"\nnewline"), sys.exc_info())
    line = formatter.format(record)
    assert "\n" not in line  # one object per line, even with newlines in the message and traceback
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["logger"] == "pipeline.runner"
    assert entry["msg"] == "batch 7 failed: ünïcode \"quoted\"\nnewline"
    assert isinstance(entry["pid"], int) and entry["ts"].endswith("+00:00")
    assert "RuntimeError: broker gone" in entry["exc"]
    summary = logging.LogRecord("pipeline.summary", logging.INFO, __file__, 1, "summary x", (), None)
    summary.fields = {"summary": "indexer", "matches_per_s": 3.5, "msg": "not overwritten"}
    entry = json.loads(formatter.format(summary))
    assert entry["summary"] == "indexer" and entry["matches_per_s"] == 3.5 and entry["msg"] == "summary x"


def test_setup_logging_switches_format_and_refuses_unknown_ones() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("debug", "json")
        assert isinstance(root.handlers[0].formatter, JsonFormatter) and root.level == logging.DEBUG
        setup_logging(None, None)
        assert not isinstance(root.handlers[0].formatter, JsonFormatter) and root.level == logging.INFO
        with pytest.raises(ValueError, match="json"):
            setup_logging("INFO", "xml")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
