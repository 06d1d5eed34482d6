"""One event's FAISS index: exact inner product over L2-normalized faces.

Faces are stored per photo so that re-ingesting a photo replaces its faces
(never duplicates) and matches are reported per photo, scored by its best face.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from pipeline.records import Face, MatchedFace, PhotoMatch


class EventIndex:
    """FAISS IndexIDMap2 over IndexFlatIP, plus the face -> photo mapping."""

    def __init__(self, dim: int, model_id: str) -> None:
        self.dim, self.model_id = dim, model_id
        self.index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))  # FAISS stubs reject numpy ids
        self.next_id = 0
        self.photo_faces: dict[str, list[int]] = {}
        self.face_photo: dict[int, str] = {}
        self.face_bbox: dict[int, tuple[float, ...]] = {}
        # Newest occurred_at (epoch ms) of the photos upserted: the index's freshness.
        # Deletes leave it: it says how recent the applied data is, not what remains.
        self.newest_at = 0

    @property
    def size(self) -> int:
        """Faces indexed."""
        return int(self.index.ntotal)

    @property
    def photos(self) -> int:
        """Photos indexed (a photo with zero faces counts: it was processed)."""
        return len(self.photo_faces)

    def upsert(self, photo_id: str, faces: Sequence[Face], occurred_at: int = 0) -> None:
        """Replace the photo's faces; `occurred_at` (epoch ms) of its event moves newest_at forward."""
        self.newest_at = max(self.newest_at, occurred_at)
        self.delete(photo_id)
        ids = list(range(self.next_id, self.next_id + len(faces)))
        self.next_id += len(faces)
        if faces:
            vectors = np.stack([np.asarray(f.embedding, dtype=np.float32) for f in faces])
            self.index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
        for face_id, face in zip(ids, faces):
            self.face_photo[face_id] = photo_id
            self.face_bbox[face_id] = tuple(float(v) for v in face.bbox)
        self.photo_faces[photo_id] = ids

    def delete(self, photo_id: str) -> bool:
        """Remove the photo; False if it was not there."""
        ids = self.photo_faces.pop(photo_id, None)
        if ids is None:
            return False
        if ids:
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))
        for face_id in ids:
            self.face_photo.pop(face_id, None)
            self.face_bbox.pop(face_id, None)
        return True

    def search(self, query: np.ndarray, top_k: int, threshold: float) -> list[PhotoMatch]:
        """Best photos for a normalized query: best face per photo, >= threshold."""
        total = self.size
        if total == 0 or top_k <= 0:
            return []
        query = np.asarray(query, dtype=np.float32).reshape(1, -1)
        k = min(total, max(top_k * 4, 32))
        while True:
            scores, ids = self.index.search(query, k)
            by_photo = self._group(scores[0], ids[0], threshold)
            exhausted = k >= total or (len(scores[0]) and scores[0][-1] < threshold)
            if len(by_photo) >= top_k or exhausted:
                break
            k = min(total, k * 4)  # more faces needed to find top_k distinct photos
        ranked = sorted(by_photo.values(), key=lambda m: (-m.score, m.photo_id))
        return ranked[:top_k]

    def _group(self, scores: np.ndarray, ids: np.ndarray, threshold: float) -> dict[str, PhotoMatch]:
        grouped: dict[str, PhotoMatch] = {}
        for score, face_id in zip(scores.tolist(), ids.tolist()):
            if face_id < 0 or score < threshold:
                continue
            photo_id = self.face_photo[face_id]
            face = MatchedFace(bbox=self.face_bbox[face_id], score=float(score))
            match = grouped.get(photo_id)
            if match is None:
                grouped[photo_id] = PhotoMatch(photo_id=photo_id, score=float(score), faces=[face])
            else:
                match.faces.append(face)
        return grouped

    def to_snapshot(self) -> tuple[np.ndarray, dict[str, Any]]:
        """Serialized FAISS index and JSON-able metadata."""
        meta = {"dim": self.dim, "model_id": self.model_id, "next_id": self.next_id,
                "newest_at": self.newest_at,
                "photos": {p: ids for p, ids in self.photo_faces.items()},
                "bboxes": {str(i): list(b) for i, b in self.face_bbox.items()}}
        return faiss.serialize_index(self.index), meta

    @classmethod
    def from_snapshot(cls, blob: np.ndarray, meta: dict[str, Any]) -> EventIndex:
        """Inverse of to_snapshot."""
        index = cls(int(meta["dim"]), str(meta["model_id"]))
        index.index = faiss.deserialize_index(np.asarray(blob, dtype=np.uint8))
        index.next_id = int(meta["next_id"])
        index.newest_at = int(meta.get("newest_at", 0))  # snapshots before it existed: unknown
        index.photo_faces = {p: [int(i) for i in ids] for p, ids in meta["photos"].items()}
        index.face_photo = {i: p for p, ids in index.photo_faces.items() for i in ids}
        index.face_bbox = {int(i): tuple(b) for i, b in meta["bboxes"].items()}
        return index


def dumps_meta(meta: dict[str, Any]) -> np.ndarray:
    """JSON metadata as a uint8 array, to sit beside FAISS blobs in one .npz."""
    return np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


def loads_meta(array: np.ndarray) -> dict[str, Any]:
    """Inverse of dumps_meta."""
    meta: dict[str, Any] = json.loads(bytes(np.asarray(array, dtype=np.uint8)).decode())
    return meta
