"""Ingest rate of precomputed embeddings to searchable, and time-to-searchable, in one run.

Pipeline: bridge + embedder (FACEMATCH_MODEL=none: precomputed faces only) + indexer(s).
Two ways in, each timed from the first record sent until every face is searchable
(the sum of the events' `index_size` in match replies reaches the total):
  1. direct: a confluent-kafka producer writes photo events to the photo-events topic, as a
     burst (throughput; its time-to-searchable is mostly the wait behind the backlog) and as a
     steady stream at --steady-rate faces/s for --steady-s seconds (time-to-searchable at that load);
  2. http: C client threads POST /api/v2/ingest with one `embedding` each (keep-alive), and
     --batch-clients threads POST /api/v2/ingest/batch with --http-batch photos each.
Baseline: the bare produce rate of the same records into a fresh topic (no pipeline).
Time-to-searchable p50/p99 come from the indexers' facematch_time_to_searchable_seconds
histogram (photo event occurred_at -> faces applied), interpolated inside its buckets
like Prometheus' histogram_quantile; the `_sum/_count` mean is exact.
Goal: >= 5,000 faces/s on 2 cores, p99 <= 2 s.

    .venv/bin/python bench/ingest_rate.py [--faces 20000] [--http-faces 3000] [--dim 128]
        [--events 8] [--clients 16] [--http-batch 250] [--batch-clients 4] [--steady-rate 5000]
        [--steady-s 20] [--out bench/results/ingest_rate.json]

Sizes also come from BENCH_INGEST_FACES (also the batch POSTs' faces), BENCH_INGEST_HTTP_FACES, BENCH_DIM,
BENCH_EVENTS, BENCH_CLIENTS, BENCH_HTTP_BATCH, BENCH_BATCH_CLIENTS, BENCH_STEADY_RATE and BENCH_STEADY_S.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer

REPO = Path(__file__).resolve().parent.parent
GOAL_FACES_PER_S = 5000  # the goal on 2 cores; also the steady stream's default rate
GOAL_P99_S = 2.0  # time-to-searchable p99; a steady stream that drains slower fell behind
sys.path.insert(0, str(REPO))

from pipeline.devbroker import free_port, start_broker  # noqa: E402
from pipeline.records import PhotoEvent, PrecomputedFace  # noqa: E402
from pipeline.serde import PHOTO_EVENT, SchemaRegistry  # noqa: E402
from pipeline.settings import KafkaSettings, TopicSettings  # noqa: E402
from pipeline.stack import ServiceProcess, spawn, wait_ready  # noqa: E402
from pipeline.topics import create_topics  # noqa: E402

HISTOGRAM = "facematch_time_to_searchable_seconds"


@dataclass
class Stack:
    """A running bridge + embedder + indexers on fresh topics."""

    bootstrap: str
    topics: TopicSettings
    port: int
    dim: int
    indexer_ports: list[int]
    procs: list[ServiceProcess] = field(default_factory=list)


@contextmanager
def pipeline_stack(bootstrap: str, workdir: Path, dim: int, indexers: int = 1,
                   partitions: int = 12) -> Iterator[Stack]:
    """Start the services, wait until every indexer owns partitions and the bridge is ready."""
    topics = TopicSettings(prefix=f"ir{uuid.uuid4().hex[:6]}.", partitions=partitions)
    create_topics(KafkaSettings(bootstrap_servers=bootstrap), topics)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
           "FACEMATCH_TOPIC_PREFIX": topics.prefix, "FACEMATCH_MODEL": "none",
           "FACEMATCH_EMBEDDING_DIM": str(dim), "FACEMATCH_HTTP_PORT": str(port),
           "FACEMATCH_INDEXER_GROUP": f"{topics.prefix}indexer", "FACEMATCH_EMBEDDER_GROUP": f"{topics.prefix}emb",
           "FACEMATCH_KAFKA_SESSION_TIMEOUT_MS": "6000", "FACEMATCH_LOG_LEVEL": "WARNING"}
    stack = Stack(bootstrap, topics, port, dim, [free_port() for _ in range(indexers)])
    try:
        for i, metrics_port in enumerate(stack.indexer_ports):
            stack.procs.append(spawn(f"indexer{i}", "pipeline.indexer",
                                     {**env, "FACEMATCH_INDEXER_METRICS_PORT": str(metrics_port),
                                      "FACEMATCH_INDEXER_STATE_DIR": str(workdir / f"state{i}")}, workdir))
        stack.procs.append(spawn("embedder", "pipeline.embedder", env, workdir))
        stack.procs.append(spawn("bridge", "pipeline.matcher", env, workdir))
        wait_ready(f"http://127.0.0.1:{port}", 120, stack.procs)
        for metrics_port in stack.indexer_ports:  # each owns partitions and has replayed them
            _wait_200(f"http://127.0.0.1:{metrics_port}/readyz", 120)
        wait_ready(f"http://127.0.0.1:{port}", 120, stack.procs)
        yield stack
    finally:
        for proc in stack.procs:
            proc.stop()


def _wait_200(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 (our own loopback service)
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} never answered 200")


def vectors(count: int, dim: int, seed: int) -> np.ndarray:
    """Random unit vectors (float32)."""
    data = np.random.default_rng(seed).normal(size=(count, dim)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    return data


def index_sizes(port: int, events: list[str], dim: int) -> dict[str, int]:
    """index_size of each event, from one match request per event."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    probe = json.dumps({"user_embedding": [1.0] + [0.0] * (dim - 1), "top_k": 1})[1:]
    sizes = {}
    try:
        for event in events:
            conn.request("POST", "/api/v2/match", f'{{"event_id": "{event}", {probe}',
                         {"Content-Type": "application/json"})
            sizes[event] = int(json.loads(conn.getresponse().read()).get("index_size") or 0)
    finally:
        conn.close()
    return sizes


