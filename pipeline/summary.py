"""Periodic INFO summaries per stage, computed from the service's own Prometheus registry.

Every interval a daemon thread snapshots the registry and logs one line with
rates and latency percentiles since the previous snapshot (as FaceMatch v2's
operators read them from its logs), plus the process's resident memory. The
math (counter deltas, histogram quantiles from bucket deltas) is pure and works
on plain snapshots, so it is tested without Kafka or a clock.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)

LabelSet = tuple[tuple[str, str], ...]
# (sample name, sorted labels) -> value, e.g. ("facematch_records_total", (("outcome", "ok"), ("stage", "embedder")))
Snapshot = Mapping[tuple[str, LabelSet], float]
Where = Callable[[dict[str, str]], bool]
Fields = dict[str, Any]
# Routes that are not traffic: health checks and scrapes would drown the latency of real requests.
HOUSEKEEPING_ROUTES = frozenset({"/health", "/metrics", "unmatched"})


def take_snapshot(registry: CollectorRegistry) -> dict[tuple[str, LabelSet], float]:
    """Every sample of the registry (counters, gauges, histogram buckets), keyed by name and labels."""
    samples: dict[tuple[str, LabelSet], float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def _matching(snapshot: Snapshot, name: str, where: Where | None,
              labels: Mapping[str, str]) -> dict[LabelSet, float]:
    found: dict[LabelSet, float] = {}
    for (sample_name, label_set), value in snapshot.items():
        if sample_name != name:
            continue
        as_dict = dict(label_set)
        if any(as_dict.get(k) != v for k, v in labels.items()):
            continue
        if where is not None and not where(as_dict):
            continue
        found[label_set] = value
    return found


def counter_delta(before: Snapshot, after: Snapshot, name: str, where: Where | None = None,
                  **labels: str) -> float:
    """Increase of a counter (summed over the label sets that match) between two snapshots.

    A series that went down was reset (a process restart): its whole new value is the increase.
    """
    old = _matching(before, name, where, labels)
    total = 0.0
    for label_set, value in _matching(after, name, where, labels).items():
        previous = old.get(label_set, 0.0)
        total += value - previous if value >= previous else value
    return total


def gauge_value(snapshot: Snapshot, name: str, **labels: str) -> float:
    """Current value of a gauge, summed over the label sets that match (0 when absent)."""
    return sum(_matching(snapshot, name, None, labels).values())


def bucket_deltas(before: Snapshot, after: Snapshot, name: str, where: Where | None = None,
                  **labels: str) -> list[tuple[float, float]]:
    """Cumulative bucket counts observed between two snapshots: [(upper bound, count)], ascending.

    `name` is the histogram's base name; series with other labels than `le` are summed.
    """
    bucket = f"{name}_bucket"
    totals: dict[float, float] = {}

    def without_le(label_set: LabelSet) -> LabelSet:
        return tuple(item for item in label_set if item[0] != "le")

    old = {(without_le(ls), dict(ls)["le"]): v for ls, v in _matching(before, bucket, where, labels).items()}
    for label_set, value in _matching(after, bucket, where, labels).items():
        le = dict(label_set)["le"]
        previous = old.get((without_le(label_set), le), 0.0)
        bound = math.inf if le == "+Inf" else float(le)
        totals[bound] = totals.get(bound, 0.0) + (value - previous if value >= previous else value)
    return sorted(totals.items())


def quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """The q-quantile of cumulative buckets, interpolated linearly inside its bucket (as PromQL does).

    None when nothing was observed. A rank in the +Inf bucket answers the largest finite bound.
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank and count > below:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        if not math.isinf(upper):
            lower = upper
        below = count
    return lower


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _rate(count: float, interval_s: float) -> float:
    return round(count / interval_s, 2) if interval_s > 0 else 0.0


def _percentiles(before: Snapshot, after: Snapshot, name: str, prefix: str, where: Where | None = None,
                 **labels: str) -> Fields:
    buckets = bucket_deltas(before, after, name, where, **labels)
    return {f"{prefix}_p50_ms": _ms(quantile(buckets, 0.5)), f"{prefix}_p99_ms": _ms(quantile(buckets, 0.99))}


def embedder_fields(before: Snapshot, after: Snapshot, interval_s: float) -> Fields:
    """photos/s, faces/s, fetch and embed time p50/p99, dead letters."""
    photos = counter_delta(before, after, "facematch_records_total", stage="embedder")
    faces = counter_delta(before, after, "facematch_faces_embedded_total")
    return {"photos_per_s": _rate(photos, interval_s), "faces_per_s": _rate(faces, interval_s),
            **_percentiles(before, after, "facematch_image_fetch_seconds", "fetch"),
            **_percentiles(before, after, "facematch_embed_batch_seconds", "embed"),
            "dead_letters": int(counter_delta(before, after, "facematch_dead_letters_total", stage="embedder"))}


