"""Selfie uploads stay in memory: Starlette must never roll a multipart file over to disk."""

from __future__ import annotations

import io
from tempfile import SpooledTemporaryFile
from typing import Any

import numpy as np
import pytest
import starlette.formparsers
from fastapi.testclient import TestClient

from pipeline.facelib.model import DetectedFace
from pipeline.facelib.spec import ModelSpec
from pipeline.matcher.api import BridgeServices, create_app
from pipeline.matcher.auth import Authorizer
from pipeline.metrics import create_metrics
from pipeline.settings import BridgeSettings, TopicSettings

SPEC = ModelSpec(name="fake", model_id="fake", dim=4, default_threshold=0.3, license="test")


class RecordingSpool(SpooledTemporaryFile):  # type: ignore[type-arg]
    """Counts rollovers (the moment a spooled upload would be written to a temp file)."""

    rollovers = 0

    def rollover(self) -> None:
        RecordingSpool.rollovers += 1
        super().rollover()


def test_large_selfie_is_never_spooled_to_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", RecordingSpool)
    seen: list[int] = []

    def faces_in_image(data: bytes) -> list[DetectedFace]:
        seen.append(len(data))
        return [DetectedFace(bbox=(1, 2, 3, 4), det_score=0.9, landmarks=None,
                             embedding=np.array([1, 0, 0, 0], dtype=np.float32))]

    async def health() -> dict[str, Any]:
        return {"status": "ok"}

    services = BridgeServices(requester=None, serde=None, topics=TopicSettings(),  # type: ignore[arg-type]
                              settings=BridgeSettings(bridge_max_image_bytes=8 * 1024 * 1024), spec=SPEC,
                              metrics=create_metrics(), auth=Authorizer([]), health=health,
                              faces_in_image=faces_in_image)
    client = TestClient(create_app(services))
    upload = io.BytesIO(b"\xff\xd8" + b"\x00" * (3 * 1024 * 1024))
    response = client.post("/api/face/analyze", files={"image": ("selfie.jpg", upload, "image/jpeg")})
    assert response.status_code == 200, response.text
    assert response.json()["descriptor"] == [1.0, 0.0, 0.0, 0.0]
    assert seen == [3 * 1024 * 1024 + 2]
    assert RecordingSpool.rollovers == 0


class Wire:
    """An ASGI server's side of one request: queued body messages, and what the app sent back."""

    def __init__(self, chunks: list[bytes], headers: list[tuple[bytes, bytes]]) -> None:
        self.messages: list[dict[str, Any]] = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                                               for i, c in enumerate(chunks)]
        self.scope = {"type": "http", "method": "POST", "path": "/api/face/analyze", "headers": headers}
        self.sent: list[dict[str, Any]] = []
        self.read = 0  # body messages handed to anyone (app or middleware)

    async def receive(self) -> dict[str, Any]:
        if not self.messages:
            return {"type": "http.disconnect"}
        self.read += 1
        return self.messages.pop(0)

    async def send(self, message: dict[str, Any]) -> None:
        # A client that reads early must already see the whole 413 before any body is read.
        self.sent.append({**message, "body_messages_read": self.read})


def run_limited(chunks: list[bytes], headers: list[tuple[bytes, bytes]], app_seen: list[int]) -> Wire:
    import asyncio

    from pipeline.matcher.api import BodyLimitMiddleware

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:  # buffers like a form parser would, answering 200 if it gets to the end
            message = await receive()
            app_seen.append(len(message.get("body", b"")))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    wire = Wire(chunks, headers)
    asyncio.run(BodyLimitMiddleware(app, max_bytes=1000)(wire.scope, wire.receive, wire.send))
    return wire


def test_declared_oversize_body_gets_413_before_it_is_read_then_is_drained_unbuffered() -> None:
    app_seen: list[int] = []
    wire = run_limited([b"x" * 600] * 4, [(b"content-length", b"2400")], app_seen)
    assert app_seen == []  # the app never saw a byte
    start, body, end = wire.sent
    assert start["status"] == 413 and (b"connection", b"close") in start["headers"]
    assert b"larger than 1000 bytes" in body["body"] and body["more_body"] is True
    assert start["body_messages_read"] == body["body_messages_read"] == 0
    assert end == {"type": "http.response.body", "body": b"", "more_body": False, "body_messages_read": 4}


def test_expect_continue_clients_are_refused_without_inviting_the_body() -> None:
    wire = run_limited([b"x" * 600] * 4, [(b"content-length", b"2400"), (b"expect", b"100-continue")], [])
    assert [m.get("status") for m in wire.sent] == [413, None] and wire.sent[1]["more_body"] is False
    assert wire.read == 0


def test_streamed_oversize_body_stops_at_the_cap_and_gets_413() -> None:
    app_seen: list[int] = []
    wire = run_limited([b"x" * 600] * 4, [(b"transfer-encoding", b"chunked")], app_seen)
    assert sum(app_seen) <= 1000  # the app got at most the cap, then the refusal
    assert wire.sent[0]["status"] == 413 and all(m.get("status") != 200 for m in wire.sent)
    assert wire.sent[-1]["more_body"] is False and wire.read == 4  # the rest was read and discarded


def test_bodies_under_the_cap_pass_untouched() -> None:
    app_seen: list[int] = []
    wire = run_limited([b"x" * 400, b"x" * 400], [(b"content-length", b"800")], app_seen)
    assert app_seen == [400, 400] and wire.sent[0]["status"] == 200
