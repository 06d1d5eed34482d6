"""The face-model seam: detect + align + embed a batch of images.

Every model pack implements `FaceModel`; the pipeline never hard-codes a
dimension or a threshold, it asks the pack (via `ModelSpec`) instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pipeline.facelib.spec import ModelSpec


@dataclass(frozen=True)
class DetectedFace:
    """One face found in one image, in the coordinates of the image given."""

    bbox: tuple[float, float, float, float]  # x, y, width, height in pixels
    det_score: float
    landmarks: tuple[float, ...] | None  # 5 points flattened: x0, y0, ..., x4, y4
    embedding: np.ndarray  # float32, shape (dim,), L2-normalized
    # Variance of the Laplacian of the aligned crop (pipeline/facelib/quality.py); None: not measured.
    sharpness: float | None = None


class FaceModel(Protocol):
    """A loaded (or lazily loadable) model pack."""

    spec: ModelSpec

    @property
    def provider(self) -> str:
        """The onnxruntime/OpenCV execution provider actually in use."""
        ...

    def load(self) -> None:
        """Load weights; raises ModelUnavailable with a fix-it message."""
        ...

    def detect_and_embed(self, images: Sequence[np.ndarray]) -> list[list[DetectedFace]]:
        """Faces per image, for BGR uint8 images (H, W, 3)."""
        ...


class ModelUnavailable(RuntimeError):
    """The configured pack cannot be loaded; the message says how to fix it."""


PROVIDER_PREFERENCE = ("CUDAExecutionProvider", "CPUExecutionProvider")


def preferred_providers(available: Sequence[str] | None = None) -> list[str]:
    """onnxruntime providers to ask for, best first: CUDA when present, then CPU."""
    if available is None:
        import onnxruntime  # lazy: the seam itself must not need onnxruntime

        available = onnxruntime.get_available_providers()
    return [p for p in PROVIDER_PREFERENCE if p in available] or ["CPUExecutionProvider"]
