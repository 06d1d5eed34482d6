"""`facematch demo`: the whole pipeline on an embedded broker with real photos and a real model.

Starts Tansu (unless KAFKA_BOOTSTRAP_SERVERS is set), the indexer, the embedder
and the bridge; serves the sample photos from a loopback HTTP server; ingests
them as one event through POST /api/v2/ingest; uploads a selfie to
/api/v2/match/image; prints which photos matched, with scores and face boxes.
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
import urllib.request
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pipeline.assets import fetch_sample_photos, fetch_sface_models
from pipeline.devbroker import free_port, start_broker
from pipeline.settings import KafkaSettings, ModelSettings, TopicSettings
from pipeline.stack import SERVICES, ServiceProcess, spawn, wait_ready
from pipeline.topics import create_topics

EVENT_PHOTOS = ["obama.jpg", "biden.jpg", "t1.jpg"] + [f"sample{i}.jpg" for i in range(1, 7)]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        """Keep the demo's output readable."""


def serve_photos(directory: Path) -> tuple[ThreadingHTTPServer, str]:
    """Serve the photo folder on loopback; the embedder fetches from here (allow-listed)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def call(method: str, url: str, body: bytes | None = None, content_type: str = "application/json") -> dict[str, Any]:
    """One HTTP call to the bridge; raises with the bridge's error message."""
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": content_type})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (the local bridge's http URL)
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{method} {url}: {exc.code} {exc.read().decode()}") from exc


def multipart(fields: dict[str, str], image: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with an `image` part."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="selfie.jpg"\r\n'
                 "Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def run_demo(base: str, photo_base: str, photos: dict[str, Path], selfie: str, event: str) -> int:
    """Ingest, wait for indexing, match the selfie, print the answer."""
    for name in EVENT_PHOTOS:
        accepted = call("POST", f"{base}/api/v2/ingest", json.dumps(
            {"event_id": event, "photo_id": name, "image_url": f"{photo_base}/{name}"}).encode())
        print(f"  ingested {name:<12} -> {accepted['topic']}[{accepted['partition']}]@{accepted['offset']}")
    body, content_type = multipart({"event_id": event, "threshold": "-1"}, photos[selfie].read_bytes())
    started = time.monotonic()
    while True:
        answer = call("POST", f"{base}/api/v2/match/image", body, content_type)
        if answer["photos_indexed"] == len(EVENT_PHOTOS):
            break
        if time.monotonic() - started > 180:
            raise TimeoutError(f"only {answer['photos_indexed']} of {len(EVENT_PHOTOS)} photos indexed")
        time.sleep(0.5)
    print(f"\nindexed {answer['photos_indexed']} photos, {answer['index_size']} faces "
          f"in {time.monotonic() - started:.1f}s")
    body, content_type = multipart({"event_id": event}, photos[selfie].read_bytes())
    answer = call("POST", f"{base}/api/v2/match/image", body, content_type)
    print(f"\nselfie {selfie}: {answer['count']} matching photo(s) above the model threshold "
          f"{answer['threshold']:.3f} (search {answer['search_ms']:.1f} ms, total {answer['took_ms']:.1f} ms)")
    for match in answer["matches"]:
        boxes = ", ".join("[" + " ".join(f"{v:.0f}" for v in f["bbox"]) + f"] {f['score']:.3f}"
                          for f in match["faces"])
        print(f"  {match['photo_id']:<12} score {match['score']:.3f}   face boxes (x y w h) {boxes}")
    return 0 if answer["matches"] else 1


def main(argv: list[str] | None = None) -> int:
    """`facematch demo [--selfie obama2.jpg]`."""
    parser = argparse.ArgumentParser(prog="facematch demo")
    parser.add_argument("--selfie", default="obama2.jpg", help="one of the sample photos")
    parser.add_argument("--photos-dir", type=Path,
                        default=Path(os.environ.get("FACEMATCH_CACHE_DIR", ".cache")) / "photos")
    args = parser.parse_args(argv)
    kafka, model_root = KafkaSettings(), ModelSettings().model_root.resolve()
    print("fetching (cached, hash-checked) the SFace models and the sample photos ...")
    fetch_sface_models(model_root)
    photos = fetch_sample_photos(args.photos_dir)
    broker = None if "bootstrap_servers" in kafka.model_fields_set else start_broker()
    if broker is not None:
        kafka = kafka.model_copy(update={"bootstrap_servers": broker.bootstrap})
    bootstrap = kafka.bootstrap_servers
    topics = TopicSettings(prefix=f"demo{uuid.uuid4().hex[:6]}.", partitions=4)
    create_topics(kafka, topics)
    server, photo_base = serve_photos(args.photos_dir)
    port = free_port()
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "FACEMATCH_TOPIC_PREFIX": topics.prefix,
           "FACEMATCH_TOPIC_PARTITIONS": "4", "FACEMATCH_MODEL": "sface", "FACEMATCH_MODEL_ROOT": str(model_root),
           "FACEMATCH_FETCH_ALLOW_LIST": "127.0.0.1/32", "FACEMATCH_HTTP_PORT": str(port),
           "FACEMATCH_INDEXER_GROUP": f"{topics.prefix}indexer", "FACEMATCH_EMBEDDER_GROUP": f"{topics.prefix}embedder",
           "FACEMATCH_KAFKA_SESSION_TIMEOUT_MS": "6000", "FACEMATCH_LOG_LEVEL": "WARNING"}
    procs: list[ServiceProcess] = []
    with tempfile.TemporaryDirectory() as tmp:
        env["FACEMATCH_INDEXER_STATE_DIR"] = f"{tmp}/state"
        try:
            procs = [spawn(name, module, env, Path(tmp)) for name, module in SERVICES]
            base = f"http://127.0.0.1:{port}"
            health = wait_ready(base, 120, procs)
            print(f"pipeline ready at {base}: model {health['models']['model_id']} on "
                  f"{health['models']['provider']}, embedding_dim {health['embedding_dim']}, broker {bootstrap}\n")
            return run_demo(base, photo_base, photos, args.selfie, "DEMO")
        finally:
            for proc in procs:
                proc.stop()
            server.shutdown()
            if broker:
                broker.stop()


if __name__ == "__main__":
    sys.exit(main())
