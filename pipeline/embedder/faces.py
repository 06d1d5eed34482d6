"""Small helpers over detected faces, shared by the embedder, eval and selfie API."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from pipeline.embedder.model import DetectedFace

logger = logging.getLogger(__name__)


def box_area(face: DetectedFace) -> float:
    """Box area in square pixels (0 for degenerate boxes)."""
    _, _, width, height = face.bbox
    return max(width, 0.0) * max(height, 0.0)


def most_prominent(faces: Sequence[DetectedFace]) -> DetectedFace | None:
    """The largest face by box area; detector score breaks ties; None if empty.

    Area alone, not area x score: in a selfie or an LFW crop the subject is the
    biggest face, and every face we get has already passed the detector's score
    threshold, so scores barely differ while a background face is much smaller.
    """
    if not faces:
        return None
    return max(faces, key=lambda f: (box_area(f), f.det_score))


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32; zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
