"""HTTP -> Kafka -> indexer -> Kafka -> HTTP match latency, against its baselines, in one run.

Measures, on the same broker and machine:
  1. bare FAISS search (IndexFlatIP, 1 thread) over N faces of one event;
  2. bare broker request/reply round trip (a trivial echo process, same client tuning);
  3. the full path: POST /api/v2/match on the bridge, answered by the indexer over Kafka.
Prints p50/p99 and the ratio full/round-trip (target: p50 within 1.5x), writes JSON.

    .venv/bin/python bench/match_latency.py [--faces 10000] [--queries 500] [--out bench/results/match_latency.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

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


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "n": len(ms)}


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


def bench_round_trip(bootstrap: str, queries: int, workdir: Path) -> dict[str, float]:
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
    samples = []
    try:
        for i in range(queries + 50):
            start = time.perf_counter()
            producer.produce(topics.match_requests, value=payload, partition=0, headers=[("id", str(i).encode())])
            producer.poll(0)
            deadline = start + 10
            while time.perf_counter() < deadline:
                msg = consumer.poll(1)
                if msg is not None and not msg.error() and dict(msg.headers() or [])["id"] == str(i).encode():
                    if i >= 50:  # the first 50 warm up connections and the echo's start
                        samples.append(time.perf_counter() - start)
                    break
    finally:
        echo.kill()
        consumer.close()
    return percentiles(samples)


def bench_http(bootstrap: str, faces: int, queries: int, workdir: Path) -> dict[str, float]:
    topics = TopicSettings(prefix=f"bm{uuid.uuid4().hex[:6]}.", partitions=12)
    create_topics(KafkaSettings(bootstrap_servers=bootstrap), topics)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
           "FACEMATCH_TOPIC_PREFIX": topics.prefix, "FACEMATCH_MODEL": "none",
           "FACEMATCH_EMBEDDING_DIM": str(DIM), "FACEMATCH_HTTP_PORT": str(port),
           "FACEMATCH_INDEXER_STATE_DIR": str(workdir / "state"),
           "FACEMATCH_INDEXER_GROUP": f"{topics.prefix}indexer", "FACEMATCH_EMBEDDER_GROUP": f"{topics.prefix}emb",
           "FACEMATCH_KAFKA_SESSION_TIMEOUT_MS": "6000", "FACEMATCH_LOG_LEVEL": "WARNING"}
    procs = [spawn(n, m, env, workdir) for n, m in
             [("indexer", "pipeline.indexer"), ("embedder", "pipeline.embedder"), ("bridge", "pipeline.matcher")]]
    try:
        base = f"127.0.0.1:{port}"
        wait_ready(f"http://{base}", 120, procs)
        vectors = _publish_faces(bootstrap, topics, faces)
        _wait_indexed(port, vectors[0], faces)
        conn = http.client.HTTPConnection("127.0.0.1", port)
        samples = []
        for i in range(queries + 20):
            body = json.dumps({"event_id": "BENCH", "user_embedding": vectors[i % faces].tolist(), "top_k": 20})
            start = time.perf_counter()
            conn.request("POST", "/api/v2/match", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = json.loads(response.read())
            elapsed = time.perf_counter() - start
            assert response.status == 200 and payload["index_size"] == faces, payload
            if i >= 20:
                samples.append(elapsed)
        return percentiles(samples)
    finally:
        for proc in procs:
            proc.stop()


def _publish_faces(bootstrap: str, topics: TopicSettings, faces: int) -> np.ndarray:
    serde = SchemaRegistry.load()
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(faces, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 20})
    for i in range(faces):
        event = PhotoEvent(event_id="BENCH", photo_id=f"p{i}", faces=[PrecomputedFace(embedding=vectors[i].tolist())])
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--faces", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--dim", type=int, default=512, help="512 = ArcFace (buffalo_l), 128 = SFace (default model)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "match_latency.json")
    parser.add_argument("--echo", nargs=3, metavar=("BOOTSTRAP", "REQUESTS", "REPLIES"))
    args = parser.parse_args()
    if args.echo:
        echo_main(*args.echo)
        return 0
    global DIM
    DIM = args.dim
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker = None if bootstrap else start_broker()
    bootstrap = bootstrap or broker.bootstrap  # type: ignore[union-attr]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            results = {"faces": args.faces, "queries": args.queries, "dim": DIM,
                       "faiss_search": bench_faiss(args.faces, args.queries),
                       "broker_round_trip": bench_round_trip(bootstrap, args.queries, workdir),
                       "http_match": bench_http(bootstrap, args.faces, args.queries, workdir)}
    finally:
        if broker:
            broker.stop()
    rt, full = results["broker_round_trip"], results["http_match"]
    results["ratio_p50_http_vs_round_trip"] = full["p50_ms"] / rt["p50_ms"]
    results["ratio_p99_http_vs_round_trip"] = full["p99_ms"] / rt["p99_ms"]
    results["target_p50_ratio"] = 1.5
    for name in ("faiss_search", "broker_round_trip", "http_match"):
        r = results[name]
        print(f"{name:<18} p50 {r['p50_ms']:7.2f} ms   p99 {r['p99_ms']:7.2f} ms   (n={r['n']})")
    print(f"http/round-trip    p50 x{results['ratio_p50_http_vs_round_trip']:.2f} "
          f"(target <= 1.5)   p99 x{results['ratio_p99_http_vs_round_trip']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
