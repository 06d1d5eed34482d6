"""Selfie handling for the bridge: pick the face, shape the V1 answer."""

from __future__ import annotations

from typing import Any

from pipeline.facelib.geometry import most_prominent
from pipeline.facelib.model import DetectedFace
from pipeline.facelib.spec import ModelSpec


class SelfieError(ValueError):
    """The selfie shows no face, or more than one."""


def pick_single_face(faces: list[DetectedFace]) -> DetectedFace:
    """The selfie's face; refuses zero or several faces so nobody matches as someone else."""
    if not faces:
        raise SelfieError("no face found in the image: send a well-lit photo of your face")
    if len(faces) > 1:
        raise SelfieError(f"found {len(faces)} faces: send a selfie that shows only your face")
    return faces[0]


def face_json(face: DetectedFace) -> dict[str, Any]:
    """One face as JSON (box in the uploaded image's pixels)."""
    return {"bbox": [float(v) for v in face.bbox], "det_score": float(face.det_score),
            "landmarks": None if face.landmarks is None else [float(v) for v in face.landmarks]}


def analyze_payload(faces: list[DetectedFace], spec: ModelSpec) -> dict[str, Any]:
    """The V1 `/api/face/analyze` answer: `descriptor` of the most prominent face, plus all faces."""
    main = most_prominent(faces)
    return {"success": main is not None, "face_count": len(faces),
            "descriptor": None if main is None else [float(v) for v in main.embedding],
            "face": None if main is None else face_json(main),
            "faces": [face_json(f) for f in faces], "model": spec.model_id,
            "embedding_dim": spec.dim,
            "error": None if main is not None else "no face found in the image"}
