"""Selfie handling for the bridge: pick the face, shape the V1 answer."""

from __future__ import annotations

from typing import Any

from pipeline.facelib.geometry import box_area, most_prominent
from pipeline.facelib.model import DetectedFace
from pipeline.facelib.quality import NO_GATE, QualityGate
from pipeline.facelib.spec import ModelSpec


class SelfieError(ValueError):
    """The selfie shows no usable face, or more than one; `reason` is a stable code for clients."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def pick_single_face(faces: list[DetectedFace], gate: QualityGate = NO_GATE) -> DetectedFace:
    """The selfie's face; refuses zero or several faces so nobody matches as someone else.

    Faces failing the gate are dropped first, as the embedder drops them from
    the index (a tiny face in the background does not count); when none is
    left, the answer says why the most prominent one failed.
    """
    if not faces:
        raise SelfieError("no face found in the image: send a well-lit photo of your face", "no_face")
    checked = [(face, gate.check(face)) for face in faces]
    usable = [face for face, rejection in checked if rejection is None]
    if len(usable) > 1:
        raise SelfieError(f"found {len(usable)} faces: send a selfie that shows only your face", "several_faces")
    if usable:
        return usable[0]
    failed = [(face, rejection) for face, rejection in checked if rejection is not None]
    _, main = max(failed, key=lambda pair: (box_area(pair[0]), pair[0].det_score))  # the most prominent face
    raise SelfieError(main.message, main.reason)


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
