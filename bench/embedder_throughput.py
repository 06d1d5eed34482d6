"""Faces/s of the whole embedder stage against the bare model, on the same images, in one run.

Baseline ("bare model"): in one process, decode each photo (the same decoder,
640 px) and call detect_and_embed in batches of the embedder's batch size.
Stage: a warmed-up embedder process (model loaded, group joined) at the same
batch size; publish photo events with image_urls served from loopback, and time
from publishing to the last faces record (fetch + decode + model + Avro + Kafka,
at-least-once). Both run at every --batches size. Target: stage >= 0.9x bare.

    .venv/bin/python bench/embedder_throughput.py [--copies 4] [--batches 1,8,32]
        [--out bench/results/embedder_throughput.json]

Sizes also come from BENCH_COPIES and BENCH_BATCHES; BENCH_FETCH_DELAY_MS delays every photo
download (remote storage is not loopback: it shows how much fetching overlaps inference).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.assets import fetch_sample_photos, fetch_sface_models  # noqa: E402
from pipeline.devbroker import start_broker  # noqa: E402
from pipeline.facelib.images import DecodePolicy, decode_image  # noqa: E402
from pipeline.facelib.packs import load_model  # noqa: E402
from pipeline.records import PhotoEvent  # noqa: E402
from pipeline.serde import PHOTO_EVENT, PHOTO_FACES, SchemaRegistry  # noqa: E402
from pipeline.settings import KafkaSettings, ModelSettings, TopicSettings  # noqa: E402
from pipeline.stack import spawn  # noqa: E402
from pipeline.topics import create_topics  # noqa: E402


def bare_model(model_root: Path, datas: list[bytes], batch: int) -> dict[str, Any]:
    model = load_model("sface", model_root)
    assert model is not None
    model.load()
    policy = DecodePolicy()
    model.detect_and_embed([decode_image(datas[0], policy).bgr])  # warm-up
    started, faces = time.perf_counter(), 0
    for i in range(0, len(datas), batch):
        images = [decode_image(d, policy).bgr for d in datas[i:i + batch]]
        faces += sum(len(f) for f in model.detect_and_embed(images))
    elapsed = time.perf_counter() - started
    return {"faces": faces, "photos": len(datas), "seconds": elapsed, "faces_per_s": faces / elapsed,
            "provider": model.provider}


def serve(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    delay_s = float(os.environ.get("BENCH_FETCH_DELAY_MS", 0)) / 1000  # emulate remote storage's latency

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            time.sleep(delay_s)
            super().do_GET()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def stage(bootstrap: str, model_root: Path, names: list[str], photo_base: str, workdir: Path,
          batch: int) -> dict[str, float]:
    topics = TopicSettings(prefix=f"eb{uuid.uuid4().hex[:6]}.", partitions=1)
    create_topics(KafkaSettings(bootstrap_servers=bootstrap), topics)
    serde = SchemaRegistry.load()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})

    def publish(photo_names: list[str], tag: str) -> None:
        for i, name in enumerate(photo_names):
            event = PhotoEvent(event_id="B", photo_id=f"{tag}{i}-{name}", image_url=f"{photo_base}/{name}")
            producer.produce(topics.photo_events, key=b"B", value=serde.encode(PHOTO_EVENT, event.to_avro()))
        producer.flush(30)

    env = {**os.environ, "PYTHONPATH": str(REPO), "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
           "FACEMATCH_TOPIC_PREFIX": topics.prefix, "FACEMATCH_MODEL": "sface",
           "FACEMATCH_MODEL_ROOT": str(model_root), "FACEMATCH_FETCH_ALLOW_LIST": "127.0.0.1/32",
           "FACEMATCH_EMBEDDER_GROUP": f"{topics.prefix}emb", "FACEMATCH_EMBEDDER_BATCH_SIZE": str(batch),
           "FACEMATCH_KAFKA_SESSION_TIMEOUT_MS": "6000", "FACEMATCH_LOG_LEVEL": "WARNING"}
    proc = spawn("embedder", "pipeline.embedder", env, workdir)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"r{uuid.uuid4().hex}"})
    consumer.assign([TopicPartition(topics.faces, 0, 0)])
    try:
        # Warm-up: one photo through, so model load and the group join are not timed.
        publish(names[:1], "warm")
        collect_faces(consumer, serde, 1)
        started = time.monotonic()
        publish(names, "run")
        faces = collect_faces(consumer, serde, len(names))
        elapsed = time.monotonic() - started
    finally:
        proc.stop()
        consumer.close()
    return {"faces": faces, "photos": len(names), "seconds": elapsed, "faces_per_s": faces / elapsed}


def collect_faces(consumer: Consumer, serde: SchemaRegistry, records: int, timeout_s: float = 600) -> int:
    """Read `records` faces records; returns how many faces they hold."""
    seen = faces = 0
    deadline = time.monotonic() + timeout_s
    while seen < records:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {seen} of {records} faces records arrived")
        msg = consumer.poll(1)
        if msg is None or msg.error():
            continue
        seen += 1
        faces += len(serde.decode(PHOTO_FACES, msg.value())["faces"])
    return faces


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=int(os.environ.get("BENCH_COPIES", 4)),
                        help="times each sample photo is ingested")
    parser.add_argument("--batches", default=os.environ.get("BENCH_BATCHES", "1,8,32"),
                        help="embedder batch sizes (FACEMATCH_EMBEDDER_BATCH_SIZE) to compare")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "embedder_throughput.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    model_root = Path(ModelSettings().model_root).resolve()
    fetch_sface_models(model_root)
    photo_dir = Path(os.environ.get("FACEMATCH_CACHE_DIR", REPO / ".cache")) / "photos"
    photos = fetch_sample_photos(photo_dir)
    names = sorted(n for n in photos if n.startswith(("sample", "t1", "obama.", "biden"))) * args.copies
    datas = [photos[n].read_bytes() for n in names]
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker = None if bootstrap else start_broker()
    bootstrap = bootstrap or broker.bootstrap  # type: ignore[union-attr]
    server, base = serve(photo_dir)
    by_batch: dict[str, dict[str, object]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for batch in batches:
                bare = bare_model(model_root, datas, batch)
                staged = stage(bootstrap, model_root, names, base, Path(tmp), batch)
                by_batch[str(batch)] = {"bare_model": bare, "embedder_stage": staged,
                                        "ratio_stage_vs_bare": staged["faces_per_s"] / bare["faces_per_s"]}
    finally:
        server.shutdown()
        if broker:
            broker.stop()
    first = by_batch[str(batches[0])]
    results = {"photos": len(names), "batch": batches[0], **first, "target_ratio": 0.9, "by_batch": by_batch,
               "fetch_delay_ms": float(os.environ.get("BENCH_FETCH_DELAY_MS", 0)),
               "load_average": os.getloadavg()}
    print(f"{len(names)} photos; faces/s of the stage vs the bare model at the same batch size (same run)")
    print(f"{'batch':>5} {'bare faces/s':>13} {'stage faces/s':>14} {'stage/bare':>11}")
    for size, r in by_batch.items():
        bare, staged = r["bare_model"], r["embedder_stage"]
        assert isinstance(bare, dict) and isinstance(staged, dict)
        print(f"{size:>5} {bare['faces_per_s']:13.1f} {staged['faces_per_s']:14.1f} "
              f"{r['ratio_stage_vs_bare']:10.2f}x")
    print("(target: stage >= 0.9x bare)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
