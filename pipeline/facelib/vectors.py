"""Embedding rules written once: validation, normalisation, splitting a batch per image."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.errors import PoisonRecord


class InvalidEmbedding(PoisonRecord):
    """An embedding of the wrong length, with NaN/inf, or all zeros."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_embedding", message)


def normalize_embedding(values: Sequence[float] | np.ndarray, dim: int, name: str = "embedding") -> np.ndarray:
    """Validate (length, finite, non-zero) and L2-normalize one embedding; raises InvalidEmbedding.

    `name` is the field the caller knows it by, so the message points at it.
    """
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, refused below
        vector = np.asarray(values, dtype=np.float32).reshape(-1)
    if vector.shape[0] != dim:
        raise InvalidEmbedding(f"{name} has {vector.shape[0]} values; this pipeline's model expects {dim}")
    if not np.all(np.isfinite(vector)):
        raise InvalidEmbedding(f"{name} contains NaN or infinite values")
    norm = float(np.linalg.norm(vector))
    if norm == 0.0 or not np.isfinite(norm):  # float32 overflow makes the norm inf
        raise InvalidEmbedding(f"{name} is all zeros or too large to normalize")
    return (vector / norm).astype(np.float32, copy=False)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as float32; zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    scaled: np.ndarray = (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return scaled


def split_per_image(counts: Sequence[int], embeddings: np.ndarray) -> list[np.ndarray]:
    """Cut one stacked batch of embeddings back into each image's rows, in order."""
    if sum(counts) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings for {sum(counts)} faces")
    bounds = np.cumsum([0, *counts])
    return [embeddings[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
