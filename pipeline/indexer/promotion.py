"""Promotion of a large event from exact search to an approximate IVF-SQ8 index.

Below `IndexOptions.promote_at` faces an event is an exact IndexFlatIP. Above
it, the event moves to IVF with 8-bit scalar quantization (512 B a face at
512-d instead of 2 KB; measured in bench/large_event.py against HNSW and
IVF-PQ: HNSW took 3-4 min to build 100k faces on 2 cores, IVF-PQ lost recall).

The new index is trained and filled in a background thread from a copy of the
vectors, while the old index keeps answering. Changes made meanwhile are
journaled and replayed onto the new index on the runner's thread, just before
the swap, so the swap never loses an upsert or a delete. The same path
retrains an event that has grown `regrow_factor` times past its last build
(more inverted lists for more faces).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexOptions:
    """How an event index grows (IndexerSettings: index_promote_at, index_nprobe, ...)."""

    promote_at: int = 100_000  # faces; 0 disables promotion
    nprobe: int = 64  # inverted lists scanned per query (at least): recall against latency
    # ...and at least this share of the lists, as events grow. 0.15: recall@10 of faces >= 0.5 is 0.96 at
    # 1M x 128 (0.93 at 0.1) and 0.98 at 1M x 512, p99 10-17 ms on one shared core (bench/large_event.py).
    probe_fraction: float = 0.15
    regrow_factor: float = 4.0  # retrain once the event is this many times its last build
    build_threads: int = 1  # OpenMP threads of the background build (one core stays for queries)


def choose_nlist(faces: int) -> int:
    """Inverted lists for an event of this size: ~2*sqrt(n), within [16, 4096]."""
    return int(min(4096, max(16, 2 * math.sqrt(max(faces, 1)))))


def probes(nlist: int, options: IndexOptions) -> int:
    """Lists to scan: same-identity faces (cosine ~0.6-0.8) spread over more lists as nlist grows."""
    return max(1, min(nlist, max(options.nprobe, math.ceil(nlist * options.probe_fraction))))


def build_ivf_sq8(vectors: np.ndarray, ids: np.ndarray, nprobe: int) -> Any:
    """Train IVF-SQ8 (inner product, no residuals) on the vectors and add them under their ids."""
    dim = vectors.shape[1]
    nlist = choose_nlist(len(vectors))
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist,
                                          faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    # Without residuals a code decodes on its own, so a rebuild can read the vectors back.
    index.by_residual = False
    index.cp.niter = 10
    index.cp.min_points_per_centroid = 5  # small events: fewer points a list is fine, no warning
    sample = min(len(vectors), 40 * nlist)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(vectors), size=sample, replace=False)) if sample < len(vectors) else None
    index.train(vectors if rows is None else vectors[rows])
    index.add_with_ids(vectors, ids)
    index.nprobe = min(nprobe, nlist)
    return index


def index_contents(index: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A copy of (vectors, ids) of a flat IndexIDMap2 or an IVF-SQ8 index (decoded)."""
    if isinstance(index, faiss.IndexIDMap2):
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        flat: Any = faiss.downcast_index(index.index)
        vectors = faiss.vector_to_array(flat.codes).view(np.float32).reshape(-1, dim)
        return vectors, ids
    ivf: Any = index  # an IndexIVFScalarQuantizer, as built above or deserialized
    invlists: Any = ivf.invlists
    code_size = int(ivf.code_size)
    parts_v: list[np.ndarray] = []
    parts_i: list[np.ndarray] = []
    for list_no in range(ivf.nlist):
        n = invlists.list_size(list_no)
        if n == 0:
            continue
        codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), n * code_size).copy()
        parts_i.append(faiss.rev_swig_ptr(invlists.get_ids(list_no), n).copy())
        parts_v.append(ivf.sq.decode(codes.reshape(n, code_size)))
    if not parts_v:
        return np.zeros((0, dim), dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(parts_v).astype(np.float32), np.concatenate(parts_i).astype(np.int64)


class Promotion:
    """One background build, plus the journal of changes to replay at the swap."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, options: IndexOptions) -> None:
        self.options = options
        self.faces = len(ids)
        self.journal: list[tuple[str, np.ndarray, np.ndarray | None]] = []
        self.result: Any = None
        self.error: BaseException | None = None
        self.build_s = 0.0
        self._thread = threading.Thread(target=self._build, args=(vectors, ids), daemon=True,
                                        name="facematch-index-build")
        self._thread.start()

    def _build(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        started = time.perf_counter()
        try:
            # OpenMP settings are per thread: this leaves the query thread's setting alone.
            faiss.omp_set_num_threads(self.options.build_threads)
            self.result = build_ivf_sq8(vectors, ids, probes(choose_nlist(len(ids)), self.options))
        except BaseException as exc:  # reported on the runner thread, never lost in this one
            self.error = exc
        self.build_s = time.perf_counter() - started

    def record_add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """An upsert applied to the old index after the copy was taken."""
        self.journal.append(("add", ids, vectors))

    def record_remove(self, ids: np.ndarray) -> None:
        """A delete applied to the old index after the copy was taken."""
        self.journal.append(("remove", ids, None))

    def done(self) -> bool:
        """True once the build thread has finished (well or not)."""
        return not self._thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the build finishes; False on timeout."""
        self._thread.join(timeout_s)
        return self.done()

    def finish(self) -> Any:
        """The new index with the journal replayed; raises what the build raised."""
        if self.error is not None:
            raise RuntimeError("index build failed") from self.error
        index = self.result
        for op, ids, vectors in self.journal:
            if op == "add":
                index.add_with_ids(vectors, ids)
            else:
                index.remove_ids(ids)
        logger.info("event index promoted to IVF-SQ8: %d faces built in %.1fs, %d changes replayed",
                    self.faces, self.build_s, len(self.journal))
        self.journal.clear()
        return index
