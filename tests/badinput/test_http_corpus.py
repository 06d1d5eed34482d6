"""Hostile and malformed HTTP input: each case gets its precise status and message, and nothing breaks.

After the whole table, a good photo is still ingested and matched: no case
left the bridge, the embedder or the indexer in a bad state.
"""

from __future__ import annotations

import http.client as httpclient
import json
import math
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from tests.badinput.conftest import Corpus
from tests.integration.helpers import http, match, unit_vectors, wait_index_size

DIM = 128  # the SFace pack's dimension
GOOD = [1.0] + [0.0] * (DIM - 1)


@dataclass(frozen=True)
class Case:
    """One request and what the caller must be told."""

    name: str
    method: str
    path: str
    body: bytes | None
    status: int
    says: str  # a fragment of the `error` message that names the problem
    content_type: str = "application/json"


def js(value: Any) -> bytes:
    """JSON the way a sloppy client writes it (NaN and Infinity allowed)."""
    return json.dumps(value, allow_nan=True).encode()


def ingest(**fields: Any) -> bytes:
    return js({"event_id": "BAD", "photo_id": "p1", **fields})


def matching(**fields: Any) -> bytes:
    return js({"event_id": "BAD", "user_embedding": GOOD, **fields})


def multipart(parts: dict[str, tuple[str | None, bytes]], boundary: str = "b0undary") -> bytes:
    out = b""
    for name, (filename, data) in parts.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


MULTIPART = "multipart/form-data; boundary=b0undary"
HTML = b"<!doctype html><html><body>not a photo</body></html>"

