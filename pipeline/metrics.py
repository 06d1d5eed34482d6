"""Every Prometheus metric of the pipeline, created in one factory, and the consumers' probe server.

Base units (seconds, bytes), `_total` counters, and no ids in labels: an
event_id label would explode cardinality. Tests pass a fresh registry.

Consumers serve /metrics, /healthz (alive) and /readyz (ready) on one port
(`serve_metrics`); the bridge serves its own /metrics and /health.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
# From a photo event to its faces being searchable: the embedder's fetch + model
# time dominates, and a backlog stretches it to minutes. 1.5 and 2: the ingest goal (p99 <= 2 s)
# must not fall inside one bucket spanning 1 to 2.5 s.
SEARCHABLE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 2.5, 5, 10, 30, 60, 120, 300, 600)
LAG_SUM = "kafka_consumergroup_lag_sum"


@dataclass(frozen=True)
class Metrics:
    """The metric objects; build with `create_metrics(registry)`."""

    registry: CollectorRegistry
    records: Counter
    dead_letters: Counter
    retries: Counter
    batch_seconds: Histogram
    consumer_lag: Gauge
    assigned_partitions: Gauge
    rebalances: Counter
    faces_embedded: Counter
    faces_rejected: Counter
    fetch_seconds: Histogram
    embed_seconds: Histogram
    index_faces: Gauge
    index_events: Gauge
    match_seconds: Histogram
    direct_queries: Counter
    snapshots: Counter
    replay_records: Counter
    http_requests: Counter
    http_seconds: Histogram
    published: Counter
    time_to_searchable: Histogram
    notifications: Counter
    time_to_notified: Histogram
    # Held while lag series change and while a scrape reads them, so every scrape's
    # lag sum equals the sum of the partition series it shows.
    lag_lock: threading.Lock = field(default_factory=threading.Lock)

    def update_lag_from_stats(self, group: str, stats_json: str) -> None:
        """librdkafka statistics -> kafka_consumergroup_lag (fetch watermarks, not ListOffsets).

        Both lags are the partition end from fetch responses minus a position:
        `consumer_lag_stored` uses the offset this member stored (stored only
        once a record's outputs are acknowledged: what it has applied), and is
        current within one statistics interval; `consumer_lag` uses the
        committed offset, which trails it by the auto-commit interval. The
        committed one is only the fallback before anything is stored since the
        assignment (e.g. right after a restart, when the whole backlog is due).
        """
        stats = json.loads(stats_json)
        lags = {}
        for topic, tstats in stats.get("topics", {}).items():
            for partition, pstats in tstats.get("partitions", {}).items():
                if partition == "-1":
                    continue
                lag = pstats.get("consumer_lag_stored", -1)
                if lag is None or lag < 0:
                    lag = pstats.get("consumer_lag", -1)
                if lag is not None and lag >= 0:
                    lags[(topic, partition)] = lag
        with self.lag_lock:
            for (topic, partition), lag in lags.items():
                self.consumer_lag.labels(group, topic, partition).set(lag)

    def forget_partitions(self, group: str, partitions: list[tuple[str, int]]) -> None:
        """Drop the lag series of partitions this member no longer owns (their new owner reports them)."""
        with self.lag_lock:
            for topic, partition in partitions:
                with contextlib.suppress(KeyError):  # no statistics arrived for it yet
                    self.consumer_lag.remove(group, topic, str(partition))


class LagCollector(Collector):
    """kafka_consumergroup_lag{consumergroup,topic,partition} and its sum per topic, read together.

    kafka_consumergroup_lag_sum{consumergroup,topic} is computed from the
    partition series at scrape time, under the lock their updates take: it
    never drifts from them, and a revoked partition (its series removed by
    `forget_partitions`) leaves the sum in the same scrape.
    """

    def __init__(self, per_partition: Gauge, lock: threading.Lock) -> None:
        self.per_partition, self.lock = per_partition, lock

    def describe(self) -> Iterable[Metric]:
        """The names, so the registry refuses a clash."""
        return [*self.per_partition.describe(), self._sum_family()]

    def collect(self) -> Iterable[Metric]:
        """The partition series, then one sum per group and topic that has any."""
        with self.lock:
            families = list(self.per_partition.collect())
        sums: dict[tuple[str, str], float] = {}
        for family in families:
            for sample in family.samples:
                key = (sample.labels["consumergroup"], sample.labels["topic"])
                sums[key] = sums.get(key, 0.0) + sample.value
        total = self._sum_family()
        for (group, topic), value in sorted(sums.items()):
            total.add_metric([group, topic], value)
        return [*families, total]

    @staticmethod
    def _sum_family() -> GaugeMetricFamily:
        return GaugeMetricFamily(LAG_SUM, "Records behind the partition ends, summed over the partitions "
                                 "this member owns", labels=["consumergroup", "topic"])


def create_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Create every metric in `registry` (a fresh one by default), with process and platform metrics."""
    reg = registry or CollectorRegistry()
    ProcessCollector(registry=reg)  # process_resident_memory_bytes, process_cpu_seconds_total, fds
    PlatformCollector(registry=reg)  # python_info
    metrics = Metrics(
        registry=reg,
        records=Counter("facematch_records_total", "Records handled by a stage",
                        ["stage", "outcome"], registry=reg),
        dead_letters=Counter("facematch_dead_letters_total", "Records sent to the DLQ",
                             ["stage", "reason"], registry=reg),
        retries=Counter("facematch_retries_total", "Transient failures retried",
                        ["stage", "reason"], registry=reg),
        batch_seconds=Histogram("facematch_batch_seconds", "Time to process one polled batch",
                                ["stage"], buckets=LATENCY_BUCKETS, registry=reg),
        # Registered through LagCollector (below), which adds the sum from the same read.
        consumer_lag=Gauge("kafka_consumergroup_lag", "Records behind the partition end",
                           ["consumergroup", "topic", "partition"], registry=None),
        assigned_partitions=Gauge("facematch_assigned_partitions", "Partitions this member owns now",
                                  ["stage", "topic"], registry=reg),
        rebalances=Counter("facematch_rebalance_events_total",
                           "Partition assignments, revocations and losses (eviction) of this member",
                           ["stage", "event"], registry=reg),
        faces_embedded=Counter("facematch_faces_embedded_total", "Faces detected and embedded",
                               registry=reg),
        faces_rejected=Counter("facematch_faces_rejected_total",
                               "Detected faces the quality gate kept out of the index "
                               "(reason: too_small, low_score, too_blurred)", ["reason"], registry=reg),
        fetch_seconds=Histogram("facematch_image_fetch_seconds", "Image download time",
                                buckets=LATENCY_BUCKETS, registry=reg),
        embed_seconds=Histogram("facematch_embed_batch_seconds", "Model time per batch",
                                buckets=LATENCY_BUCKETS, registry=reg),
        index_faces=Gauge("facematch_index_faces", "Faces held in owned indexes", registry=reg),
        index_events=Gauge("facematch_index_events", "Events held in owned indexes", registry=reg),
        match_seconds=Histogram("facematch_match_seconds", "FAISS search + grouping per query",
                                buckets=LATENCY_BUCKETS, registry=reg),
        direct_queries=Counter("facematch_direct_queries_total",
                               "Match queries asked over TCP instead of Kafka (pipeline/direct.py); outcome: "
                               "answered, not_mine (sent through Kafka), failed (bridge: unreachable or late)",
                               ["outcome"], registry=reg),
        snapshots=Counter("facematch_snapshots_total", "Index snapshots written", registry=reg),
        replay_records=Counter("facematch_replay_records_total",
                               "Faces records applied while catching up after assignment",
                               registry=reg),
        http_requests=Counter("facematch_http_requests_total", "HTTP bridge requests",
                              ["route", "status"], registry=reg),
        http_seconds=Histogram("facematch_http_request_seconds", "HTTP bridge latency",
                               ["route"], buckets=LATENCY_BUCKETS, registry=reg),
        published=Counter("facematch_photo_events_published_total",
                          "Photo events published by producers", ["source"], registry=reg),
        time_to_searchable=Histogram(
            "facematch_time_to_searchable_seconds",
            "From a photo event's occurred_at to its faces applied in an index (live records only, "
            "not those replayed after an assignment)", buckets=SEARCHABLE_BUCKETS, registry=reg),
        notifications=Counter("facematch_notifications_total",
                              "Match notifications to enrolled guests, by how (photo: a new photo matched; "
                              "enrol: already indexed at enrolment; withdrawn: tombstoned)", ["kind"], registry=reg),
        time_to_notified=Histogram(
            "facematch_time_to_notified_seconds",
            "From a photo event's occurred_at to its match notification produced (live photos only)",
            buckets=SEARCHABLE_BUCKETS, registry=reg),
    )
    reg.register(LagCollector(metrics.consumer_lag, metrics.lag_lock))
    return metrics


@dataclass(frozen=True)
class Probe:
    """A liveness or readiness answer: ok, and why (the JSON body)."""

    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)


