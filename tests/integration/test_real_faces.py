"""The SFace pack on real photos: how many faces it finds, whether it tells people apart, batching.

The photos come from the registries (see tests/faces_fixtures.py); they are
downscaled to 640 px on the long side first, as the pipeline does.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.facelib.model import DetectedFace, ModelUnavailable
from pipeline.facelib.sface import SFaceModel
from pipeline.facelib.spec import SFACE_SPEC

EXPECTED_FACES = {
    "obama.jpg": 1,
    "obama2.jpg": 1,
    "obama3.jpg": 1,
    "biden.jpg": 1,
    "t1.jpg": 6,
    "sample1.jpg": 3,
    "sample2.jpg": 3,
    "sample3.jpg": 3,
    "sample4.jpg": 4,
    "sample5.jpg": 5,
    "sample6.jpg": 4,
}
OBAMA = ("obama.jpg", "obama2.jpg", "obama3.jpg")


@pytest.mark.parametrize(("photo", "expected"), sorted(EXPECTED_FACES.items()))
def test_finds_every_face_and_nothing_else(
    photo: str, expected: int, sample_faces: dict[str, list[DetectedFace]], sface_model: SFaceModel
) -> None:
    faces = sample_faces[photo]
    assert len(faces) == expected
    for face in faces:
        assert face.det_score >= sface_model.det_threshold
        assert face.landmarks is not None and len(face.landmarks) == 10
        assert face.embedding.dtype == np.float32 and face.embedding.shape == (SFACE_SPEC.dim,)
        assert np.linalg.norm(face.embedding) == pytest.approx(1.0, abs=1e-5)


def _identity(photo: str, index: int, count: int) -> str:
    # Only the Obama photos share a person; every other face counts as its own person.
    if photo in OBAMA:
        return "obama"
    return photo if count == 1 else f"{photo}#{index}"


def _pair_scores(faces: dict[str, list[DetectedFace]]) -> tuple[np.ndarray, np.ndarray]:
    labelled = [(_identity(p, i, len(fs)), f.embedding) for p, fs in faces.items() for i, f in enumerate(fs)]
    genuine: list[float] = []
    impostor: list[float] = []
    for (id_a, emb_a), (id_b, emb_b) in itertools.combinations(labelled, 2):
        (genuine if id_a == id_b else impostor).append(float(emb_a @ emb_b))
    return np.array(genuine), np.array(impostor)


def test_same_person_matches_and_strangers_do_not(sample_faces: dict[str, list[DetectedFace]]) -> None:
    genuine, impostor = _pair_scores(sample_faces)
    threshold = SFACE_SPEC.default_threshold
    p99 = float(np.percentile(impostor, 99))
    print(
        f"\n{'pairs':>14} {'min':>7} {'mean':>7} {'p99':>7} {'max':>7}\n"
        f"{'genuine ' + str(genuine.size):>14} {genuine.min():7.3f} {genuine.mean():7.3f}\n"
        f"{'impostor ' + str(impostor.size):>14} {impostor.min():7.3f} {impostor.mean():7.3f} "
        f"{p99:7.3f} {impostor.max():7.3f}\n"
        f"{'threshold':>14} {threshold:7.3f}"
    )
    assert genuine.size == 3  # obama x obama2 x obama3
    assert impostor.size == 493  # 32 faces, C(32, 2) - 3
    assert genuine.min() > threshold
    assert p99 < threshold


def test_one_batch_gives_what_image_by_image_gives(
    sface_model: SFaceModel, sample_images: dict[str, np.ndarray], sample_faces: dict[str, list[DetectedFace]]
) -> None:
    for name, image in sample_images.items():
        (alone,) = sface_model.detect_and_embed([image])
        assert [f.bbox for f in alone] == [f.bbox for f in sample_faces[name]]
        for single, batched in zip(alone, sample_faces[name], strict=True):
            np.testing.assert_allclose(single.embedding, batched.embedding, atol=1e-5)


@pytest.mark.parametrize("backend", ["opencv", "onnxruntime"])
def test_embeddings_equal_opencvs_own_feature(
    backend: str, sface_model_root: Path, sample_images: dict[str, np.ndarray]
) -> None:
    model = SFaceModel(sface_model_root, backend=backend)
    model.load()
    assert model.backend == backend
    reference = cv2.FaceRecognizerSF.create(str(model.model_dir / "face_recognition_sface_2021dec.onnx"), "")
    image = sample_images["sample5.jpg"]
    rows = model.detect(image)
    (faces,) = model.detect_and_embed([image])
    for row, face in zip(rows, faces, strict=True):
        expected = reference.feature(reference.alignCrop(image, row)).reshape(-1)
        cosine = float(face.embedding @ expected) / float(np.linalg.norm(expected))
        assert cosine > 1 - 1e-4


def test_provider_names_what_runs(sface_model: SFaceModel) -> None:
    assert sface_model.provider in ("OpenCV-DNN/CPU", "CPUExecutionProvider", "CUDAExecutionProvider")


def test_missing_files_name_the_fetch_command(tmp_path: Path) -> None:
    model = SFaceModel(tmp_path)
    with pytest.raises(ModelUnavailable, match="facematch models fetch"):
        model.load()
    with pytest.raises(ModelUnavailable):
        model.detect_and_embed([np.zeros((64, 64, 3), np.uint8)])


def test_no_images_and_faceless_images(sface_model: SFaceModel) -> None:
    assert sface_model.detect_and_embed([]) == []
    assert sface_model.detect_and_embed([np.full((240, 320, 3), 127, np.uint8)]) == [[]]
    with pytest.raises(ValueError):
        sface_model.detect_and_embed([np.zeros((64, 64), np.uint8)])
