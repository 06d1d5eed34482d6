"""The face quality gate: minimum face size, detector score and sharpness, checked before a face is used.

Pure: no model here. Sharpness is the variance of the Laplacian of the face's
grey crop, aligned and scaled to SHARPNESS_SIZE px as the recognizer sees it,
so a face's number does not depend on how large the photo was. The defaults
(pipeline/settings.py QualitySettings) come from docs/quality.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from pipeline.facelib.model import DetectedFace

if TYPE_CHECKING:
    from pipeline.settings import QualitySettings

logger = logging.getLogger(__name__)

SHARPNESS_SIZE = 112  # the recognizers' input side (SFace, ArcFace)
# ArcFace's 5-point template in a 112x112 crop (eyes, nose tip, mouth corners); SFace aligns to it too.
_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                      [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)

TOO_SMALL, LOW_SCORE, TOO_BLURRED = "too_small", "low_score", "too_blurred"
REASONS = (TOO_SMALL, LOW_SCORE, TOO_BLURRED)


@dataclass(frozen=True)
class Rejection:
    """Why a face failed the gate: a stable reason code and a message for people."""

    reason: str
    message: str


@dataclass(frozen=True)
class QualityGate:
    """Per-deployment minimums; a zero turns its check off (QualityGate() passes every face)."""

    min_face_px: float = 0.0  # shorter side of the box, in original-image pixels
    min_det_score: float = 0.0
    min_sharpness: float = 0.0  # see crop_sharpness()

    @classmethod
    def from_settings(cls, settings: QualitySettings) -> QualityGate:
        """The gate FACEMATCH_QUALITY_* describes."""
        return cls(min_face_px=settings.min_face_px, min_det_score=settings.min_det_score,
                   min_sharpness=settings.min_sharpness)

    @property
    def enabled(self) -> bool:
        """Whether any check is on."""
        return bool(self.min_face_px or self.min_det_score or self.min_sharpness)

    def check(self, face: DetectedFace) -> Rejection | None:
        """The first check the face fails (size, then score, then sharpness), or None.

        Size comes first: a tiny face is also blurry, and "too small" is the
        fix the sender can act on. A face without a sharpness (precomputed, or
        a pack that does not measure it) skips that check.
        """
        side = min(face.bbox[2], face.bbox[3])
        if self.min_face_px and side < self.min_face_px:
            return Rejection(TOO_SMALL, f"face is {side:.0f} px wide, under {self.min_face_px:.0f} px: "
                                        "move closer or send a larger photo")
        if self.min_det_score and face.det_score < self.min_det_score:
            return Rejection(LOW_SCORE, f"face detector score {face.det_score:.2f} is under "
                                        f"{self.min_det_score:.2f}: the face is hidden, turned away or badly lit")
        if self.min_sharpness and face.sharpness is not None and face.sharpness < self.min_sharpness:
            return Rejection(TOO_BLURRED, f"face sharpness {face.sharpness:.1f} is under "
                                          f"{self.min_sharpness:.1f}: the face is blurred or out of focus")
        return None

    def split(self, faces: Sequence[DetectedFace]) -> tuple[list[DetectedFace], list[Rejection]]:
        """(faces that pass, rejections of the others)."""
        kept: list[DetectedFace] = []
        rejected: list[Rejection] = []
        for face in faces:
            rejection = self.check(face)
            if rejection is None:
                kept.append(face)
            else:
                rejected.append(rejection)
        return kept, rejected


NO_GATE = QualityGate()


def crop_sharpness(crop: np.ndarray) -> float:
    """Variance of the Laplacian of a face crop (BGR or grey), scaled to SHARPNESS_SIZE square first."""
    grey = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY) if crop.ndim == 3 else crop
    if grey.shape[:2] != (SHARPNESS_SIZE, SHARPNESS_SIZE):
        grey = cv2.resize(grey, (SHARPNESS_SIZE, SHARPNESS_SIZE), interpolation=cv2.INTER_AREA)
    return float(cv2.Laplacian(grey.astype(np.float32), cv2.CV_32F).var())


def face_sharpness(image: np.ndarray, bbox: Sequence[float], landmarks: Sequence[float] | None) -> float:
    """Sharpness of one face of a BGR image: aligned on its 5 landmarks when given, else its box."""
    crop = None
    if landmarks is not None and len(landmarks) == 10:
        points = np.asarray(landmarks, dtype=np.float32).reshape(5, 2)
        matrix, _ = cv2.estimateAffinePartial2D(points, _TEMPLATE, method=cv2.LMEDS)
        if matrix is not None:
            crop = cv2.warpAffine(image, matrix, (SHARPNESS_SIZE, SHARPNESS_SIZE))
    if crop is None:
        x, y, w, h = (int(round(v)) for v in bbox)
        height, width = image.shape[:2]
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(width, x + max(w, 1)), min(height, y + max(h, 1))
        if x1 <= x0 or y1 <= y0:
            return 0.0
        crop = image[y0:y1, x0:x1]
    return crop_sharpness(crop)
