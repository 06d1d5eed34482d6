"""Faces/s of the whole embedder stage against the bare model, on the same images, in one run.

Baseline ("bare model"): in one process, decode each photo (the same decoder,
640 px) and call detect_and_embed in batches of the embedder's batch size.
Stage: a warmed-up embedder process (model loaded, group joined); publish photo
events with image_urls served from loopback, and time from publishing to the
last faces record (fetch + decode + model + Avro + Kafka, at-least-once).
Target: stage >= 0.9x bare.

    .venv/bin/python bench/embedder_throughput.py [--copies 6] [--out bench/results/embedder_throughput.json]
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

BATCH = 16


def bare_model(model_root: Path, datas: list[bytes]) -> dict[str, float]:
    model = load_model("sface", model_root)
    assert model is not None
    model.load()
    policy = DecodePolicy()
    model.detect_and_embed([decode_image(datas[0], policy).bgr])  # warm-up
    started, faces = time.perf_counter(), 0
    for i in range(0, len(datas), BATCH):
        images = [decode_image(d, policy).bgr for d in datas[i:i + BATCH]]
        faces += sum(len(f) for f in model.detect_and_embed(images))
    elapsed = time.perf_counter() - started
    return {"faces": faces, "photos": len(datas), "seconds": elapsed, "faces_per_s": faces / elapsed,
            "provider": model.provider}


def serve(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def stage(bootstrap: str, model_root: Path, names: list[str], photo_base: str, workdir: Path) -> dict[str, float]:
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
           "FACEMATCH_EMBEDDER_GROUP": f"{topics.prefix}emb", "FACEMATCH_EMBEDDER_BATCH_SIZE": str(BATCH),
           "FACEMATCH_KAFKA_SESSION_TIMEOUT_MS": "6000", "FACEMATCH_LOG_LEVEL": "WARNING"}
    proc = spawn("embedder", "pipeline.embedder", env, workdir)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"r{uuid.uuid4().hex}"})
    consumer.assign([TopicPartition(topics.faces, 0, 0)])
    try:
        # Warm-up: one photo through, so model load and the group join are not timed.
        publish(names[:1], "warm")
        _collect(consumer, serde, 1)
        started = time.monotonic()
        publish(names, "run")
        faces = _collect(consumer, serde, len(names))
        elapsed = time.monotonic() - started
    finally:
        proc.stop()
        consumer.close()
    return {"faces": faces, "photos": len(names), "seconds": elapsed, "faces_per_s": faces / elapsed}


def _collect(consumer: Consumer, serde: SchemaRegistry, records: int, timeout_s: float = 600) -> int:
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
    parser.add_argument("--copies", type=int, default=6, help="times each sample photo is ingested")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "embedder_throughput.json")
    args = parser.parse_args()
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
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results = {"photos": len(names), "batch": BATCH, "bare_model": bare_model(model_root, datas),
                       "embedder_stage": stage(bootstrap, model_root, names, base, Path(tmp))}
    finally:
        server.shutdown()
        if broker:
            broker.stop()
    results["ratio_stage_vs_bare"] = results["embedder_stage"]["faces_per_s"] / results["bare_model"]["faces_per_s"]
    results["target_ratio"] = 0.9
    for name in ("bare_model", "embedder_stage"):
        r = results[name]
        print(f"{name:<15} {r['faces']:5d} faces / {r['photos']:4d} photos in {r['seconds']:6.2f}s "
              f"= {r['faces_per_s']:6.1f} faces/s")
    print(f"stage/bare      x{results['ratio_stage_vs_bare']:.2f} (target >= 0.9)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
