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
