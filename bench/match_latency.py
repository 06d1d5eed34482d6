"""HTTP -> Kafka -> indexer -> Kafka -> HTTP match latency, against its baselines, in one run.

Measures, on the same broker and machine:
  1. bare FAISS search (IndexFlatIP, 1 thread) over N faces of one event;
  2. bare broker request/reply round trip (a trivial echo process, same client tuning);
  3. the full path: POST /api/v2/match on the bridge, answered by the indexer that owns the
     event, asked directly over TCP (pipeline/direct.py; the default), and
  4. the same through Kafka request/reply (a second bridge with FACEMATCH_BRIDGE_DIRECT_QUERIES=false).
Each of 2 and 3 runs at every --concurrency (closed loop: C requests always in flight;
the round trip keeps C requests outstanding from one client, the HTTP path uses C
client threads with a keep-alive connection each) and reports p50/p99 and req/s.
Prints the ratio full/round-trip at the same concurrency (target: p50 within 1.5x at
1 client), writes JSON. The top-level fields are those of the first --dims at 1 client.

    .venv/bin/python bench/match_latency.py [--faces 10000] [--queries 500] [--dims 512,128]
        [--concurrency 1,32] [--out bench/results/match_latency.json]

Sizes also come from BENCH_FACES, BENCH_QUERIES, BENCH_DIMS and BENCH_CONCURRENCY.
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
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.devbroker import free_port, start_broker  # noqa: E402
from pipeline.records import PhotoEvent, PrecomputedFace  # noqa: E402
from pipeline.serde import PHOTO_EVENT, SchemaRegistry  # noqa: E402
from pipeline.settings import KafkaSettings, TopicSettings  # noqa: E402
from pipeline.stack import spawn, wait_ready  # noqa: E402
from pipeline.topics import create_topics  # noqa: E402

DIM = 512
TUNED = {"linger.ms": 0, "fetch.wait.max.ms": 5}


def percentiles(samples_s: list[float], wall_s: float | None = None) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    out = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
           "mean_ms": float(ms.mean()), "n": len(ms)}
    if wall_s:
        out["req_per_s"] = len(ms) / wall_s
    return out


def bench_faiss(faces: int, queries: int) -> dict[str, float]:
    import faiss

    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    data = rng.normal(size=(faces, DIM)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(DIM)
    index.add(data)
    samples = []
    for i in range(queries):
        start = time.perf_counter()
        index.search(data[i % faces: i % faces + 1], 80)
        samples.append(time.perf_counter() - start)
    return percentiles(samples)


def echo_main(bootstrap: str, request_topic: str, reply_topic: str) -> None:
    """The baseline's server: consume a request, produce it back (no work at all)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"echo-{uuid.uuid4().hex}",
                         "fetch.wait.max.ms": 5})
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    consumer.assign([TopicPartition(request_topic, 0, 0)])  # no group join: nothing to wait for
    while True:
        msg = consumer.poll(0.1)
        if msg is None or msg.error():
            continue
        producer.produce(reply_topic, value=msg.value(), headers=msg.headers(), partition=0)
        producer.poll(0)


