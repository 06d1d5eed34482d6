"""Clustered synthetic face embeddings, shared by the benchmarks.

An event's faces are not uniform noise: each guest appears in many photos, so
the index holds several noisy copies of every identity, and a selfie is one
more noisy copy of one of them. Uniform random vectors make every approximate
index look perfect or hopeless; clustered ones make recall@k meaningful.

Noise is isotropic with total norm `noise` before renormalizing, so
cos(copy, centre) ~ 1/sqrt(1+noise^2) and cos(copy, copy) ~ 1/(1+noise^2):
the default 0.65 gives ~0.70 between two photos of one guest (ArcFace/SFace
genuine pairs are ~0.5-0.8) and ~0 between guests.

    from bench.datasets import clustered_faces, selfie_queries
    faces = clustered_faces(100_000, dim=512, seed=0)       # Faces(vectors, identity)
    queries = selfie_queries(faces, 500, seed=1)            # Faces of 500 held-out selfies
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_NOISE = 0.65
DEFAULT_MEAN_COPIES = 8.0


@dataclass(frozen=True)
class Faces:
    """L2-normalized float32 vectors (n, dim) and the identity (guest) of each row."""

    vectors: np.ndarray
    identity: np.ndarray
    centres: np.ndarray
    noise: float

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.vectors.shape[1])


def _normalize(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _noisy_copies(centres: np.ndarray, rows: np.ndarray, noise: float, rng: np.random.Generator,
                  chunk: int = 65_536) -> np.ndarray:
    out = np.empty((len(rows), centres.shape[1]), dtype=np.float32)
    scale = np.float32(noise / np.sqrt(centres.shape[1]))
    for start in range(0, len(rows), chunk):  # bounded temporaries at 1M x 512
        part = rows[start:start + chunk]
        block = rng.standard_normal((len(part), centres.shape[1]), dtype=np.float32)
        block *= scale
        block += centres[part]
        out[start:start + len(part)] = _normalize(block)
    return out


def clustered_faces(n_faces: int, dim: int = 512, mean_copies: float = DEFAULT_MEAN_COPIES,
                    noise: float = DEFAULT_NOISE, seed: int = 0) -> Faces:
    """`n_faces` faces of about n_faces/mean_copies guests; copies per guest vary (1 + Poisson)."""
    rng = np.random.default_rng(seed)
    n_ids = max(1, int(round(n_faces / mean_copies)))
    counts = 1 + rng.poisson(max(mean_copies - 1, 0.0), size=n_ids)
    identity = np.repeat(np.arange(n_ids, dtype=np.int64), counts)
    if len(identity) < n_faces:  # top up with random guests so the size is exact
        identity = np.concatenate([identity, rng.integers(0, n_ids, n_faces - len(identity))])
    identity = rng.permutation(identity[:n_faces])  # photos arrive in no order of guest
    centres = _normalize(rng.standard_normal((n_ids, dim), dtype=np.float32))
    return Faces(_noisy_copies(centres, identity, noise, rng), identity, centres, noise)


def selfie_queries(faces: Faces, n_queries: int, seed: int = 1) -> Faces:
    """New noisy copies (not in the index) of guests drawn from those present."""
    rng = np.random.default_rng(seed)
    identity = rng.choice(faces.identity, size=n_queries)
    return Faces(_noisy_copies(faces.centres, identity, faces.noise, rng), identity, faces.centres, faces.noise)


def exact_top_k(faces: Faces, queries: Faces, k: int) -> np.ndarray:
    """Ground truth: row ids of the k highest inner products per query (FAISS IndexFlatIP)."""
    import faiss

    index = faiss.IndexFlatIP(faces.dim)
    index.add(faces.vectors)
    _, ids = index.search(queries.vectors, k)
    return np.asarray(ids, dtype=np.int64)


def exact_search(faces: Faces, queries: Faces, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth with scores: (inner products, row ids) of the k best rows per query."""
    import faiss

    index = faiss.IndexFlatIP(faces.dim)
    index.add(faces.vectors)
    scores, ids = index.search(queries.vectors, k)
    return np.asarray(scores, dtype=np.float32), np.asarray(ids, dtype=np.int64)


def recall_at_k(found: list[list[int]], truth: np.ndarray, k: int) -> float:
    """Mean |found[:k] & truth[:k]| / k over queries."""
    hits = sum(len(set(f[:k]) & set(t[:k].tolist())) for f, t in zip(found, truth))
    return hits / (k * len(truth))


def recall_above(found: list[list[int]], truth: np.ndarray, truth_scores: np.ndarray, k: int,
                 threshold: float) -> float:
    """Share of the exact top-k rows scoring >= threshold (the faces a match returns) that were found.

    Beyond a guest's own photos the exact top-k is filled with strangers at cosine ~0 that no
    threshold returns; recall@k counts them, this does not.
    """
    wanted = [set(t[:k][s[:k] >= threshold].tolist()) for t, s in zip(truth, truth_scores)]
    hits = sum(len(set(f[:k]) & w) for f, w in zip(found, wanted))
    return hits / max(1, sum(len(w) for w in wanted))
