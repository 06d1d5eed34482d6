"""What each model pack promises (ModelSpec), known without loading weights or OpenCV.

The indexer, the producers and the bridge size indexes and validate
embeddings from these specs; only `packs.load_model` touches weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """What the pipeline needs to know about a pack without loading it."""

    name: str  # the setting value, e.g. "sface"
    model_id: str  # goes into every faces record
    dim: int
    default_threshold: float  # cosine similarity above which two faces match
    license: str


NONE = "none"  # no model: events carry precomputed embeddings
PRECOMPUTED_DEFAULT_DIM = 512
PRECOMPUTED_THRESHOLD = 0.35

# The offline default pack: OpenCV Zoo's YuNet detector + SFace recognizer,
# kept in <model_root>/SFACE_SUBDIR/ under these file names.
SFACE_SUBDIR = "sface"
YUNET_FILE = "face_detection_yunet_2023mar.onnx"
SFACE_FILE = "face_recognition_sface_2021dec.onnx"
SFACE_SPEC = ModelSpec(
    name="sface",
    model_id="yunet-2023mar+sface-2021dec",
    dim=128,
    default_threshold=0.363,  # OpenCV's published cosine threshold for SFace
    license="Apache-2.0 (SFace) / MIT (YuNet)",
)

INSIGHTFACE_LICENSE = "non-commercial research only (InsightFace model packs)"
# The packs we know; any other folder name is allowed through insightface_spec().
KNOWN_INSIGHTFACE_PACKS = ("buffalo_l", "buffalo_m", "buffalo_s", "buffalo_sc", "antelopev2")
INSIGHTFACE_DECLARED_DIM = 512  # what InsightFace's published recognizers emit; the loaded model has the last word
INSIGHTFACE_THRESHOLD = 0.40


def insightface_spec(pack: str, dim: int = INSIGHTFACE_DECLARED_DIM) -> ModelSpec:
    """The spec of an InsightFace pack named after its folder under `<model_root>/models/`."""
    return ModelSpec(name=pack, model_id=f"insightface-{pack}", dim=dim,
                     default_threshold=INSIGHTFACE_THRESHOLD, license=INSIGHTFACE_LICENSE)


SPECS: dict[str, ModelSpec] = {
    SFACE_SPEC.name: SFACE_SPEC,
    **{pack: insightface_spec(pack) for pack in KNOWN_INSIGHTFACE_PACKS},
}


def precomputed_spec(embedding_dim: int | None = None) -> ModelSpec:
    """The spec for model "none": the caller's embeddings, of the caller's dimension."""
    dim = PRECOMPUTED_DEFAULT_DIM if embedding_dim is None else int(embedding_dim)
    if dim <= 0:
        raise ValueError(f"embedding_dim must be positive, not {dim}")
    return ModelSpec(name=NONE, model_id="precomputed", dim=dim, default_threshold=PRECOMPUTED_THRESHOLD,
                     license="n/a (embeddings supplied by the producer)")


def _is_pack_name(name: str) -> bool:
    # Any other insightface pack is a folder under <model_root>/models/; a
    # plain name keeps that folder inside the model root.
    return bool(name) and name.replace("_", "").replace("-", "").isalnum()


def spec_for(name: str, embedding_dim: int | None = None) -> ModelSpec:
    """The spec of a pack; embedding_dim only matters for "none"."""
    if name == NONE:
        return precomputed_spec(embedding_dim)
    if name in SPECS:
        return SPECS[name]
    if _is_pack_name(name):
        logger.info("model %r is not a known pack; treating it as an InsightFace pack folder", name)
        return insightface_spec(name)
    raise ValueError(f"unknown model {name!r}: use one of {sorted([*SPECS, NONE])} or an InsightFace pack folder name")
