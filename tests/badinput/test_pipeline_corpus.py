"""Hostile records, images and URLs that reach Kafka directly: each lands in the DLQ with its precise
reason, images in odd but legal formats are indexed, and a good photo is indexed afterwards.

Every case gets its own event id, which is the record key, so the dead letter
that answers a case is found by its key.
"""

from __future__ import annotations

import io
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from PIL import Image

from pipeline.serde import MARKER, PHOTO_EVENT, PHOTO_FACES, SchemaRegistry
from pipeline.topics import partition_for
from tests.badinput.conftest import Corpus
from tests.httpserver import redirect, respond
from tests.integration.helpers import http, read_topic, wait_for

SFACE_THRESHOLD = 0.363


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height pixels, with a tiny body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def saved(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def many_frame_gif(frames: int) -> bytes:
    first = Image.new("P", (16, 16), 0)
    rest = [Image.new("P", (16, 16), i % 255) for i in range(1, frames)]
    return saved(first, "GIF", save_all=True, append_images=rest, duration=10, loop=0)


@dataclass(frozen=True)
class DeadLetterCase:
    """A photo event (built once the image server's URL is known) and the DLQ reason it must earn."""

    name: str
    event: Callable[[Corpus], dict[str, Any] | bytes]  # an event dict, or raw record bytes
    reason: str
    stage: str = "embedder"


def url_event(url: str) -> Callable[[Corpus], dict[str, Any]]:
    return lambda corpus: {"image_url": url}


def served(path: str, data: bytes | None) -> Callable[[Corpus], dict[str, Any]]:
    """The image server answers path with data (None: no route, so a 404)."""
    def build(corpus: Corpus) -> dict[str, Any]:
        if data is not None:
            corpus.site.routes[path] = respond(data, 200, "image/jpeg")
        return {"image_url": corpus.site.url(path)}
    return build


def redirect_to(target: str) -> Callable[[Corpus], dict[str, Any]]:
    def build(corpus: Corpus) -> dict[str, Any]:
        corpus.site.routes["/hop"] = redirect(target)
        return {"image_url": corpus.site.url("/hop")}
    return build


def raw(data: bytes) -> Callable[[Corpus], bytes]:
    return lambda corpus: data


TRUNCATED_JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x01" * 300

DEAD_LETTER_CASES = [
    DeadLetterCase("record_not_avro", raw(b"hello, kafka"), "undecodable"),
    DeadLetterCase("record_unknown_fingerprint", raw(MARKER + b"\x01" * 8 + b"\x00" * 16), "unknown_schema"),
    DeadLetterCase("record_truncated_avro", lambda c: "truncate", "undecodable"),
    DeadLetterCase("record_empty_value", raw(b""), "undecodable"),
    DeadLetterCase("image_zero_bytes", served("/empty.jpg", b""), "not_an_image"),
    DeadLetterCase("image_html", served("/page.jpg", b"<!doctype html><html></html>"), "not_an_image"),
    DeadLetterCase("image_truncated_jpeg", served("/cut.jpg", TRUNCATED_JPEG), "image_corrupt"),
    DeadLetterCase("image_png_bomb", served("/bomb.png", png_bomb(50_000, 50_000)), "image_too_many_pixels"),
    DeadLetterCase("url_loopback", url_event("http://127.0.0.1:9/x.jpg"), "fetch_blocked"),
    DeadLetterCase("url_private", url_event("http://10.20.30.40/x.jpg"), "fetch_blocked"),
    DeadLetterCase("url_link_local_metadata", url_event("http://169.254.169.254/latest/meta-data/"),
                   "fetch_blocked"),
    DeadLetterCase("url_metadata_hostname", url_event("http://metadata.google.internal/computeMetadata/v1/"),
                   "fetch_blocked"),
    DeadLetterCase("url_redirect_into_loopback", redirect_to("http://127.0.0.1:9/secret"), "fetch_blocked"),
    DeadLetterCase("url_file_scheme", url_event("file:///etc/passwd"), "invalid_url"),
    DeadLetterCase("url_gopher_scheme", url_event("gopher://127.0.0.2:70/_x"), "invalid_url"),
    DeadLetterCase("url_ftp_scheme", url_event("ftp://127.0.0.2/x.jpg"), "invalid_url"),
    DeadLetterCase("url_credentials", url_event("http://user:pw@127.0.0.2/x.jpg"), "invalid_url"),
    DeadLetterCase("url_http_404", served("/missing-on-purpose", None), "fetch_http_404"),
    DeadLetterCase("event_without_image_or_faces", lambda c: {}, "no_image"),
    DeadLetterCase("event_id_with_slash", lambda c: {"event_id": "a/b", "image_url": "http://127.0.0.2/x.jpg"},
                   "invalid_event_id"),
]


def dead_letters(corpus: Corpus) -> list[Any]:
    """Every dead letter so far (read until the topic stays quiet; ListOffsets is unreliable on Tansu)."""
    topics = corpus.stack.topics
    return read_topic(corpus.stack.bootstrap, topics.dlq, topics.dlq_partitions, expect=10**9, timeout_s=3)


@pytest.fixture(scope="module")
def producer(corpus: Corpus) -> Producer:
    return Producer({"bootstrap.servers": corpus.stack.bootstrap, "partitioner": "murmur2_random"})


def _produce_cases(corpus: Corpus, producer: Producer, serde: SchemaRegistry) -> None:
    for case in DEAD_LETTER_CASES:
        built = case.event(corpus)
        if built == "truncate":
            good = serde.encode(PHOTO_EVENT, {"event_id": case.name, "photo_id": "p", "op": "UPSERT",
                                              "image_url": "http://127.0.0.2/x.jpg", "faces": None,
                                              "source": "corpus", "occurred_at": 1})
            value = good[: len(good) // 2]
        elif isinstance(built, bytes):
            value = built
        else:
            value = serde.encode(PHOTO_EVENT, {"event_id": case.name, "photo_id": "p", "op": "UPSERT",
                                               "image_url": None, "faces": None, "source": "corpus",
                                               "occurred_at": 1, **built})
        producer.produce(corpus.stack.topics.photo_events, key=case.name.encode(), value=value)
    assert producer.flush(30) == 0


def test_every_bad_record_is_dead_lettered_with_its_reason(corpus: Corpus, producer: Producer) -> None:
    serde = SchemaRegistry.load()
    _produce_cases(corpus, producer, serde)
    wanted = {case.name: case for case in DEAD_LETTER_CASES}

    def all_letters() -> dict[str, dict[str, str]] | None:
        found: dict[str, dict[str, str]] = {}
        for msg in dead_letters(corpus):
            key = (msg.key() or b"").decode()
            if key in wanted:
                found[key] = {k: v.decode() for k, v in msg.headers() or []}
        return found if len(found) == len(wanted) else None

    letters = wait_for(all_letters, 120, "a dead letter for every case")
    wrong = {name: (letters[name].get("dlq.reason"), case.reason) for name, case in wanted.items()
             if letters[name].get("dlq.reason") != case.reason or letters[name].get("dlq.stage") != case.stage}
    assert not wrong, f"case: (got, wanted) {wrong}"


def test_faces_record_on_the_wrong_partition_is_refused_by_the_indexer(corpus: Corpus, producer: Producer) -> None:
    serde = SchemaRegistry.load()
    topics = corpus.stack.topics
    event = f"WRONGPART-{uuid.uuid4().hex[:6]}"
    right = partition_for(event, topics.partitions)
    value = serde.encode(PHOTO_FACES, {"event_id": event, "photo_id": "p", "model_id": "yunet-2023mar+sface-2021dec",
                                       "dim": 128, "faces": [], "image_url": None, "op": "UPSERT",
                                       "occurred_at": 1})
    producer.produce(topics.faces, key=f"{event}/p".encode(), value=value, partition=(right + 1) % topics.partitions)
    assert producer.flush(30) == 0

    def letter() -> dict[str, str] | None:
        for msg in dead_letters(corpus):
            if (msg.key() or b"").decode() == f"{event}/p":
                return {k: v.decode() for k, v in msg.headers() or []}
        return None

    headers = wait_for(letter, 60, "the indexer's dead letter")
    assert headers["dlq.reason"] == "wrong_partition" and headers["dlq.stage"] == "indexer", headers


LEGAL_FORMATS = {
    "cmyk_jpeg": lambda im: saved(im.convert("CMYK"), "JPEG", quality=92),
    "grey_jpeg": lambda im: saved(im.convert("L"), "JPEG", quality=92),
    "sixteen_bit_png": lambda im: saved(im.convert("I;16"), "PNG"),
    "alpha_png": lambda im: saved(im.convert("RGBA"), "PNG"),
    "palette_gif": lambda im: saved(im.convert("P"), "GIF"),
}


def test_legal_but_unusual_images_are_indexed(corpus: Corpus, sample_photos: dict[str, Path]) -> None:
    obama = Image.open(sample_photos["obama.jpg"])
    obama.load()
    status, analyzed = _analyze(corpus, sample_photos["obama2.jpg"].read_bytes())
    assert status == 200 and analyzed["face_count"] == 1, analyzed
    selfie = analyzed["descriptor"]
    for name, make in LEGAL_FORMATS.items():
        corpus.site.routes[f"/{name}"] = respond_image(make(obama))
        status, body = http("POST", f"{corpus.base}/api/v2/ingest",
                            {"event_id": f"FMT-{name}", "photo_id": name, "image_url": corpus.site.url(f"/{name}")})
        assert status == 202, body
    corpus.site.routes["/frames.gif"] = respond_image(many_frame_gif(10_000))
    status, body = http("POST", f"{corpus.base}/api/v2/ingest",
                        {"event_id": "FMT-frames", "photo_id": "frames", "image_url": corpus.site.url("/frames.gif")})
    assert status == 202, body

    for name in LEGAL_FORMATS:
        def found(name: str = name) -> dict[str, Any] | None:
            status, body = http("POST", f"{corpus.base}/api/v2/match",
                                {"event_id": f"FMT-{name}", "user_embedding": selfie, "threshold": SFACE_THRESHOLD})
            return body if status == 200 and body["count"] == 1 else None
        body = wait_for(found, 90, f"obama found in the {name} copy")
        assert body["matches"][0]["photo_id"] == name

    def frames_indexed() -> dict[str, Any] | None:
        status, body = http("POST", f"{corpus.base}/api/v2/match",
                            {"event_id": "FMT-frames", "user_embedding": selfie})
        return body if status == 200 and body["photos_indexed"] == 1 else None
    assert wait_for(frames_indexed, 90, "the 10,000-frame GIF processed (first frame, no face)")["count"] == 0


def _analyze(corpus: Corpus, image: bytes) -> tuple[int, dict[str, Any]]:
    from tests.integration.test_faces_pipeline import post_image
    return post_image(f"{corpus.base}/api/face/analyze", image)


def respond_image(data: bytes) -> Any:
    return respond(data, 200, "image/jpeg")
