"""Face geometry written once: prominence, and boxes/landmarks between decoded and original pixels."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from pipeline.facelib.model import DetectedFace

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


def fit_scale(width: int, height: int, max_side: int) -> float:
    """Original pixels per model pixel so the long side fits max_side (1.0 when it already fits or max_side=0)."""
    longest = max(width, height)
    return longest / max_side if max_side and longest > max_side else 1.0


def fitted_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """(width, height) after dividing by scale, at least one pixel each."""
    return max(1, round(width / scale)), max(1, round(height / scale))


def map_box_to_original(bbox: Sequence[float], scale: float) -> tuple[float, float, float, float]:
    """Map an (x, y, width, height) box from decoded to original-image pixels."""
    x, y, w, h = bbox
    return (x * scale, y * scale, w * scale, h * scale)


def map_landmarks_to_original(landmarks: Sequence[float] | None, scale: float) -> tuple[float, ...] | None:
    """Map flattened landmark coordinates (x0, y0, x1, y1, ...) to original-image pixels."""
    if landmarks is None:
        return None
    return tuple(float(v) * scale for v in landmarks)


def to_original(face: DetectedFace, scale: float) -> DetectedFace:
    """The face in the original photo's pixels (detection ran on a downscaled copy)."""
    # Sharpness is measured on the normalised crop, so it does not change with the scale.
    return replace(face, bbox=map_box_to_original(face.bbox, scale), det_score=float(face.det_score),
                   landmarks=map_landmarks_to_original(face.landmarks, scale))