def wait_searchable(stack: Stack, expected: dict[str, int], timeout_s: float = 600) -> float:
    """Block until every event's index holds its expected faces; returns time.perf_counter() then.

    Asks only the events still short, every 50 ms: the probes are load on the bridge and the
    indexer being measured (every 20 ms over all events, they were 400 matches/s).
    """
    deadline = time.monotonic() + timeout_s
    waiting = dict(expected)
    while time.monotonic() < deadline:
        sizes = index_sizes(stack.port, list(waiting), stack.dim)
        waiting = {e: n for e, n in waiting.items() if sizes[e] < n}
        if not waiting:
            return time.perf_counter()
        time.sleep(0.05)
    raise TimeoutError(f"not searchable in {timeout_s}s: {waiting} still short")


def histogram(ports: list[int]) -> dict[str, Any]:
    """The indexers' time-to-searchable histograms, summed: bucket counts, sum, count."""
    buckets: dict[float, float] = {}
    total_sum = total_count = 0.0
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:  # noqa: S310
            text = response.read().decode()
        for line in text.splitlines():
            if line.startswith(f"{HISTOGRAM}_bucket"):
                le = line.split('le="')[1].split('"')[0]
                bound = float("inf") if le == "+Inf" else float(le)
                buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
            elif line.startswith(f"{HISTOGRAM}_sum"):
                total_sum += float(line.rsplit(" ", 1)[1])
            elif line.startswith(f"{HISTOGRAM}_count"):
                total_count += float(line.rsplit(" ", 1)[1])
    return {"buckets": sorted(buckets.items()), "sum": total_sum, "count": total_count}


def searchable_stats(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """p50/p99 (bucket-interpolated) and exact mean of the observations between two scrapes."""
    old = dict(before["buckets"])
    cumulative = [(bound, count - old.get(bound, 0.0)) for bound, count in after["buckets"]]
    count = after["count"] - before["count"]
    out = {"observations": count,
           "mean_s": (after["sum"] - before["sum"]) / count if count else float("nan")}
    for q in (0.5, 0.99):
        out[f"p{int(q * 100)}_s"] = _quantile(q, cumulative)
    return out


def _quantile(q: float, cumulative: list[tuple[float, float]]) -> float:
    """Prometheus histogram_quantile: linear inside the bucket that holds the q-th observation."""
    if not cumulative or cumulative[-1][1] == 0:
        return float("nan")
    rank = q * cumulative[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-9)
        lower_bound, lower_count = bound, count
    return lower_bound


def event_ids(tag: str, events: int) -> list[str]:
    return [f"{tag}{i}" for i in range(events)]


def bare_produce(bootstrap: str, faces: np.ndarray, events: list[str]) -> dict[str, float]:
    """The baseline: the same photo events, encoded and produced to a fresh topic, acked."""
    topics = TopicSettings(prefix=f"bp{uuid.uuid4().hex[:6]}.", partitions=12)
    create_topics(KafkaSettings(bootstrap_servers=bootstrap), topics)
    started = time.perf_counter()
    produce_events(bootstrap, topics.photo_events, faces, events, "bare")
    elapsed = time.perf_counter() - started
    return {"faces": len(faces), "seconds": elapsed, "faces_per_s": len(faces) / elapsed}


def produce_events(bootstrap: str, topic: str, faces: np.ndarray, events: list[str], tag: str,
                   rate: float | None = None) -> None:
    """One photo event (one precomputed face) per row, round-robin over `events`, then flush.

    rate: faces/s to pace the producer at (None: as fast as it goes, a burst).
    """
    started = time.perf_counter()
    serde = SchemaRegistry.load()
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 5,
                         "compression.type": "lz4"})
    for i, vector in enumerate(faces):
        if rate is not None:  # the i-th record leaves no earlier than i / rate after the start
            ahead = started + i / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        event = PhotoEvent(event_id=events[i % len(events)], photo_id=f"{tag}{i}",
                           faces=[PrecomputedFace(embedding=vector)], source="bench")
        value = serde.encode(PHOTO_EVENT, event.to_avro())  # occurred_at: now, after the pacing wait
        while True:
            try:
                producer.produce(topic, key=event.event_id.encode(), value=value)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(120)


