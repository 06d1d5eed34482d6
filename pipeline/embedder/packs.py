"""Which model packs exist, what they promise (ModelSpec), and how to build one.

Specs are known without loading weights, so the indexer and matcher can size
their indexes and thresholds without a model. Nothing reads weights until the
returned model's load(); insightface itself is imported only then.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.embedder.insightface_pack import KNOWN_PACKS, insightface_spec
from pipeline.embedder.model import FaceModel, ModelSpec
from pipeline.embedder.sface import SFACE_SPEC

logger = logging.getLogger(__name__)

NONE = "none"  # no model: events carry precomputed embeddings
PRECOMPUTED_DEFAULT_DIM = 512
PRECOMPUTED_THRESHOLD = 0.35

SPECS: dict[str, ModelSpec] = {
    SFACE_SPEC.name: SFACE_SPEC,
    **{pack: insightface_spec(pack) for pack in KNOWN_PACKS},
}


def precomputed_spec(embedding_dim: int | None = None) -> ModelSpec:
    """The spec for model "none": the caller's embeddings, of the caller's dimension."""
    dim = PRECOMPUTED_DEFAULT_DIM if embedding_dim is None else int(embedding_dim)
    if dim <= 0:
        raise ValueError(f"embedding_dim must be positive, not {dim}")
    return ModelSpec(
        name=NONE,
        model_id="precomputed",
        dim=dim,
        default_threshold=PRECOMPUTED_THRESHOLD,
        license="n/a (embeddings supplied by the producer)",
    )


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


def load_model(name: str, model_root: Path, **opts: Any) -> FaceModel | None:
    """A lazily loading model for the pack (call .load() to fail fast), or None for "none".

    opts go to the pack's constructor (det_threshold, providers, intra_op_threads,
    max_batch, and for sface also backend); det_threshold=None means the pack's default.
    """
    spec = spec_for(name)
    if spec.name == NONE:
        return None
    if spec.name == SFACE_SPEC.name:
        from pipeline.embedder.sface import SFaceModel

        return SFaceModel(Path(model_root), **opts)
    from pipeline.embedder.insightface_pack import InsightFacePack

    return InsightFacePack(Path(model_root), spec.name, **opts)
