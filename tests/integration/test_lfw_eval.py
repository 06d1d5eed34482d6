"""`facematch eval lfw` end to end on a tiny LFW-layout folder built from the real sample photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.evaluation.lfw import lfw_image, lfw_main
from pipeline.facelib.geometry import most_prominent
from pipeline.facelib.model import DetectedFace
from tests.faces_fixtures import MAX_SIDE

# Each guest is the most prominent face of one group photo: a crop and its mirror image.
GUESTS = {"Guest_A": "sample2.jpg", "Guest_B": "sample3.jpg", "Guest_C": "sample5.jpg", "Guest_D": "t1.jpg"}

# 2 folds x (4 matched + 4 mismatched); No_Face sits in one mismatched pair of fold 0.
PAIRS = """2 4
Barack_Obama 1 2
Joe_Biden 1 2
Guest_A 1 2
Guest_B 1 2
Barack_Obama 1 Joe_Biden 1
Guest_A 1 Guest_B 1
Barack_Obama 3 Guest_C 1
No_Face 1 Guest_D 2
Barack_Obama 1 3
Barack_Obama 2 3
Guest_C 1 2
Guest_D 1 2
Joe_Biden 2 Guest_A 2
Guest_B 2 Guest_C 2
Barack_Obama 2 Guest_D 1
Joe_Biden 1 Guest_C 1
"""


def _write(root: Path, name: str, index: int, image: np.ndarray) -> None:
    path = root / lfw_image(name, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def _imread(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"{path} does not decode"
    return image


def _face_crop(photo: Path, face: DetectedFace) -> np.ndarray:
    """A 250 px LFW-like crop around a face found at 640 px, cut from the full-size photo."""
    image = _imread(photo)
    scale = max(image.shape[:2]) / MAX_SIDE
    x, y, w, h = (v * scale for v in face.bbox)
    half = 1.25 * max(w, h)  # LFW's faces fill about 40% of the frame
    cx, cy = x + w / 2, y + h / 2
    x0, y0 = int(max(cx - half, 0)), int(max(cy - half, 0))
    crop = image[y0 : int(cy + half), x0 : int(cx + half)]
    return cv2.resize(crop, (250, 250), interpolation=cv2.INTER_AREA)


@pytest.fixture
def tiny_lfw(tmp_path: Path, sample_photos: dict[str, Path], sample_faces: dict[str, list[DetectedFace]]) -> Path:
    root = tmp_path / "lfw"
    for i, photo in enumerate(("obama.jpg", "obama2.jpg", "obama3.jpg"), start=1):
        (root / "Barack_Obama").mkdir(parents=True, exist_ok=True)
        shutil.copy(sample_photos[photo], root / lfw_image("Barack_Obama", i))
    biden = _imread(sample_photos["biden.jpg"])
    _write(root, "Joe_Biden", 1, biden)
    _write(root, "Joe_Biden", 2, cv2.flip(biden, 1))
    for guest, photo in GUESTS.items():
        face = most_prominent(sample_faces[photo])
        assert face is not None
        crop = _face_crop(sample_photos[photo], face)
        _write(root, guest, 1, crop)
        _write(root, guest, 2, cv2.flip(crop, 1))
    _write(root, "No_Face", 1, np.full((250, 250, 3), 128, np.uint8))
    (root / "pairs.txt").write_text(PAIRS)
    return root


def test_lfw_eval_reports_accuracy_and_faceless_images(
    tiny_lfw: Path, sface_model_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report" / "lfw.json"
    code = lfw_main(
        [
            "--dir",
            str(tiny_lfw),
            "--model",
            "sface",
            "--model-root",
            str(sface_model_root),
            "--json",
            str(out),
            "--batch",
            "5",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "accuracy  0.9375 ± 0.0625" in printed
    assert "no face found in 1 images (1 pairs counted wrong)" in printed
    report = json.loads(out.read_text())
    assert report["model_id"] == "yunet-2023mar+sface-2021dec"
    assert (report["folds"], report["pairs"], report["images"]) == (2, 16, 14)
    assert (report["images_no_face"], report["pairs_no_face"]) == (1, 1)
    assert report["no_face_images"] == ["No_Face/No_Face_0001.jpg"]
    # Fold 0 loses only its faceless pair; fold 1 is all right.
    assert report["fold_accuracies"] == pytest.approx([7 / 8, 1.0])
    assert all(0.3 < t < 0.8 for t in report["fold_thresholds"])


def test_lfw_eval_refuses_missing_images_and_missing_models(
    tiny_lfw: Path, tmp_path: Path, sface_model_root: Path
) -> None:
    (tiny_lfw / lfw_image("Guest_A", 2)).unlink()
    assert lfw_main(["--dir", str(tiny_lfw), "--model-root", str(sface_model_root)]) == 2
    assert lfw_main(["--dir", str(tiny_lfw), "--model-root", str(tmp_path / "empty")]) == 2
    assert lfw_main(["--dir", str(tiny_lfw), "--model", "none"]) == 2
