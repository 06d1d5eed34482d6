"""The face quality gate: its checks, its sharpness measure, and the defaults on the real photos.

The real-photo tests run YuNet + SFace the embedder's way (JPEG bytes decoded
to 640 px, faces mapped back to original pixels); tests/faces_fixtures.py
fetches the photos and the models, or skips saying what to run.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.facelib.geometry import to_original
from pipeline.facelib.images import DecodePolicy, decode_image
from pipeline.facelib.model import DetectedFace
from pipeline.facelib.quality import NO_GATE, QualityGate, crop_sharpness, face_sharpness
from pipeline.facelib.sface import SFaceModel
from pipeline.settings import QualitySettings

DEFAULTS = QualityGate.from_settings(QualitySettings())


def face(side: float = 100.0, score: float = 0.9, sharpness: float | None = 50.0) -> DetectedFace:
    return DetectedFace(bbox=(5.0, 5.0, side, side * 1.2), det_score=score, landmarks=None,
                        embedding=np.ones(4, np.float32) / 2, sharpness=sharpness)


def test_each_check_has_a_stable_reason_and_a_message_with_the_numbers() -> None:
    gate = QualityGate(min_face_px=40, min_det_score=0.7, min_sharpness=10)
    assert gate.check(face()) is None
    small = gate.check(face(side=24))
    assert small is not None and small.reason == "too_small"
    assert small.message.startswith("face is 24 px wide, under 40 px")
    low = gate.check(face(score=0.5))
    assert low is not None and low.reason == "low_score" and "0.50" in low.message
    blurred = gate.check(face(sharpness=3.2))
    assert blurred is not None and blurred.reason == "too_blurred" and "3.2" in blurred.message
    # A tiny face is blurry too: the size is the reason given, as the fix the sender can act on.
    both = gate.check(face(side=10, sharpness=1.0))
    assert both is not None and both.reason == "too_small"


def test_zeros_disable_each_check_and_unmeasured_sharpness_is_not_judged() -> None:
    assert not NO_GATE.enabled
    assert NO_GATE.check(face(side=1, score=0.01, sharpness=0.0)) is None
    assert QualityGate(min_sharpness=10).check(face(sharpness=None)) is None
    kept, rejected = QualityGate(min_face_px=40).split([face(), face(side=20), face(side=60)])
    assert [f.bbox[2] for f in kept] == [100.0, 60.0] and [r.reason for r in rejected] == ["too_small"]


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEMATCH_QUALITY_MIN_FACE_PX", "64")
    monkeypatch.setenv("FACEMATCH_QUALITY_MIN_SHARPNESS", "0")
    gate = QualityGate.from_settings(QualitySettings())
    assert gate == QualityGate(min_face_px=64, min_det_score=DEFAULTS.min_det_score, min_sharpness=0)


def test_sharpness_drops_with_blur_and_does_not_depend_on_the_crop_size() -> None:
    rng = np.random.default_rng(0)
    texture = cv2.resize(rng.integers(0, 256, (28, 28), dtype=np.uint8), (112, 112), interpolation=cv2.INTER_CUBIC)
    sharp = crop_sharpness(texture)
    assert crop_sharpness(cv2.GaussianBlur(texture, (0, 0), 2)) < sharp / 4
    # The same face crop at twice the size is measured at 112 px: about the same number.
    doubled = cv2.resize(texture, (224, 224), interpolation=cv2.INTER_CUBIC)
    assert crop_sharpness(doubled) == pytest.approx(sharp, rel=0.25)
    assert face_sharpness(texture, (-10, -10, 5, 5), None) == 0.0  # a box outside the image


# -- real photos ------------------------------------------------------------------------------------


def pipeline_faces(model: SFaceModel, image: np.ndarray) -> list[DetectedFace]:
    """Faces in original pixels, the embedder's way (JPEG, decode to 640 px, map back)."""
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    decoded = decode_image(jpeg.tobytes(), DecodePolicy(max_side=640))
    return [to_original(f, decoded.scale) for f in model.detect_and_embed([decoded.bgr])[0]]


def blurred(image: np.ndarray, sigma_at_640: float) -> np.ndarray:
    """Gaussian blur of sigma_at_640 px at the size the model sees (as bench/quality_gate.py)."""
    return cv2.GaussianBlur(image, (0, 0), sigma_at_640 * max(image.shape[:2]) / 640)


@pytest.fixture(scope="module")
def obama(sample_photos: dict[str, Path]) -> np.ndarray:
    image = cv2.imread(str(sample_photos["obama.jpg"]), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def test_every_real_face_passes_the_default_gate(sface_model: SFaceModel, sample_photos: dict[str, Path]) -> None:
    for name, path in sorted(sample_photos.items()):
        faces = pipeline_faces(sface_model, cv2.imread(str(path), cv2.IMREAD_COLOR))
        assert faces, name
        for f in faces:
            assert f.sharpness is not None
            assert DEFAULTS.check(f) is None, (name, f.bbox, f.det_score, f.sharpness)


def test_obama_passes_blurred_is_too_blurred_downscaled_is_too_small(
        sface_model: SFaceModel, obama: np.ndarray) -> None:
    [original] = pipeline_faces(sface_model, obama)
    assert DEFAULTS.check(original) is None
    [soft] = pipeline_faces(sface_model, blurred(obama, 8))
    rejection = DEFAULTS.check(soft)
    assert rejection is not None and rejection.reason == "too_blurred", (soft.sharpness, rejection)
    tiny = cv2.resize(obama, (obama.shape[1] // 8, obama.shape[0] // 8), interpolation=cv2.INTER_AREA)
    [small] = pipeline_faces(sface_model, tiny)
    rejection = DEFAULTS.check(small)
    assert rejection is not None and rejection.reason == "too_small", (small.bbox, rejection)
    assert rejection.message.startswith(f"face is {min(small.bbox[2:]):.0f} px wide, under 40 px")


def test_face_sharpness_from_pixels_agrees_with_the_models_crop(sface_model: SFaceModel, obama: np.ndarray) -> None:
    decoded = decode_image(cv2.imencode(".jpg", obama)[1].tobytes(), DecodePolicy(max_side=640))
    for image in (decoded.bgr, blurred(decoded.bgr, 3)):
        [detected] = sface_model.detect_and_embed([image])
        assert detected[0].sharpness == pytest.approx(
            face_sharpness(image, detected[0].bbox, detected[0].landmarks), rel=0.15)