def indexer_fields(before: Snapshot, after: Snapshot, interval_s: float) -> Fields:
    """faces applied/s, matches/s, search time p50/p99, index faces/events, dead letters."""
    matches = counter_delta(before, after, "facematch_match_seconds_count")
    expired = counter_delta(before, after, "facematch_records_total", stage="indexer", outcome="expired")
    # Direct queries (pipeline/direct.py) are searched too, but never settled as records.
    direct = counter_delta(before, after, "facematch_direct_queries_total", outcome="answered")
    # The runner counts every record it settles: faces records, answered and expired requests.
    settled = counter_delta(before, after, "facematch_records_total", stage="indexer",
                            where=lambda labels: labels.get("outcome") != "expired")
    faces = max(settled - (matches - direct) - expired, 0.0)
    return {"faces_applied_per_s": _rate(faces, interval_s), "matches_per_s": _rate(matches, interval_s),
            **_percentiles(before, after, "facematch_match_seconds", "search"),
            "expired_requests": int(expired),
            "index_faces": int(gauge_value(after, "facematch_index_faces")),
            "index_events": int(gauge_value(after, "facematch_index_events")),
            "dead_letters": int(counter_delta(before, after, "facematch_dead_letters_total", stage="indexer"))}


def bridge_fields(before: Snapshot, after: Snapshot, interval_s: float) -> Fields:
    """requests/s by route, latency p50/p99 (API routes), 4xx and 5xx counts."""
    routes = {dict(ls).get("route", "") for (name, ls) in after if name == "facematch_http_requests_total"}
    by_route = {route: _rate(counter_delta(before, after, "facematch_http_requests_total", route=route),
                             interval_s) for route in sorted(routes)}

    def status_class(digit: str) -> float:
        return counter_delta(before, after, "facematch_http_requests_total",
                             where=lambda labels: labels.get("status", "").startswith(digit))

    return {"requests_per_s": {route: rate for route, rate in by_route.items() if rate > 0},
            **_percentiles(before, after, "facematch_http_request_seconds", "latency",
                           where=lambda labels: labels.get("route") not in HOUSEKEEPING_ROUTES),
            "http_4xx": int(status_class("4")), "http_5xx": int(status_class("5"))}


def producer_fields(before: Snapshot, after: Snapshot, interval_s: float) -> Fields:
    """photo events published/s and dead letters (Firestore listener, poll worker)."""
    published = counter_delta(before, after, "facematch_photo_events_published_total")
    return {"published_per_s": _rate(published, interval_s),
            "dead_letters": int(counter_delta(before, after, "facematch_dead_letters_total"))}


STAGE_FIELDS: dict[str, Callable[[Snapshot, Snapshot, float], Fields]] = {
    "embedder": embedder_fields, "indexer": indexer_fields, "bridge": bridge_fields, "producer": producer_fields}


def rss_bytes() -> int:
    """Resident memory of this process now (/proc); elsewhere the peak, which is what getrusage knows."""
    statm = Path("/proc/self/statm")
    try:
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kB on Linux


def summary_fields(stage: str, kind: str, before: Snapshot, after: Snapshot, interval_s: float,
                   rss: int) -> Fields:
    """The summary of one interval: the stage's own fields, then memory."""
    return {"summary": stage, "interval_s": round(interval_s, 1),
            **STAGE_FIELDS[kind](before, after, interval_s), "rss_mb": round(rss / 2**20, 1)}


def format_summary(fields: Fields) -> str:
    """`summary <stage> key=value ...` (dicts as route:value,...; missing percentiles as -)."""
    parts = [f"summary {fields['summary']}"]
    for key, value in fields.items():
        if key == "summary":
            continue
        if isinstance(value, dict):
            value = ",".join(f"{k}:{v}" for k, v in value.items()) or "-"
        elif value is None:
            value = "-"
        parts.append(f"{key}={value}")
    return " ".join(parts)


class SummaryLogger:
    """Logs one summary line per interval from a registry, on a daemon thread."""

    def __init__(self, stage: str, registry: CollectorRegistry, interval_s: float, kind: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stage, self.registry, self.interval_s = stage, registry, interval_s
        self.kind = kind or stage
        if self.kind not in STAGE_FIELDS:
            raise ValueError(f"no summary for stage kind {self.kind!r}; known: {sorted(STAGE_FIELDS)}")
        self.clock = clock
        self._before = take_snapshot(registry)
        self._since = clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"summary-{stage}", daemon=True)

    def tick(self) -> Fields:
        """Log the summary since the last tick (or construction) and start a new interval."""
        after, now = take_snapshot(self.registry), self.clock()
        fields = summary_fields(self.stage, self.kind, self._before, after, now - self._since, rss_bytes())
        self._before, self._since = after, now
        logger.info("%s", format_summary(fields), extra={"fields": fields})
        return fields

    def start(self) -> SummaryLogger:
        """Start the thread; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (it is a daemon: a process may also just exit)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:  # a summary must never take the service down
                logger.warning("summary %s failed", self.stage, exc_info=True)


def start_summaries(stage: str, registry: CollectorRegistry, interval_s: float,
                    kind: str | None = None) -> SummaryLogger | None:
    """Start periodic summaries (main() passes LogSettings().log_summary_interval_s; 0 disables)."""
    if interval_s <= 0:
        return None
    return SummaryLogger(stage, registry, interval_s, kind).start()