def direct_ingest(stack: Stack, faces: np.ndarray, events: list[str], rate: float | None = None,
                  tag: str = "d") -> dict[str, float]:
    """Produce straight to photo-events; faces/s until all searchable, and time-to-searchable.

    rate None: a burst (throughput; its p99 is mostly the wait behind the backlog). A rate: a steady
    stream (time-to-searchable at that load).
    """
    before = histogram(stack.indexer_ports)
    started = time.perf_counter()
    produce_events(stack.bootstrap, stack.topics.photo_events, faces, events, tag, rate)
    produced = time.perf_counter()
    done = wait_searchable(stack, _expected(len(faces), events))
    stats = searchable_stats(before, _settled_histogram(stack, before, len(faces)))
    # A stream that keeps pace ends searchable about one time-to-searchable after its last record:
    # offered_per_s is what went in, drain_s how far behind the pipeline was when it stopped.
    return {"faces": len(faces), "produce_s": produced - started, "seconds": done - started,
            "faces_per_s": len(faces) / (done - started), "offered_per_s": len(faces) / (produced - started),
            "drain_s": done - produced, **{f"time_to_searchable_{k}": v for k, v in stats.items()}}


def http_ingest(stack: Stack, faces: np.ndarray, events: list[str], clients: int,
                batch: int = 1) -> dict[str, float]:
    """POST from `clients` threads, one photo of one face per POST (batch 1: /api/v2/ingest) or
    `batch` photos per POST (/api/v2/ingest/batch); faces/s until all searchable."""
    photos = [{"event_id": events[i % len(events)], "photo_id": f"h{batch}-{i}", "embedding": v.tolist()}
              for i, v in enumerate(faces)]
    if batch == 1:
        path, bodies = "/api/v2/ingest", [json.dumps(p).encode() for p in photos]
    else:
        path = "/api/v2/ingest/batch"
        bodies = [json.dumps({"photos": photos[i:i + batch]}).encode() for i in range(0, len(photos), batch)]
    before = histogram(stack.indexer_ports)
    counter = iter(range(len(bodies)))
    lock = threading.Lock()
    failures: list[str] = []
    latencies: list[float] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
        mine = []
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                conn.request("POST", path, bodies[i], {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                mine.append(time.perf_counter() - start)
                if response.status != 202:
                    failures.append(f"HTTP {response.status}")
        finally:
            conn.close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    accepted = time.perf_counter()
    if failures:
        raise RuntimeError(f"{len(failures)} ingests failed, e.g. {failures[0]}")
    done = wait_searchable(stack, _expected(len(faces), events))
    stats = searchable_stats(before, _settled_histogram(stack, before, len(faces)))
    ms = np.asarray(latencies) * 1000
    return {"faces": len(faces), "clients": clients, "photos_per_post": batch, "accept_s": accepted - started,
            "accepted_per_s": len(faces) / (accepted - started),
            "ingest_p50_ms": float(np.percentile(ms, 50)), "ingest_p99_ms": float(np.percentile(ms, 99)),
            "seconds": done - started, "faces_per_s": len(faces) / (done - started),
            **{f"time_to_searchable_{k}": v for k, v in stats.items()}}


def _expected(total: int, events: list[str]) -> dict[str, int]:
    return {e: total // len(events) + (1 if i < total % len(events) else 0) for i, e in enumerate(events)}


def _settled_histogram(stack: Stack, before: dict[str, Any], faces: int) -> dict[str, Any]:
    # Searchable (index_size) can be seen a moment before the indexer's observe() of the same batch.
    deadline = time.monotonic() + 5
    after = histogram(stack.indexer_ports)
    while after["count"] - before["count"] < faces and time.monotonic() < deadline:
        time.sleep(0.1)
        after = histogram(stack.indexer_ports)
    return after


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--faces", type=int, default=int(os.environ.get("BENCH_INGEST_FACES", 20_000)))
    parser.add_argument("--http-faces", type=int, default=int(os.environ.get("BENCH_INGEST_HTTP_FACES", 3_000)))
    parser.add_argument("--dim", type=int, default=int(os.environ.get("BENCH_DIM", 128)))
    parser.add_argument("--events", type=int, default=int(os.environ.get("BENCH_EVENTS", 8)))
    parser.add_argument("--clients", type=int, default=int(os.environ.get("BENCH_CLIENTS", 16)))
    parser.add_argument("--http-batch", type=int, default=int(os.environ.get("BENCH_HTTP_BATCH", 250)),
                        help="photos per POST /api/v2/ingest/batch")
    parser.add_argument("--batch-clients", type=int, default=int(os.environ.get("BENCH_BATCH_CLIENTS", 4)))
    parser.add_argument("--steady-rate", type=float,
                        default=float(os.environ.get("BENCH_STEADY_RATE", GOAL_FACES_PER_S)),
                        help="faces/s of the steady stream (time-to-searchable at the goal's rate)")
    parser.add_argument("--steady-s", type=float, default=float(os.environ.get("BENCH_STEADY_S", 20)))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ingest_rate.json")
    args = parser.parse_args()
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker = None if bootstrap else start_broker()
    bootstrap = bootstrap or broker.bootstrap  # type: ignore[union-attr]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bare = bare_produce(bootstrap, vectors(args.faces, args.dim, 0), event_ids("B", args.events))
            with pipeline_stack(bootstrap, Path(tmp), args.dim) as stack:
                direct = direct_ingest(stack, vectors(args.faces, args.dim, 1), event_ids("D", args.events))
                steady = direct_ingest(stack, vectors(int(args.steady_rate * args.steady_s), args.dim, 3),
                                       event_ids("S", args.events), rate=args.steady_rate, tag="s")
                via_http = http_ingest(stack, vectors(args.http_faces, args.dim, 2), event_ids("H", args.events),
                                       args.clients)
                via_batch = http_ingest(stack, vectors(args.faces, args.dim, 4), event_ids("HB", args.events),
                                        args.batch_clients, batch=args.http_batch)
    finally:
        if broker:
            broker.stop()
    results = {"dim": args.dim, "events": args.events, "goal_faces_per_s": GOAL_FACES_PER_S, "goal_p99_s": GOAL_P99_S,
               "bare_produce": bare, "direct_kafka": direct, "steady_kafka": {"rate": args.steady_rate, **steady},
               "http_ingest": via_http, "http_batch_ingest": via_batch,
               "ratio_direct_vs_bare": direct["faces_per_s"] / bare["faces_per_s"],
               "ratio_http_vs_bare": via_http["faces_per_s"] / bare["faces_per_s"],
               "ratio_http_batch_vs_bare": via_batch["faces_per_s"] / bare["faces_per_s"],
               "load_average": os.getloadavg()}
    print(f"precomputed {args.dim}-d faces over {args.events} events; ratios vs the bare produce of the same run")
    print(f"{'path':<14} {'faces':>6} {'faces/s':>9} {'x bare':>7} {'searchable p50 s':>17} {'p99 s':>6} "
          f"{'mean s':>7}")
    for name, r in (("bare_produce", bare), ("direct_kafka", direct), ("steady_kafka", steady),
                    ("http_ingest", via_http), ("http_batch", via_batch)):
        latency = (f"{r['time_to_searchable_p50_s']:17.3f} {r['time_to_searchable_p99_s']:6.2f} "
                   f"{r['time_to_searchable_mean_s']:7.3f}" if "time_to_searchable_p50_s" in r else f"{'-':>17}")
        print(f"{name:<14} {r['faces']:6d} {r['faces_per_s']:9.0f} {r['faces_per_s'] / bare['faces_per_s']:7.2f} "
              f"{latency}")
    kept_pace = "kept pace" if steady["drain_s"] <= GOAL_P99_S else "fell behind"
    print(f"steady stream: offered {steady['offered_per_s']:.0f} faces/s for {steady['produce_s']:.1f} s; all "
          f"searchable {steady['drain_s']:.2f} s after the last record: {kept_pace} "
          f"(a drain over {GOAL_P99_S:g} s: behind)")
    print(f"http accepted {via_http['accepted_per_s']:.0f}/s by {args.clients} clients "
          f"(POST p50 {via_http['ingest_p50_ms']:.1f} ms, p99 {via_http['ingest_p99_ms']:.1f} ms)")
    print(f"http batch accepted {via_batch['accepted_per_s']:.0f} faces/s by {args.batch_clients} clients, "
          f"{args.http_batch} photos a POST (POST p50 {via_batch['ingest_p50_ms']:.1f} ms, "
          f"p99 {via_batch['ingest_p99_ms']:.1f} ms)")
    print(f"goal: >= {GOAL_FACES_PER_S} faces/s, time-to-searchable p99 <= {GOAL_P99_S:g} s "
          "(p50/p99 interpolated in histogram buckets)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
