"""Every Prometheus metric of the pipeline, created in one factory.

Base units (seconds, bytes), `_total` counters, and no ids in labels: an
event_id label would explode cardinality. Tests pass a fresh registry.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)


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
    fetch_seconds: Histogram
    embed_seconds: Histogram
    index_faces: Gauge
    index_events: Gauge
    match_seconds: Histogram
    snapshots: Counter
    replay_records: Counter
    http_requests: Counter
    http_seconds: Histogram
    published: Counter

    def update_lag_from_stats(self, group: str, stats_json: str) -> None:
        """librdkafka statistics -> kafka_consumergroup_lag (fetch watermarks, not ListOffsets)."""
        stats = json.loads(stats_json)
        for topic, tstats in stats.get("topics", {}).items():
            for partition, pstats in tstats.get("partitions", {}).items():
                lag = pstats.get("consumer_lag", -1)
                if partition == "-1" or lag is None or lag < 0:
                    continue
                self.consumer_lag.labels(group, topic, partition).set(lag)

    def forget_partitions(self, group: str, partitions: list[tuple[str, int]]) -> None:
        """Drop the lag series of partitions this member no longer owns (their new owner reports them)."""
        for topic, partition in partitions:
            with contextlib.suppress(KeyError):  # no statistics arrived for it yet
                self.consumer_lag.remove(group, topic, str(partition))


def create_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Create every metric in `registry` (a fresh one by default)."""
    reg = registry or CollectorRegistry()
    return Metrics(
        registry=reg,
        records=Counter("facematch_records_total", "Records handled by a stage",
                        ["stage", "outcome"], registry=reg),
        dead_letters=Counter("facematch_dead_letters_total", "Records sent to the DLQ",
                             ["stage", "reason"], registry=reg),
        retries=Counter("facematch_retries_total", "Transient failures retried",
                        ["stage", "reason"], registry=reg),
        batch_seconds=Histogram("facematch_batch_seconds", "Time to process one polled batch",
                                ["stage"], buckets=LATENCY_BUCKETS, registry=reg),
        consumer_lag=Gauge("kafka_consumergroup_lag", "Records behind the partition end",
                           ["consumergroup", "topic", "partition"], registry=reg),
        assigned_partitions=Gauge("facematch_assigned_partitions", "Partitions this member owns now",
                                  ["stage", "topic"], registry=reg),
        rebalances=Counter("facematch_rebalance_events_total",
                           "Partition assignments, revocations and losses (eviction) of this member",
                           ["stage", "event"], registry=reg),
        faces_embedded=Counter("facematch_faces_embedded_total", "Faces detected and embedded",
                               registry=reg),
        fetch_seconds=Histogram("facematch_image_fetch_seconds", "Image download time",
                                buckets=LATENCY_BUCKETS, registry=reg),
        embed_seconds=Histogram("facematch_embed_batch_seconds", "Model time per batch",
                                buckets=LATENCY_BUCKETS, registry=reg),
        index_faces=Gauge("facematch_index_faces", "Faces held in owned indexes", registry=reg),
        index_events=Gauge("facematch_index_events", "Events held in owned indexes", registry=reg),
        match_seconds=Histogram("facematch_match_seconds", "FAISS search + grouping per query",
                                buckets=LATENCY_BUCKETS, registry=reg),
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
    )


def serve_metrics(metrics: Metrics, port: int) -> None:
    """Expose /metrics on `port` (0 disables)."""
    if port:
        # All interfaces: Prometheus scrapes from another host or container.
        start_http_server(port, addr="0.0.0.0", registry=metrics.registry)  # noqa: S104
        logger.info("metrics on :%d/metrics", port)
