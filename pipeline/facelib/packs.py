"""Build a model pack by name; nothing reads weights until the model's load().

insightface and OpenCV are imported only when their pack is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.facelib.model import FaceModel
from pipeline.facelib.spec import NONE, SFACE_SPEC, spec_for


def load_model(name: str, model_root: Path, **opts: Any) -> FaceModel | None:
    """A lazily loading model for the pack (call .load() to fail fast), or None for "none".

    opts go to the pack's constructor (det_threshold, providers, intra_op_threads,
    max_batch, and for sface also backend); det_threshold=None means the pack's default.
    """
    spec = spec_for(name)
    if spec.name == NONE:
        return None
    if spec.name == SFACE_SPEC.name:
        from pipeline.facelib.sface import SFaceModel

        return SFaceModel(Path(model_root), **opts)
    from pipeline.facelib.insightface_pack import InsightFacePack

    return InsightFacePack(Path(model_root), spec.name, **opts)
