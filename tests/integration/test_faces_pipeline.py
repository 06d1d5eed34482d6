"""Real photos through the whole pipeline: image_url -> embedder (YuNet+SFace) -> indexer -> selfie match."""

from __future__ import annotations

import io
import itertools
import json
import socket
import struct
import urllib.request
import uuid
import zlib
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.serde import DEAD_LETTER, SchemaRegistry
from tests.httpserver import not_found, serve, slow
from tests.integration.helpers import http, read_topic, wait_for

GROUP = [f"sample{i}.jpg" for i in range(1, 7)] + ["t1.jpg"]
SFACE_THRESHOLD = 0.363


def post_image(url: str, image: bytes, fields: dict[str, str] | None = None) -> tuple[int, dict]:
    """multipart/form-data POST with an `image` file part."""
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
             for k, v in (fields or {}).items()]
    parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"selfie.jpg\"\r\n"
                 f"Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height pixels, with a tiny body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


@pytest.fixture
def face_stack(stack, sface_model_root: Path):
    """The stack with the real SFace pack and an allow-listed local image server."""
    stack.env.update({"FACEMATCH_MODEL": "sface", "FACEMATCH_MODEL_ROOT": str(sface_model_root),
                      "FACEMATCH_FETCH_ALLOW_LIST": "127.0.0.1/32",
                      "FACEMATCH_FETCH_READ_TIMEOUT_S": "0.5", "FACEMATCH_FETCH_TOTAL_TIMEOUT_S": "1.0",
                      "FACEMATCH_RUNNER_MAX_ATTEMPTS": "2"})
    return stack


def ingest_urls(base: str, event: str, urls: dict[str, str]) -> None:
    for photo_id, url in urls.items():
        status, body = http("POST", f"{base}/api/v2/ingest", {"event_id": event, "photo_id": photo_id,
                                                              "image_url": url})
        assert status == 202, body


def test_selfie_finds_obama_and_nobody_else(face_stack, sample_photos: dict[str, Path]) -> None:
    face_stack.indexer()
    face_stack.embedder()
    base = face_stack.bridge()
    names = ["obama.jpg", "biden.jpg", *GROUP]
    with serve({f"/{n}": sample_photos[n].read_bytes() for n in names}) as site:
        ingest_urls(base, "GALA", {n: site.url(f"/{n}") for n in names})
        selfie = sample_photos["obama2.jpg"].read_bytes()

        def all_indexed() -> dict | None:
            status, body = post_image(f"{base}/api/v2/match/image", selfie,
                                      {"event_id": "GALA", "threshold": "-1", "top_k": "100"})
            return body if status == 200 and body["photos_indexed"] == len(names) else None
        everything = wait_for(all_indexed, 120, "every photo embedded and indexed")
    # 1 + 1 + (3+3+3+4+5+4) + 6 faces, found by the real detector.
    assert everything["index_size"] == 2 + 22 + 6

    for name in ("obama2.jpg", "obama3.jpg"):
        status, body = post_image(f"{base}/api/v2/match/image", sample_photos[name].read_bytes(),
                                  {"event_id": "GALA"})
        assert status == 200, body
        assert body["threshold"] == pytest.approx(SFACE_THRESHOLD)  # the model's default
        assert [m["photo_id"] for m in body["matches"]] == ["obama.jpg"], body["matches"]
        assert body["matches"][0]["score"] > SFACE_THRESHOLD
        box = body["matches"][0]["faces"][0]["bbox"]
        assert len(box) == 4 and box[2] > 50  # in original-photo pixels, not the 640 px copy

    # V1 analyze returns the descriptor; matching it by embedding gives the same answer.
    status, analyzed = post_image(f"{base}/api/face/analyze", sample_photos["obama3.jpg"].read_bytes())
    assert status == 200 and analyzed["face_count"] == 1 and len(analyzed["descriptor"]) == 128
    status, body = http("POST", f"{base}/api/v2/match", {"event_id": "GALA", "user_embedding": analyzed["descriptor"]})
    assert [m["photo_id"] for m in body["matches"]] == ["obama.jpg"]


