"""Where the quality gate acts: the embedder drops and counts gated faces, the bridge refuses gated selfies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from pipeline.embedder.core import EmbedderCore
from pipeline.embedder.stage import EmbedderStage
from pipeline.facelib.images import DecodedImage
from pipeline.facelib.model import DetectedFace
from pipeline.facelib.quality import QualityGate
from pipeline.facelib.sface import SFaceModel
from pipeline.facelib.spec import SFACE_SPEC, ModelSpec
from pipeline.matcher.api import BridgeServices, create_app
from pipeline.matcher.auth import Authorizer
from pipeline.matcher.main import selfie_reader
from pipeline.matcher.selfie import SelfieError, pick_single_face
from pipeline.metrics import create_metrics
from pipeline.records import MatchReply, PhotoEvent, PhotoFaces, PrecomputedFace
from pipeline.serde import PHOTO_EVENT, PHOTO_FACES, SchemaRegistry
from pipeline.settings import BridgeSettings, EmbedderSettings, QualitySettings, TopicSettings
from pipeline.stage_api import Incoming

SPEC = ModelSpec(name="fake", model_id="fake-1", dim=4, default_threshold=0.3, license="test")
GATE = QualityGate(min_face_px=40, min_det_score=0.0, min_sharpness=10)


def detected(side: float, sharpness: float, x: float = 0.0) -> DetectedFace:
    return DetectedFace(bbox=(x, 0.0, side, side), det_score=0.9, landmarks=(1.0,) * 10,
                        embedding=np.array([1, 0, 0, 0], dtype=np.float32), sharpness=sharpness)


class ThreeFaces:
    """A good face, a tiny one and a blurred one per image (sizes in decoded pixels)."""

    spec = SPEC
    provider = "fake"

    def load(self) -> None:
        pass

    def detect_and_embed(self, images: Any) -> list[list[DetectedFace]]:
        return [[detected(60, 80.0), detected(15, 80.0, x=100), detected(60, 4.0, x=200)] for _ in images]


def decode(data: bytes) -> DecodedImage:
    # Detection ran at half size: the gate must judge sizes in original pixels (x2).
    return DecodedImage(bgr=np.zeros((8, 8, 3), np.uint8), scale=2.0, original_size=(16, 16))


def core(gate: QualityGate) -> EmbedderCore:
    return EmbedderCore(SPEC, ThreeFaces(), lambda url: b"jpeg", decode, gate=gate)  # type: ignore[arg-type]


def test_embedder_drops_gated_faces_and_counts_them_by_reason() -> None:
    embedder = core(GATE)
    [result] = embedder.process([PhotoEvent(event_id="E", photo_id="p", image_url="http://x/p.jpg")])
    assert isinstance(result, PhotoFaces)
    assert [f.bbox for f in result.faces] == [(0.0, 0.0, 120.0, 120.0)]  # 15 px decoded = 30 px original: gated
    assert embedder.last_rejected == {"too_small": 1, "too_blurred": 1}
    # Precomputed faces carry no pixels to judge: they pass through untouched, and nothing is counted.
    [pre] = embedder.process([PhotoEvent(event_id="E", photo_id="q",
                                         faces=[PrecomputedFace(embedding=[1.0, 0, 0, 0], bbox=[0, 0, 5, 5])])])
    assert isinstance(pre, PhotoFaces) and len(pre.faces) == 1 and embedder.last_rejected == {}


def test_no_gate_keeps_every_face() -> None:
    [result] = core(QualityGate()).process([PhotoEvent(event_id="E", photo_id="p", image_url="http://x/p.jpg")])
    assert isinstance(result, PhotoFaces) and len(result.faces) == 3


def test_embedder_stage_exports_facematch_faces_rejected_total() -> None:
    serde, metrics = SchemaRegistry.load(), create_metrics()
    stage = EmbedderStage(core(GATE), serde, "faces", 1, metrics)
    value = serde.encode(PHOTO_EVENT, PhotoEvent(event_id="E", photo_id="p", image_url="http://x/p.jpg").to_avro())
    [outcome] = stage.handle([Incoming("photo-events", 0, 0, b"E", value)])
    assert isinstance(outcome, list)
    faces = PhotoFaces.from_avro(serde.decode(PHOTO_FACES, outcome[0].value))
    assert len(faces.faces) == 1
    sample = metrics.registry.get_sample_value
    assert sample("facematch_faces_rejected_total", {"reason": "too_small"}) == 1
    assert sample("facematch_faces_rejected_total", {"reason": "too_blurred"}) == 1
    assert sample("facematch_faces_embedded_total") == 1


def test_selfie_picks_the_one_usable_face_and_says_why_none_is() -> None:
    # A tiny face in the background does not make a selfie a group photo.
    assert pick_single_face([detected(200, 80.0), detected(20, 80.0)], GATE).bbox[2] == 200
    with pytest.raises(SelfieError) as info:
        pick_single_face([detected(20, 80.0)], GATE)
    assert info.value.reason == "too_small" and "20 px wide, under 40 px" in str(info.value)
    with pytest.raises(SelfieError) as info:
        pick_single_face([detected(200, 3.0), detected(20, 80.0)], GATE)  # the most prominent face's reason
    assert info.value.reason == "too_blurred"
    with pytest.raises(SelfieError) as info:
        pick_single_face([detected(200, 80.0), detected(200, 80.0, x=300)], GATE)
    assert info.value.reason == "several_faces"
    with pytest.raises(SelfieError) as info:
        pick_single_face([], GATE)
    assert info.value.reason == "no_face"


# -- the bridge, with the real model ------------------------------------------------------------------


class Requester:
    """Answers every match with an empty OK reply, and remembers that it was asked."""

    def __init__(self) -> None:
        self.matched = 0

    async def match(self, event_id: str, embedding: np.ndarray, top_k: int, threshold: float | None,
                    timeout_s: float, guest_id: str | None = None, model_id: str | None = None) -> MatchReply:
        self.matched += 1
        return MatchReply("r", event_id, "OK")


@pytest.fixture()
def bridge(sface_model: SFaceModel) -> tuple[TestClient, Requester]:
    async def health() -> dict[str, Any]:
        return {"status": "ok", "ready": True}

    requester = Requester()
    services = BridgeServices(requester=requester, serde=SchemaRegistry.load(),  # type: ignore[arg-type]
                              topics=TopicSettings(), settings=BridgeSettings(), spec=SFACE_SPEC,
                              metrics=create_metrics(), auth=Authorizer([]), health=health,
                              faces_in_image=selfie_reader([sface_model], EmbedderSettings()),
                              quality_gate=QualityGate.from_settings(QualitySettings()))
    return TestClient(create_app(services), raise_server_exceptions=False), requester


def post_selfie(client: TestClient, image: np.ndarray) -> Any:
    jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    return client.post("/api/v2/match/image", data={"event_id": "E"},
                       files={"image": ("selfie.jpg", jpeg, "image/jpeg")})


def test_blurred_selfie_gets_422_with_the_reason(bridge: tuple[TestClient, Requester],
                                                 sample_photos: dict[str, Path]) -> None:
    client, requester = bridge
    obama = cv2.imread(str(sample_photos["obama.jpg"]), cv2.IMREAD_COLOR)
    soft = cv2.GaussianBlur(obama, (0, 0), 8 * max(obama.shape[:2]) / 640)
    response = post_selfie(client, soft)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["reason"] == "too_blurred" and body["faces_found"] == 1
    assert "blurred" in body["error"]
    assert requester.matched == 0
    tiny = cv2.resize(obama, (obama.shape[1] // 8, obama.shape[0] // 8), interpolation=cv2.INTER_AREA)
    response = post_selfie(client, tiny)
    assert response.status_code == 422 and response.json()["reason"] == "too_small", response.text
    response = post_selfie(client, obama)
    assert response.status_code == 200, response.text
    assert requester.matched == 1