CASES = [
    Case("malformed_json", "POST", "/api/v2/ingest", b'{"event_id": "BAD", ', 422, "JSON"),
    Case("json_array_body", "POST", "/api/v2/ingest", b"[1, 2]", 422, "valid dictionary"),
    Case("empty_body", "POST", "/api/v2/ingest", b"", 422, "Field required"),
    Case("event_id_wrong_type", "POST", "/api/v2/ingest", js({"event_id": 5, "photo_id": "p", "embedding": GOOD}),
         422, "event_id"),
    Case("missing_event_id", "POST", "/api/v2/ingest", js({"photo_id": "p", "embedding": GOOD}), 422,
         "event_id: Field required"),
    Case("missing_photo_id", "POST", "/api/v2/ingest", js({"event_id": "e", "embedding": GOOD}), 422,
         "photo_id: Field required"),
    Case("extra_field", "POST", "/api/v2/ingest", ingest(embedding=GOOD, colour="red"), 422, "colour"),
    Case("event_id_10kb", "POST", "/api/v2/ingest", js({"event_id": "e" * 10_000, "photo_id": "p",
                                                         "embedding": GOOD}), 422, "event_id"),
    Case("photo_id_with_slash", "POST", "/api/v2/ingest", ingest(photo_id="a/b", embedding=GOOD), 422, "photo_id"),
    Case("photo_id_dotdot", "POST", "/api/v2/ingest", ingest(photo_id="..", embedding=GOOD), 422, "photo_id"),
    Case("event_id_control_chars", "POST", "/api/v2/ingest",
         js({"event_id": "e\n\x07", "photo_id": "p", "embedding": GOOD}), 422, "event_id"),
    Case("nothing_to_index", "POST", "/api/v2/ingest", ingest(), 422, "give image_url, embedding or faces"),
    Case("embedding_nan", "POST", "/api/v2/ingest", ingest(embedding=[math.nan] * DIM), 422, "NaN"),
    Case("embedding_inf", "POST", "/api/v2/ingest", ingest(embedding=[math.inf] + [0.0] * (DIM - 1)), 422,
         "infinite"),
    Case("embedding_zero", "POST", "/api/v2/ingest", ingest(embedding=[0.0] * DIM), 422, "all zeros"),
    Case("embedding_wrong_length", "POST", "/api/v2/ingest", ingest(embedding=[1.0, 2.0, 3.0]), 422,
         "embedding has 3 values"),
    Case("embedding_strings", "POST", "/api/v2/ingest", ingest(embedding=["a"] * DIM), 422, "embedding"),
    Case("faces_second_wrong_length", "POST", "/api/v2/ingest", ingest(faces=[GOOD, [1.0]]), 422,
         "faces[1] has 1 values"),
    Case("url_file_scheme", "POST", "/api/v2/ingest", ingest(image_url="file:///etc/passwd"), 422, "image_url"),
    Case("url_gopher_scheme", "POST", "/api/v2/ingest", ingest(image_url="gopher://127.0.0.1:70/x"), 422,
         "image_url"),
    Case("url_ftp_scheme", "POST", "/api/v2/ingest", ingest(image_url="ftp://example.com/a.jpg"), 422, "image_url"),
    Case("url_credentials", "POST", "/api/v2/ingest", ingest(image_url="https://user:pw@example.com/a.jpg"), 422,
         "image_url"),
    Case("url_too_long", "POST", "/api/v2/ingest", ingest(image_url="https://example.com/" + "a" * 5000), 422,
         "image_url"),
    Case("url_no_host", "POST", "/api/v2/ingest", ingest(image_url="https:///a.jpg"), 422, "image_url"),
    Case("batch_empty", "POST", "/api/v2/ingest/batch", js({"photos": []}), 422, "photos"),
    Case("batch_not_a_list", "POST", "/api/v2/ingest/batch", js({"photos": {"event_id": "BAD"}}), 422, "photos"),
    Case("batch_one_bad_embedding", "POST", "/api/v2/ingest/batch",
         js({"photos": [{"event_id": "BAD", "photo_id": "p1", "embedding": GOOD},
                        {"event_id": "BAD", "photo_id": "p2", "embedding": [math.nan] * DIM}]}), 422,
         "photos[1].embedding contains NaN"),
    Case("batch_over_the_cap", "POST", "/api/v2/ingest/batch",
         js({"photos": [{"event_id": "BAD", "photo_id": f"p{i}", "image_url": "https://example.com/a.jpg"}
                        for i in range(501)]}), 422, "at most 500"),
    Case("top_k_zero", "POST", "/api/v2/match", matching(top_k=0), 422, "top_k"),
    Case("top_k_million", "POST", "/api/v2/match", matching(top_k=10**6), 422, "top_k"),
    Case("threshold_above_one", "POST", "/api/v2/match", matching(threshold=1.5), 422, "threshold"),
    Case("threshold_below_minus_one", "POST", "/api/v2/match", matching(threshold=-2), 422, "threshold"),
    Case("match_embedding_empty", "POST", "/api/v2/match", matching(user_embedding=[]), 422, "user_embedding"),
    Case("match_embedding_nan", "POST", "/api/v2/match", matching(user_embedding=[math.nan] * DIM), 422, "NaN"),
    Case("match_embedding_wrong_length", "POST", "/api/v2/match", matching(user_embedding=[1.0] * 512), 422,
         "user_embedding has 512 values"),
    Case("match_missing_event", "POST", "/api/v2/match", js({"user_embedding": GOOD}), 422,
         "event_id: Field required"),
    Case("multipart_without_boundary", "POST", "/api/v2/match/image", b"garbage", 400, "boundary",
         content_type="multipart/form-data"),
    Case("multipart_missing_image", "POST", "/api/v2/match/image", multipart({"event_id": (None, b"BAD")}), 422,
         "image: Field required", content_type=MULTIPART),
    Case("selfie_html", "POST", "/api/v2/match/image",
         multipart({"event_id": (None, b"BAD"), "image": ("s.jpg", HTML)}), 422, "<html>",
         content_type=MULTIPART),
    Case("selfie_zero_bytes", "POST", "/api/v2/match/image",
         multipart({"event_id": (None, b"BAD"), "image": ("s.jpg", b"")}), 422, "empty body",
         content_type=MULTIPART),
    Case("analyze_truncated_jpeg", "POST", "/api/face/analyze",
         multipart({"image": ("s.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 40)}), 422, "truncated or corrupt",
         content_type=MULTIPART),
    Case("delete_photo_dotdot", "DELETE", "/api/v2/events/BAD/photos/%2E%2E", None, 422, "photo_id"),
    Case("unknown_route", "GET", "/api/v3/nothing", None, 404, "Not Found"),
    Case("wrong_method", "GET", "/api/v2/ingest", None, 405, "Method Not Allowed"),
]


def send(base: str, case: Case) -> tuple[int, dict[str, Any]]:
    """The raw request (no client-side JSON validation), JSON answer."""
    netloc = urlsplit(base).netloc
    conn = httpclient.HTTPConnection(netloc, timeout=30)
    try:
        headers = {"Content-Type": case.content_type} if case.body is not None else {}
        conn.request(case.method, case.path, body=case.body, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        body = json.loads(raw)
    except ValueError:
        raise AssertionError(f"{case.name}: answer is not JSON: {raw[:200]!r}") from None
    return response.status, body


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_request_gets_precise_answer(corpus: Corpus, case: Case) -> None:
    status, body = send(corpus.base, case)
    message = str(body.get("error", body.get("detail", "")))
    assert status == case.status, f"{case.name}: HTTP {status} {body}"
    assert case.says.lower() in message.lower(), f"{case.name}: message {message!r} lacks {case.says!r}"


def test_good_photo_indexed_after_the_corpus(corpus: Corpus) -> None:
    vectors = unit_vectors(2, DIM, seed=5)
    event = f"AFTER-{uuid.uuid4().hex[:6]}"
    status, body = http("POST", f"{corpus.base}/api/v2/ingest",
                        {"event_id": event, "photo_id": "good", "embedding": vectors[0].tolist()})
    assert status == 202, body
    wait_index_size(corpus.base, event, vectors[0], 1, timeout_s=60)
    status, body = match(corpus.base, event, np.asarray(vectors[0]))
    assert status == 200 and body["matches"][0]["photo_id"] == "good", body


def test_corpus_is_large_enough() -> None:
    names = [c.name for c in CASES]
    assert len(set(names)) == len(names) >= 40
