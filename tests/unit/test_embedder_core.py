"""The embedder core without Kafka: precomputed faces, deletes, and the model seam (with a fake model)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.embedder.core import EmbedderCore, Tombstone
from pipeline.errors import PoisonRecord, TransientError
from pipeline.facelib.images import DecodedImage
from pipeline.facelib.model import DetectedFace
from pipeline.facelib.spec import ModelSpec
from pipeline.facelib.vectors import normalize_embedding
from pipeline.records import PhotoEvent, PhotoFaces, PrecomputedFace

SPEC = ModelSpec(name="fake", model_id="fake-1", dim=4, default_threshold=0.3, license="test")


class FakeModel:
    """Two faces per image; records the batch sizes it was called with (pure-core test double)."""

    spec = SPEC
    provider = "fake"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def load(self) -> None:
        pass

    def detect_and_embed(self, images):
        self.batches.append(len(images))
        face = DetectedFace(bbox=(10, 20, 30, 40), det_score=0.9, landmarks=(1.0,) * 10,
                            embedding=np.array([1, 0, 0, 0], dtype=np.float32))
        return [[face, face] for _ in images]


def fetch(url: str) -> bytes:
    if "timeout" in url:
        raise TransientError("fetch_timeout", "slow")
    if "404" in url:
        raise PoisonRecord("fetch_http_404", "gone")
    return url.encode()


def decode(data: bytes) -> DecodedImage:
    return DecodedImage(bgr=np.zeros((8, 8, 3), np.uint8), scale=2.0, original_size=(16, 16))


def test_normalize_rejects_bad_vectors() -> None:
    assert np.linalg.norm(normalize_embedding([3, 4, 0, 0], 4)) == pytest.approx(1.0)
    for bad in ([1, 2, 3], [0, 0, 0, 0], [math.nan, 1, 1, 1], [math.inf, 1, 1, 1]):
        with pytest.raises(PoisonRecord) as info:
            normalize_embedding(bad, 4)
        assert info.value.reason == "invalid_embedding"


def test_precomputed_delete_and_event_delete() -> None:
    core = EmbedderCore(SPEC, None, None, None)
    results = core.process([
        PhotoEvent("E", "p1", faces=[PrecomputedFace(embedding=[0, 2, 0, 0], bbox=[1, 2, 3, 4])]),
        PhotoEvent("E", "p2", op="DELETE"),
        PhotoEvent("E", "", op="DELETE_EVENT"),
        PhotoEvent("E", "p3", image_url="http://x/y.jpg"),
        PhotoEvent("E/x", "p4", faces=[]),
    ])
    assert isinstance(results[0], PhotoFaces) and results[0].faces[0].embedding.tolist() == [0, 1, 0, 0]
    assert results[1] == Tombstone("E", "p2")
    assert isinstance(results[2], PhotoFaces) and results[2].op == "DELETE_EVENT"
    assert isinstance(results[3], PoisonRecord) and results[3].reason == "no_model"
    assert isinstance(results[4], PoisonRecord) and results[4].reason == "invalid_event_id"


def test_images_are_batched_and_boxes_mapped_to_original_pixels() -> None:
    model = FakeModel()
    core = EmbedderCore(SPEC, model, fetch, decode)  # type: ignore[arg-type]
    events = [PhotoEvent("E", f"p{i}", image_url=f"http://x/{i}.jpg") for i in range(5)]
    events.insert(2, PhotoEvent("E", "bad", image_url="http://x/404.jpg"))
    events.insert(4, PhotoEvent("E", "slow", image_url="http://x/timeout.jpg"))
    results = core.process(events)
    assert model.batches == [5]  # every decodable image in one model call
    assert isinstance(results[2], PoisonRecord) and isinstance(results[4], TransientError)
    faces = [r for r in results if isinstance(r, PhotoFaces)]
    assert len(faces) == 5 and all(len(f.faces) == 2 for f in faces)
    assert faces[0].faces[0].bbox == (20, 40, 60, 80)  # decoded at half size
    assert faces[0].model_id == "fake-1" and faces[0].dim == 4


def test_faces_carry_the_loaded_models_id_not_the_declared_one() -> None:
    """A pack corrects its spec on load (InsightFace reads the recognizer's real output)."""
    declared = ModelSpec(name="pack", model_id="insightface-pack", dim=4, default_threshold=0.4, license="test")
    model = FakeModel()
    model.spec = ModelSpec(name="pack", model_id="insightface-pack-loaded", dim=4, default_threshold=0.4,
                           license="test")
    core = EmbedderCore(declared, model, fetch, decode)  # type: ignore[arg-type]
    results = core.process([PhotoEvent("E", "p1", image_url="http://x/1.jpg"),
                            PhotoEvent("E", "p2", faces=[PrecomputedFace(embedding=[0, 1, 0, 0])]),
                            PhotoEvent("E", "", op="DELETE_EVENT")])
    assert all(isinstance(r, PhotoFaces) and r.model_id == "insightface-pack-loaded" for r in results)


def test_model_none_labels_precomputed_faces_precomputed() -> None:
    from pipeline.facelib.spec import precomputed_spec

    core = EmbedderCore(precomputed_spec(4), None, None, None)
    [result] = core.process([PhotoEvent("E", "p", faces=[PrecomputedFace(embedding=[1, 0, 0, 0])])])
    assert isinstance(result, PhotoFaces) and result.model_id == "precomputed" and result.dim == 4