ProbeFn = Callable[[], Probe]


def always_ok() -> Probe:
    """The probe of a process that has nothing to wait for."""
    return Probe(True)


def all_of(*probes: ProbeFn) -> ProbeFn:
    """One probe that is ok when every probe is; details merged."""
    def combined() -> Probe:
        answers = [probe() for probe in probes]
        detail: dict[str, Any] = {}
        for answer in answers:
            detail.update(answer.detail)
        return Probe(all(a.ok for a in answers), detail)
    return combined


class _ProbeHandler(BaseHTTPRequestHandler):
    """GET /metrics, /healthz, /readyz; anything else is a 404."""

    registry: CollectorRegistry
    liveness: ProbeFn
    readiness: ProbeFn

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, encoder(self.registry), content_type)
        elif path in ("/healthz", "/readyz"):
            probe = self.liveness if path == "/healthz" else self.readiness
            try:
                answer = probe()
            except Exception as exc:  # a probe that fails says so instead of dropping the connection
                logger.exception("probe %s failed", path)
                answer = Probe(False, {"error": repr(exc)})
            body = {"status": "ok" if answer.ok else "unavailable", **answer.detail}
            self._send(200 if answer.ok else 503, json.dumps(body).encode(), "application/json")
        else:
            self._send(404, json.dumps({"error": f"no {path}; try /metrics, /healthz, /readyz"}).encode(),
                       "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        """Probes come every few seconds: no access log."""


def serve_metrics(metrics: Metrics, port: int, liveness: ProbeFn = always_ok,
                  readiness: ProbeFn = always_ok, host: str = "0.0.0.0") -> ThreadingHTTPServer | None:  # noqa: S104
    """Serve /metrics, /healthz and /readyz on `port` from a daemon thread (0 disables).

    All interfaces by default: Prometheus and the orchestrator's probes come
    from another host or container. Returns the server (tests shut it down).
    """
    if not port:
        return None
    handler = type("ProbeHandler", (_ProbeHandler,), {
        "registry": metrics.registry, "liveness": staticmethod(liveness), "readiness": staticmethod(readiness)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    logger.info("metrics on :%d/metrics, probes on /healthz and /readyz", port)
    return server
