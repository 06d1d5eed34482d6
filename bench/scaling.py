"""1 vs 2 indexers and 1 vs 2 embedders on this machine, each against the 1-process baseline of the same run.

Indexers: faces records (precomputed, --dim) produced straight to the faces topic
(12 partitions, --events events spread over them), timed from the first record
until every face is searchable (index_size in match replies through the bridge).
The embedder is bypassed so that only the indexers' work is measured.
Embedders: real photos (the sample photos, served from loopback) published to a
4-partition photo-events topic, timed until every faces record has arrived.
Each extra process joins the same consumer group; the run starts once every
member reports ready (owns partitions), so no rebalance falls inside the timing.

    .venv/bin/python bench/scaling.py [--faces 30000] [--copies 10] [--processes 1,2]
        [--out bench/results/scaling.json]

Sizes also come from BENCH_SCALING_FACES, BENCH_COPIES, BENCH_PROCESSES, BENCH_DIM and BENCH_EVENTS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.embedder_throughput import collect_faces, serve  # noqa: E402
from bench.ingest_rate import _expected, _wait_200, event_ids, pipeline_stack, vectors, wait_searchable  # noqa: E402
from pipeline.assets import fetch_sample_photos, fetch_sface_models  # noqa: E402
from pipeline.devbroker import free_port, start_broker  # noqa: E402
from pipeline.facelib.spec import precomputed_spec  # noqa: E402
from pipeline.records import Face, PhotoEvent, PhotoFaces, faces_key, now_ms  # noqa: E402
from pipeline.serde import PHOTO_EVENT, PHOTO_FACES, SchemaRegistry  # noqa: E402
from pipeline.settings import KafkaSettings, ModelSettings, TopicSettings  # noqa: E402
from pipeline.stack import ServiceProcess, spawn  # noqa: E402
from pipeline.topics import create_topics, partition_for  # noqa: E402


def indexers_run(bootstrap: str, workdir: Path, processes: int, faces: int, dim: int, events: int) -> dict[str, Any]:
    """Faces/s from the faces topic to searchable with `processes` indexers."""
    spec = precomputed_spec(dim)
    serde = SchemaRegistry.load()
    data = vectors(faces, dim, processes)
    ids = event_ids(f"S{processes}x", events)
    with pipeline_stack(bootstrap, workdir / f"ix{processes}", dim, indexers=processes) as stack:
        partitions = stack.topics.partitions
        owners = len({partition_for(e, partitions) for e in ids})
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "compression.type": "lz4"})
        started = time.perf_counter()
        for i, vector in enumerate(data):
            event = ids[i % len(ids)]
            record = PhotoFaces(event_id=event, photo_id=f"p{i}", model_id=spec.model_id, dim=dim,
                                faces=[Face(bbox=(0.0, 0.0, 0.0, 0.0), det_score=1.0, embedding=vector)],
                                occurred_at=now_ms())
            value = serde.encode(PHOTO_FACES, record.to_avro())
            while True:
                try:
                    producer.produce(stack.topics.faces, key=faces_key(event, f"p{i}"), value=value,
                                     partition=partition_for(event, partitions))
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        producer.flush(120)
        done = wait_searchable(stack, _expected(faces, ids))
    elapsed = done - started
    return {"processes": processes, "faces": faces, "partitions_used": owners, "seconds": elapsed,
            "faces_per_s": faces / elapsed}


def embedders_run(bootstrap: str, workdir: Path, processes: int, model_root: Path, names: list[str],
                  photo_base: str) -> dict[str, Any]:
    """Faces/s of real-photo embedding with `processes` embedders in one group."""
    topics = TopicSettings(prefix=f"se{uuid.uuid4().hex[:6]}.", partitions=4)
    create_topics(KafkaSettings(bootstrap_servers=bootstrap), topics)
    serde = SchemaRegistry.load()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "partitioner": "murmur2_random"})
    events = [f"E{i}" for i in range(64)]
    by_partition = {partition_for(e, topics.partitions): e for e in reversed(events)}  # one per partition

    def publish(photo_names: list[str], tag: str) -> None:
        for i, name in enumerate(photo_names):
            event_id = by_partition[i % topics.partitions]
            event = PhotoEvent(event_id=event_id, photo_id=f"{tag}{i}", image_url=f"{photo_base}/{name}")
            producer.produce(topics.photo_events, key=event_id.encode(),
                             value=serde.encode(PHOTO_EVENT, event.to_avro()))
        producer.flush(30)

    env = {**os.environ, "PYTHONPATH": str(REPO), "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
           "FACEMATCH_TOPIC_PREFIX": topics.prefix, "FACEMATCH_MODEL": "sface",
           "FACEMATCH_MODEL_ROOT": str(model_root), "FACEMATCH_FETCH_ALLOW_LIST": "127.0.0.1/32",
           "FACEMATCH_EMBEDDER_GROUP": f"{topics.prefix}emb", "FACEMATCH_KAFKA_SESSION_TIMEOUT_MS": "6000",
           "FACEMATCH_LOG_LEVEL": "WARNING"}
    ports = [free_port() for _ in range(processes)]
    procs: list[ServiceProcess] = []
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"r{uuid.uuid4().hex}"})
    consumer.assign([TopicPartition(topics.faces, p, 0) for p in range(topics.partitions)])
    try:
        for i, port in enumerate(ports):
            procs.append(spawn(f"embedder{i}", "pipeline.embedder",
                               {**env, "FACEMATCH_EMBEDDER_METRICS_PORT": str(port)}, workdir))
        for port in ports:
            _wait_200(f"http://127.0.0.1:{port}/readyz", 120)
        time.sleep(1)
        for port in ports:  # still ready after the last join's rebalance
            _wait_200(f"http://127.0.0.1:{port}/readyz", 120)
        publish(names[:topics.partitions], "warm")  # one photo per partition: every member's model warm
        collect_faces(consumer, serde, topics.partitions)
        started = time.monotonic()
        publish(names, "run")
        faces = collect_faces(consumer, serde, len(names))
        elapsed = time.monotonic() - started
    finally:
        for proc in procs:
            proc.stop()
        consumer.close()
    return {"processes": processes, "photos": len(names), "faces": faces, "seconds": elapsed,
            "faces_per_s": faces / elapsed}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--faces", type=int, default=int(os.environ.get("BENCH_SCALING_FACES", 30_000)))
    parser.add_argument("--dim", type=int, default=int(os.environ.get("BENCH_DIM", 128)))
    parser.add_argument("--events", type=int, default=int(os.environ.get("BENCH_EVENTS", 24)))
    parser.add_argument("--copies", type=int, default=int(os.environ.get("BENCH_COPIES", 10)))
    parser.add_argument("--processes", default=os.environ.get("BENCH_PROCESSES", "1,2"))
    parser.add_argument("--skip", choices=["indexers", "embedders"], action="append", default=[])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scaling.json")
    args = parser.parse_args()
    counts = [int(x) for x in args.processes.split(",") if x.strip()]
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker = None if bootstrap else start_broker()
    bootstrap = bootstrap or broker.bootstrap  # type: ignore[union-attr]
    results: dict[str, Any] = {"cpus": os.cpu_count(), "indexers": [], "embedders": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if "indexers" not in args.skip:
                for n in counts:
                    results["indexers"].append(indexers_run(bootstrap, Path(tmp), n, args.faces, args.dim,
                                                            args.events))
            if "embedders" not in args.skip:
                model_root = Path(ModelSettings().model_root).resolve()
                fetch_sface_models(model_root)
                photo_dir = Path(os.environ.get("FACEMATCH_CACHE_DIR", REPO / ".cache")) / "photos"
                photos = fetch_sample_photos(photo_dir)
                names = sorted(n for n in photos if n.startswith(("sample", "t1", "obama.", "biden"))) * args.copies
                server, base = serve(photo_dir)
                try:
                    for n in counts:
                        results["embedders"].append(embedders_run(bootstrap, Path(tmp), n, model_root, names, base))
                finally:
                    server.shutdown()
    finally:
        if broker:
            broker.stop()
    for kind in ("indexers", "embedders"):
        runs = results[kind]
        if not runs:
            continue
        base_rate = runs[0]["faces_per_s"]
        for run in runs:
            run["ratio_vs_first"] = run["faces_per_s"] / base_rate
            run["efficiency_per_process"] = run["ratio_vs_first"] / (run["processes"] / runs[0]["processes"])
    results["load_average"] = os.getloadavg()
    print(f"{'stage':<10} {'procs':>5} {'faces':>6} {'seconds':>8} {'faces/s':>9} {'x first':>8} {'per proc':>9}")
    for kind in ("indexers", "embedders"):
        for run in results[kind]:
            print(f"{kind:<10} {run['processes']:5d} {run['faces']:6d} {run['seconds']:8.2f} "
                  f"{run['faces_per_s']:9.0f} {run['ratio_vs_first']:8.2f} {run['efficiency_per_process']:9.2f}")
    print(f"(ratios vs the 1-process run of the same run; {os.cpu_count()} CPUs shared by every process here)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=float))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
