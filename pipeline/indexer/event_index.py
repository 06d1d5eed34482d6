"""One event's FAISS index over L2-normalized faces: exact when small, IVF-SQ8 when large.

Faces are stored per photo so that re-ingesting a photo replaces its faces
(never duplicates) and matches are reported per photo, scored by its best face.
Per-face metadata lives in arrays indexed by face id (a photo slot and a box),
per-photo metadata in arrays indexed by slot: no Python object per face, so a
million-face event costs ~560 B a face once promoted (see promotion.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from pipeline.indexer.promotion import IndexOptions, Promotion, index_contents, probes
from pipeline.records import Face, MatchedFace, PhotoMatch

BOX = 4  # x, y, w, h


class EventIndex:
    """FAISS index (IndexIDMap2 over IndexFlatIP, or IVF-SQ8) plus the face -> photo mapping."""

    def __init__(self, dim: int, model_id: str, options: IndexOptions | None = None,
                 keyed_by_model: bool = False) -> None:
        self.dim, self.model_id = dim, model_id
        # Its photos' faces keys end in /<model_id> (written beside another model's: re-embedding).
        self.keyed_by_model = keyed_by_model
        self.options = options or IndexOptions()
        self.index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))  # FAISS stubs reject numpy ids
        self.next_id = 0
        self.built_at = 0  # faces in the index when the approximate index was last built; 0: exact
        self.promotion: Promotion | None = None
        self.photo_faces: dict[str, int] = {}  # photo id -> slot
        self._slot_photo: list[str | None] = []
        self._slot_first = np.zeros(0, dtype=np.int64)  # first face id of the slot's photo
        self._slot_count = np.zeros(0, dtype=np.int32)
        self._free_slots: list[int] = []
        self.face_slot = np.zeros(0, dtype=np.int32)  # face id -> photo slot, -1 once deleted
        self.face_bbox = np.zeros((0, BOX), dtype=np.float32)
        self.photo_url: dict[str, str] = {}  # where each photo is: a rewritten faces record keeps it
        # Newest occurred_at (epoch ms) of the photos upserted: the index's freshness.
        # Deletes leave it: it says how recent the applied data is, not what remains.
        self.newest_at = 0

    def key_tail(self, photo_id: str) -> str:
        """The part of this photo's faces key after `event/`."""
        return f"{photo_id}/{self.model_id}" if self.keyed_by_model else photo_id

    @property
    def size(self) -> int:
        """Faces indexed."""
        return int(self.index.ntotal)

    @property
    def photos(self) -> int:
        """Photos indexed (a photo with zero faces counts: it was processed)."""
        return len(self.photo_faces)

    @property
    def kind(self) -> str:
        """'flat' (exact) or 'ivf-sq8' (approximate)."""
        return "flat" if self.built_at == 0 else "ivf-sq8"

    def memory_bytes(self) -> int:
        """Index codes plus metadata arrays (excluding Python strings of photo ids)."""
        per_face = self.dim * (4 if self.built_at == 0 else 1) + 8
        arrays = (self.face_slot.nbytes + self.face_bbox.nbytes + self._slot_first.nbytes
                  + self._slot_count.nbytes)
        return self.size * per_face + arrays

    def upsert(self, photo_id: str, faces: Sequence[Face], occurred_at: int = 0,
               image_url: str | None = None) -> None:
        """Replace the photo's faces; `occurred_at` (epoch ms) of its event moves newest_at forward."""
        self.newest_at = max(self.newest_at, occurred_at)
        self.delete(photo_id)
        if image_url:
            self.photo_url[photo_id] = image_url
        first, count = self.next_id, len(faces)
        self._grow_faces(first + count)
        self.next_id += count
        slot = self._take_slot(photo_id, first, count)
        if faces:
            ids = np.arange(first, first + count, dtype=np.int64)
            vectors = np.stack([np.asarray(f.embedding, dtype=np.float32) for f in faces])
            self.index.add_with_ids(vectors, ids)
            if self.promotion is not None:
                self.promotion.record_add(ids, vectors)
            self.face_slot[first:first + count] = slot
            for row, face in enumerate(faces):
                box = [float(v) for v in face.bbox][:BOX]
                self.face_bbox[first + row] = box + [0.0] * (BOX - len(box))
        self.poll()

    def delete(self, photo_id: str) -> bool:
        """Remove the photo; False if it was not there."""
        slot = self.photo_faces.pop(photo_id, None)
        self.photo_url.pop(photo_id, None)
        if slot is None:
            return False
        first, count = int(self._slot_first[slot]), int(self._slot_count[slot])
        if count:
            ids = np.arange(first, first + count, dtype=np.int64)
            self.index.remove_ids(ids)
            if self.promotion is not None:
                self.promotion.record_remove(ids)
            self.face_slot[first:first + count] = -1
        self._slot_photo[slot] = None
        self._slot_count[slot] = 0
        self._free_slots.append(slot)
        return True

    def _take_slot(self, photo_id: str, first: int, count: int) -> int:
        if self._free_slots:
            slot = self._free_slots.pop()
            self._slot_photo[slot] = photo_id
        else:
            slot = len(self._slot_photo)
            self._slot_photo.append(photo_id)
            if slot >= len(self._slot_first):
                capacity = max(64, 2 * len(self._slot_first))
                self._slot_first = _grown(self._slot_first, capacity)
                self._slot_count = _grown(self._slot_count, capacity)
        self._slot_first[slot], self._slot_count[slot] = first, count
        self.photo_faces[photo_id] = slot
        return slot

    def _grow_faces(self, needed: int) -> None:
        if needed > len(self.face_slot):
            capacity = max(256, needed, 2 * len(self.face_slot))
            self.face_slot = _grown(self.face_slot, capacity, fill=-1)
            self.face_bbox = _grown(self.face_bbox, capacity)

    # -- promotion ---------------------------------------------------------------
    def poll(self) -> bool:
        """Start a due promotion, or swap in a finished one; True when a swap happened."""
        if self.promotion is not None:
            if not self.promotion.done():
                return False
            promotion, self.promotion = self.promotion, None
            self.index = promotion.finish()
            self.built_at = promotion.faces
            return True
        if self._due():
            self.promote()
        return False

    def _due(self) -> bool:
        promote_at = self.options.promote_at
        if promote_at <= 0 or self.size < promote_at:
            return False
        return self.built_at == 0 or self.size >= self.built_at * self.options.regrow_factor

    def promote(self) -> None:
        """Build an approximate index in the background; the current one answers until the swap."""
        if self.promotion is None and self.size > 0:
            vectors, ids = index_contents(self.index, self.dim)
            self.promotion = Promotion(vectors, ids, self.options)

    def promote_now(self) -> None:
        """Promote synchronously (tests, benchmarks, loading a large snapshot offline)."""
        self.promote()
        if self.promotion is not None:
            self.promotion.wait()
            self.poll()

    # -- erasure -----------------------------------------------------------------
    def erase_matching(self, selfies: np.ndarray, threshold: float) -> dict[str, list[Face]]:
        """Remove every face at or above `threshold` to any selfie; returns each changed photo's remaining faces.

        The photos stay (other people are in them), without those faces. Remaining
        faces are rebuilt from the index (exact, or 8-bit quantized once promoted)
        with their boxes; detector scores and landmarks are not kept per face.
        """
        hit_ids: set[int] = set()
        for selfie in np.asarray(selfies, dtype=np.float32).reshape(-1, self.dim):
            hit_ids.update(self._ids_at_or_above(selfie, threshold))
        by_slot: dict[int, set[int]] = {}
        for face_id in hit_ids:
            slot = int(self.face_slot[face_id])
            if slot >= 0:
                by_slot.setdefault(slot, set()).add(face_id)
        changed: dict[str, list[Face]] = {}
        for slot, erased in sorted(by_slot.items()):
            photo_id = self._slot_photo[slot]
            if photo_id is None:
                continue
            first, count = int(self._slot_first[slot]), int(self._slot_count[slot])
            keep = [i for i in range(first, first + count) if i not in erased]
            remaining = [Face(bbox=tuple(float(v) for v in self.face_bbox[i]), det_score=1.0,
                              embedding=self._vector(i)) for i in keep]
            url = self.photo_url.get(photo_id)
            self.upsert(photo_id, remaining, image_url=url)
            changed[photo_id] = remaining
        return changed

    def _ids_at_or_above(self, query: np.ndarray, threshold: float) -> list[int]:
        if self.size == 0:
            return []
        # Inner-product range search keeps scores > radius: step just below the threshold.
        _, scores, ids = self.index.range_search(query.reshape(1, -1), float(np.nextafter(threshold, -2.0)))
        return [int(i) for i, score in zip(ids.tolist(), scores.tolist()) if i >= 0 and score >= threshold]

    def _vector(self, face_id: int) -> np.ndarray:
        try:
            return np.asarray(self.index.reconstruct(face_id), dtype=np.float32)
        except RuntimeError:  # an IVF index reconstructs by id only with a direct map (ours are not sequential)
            faiss.extract_index_ivf(self.index).set_direct_map_type(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]
            return np.asarray(self.index.reconstruct(face_id), dtype=np.float32)

    # -- search ------------------------------------------------------------------
    def search(self, query: np.ndarray, top_k: int, threshold: float) -> list[PhotoMatch]:
        """Best photos for a normalized query: best face per photo, >= threshold."""
        self.poll()
        total = self.size
        if total == 0 or top_k <= 0:
            return []
        query = np.asarray(query, dtype=np.float32).reshape(1, -1)
        k = min(total, max(top_k * 4, 32))
        while True:
            scores, ids = self.index.search(query, k)
            by_photo = self._group(scores[0], ids[0], threshold)
            # An approximate index may return fewer than k (-1 ids): asking for more won't help.
            exhausted = (k >= total or ids[0][-1] < 0
                         or bool(len(scores[0]) and scores[0][-1] < threshold))
            if len(by_photo) >= top_k or exhausted:
                break
            k = min(total, k * 4)  # more faces needed to find top_k distinct photos
        ranked = sorted(by_photo.values(), key=lambda m: (-m.score, m.photo_id))
        return ranked[:top_k]

    def _group(self, scores: np.ndarray, ids: np.ndarray, threshold: float) -> dict[str, PhotoMatch]:
        keep = (ids >= 0) & (scores >= threshold)
        ids, scores = ids[keep], scores[keep]
        slots = self.face_slot[ids]
        boxes = self.face_bbox[ids]
        grouped: dict[str, PhotoMatch] = {}
        for score, slot, box in zip(scores.tolist(), slots.tolist(), boxes.tolist()):
            photo_id = self._slot_photo[slot] if slot >= 0 else None
            if photo_id is None:
                continue
            face = MatchedFace(bbox=tuple(box), score=float(score))
            match = grouped.get(photo_id)
            if match is None:
                grouped[photo_id] = PhotoMatch(photo_id=photo_id, score=float(score), faces=[face])
            else:
                match.faces.append(face)
        return grouped

    # -- snapshots ---------------------------------------------------------------
    def to_snapshot(self) -> tuple[np.ndarray, dict[str, Any]]:
        """Serialized FAISS index and metadata; meta["arrays"] holds numpy arrays to store beside it.

        A promotion in flight is not waited for: the snapshot holds the index that answers now.
        """
        slots = len(self._slot_photo)
        meta = {"dim": self.dim, "model_id": self.model_id, "next_id": self.next_id,
                "keyed_by_model": self.keyed_by_model,
                "newest_at": self.newest_at, "built_at": self.built_at,
                "slot_photos": list(self._slot_photo), "photo_url": self.photo_url,
                "arrays": {"face_slot": self.face_slot[:self.next_id], "face_bbox": self.face_bbox[:self.next_id],
                           "slot_first": self._slot_first[:slots], "slot_count": self._slot_count[:slots]}}
        return faiss.serialize_index(self.index), meta

    @classmethod
    def from_snapshot(cls, blob: np.ndarray, meta: dict[str, Any],
                      options: IndexOptions | None = None) -> EventIndex:
        """Inverse of to_snapshot; also reads the per-face JSON of snapshot versions 1 and 2."""
        index = cls(int(meta["dim"]), str(meta["model_id"]), options, bool(meta.get("keyed_by_model", False)))
        index.index = faiss.deserialize_index(np.asarray(blob, dtype=np.uint8))
        if isinstance(index.index, faiss.IndexIVF):
            index.index.nprobe = probes(int(index.index.nlist), index.options)
        index.next_id = int(meta["next_id"])
        index.newest_at = int(meta.get("newest_at", 0))  # snapshots before it existed: unknown
        index.built_at = int(meta.get("built_at", 0))
        index.photo_url = {str(k): str(v) for k, v in meta.get("photo_url", {}).items()}
        if "arrays" in meta:
            index._restore_arrays(meta["slot_photos"], meta["arrays"])
        else:
            index._restore_v2(meta["photos"], meta["bboxes"])
        return index

    def _restore_arrays(self, slot_photos: list[str | None], arrays: dict[str, np.ndarray]) -> None:
        self._grow_faces(self.next_id)
        self.face_slot[:self.next_id] = arrays["face_slot"]
        self.face_bbox[:self.next_id] = arrays["face_bbox"]
        self._slot_photo = [None if p is None else str(p) for p in slot_photos]
        self._slot_first = np.array(arrays["slot_first"], dtype=np.int64)
        self._slot_count = np.array(arrays["slot_count"], dtype=np.int32)
        self.photo_faces = {p: s for s, p in enumerate(self._slot_photo) if p is not None}
        self._free_slots = [s for s, p in enumerate(self._slot_photo) if p is None]

    def _restore_v2(self, photos: dict[str, list[int]], bboxes: dict[str, list[float]]) -> None:
        # Old snapshots: ids of a photo were consecutive, as upsert has always assigned them.
        self._grow_faces(self.next_id)
        for photo_id, ids in photos.items():
            first = int(ids[0]) if ids else self.next_id
            slot = self._take_slot(photo_id, first, len(ids))
            for face_id in ids:
                self.face_slot[int(face_id)] = slot
                box = [float(v) for v in bboxes[str(face_id)]][:BOX]
                self.face_bbox[int(face_id)] = box + [0.0] * (BOX - len(box))


def _grown(array: np.ndarray, capacity: int, fill: int = 0) -> np.ndarray:
    shape = (capacity, *array.shape[1:])
    out = np.full(shape, fill, dtype=array.dtype)
    out[:len(array)] = array
    return out


def dumps_meta(meta: dict[str, Any]) -> np.ndarray:
    """JSON metadata as a uint8 array, to sit beside FAISS blobs in one .npz."""
    return np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


def loads_meta(array: np.ndarray) -> dict[str, Any]:
    """Inverse of dumps_meta."""
    meta: dict[str, Any] = json.loads(bytes(np.asarray(array, dtype=np.uint8)).decode())
    return meta