def bench_round_trip(bootstrap: str, queries: int, workdir: Path,
                     concurrencies: list[int]) -> dict[int, dict[str, float]]:
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    topics = TopicSettings(prefix=f"rt{uuid.uuid4().hex[:6]}.", partitions=1)
    create_topics(kafka, topics)
    echo = spawn("echo", "bench.match_latency", {**os.environ, "PYTHONPATH": str(REPO)}, workdir,
                 args=["--echo", bootstrap, topics.match_requests, topics.match_replies])
    producer = Producer({"bootstrap.servers": bootstrap, **{"linger.ms": 0}})
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"rt-{uuid.uuid4().hex}",
                         "fetch.wait.max.ms": 5})
    consumer.assign([TopicPartition(topics.match_replies, 0, 0)])
    payload = os.urandom(DIM * 4)
    results = {}
    try:
        _closed_loop(producer, consumer, topics.match_requests, payload, 50, 1)  # warm-up, echo start
        for concurrency in concurrencies:
            results[concurrency] = _closed_loop(producer, consumer, topics.match_requests, payload,
                                                queries * max(1, concurrency // 4), concurrency)
    finally:
        echo.kill()
        consumer.close()
    return results


def _closed_loop(producer: Producer, consumer: Consumer, topic: str, payload: bytes, total: int,
                 concurrency: int) -> dict[str, float]:
    """`total` echo round trips with `concurrency` of them always outstanding."""
    sent_at: dict[bytes, float] = {}
    samples: list[float] = []
    next_id = 0

    def send() -> None:
        nonlocal next_id
        request_id = f"{concurrency}-{next_id}".encode()
        next_id += 1
        sent_at[request_id] = time.perf_counter()
        producer.produce(topic, value=payload, partition=0, headers=[("id", request_id)])
        producer.poll(0)

    started = time.perf_counter()
    for _ in range(min(concurrency, total)):
        send()
    deadline = started + 120
    while len(samples) < total and time.perf_counter() < deadline:
        msg = consumer.poll(1)
        if msg is None or msg.error():
            continue
        sent = sent_at.pop(dict(msg.headers() or [])["id"], None)
        if sent is None:
            continue  # an earlier phase's straggler
        samples.append(time.perf_counter() - sent)
        if next_id < total:
            send()
    return percentiles(samples, time.perf_counter() - started)


def bench_http(bootstrap: str, faces: int, queries: int, workdir: Path,
               concurrencies: list[int]) -> dict[str, dict[int, dict[str, Any]]]:
    """Both bridges (direct queries, Kafka only) at each concurrency: {"direct": ..., "kafka": ...}."""
    topics = TopicSettings(prefix=f"bm{uuid.uuid4().hex[:6]}.", partitions=12)
    create_topics(KafkaSettings(bootstrap_servers=bootstrap), topics)
    port, kafka_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
           "FACEMATCH_TOPIC_PREFIX": topics.prefix, "FACEMATCH_MODEL": "none",
           "FACEMATCH_EMBEDDING_DIM": str(DIM), "FACEMATCH_HTTP_PORT": str(port),
           "FACEMATCH_INDEXER_STATE_DIR": str(workdir / "state"),
           "FACEMATCH_INDEXER_GROUP": f"{topics.prefix}indexer", "FACEMATCH_EMBEDDER_GROUP": f"{topics.prefix}emb",
           "FACEMATCH_KAFKA_SESSION_TIMEOUT_MS": "6000", "FACEMATCH_LOG_LEVEL": "WARNING"}
    procs = [spawn(n, m, env, workdir) for n, m in
             [("indexer", "pipeline.indexer"), ("embedder", "pipeline.embedder"), ("bridge", "pipeline.matcher")]]
    procs.append(spawn("bridge-kafka", "pipeline.matcher", {**env, "FACEMATCH_HTTP_PORT": str(kafka_port),
                                                            "FACEMATCH_BRIDGE_DIRECT_QUERIES": "false"}, workdir))
    try:
        for bridge_port in (port, kafka_port):
            wait_ready(f"http://127.0.0.1:{bridge_port}", 120, procs)
        vectors = _publish_faces(bootstrap, topics, faces)
        _wait_indexed(port, vectors[0], faces)
        bodies = [json.dumps({"event_id": "BENCH", "user_embedding": vectors[i % faces].tolist(),
                              "top_k": 20}).encode() for i in range(min(faces, 2000))]
        results: dict[str, dict[int, dict[str, Any]]] = {"direct": {}, "kafka": {}}
        for path, bridge_port in (("direct", port), ("kafka", kafka_port)):
            _http_clients(bridge_port, bodies, faces, 20, 1)  # warm-up (the direct bridge learns the route)
            for c in concurrencies:
                results[path][c] = _http_clients(bridge_port, bodies, faces, queries * max(1, c // 4), c)
        return results
    finally:
        for proc in procs:
            proc.stop()


def _http_clients(port: int, bodies: list[bytes], faces: int, total: int, concurrency: int) -> dict[str, Any]:
    """`total` matches from `concurrency` client threads, each with its own keep-alive connection."""
    samples: list[float] = []
    outside: list[float] = []  # client time minus the bridge's took_ms: HTTP, routing, validation, JSON
    inside: list[tuple[float, float]] = []  # (took_ms: produce -> reply on the bridge, search_ms on the indexer)
    errors: list[BaseException] = []
    refused: list[str] = []  # answers other than 200: counted and shown, their time stays in the samples
    counter = iter(range(total))
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine: list[float] = []
        mine_outside: list[float] = []
        mine_inside: list[tuple[float, float]] = []
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    break
                start = time.perf_counter()
                conn.request("POST", "/api/v2/match", bodies[i % len(bodies)], {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = json.loads(response.read())
                mine.append(time.perf_counter() - start)
                if response.status != 200:  # e.g. a 504: what a user would have seen; the run goes on
                    with lock:
                        refused.append(f"HTTP {response.status}: {payload.get('error')}")
                    continue
                assert payload["index_size"] == faces, payload
                mine_outside.append(mine[-1] - payload["took_ms"] / 1000)
                mine_inside.append((payload["took_ms"], payload["search_ms"] or 0.0))
        except BaseException as exc:  # reported after the join: a failed client fails the run
            errors.append(exc)
        finally:
            conn.close()
            with lock:
                samples.extend(mine)
                outside.extend(mine_outside)
                inside.extend(mine_inside)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    if len(refused) * 100 > total:
        raise RuntimeError(f"{len(refused)} of {total} matches failed, e.g. {refused[0]}")
    result: dict[str, Any] = {**percentiles(samples, time.perf_counter() - started), "failed": len(refused)}
    if refused:
        result["failed_example"] = refused[0]
        print(f"  {len(refused)} of {total} matches failed, e.g. {refused[0]}", file=sys.stderr)
    result["outside_kafka_p50_ms"] = float(np.percentile(outside, 50)) * 1000
    result["bridge_took_p50_ms"] = float(np.percentile([t for t, _ in inside], 50))
    result["indexer_search_p50_ms"] = float(np.percentile([s for _, s in inside], 50))
    return result


def _publish_faces(bootstrap: str, topics: TopicSettings, faces: int) -> np.ndarray:
    serde = SchemaRegistry.load()
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(faces, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 20})
    for i in range(faces):
        event = PhotoEvent(event_id="BENCH", photo_id=f"p{i}", faces=[PrecomputedFace(embedding=vectors[i])])
        producer.produce(topics.photo_events, key=b"BENCH", value=serde.encode(PHOTO_EVENT, event.to_avro()))
        producer.poll(0)
    producer.flush(60)
    return vectors


def _wait_indexed(port: int, probe: np.ndarray, faces: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("POST", "/api/v2/match", json.dumps({"event_id": "BENCH", "user_embedding": probe.tolist()}),
                     {"Content-Type": "application/json"})
        body = json.loads(conn.getresponse().read())
        if body.get("index_size") == faces:
            return
        time.sleep(0.5)
    raise TimeoutError(f"index never reached {faces} faces")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def run_dim(bootstrap: str, dim: int, faces: int, queries: int, concurrencies: list[int]) -> dict[str, object]:
    """Baselines and the full path at one embedding size, all in this run."""
    global DIM
    DIM = dim
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        faiss_search = bench_faiss(faces, queries)
        round_trip = bench_round_trip(bootstrap, queries, workdir, concurrencies)
        http_match = bench_http(bootstrap, faces, queries, workdir, concurrencies)
    by_concurrency = {}
    for c in concurrencies:
        rt, full, kafka = round_trip[c], http_match["direct"][c], http_match["kafka"][c]
        by_concurrency[str(c)] = {"broker_round_trip": rt, "http_match": full, "http_match_via_kafka": kafka,
                                  "ratio_p50_http_vs_round_trip": full["p50_ms"] / rt["p50_ms"],
                                  "ratio_p99_http_vs_round_trip": full["p99_ms"] / rt["p99_ms"],
                                  "ratio_req_per_s_http_vs_round_trip": full["req_per_s"] / rt["req_per_s"],
                                  "ratio_p50_via_kafka_vs_round_trip": kafka["p50_ms"] / rt["p50_ms"],
                                  "ratio_p99_via_kafka_vs_round_trip": kafka["p99_ms"] / rt["p99_ms"],
                                  "ratio_req_per_s_via_kafka_vs_round_trip": kafka["req_per_s"] / rt["req_per_s"]}
    first = by_concurrency[str(concurrencies[0])]
    return {"faces": faces, "queries": queries, "dim": dim, "faiss_search": faiss_search,
            "broker_round_trip": first["broker_round_trip"], "http_match": first["http_match"],
            "http_match_via_kafka": first["http_match_via_kafka"],
            "ratio_p50_http_vs_round_trip": first["ratio_p50_http_vs_round_trip"],
            "ratio_p99_http_vs_round_trip": first["ratio_p99_http_vs_round_trip"],
            "ratio_p50_via_kafka_vs_round_trip": first["ratio_p50_via_kafka_vs_round_trip"],
            "target_p50_ratio": 1.5, "concurrency": by_concurrency}


def print_table(run: dict[str, object]) -> None:
    faiss_search = run["faiss_search"]
    assert isinstance(faiss_search, dict)
    print(f"dim {run['dim']}, {run['faces']} faces: bare FAISS search p50 {faiss_search['p50_ms']:.2f} ms "
          f"p99 {faiss_search['p99_ms']:.2f} ms")
    print(f"{'clients':>7} {'path':<20} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}   {'x p50':>6} {'x p99':>6} "
          f"{'x req/s':>7}")
    by_concurrency = run["concurrency"]
    assert isinstance(by_concurrency, dict)
    for c, r in by_concurrency.items():
        paths = (("broker_round_trip", None), ("http_match", "http"), ("http_match_via_kafka", "via_kafka"))
        for name, suffix in paths:
            m = r[name]
            ratios = (f"{r[f'ratio_p50_{suffix}_vs_round_trip']:6.2f} {r[f'ratio_p99_{suffix}_vs_round_trip']:6.2f} "
                      f"{r[f'ratio_req_per_s_{suffix}_vs_round_trip']:7.2f}" if suffix else
                      f"{'1.00':>6} {'1.00':>6} {'1.00':>7}")
            print(f"{c:>7} {name:<20} {m['p50_ms']:8.2f} {m['p99_ms']:8.2f} {m['req_per_s']:8.0f}   {ratios}")
    print("(ratios: over broker_round_trip at the same concurrency, same run; target p50 x <= 1.5;\n"
          " http_match asks the owning indexer directly, http_match_via_kafka goes through request/reply topics)")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--faces", type=int, default=int(os.environ.get("BENCH_FACES", 10_000)))
    parser.add_argument("--queries", type=int, default=int(os.environ.get("BENCH_QUERIES", 500)),
                        help="per concurrency level (x concurrency/4 above 4 clients)")
    parser.add_argument("--dims", default=os.environ.get("BENCH_DIMS", "512,128"),
                        help="512 = ArcFace (buffalo_l), 128 = SFace (default model)")
    parser.add_argument("--dim", type=int, help="one embedding size (overrides --dims)")
    parser.add_argument("--concurrency", default=os.environ.get("BENCH_CONCURRENCY", "1,32"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "match_latency.json")
    parser.add_argument("--echo", nargs=3, metavar=("BOOTSTRAP", "REQUESTS", "REPLIES"))
    args = parser.parse_args()
    if args.echo:
        echo_main(*args.echo)
        return 0
    dims = [args.dim] if args.dim else _ints(args.dims)
    concurrencies = _ints(args.concurrency)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker = None if bootstrap else start_broker()
    bootstrap = bootstrap or broker.bootstrap  # type: ignore[union-attr]
    try:
        runs = [run_dim(bootstrap, dim, args.faces, args.queries, concurrencies) for dim in dims]
    finally:
        if broker:
            broker.stop()
    for run in runs:
        print_table(run)
    results = {**runs[0], "runs": runs, "load_average": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
