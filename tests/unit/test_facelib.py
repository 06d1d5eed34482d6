"""The face-model library: rules written once, and the package boundaries that keep stages apart."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.facelib.geometry import fit_scale, fitted_size, most_prominent, to_original
from pipeline.facelib.model import DetectedFace
from pipeline.facelib.spec import SFACE_SPEC, spec_for
from pipeline.facelib.vectors import InvalidEmbedding, normalize_embedding, split_per_image

REPO = Path(__file__).resolve().parents[2]
STAGES = ("embedder", "indexer", "matcher", "producers", "evaluation")


def _face(x: float, w: float, score: float = 0.9) -> DetectedFace:
    return DetectedFace(bbox=(x, 0.0, w, w), det_score=score, landmarks=(x, 1.0, x + 1, 2.0),
                        embedding=np.ones(4, np.float32))


def test_normalize_embedding_names_the_field_and_refuses_bad_vectors() -> None:
    assert np.linalg.norm(normalize_embedding([3, 4], 2)) == pytest.approx(1.0)
    with pytest.raises(InvalidEmbedding, match="user_embedding has 3 values; .* expects 2"):
        normalize_embedding([1, 2, 3], 2, "user_embedding")
    with pytest.raises(InvalidEmbedding, match="NaN or infinite"):
        normalize_embedding([1, float("nan")], 2)
    with pytest.raises(InvalidEmbedding, match="all zeros"):
        normalize_embedding([0, 0], 2)
    with pytest.raises(InvalidEmbedding) as info:
        normalize_embedding([3e38, 3e38], 2)  # float32 overflow: the norm is inf
    assert info.value.reason == "invalid_embedding"


def test_split_per_image_keeps_order_and_refuses_a_wrong_total() -> None:
    rows = np.arange(12, dtype=np.float32).reshape(6, 2)
    parts = split_per_image([2, 0, 3, 1], rows)
    assert [len(p) for p in parts] == [2, 0, 3, 1]
    assert np.array_equal(np.concatenate(parts), rows)
    assert parts[3][0].tolist() == [10.0, 11.0]
    with pytest.raises(ValueError, match="5 faces"):
        split_per_image([2, 3], rows)


def test_geometry_maps_faces_back_to_original_pixels() -> None:
    assert fit_scale(1280, 960, 640) == pytest.approx(2.0)
    assert fit_scale(600, 400, 640) == 1.0 and fit_scale(5000, 10, 0) == 1.0
    assert fitted_size(1281, 3, 2.0) == (640, 2)
    mapped = to_original(_face(10, 20), 2.0)
    assert mapped.bbox == (20.0, 0.0, 40.0, 40.0)
    assert mapped.landmarks == (20.0, 2.0, 22.0, 4.0)
    assert most_prominent([_face(0, 5, 0.99), _face(0, 9, 0.81)]) is not None
    assert most_prominent([_face(0, 5, 0.99), _face(0, 9, 0.81)]).bbox[2] == 9  # type: ignore[union-attr]
    assert most_prominent([]) is None


def test_specs_are_known_without_weights() -> None:
    assert spec_for("sface") is SFACE_SPEC and SFACE_SPEC.dim == 128
    assert spec_for("none", 64).dim == 64


def test_specs_and_vectors_do_not_load_opencv() -> None:
    code = ("import sys, pipeline.facelib.spec, pipeline.facelib.vectors, pipeline.indexer.main, "
            "pipeline.producers.listener, pipeline.producers.bulk; "
            "print(sorted(m for m in ('cv2', 'onnxruntime', 'insightface') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_a_sibling_stage(stage: str) -> None:
    offenders = []
    for path in sorted((REPO / "pipeline" / stage).glob("*.py")):
        for module in _imported_modules(path):
            parts = module.split(".")
            if len(parts) >= 2 and parts[0] == "pipeline" and parts[1] in STAGES and parts[1] != stage:
                offenders.append(f"{path.relative_to(REPO)} imports {module}")
    assert not offenders, "stages must share code through pipeline/ modules, not each other:\n" + "\n".join(offenders)