def test_selfie_with_no_face_or_many_faces_is_refused(face_stack, sample_photos: dict[str, Path]) -> None:
    face_stack.indexer()
    base = face_stack.bridge()
    blank = io.BytesIO()
    Image.new("RGB", (400, 300), (120, 160, 200)).save(blank, "JPEG")
    status, body = post_image(f"{base}/api/v2/match/image", blank.getvalue(), {"event_id": "E"})
    assert status == 422 and "no face" in body["error"]
    status, body = post_image(f"{base}/api/v2/match/image", sample_photos["sample1.jpg"].read_bytes(),
                              {"event_id": "E"})
    assert status == 422 and "found 3 faces" in body["error"]
    status, body = post_image(f"{base}/api/face/analyze", b"<html>not an image</html>")
    assert status == 422 and body["reason"] == "not_an_image"
    status, health = http("GET", f"{base}/health")
    assert health["embedding_dim"] == 128 and health["models"]["model_id"] == "yunet-2023mar+sface-2021dec"
    assert health["insightface_ready"] is True and health["models"]["provider"]
    assert health["model_ready"] is True and health["models"]["loaded"] is True


def test_bad_images_are_dead_lettered_with_reasons(face_stack, sample_photos: dict[str, Path]) -> None:
    face_stack.indexer()
    face_stack.embedder()
    base = face_stack.bridge()
    good = sample_photos["obama.jpg"].read_bytes()
    routes = {"/missing.jpg": not_found(), "/slow.jpg": slow(3.0, good), "/page.jpg": b"<html>hello</html>",
              "/truncated.jpg": good[: len(good) // 2], "/bomb.png": png_bomb(20000, 20000), "/ok.jpg": good}
    with serve(routes) as site:
        port = site.base_url.rsplit(":", 1)[1]
        bad = {"missing": (site.url("/missing.jpg"), "fetch_http_404"),
               "slow": (site.url("/slow.jpg"), "fetch_timeout"),
               "page": (site.url("/page.jpg"), "not_an_image"),
               "truncated": (site.url("/truncated.jpg"), "image_corrupt"),
               "bomb": (site.url("/bomb.png"), "image_too_many_pixels"),
               "loopback": (f"http://127.0.0.2:{port}/ok.jpg", "fetch_blocked"),
               "metadata": ("http://169.254.169.254/latest/meta-data/", "fetch_blocked")}
        ingest_urls(base, "BAD", {k: url for k, (url, _) in bad.items()})
        ingest_urls(base, "BAD", {"ok": site.url("/ok.jpg")})

        def ok_indexed() -> bool:
            body = http("POST", f"{base}/api/v2/match", {"event_id": "BAD", "user_embedding": [0.1] * 128})[1]
            return body.get("photos_indexed") == 1
        wait_for(ok_indexed, 90, "the good photo after the bad ones")
    letters = read_topic(face_stack.bootstrap, face_stack.topics.dlq, 1, expect=len(bad))
    serde = SchemaRegistry.load()
    got, attempts = {}, {}
    for msg in letters:
        envelope = serde.decode(DEAD_LETTER, msg.value())
        photo_id = envelope["value"] and _photo_id(serde, envelope["value"])
        got[photo_id] = dict(msg.headers())["dlq.reason"].decode()
        attempts[photo_id] = int(dict(msg.headers())["dlq.attempts"])
        assert envelope["error_message"]
    assert got == {k: reason for k, (_, reason) in bad.items()}
    # Timeouts are transient: retried (FACEMATCH_RUNNER_MAX_ATTEMPTS=2) before the DLQ; poison is not.
    assert attempts == {k: 2 if k == "slow" else 1 for k in bad}


def _photo_id(serde: SchemaRegistry, value: bytes) -> str:
    from pipeline.serde import PHOTO_EVENT

    return str(serde.decode(PHOTO_EVENT, value)["photo_id"])


def metric_samples(port: int, name: str) -> list[Any]:
    """The samples of one metric from a service's /metrics (none while it cannot answer)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return []
    return [s for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]


def test_two_embedders_split_the_work(face_stack, sample_photos: dict[str, Path]) -> None:
    from pipeline.devbroker import free_port
    from pipeline.topics import partition_for

    face_stack.indexer()
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        face_stack.embedder(f"embedder-{i}", FACEMATCH_EMBEDDER_METRICS_PORT=str(port))
    base = face_stack.bridge()
    def owned(port: int) -> float:
        return sum(s.value for s in metric_samples(port, "facematch_assigned_partitions"))
    wait_for(lambda: all(owned(p) > 0 for p in ports) and sum(owned(p) for p in ports) == 6, 60,
             "the photo-events partitions split between both embedders")
    events = [f"PARTY{i}" for i in range(8)]
    partitions = {partition_for(e, face_stack.topics.partitions) for e in events}
    assert partitions & {0, 1, 2} and partitions & {3, 4, 5}  # both halves of the range assignment
    with serve({"/obama.jpg": sample_photos["obama.jpg"].read_bytes()}) as site:
        for event in events:
            ingest_urls(base, event, {"p": site.url("/obama.jpg")})

        def all_indexed() -> bool:
            return all(http("POST", f"{base}/api/v2/match", {"event_id": e, "user_embedding": [0.1] * 128})[1]
                       .get("index_size") == 1 for e in events)
        wait_for(all_indexed, 120, "every event's photo indexed")

    def processed(port: int) -> float:
        return sum(s.value for s in metric_samples(port, "facematch_records_total")
                   if s.labels == {"stage": "embedder", "outcome": "ok"})
    counts = [processed(port) for port in ports]
    assert all(c > 0 for c in counts) and sum(counts) == len(events), counts



def read_response(sock: socket.socket) -> tuple[int, dict[str, str], dict]:
    """Read one HTTP/1.1 response with a Content-Length from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-response"
        body += chunk
    return int(lines[0].split()[1]), headers, json.loads(body)


def test_huge_uploads_are_refused_before_buffering(face_stack) -> None:
    limit = 2 * 1024 * 1024
    base = face_stack.bridge(wait_for="insightface_ready", FACEMATCH_BRIDGE_MAX_IMAGE_BYTES=str(limit))
    host, port = base.removeprefix("http://").split(":")
    size = 3 * 1024 * 1024
    boundary = uuid.uuid4().hex

    # A client that reads before sending its body gets the 413 at once: the bridge answers from the
    # declared Content-Length, without waiting for (let alone buffering) a byte of the body.
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /api/face/analyze HTTP/1.1\r\nHost: {host}\r\nContent-Length: {size}\r\n"
                     f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode())
        status, headers, body = read_response(sock)
    assert status == 413 and "larger than" in body["error"] and headers["connection"] == "close"

    # An ordinary client sends everything, then reads: it gets the 413, not a reset connection
    # (the bridge reads and discards the rest of the body before closing).
    status, body = post_image(f"{base}/api/face/analyze", b"\xff" * size)
    assert status == 413 and "larger than" in body["error"]

    # A chunked body declares no length: it is counted as it arrives and refused at the cap.
    conn = HTTPConnection(host, int(port), timeout=30)
    try:
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"s.jpg\"\r\n"
                f"Content-Type: image/jpeg\r\n\r\n").encode()
        parts = itertools.chain([head], (b"\xff" * 65536 for _ in range(size // 65536)))
        conn.request("POST", "/api/face/analyze", body=parts, encode_chunked=True,
                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        response = conn.getresponse()
        assert response.status == 413 and "larger than" in json.loads(response.read())["error"]
    finally:
        conn.close()
    assert http("GET", f"{base}/health")[1]["broker"]["reachable"] is True  # and the bridge serves on
