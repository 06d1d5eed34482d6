"""The indexer's pure core: apply face changes, answer match requests."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from pipeline.errors import PoisonRecord
from pipeline.facelib.vectors import InvalidEmbedding, normalize_embedding
from pipeline.indexer.event_index import EventIndex
from pipeline.indexer.promotion import IndexOptions
from pipeline.indexer.state import PartitionState, photo_key
from pipeline.records import MatchReply, MatchRequest, PhotoFaces


@dataclass(frozen=True)
class IndexerConfig:
    """What the core needs to know about the model and limits.

    `model_id` is the one model this indexer serves: faces made by any other
    model (even of the same dimension) are refused as `model_mismatch`, since
    cosine scores between two models' embeddings mean nothing.
    """

    dim: int
    model_id: str
    default_threshold: float
    max_top_k: int = 1000
    index: IndexOptions = IndexOptions()  # when an event moves to an approximate index


class IndexerCore:
    """Holds the PartitionStates this instance owns."""

    def __init__(self, config: IndexerConfig) -> None:
        self.config = config
        self.partitions: dict[int, PartitionState] = {}

    def apply_faces(self, partition: int, offset: int, event_id: str, photo_id: str | None,
                    faces: PhotoFaces | None) -> list[str]:
        """Apply one faces-topic record (faces=None is a tombstone: delete the photo).

        Returns the photo ids an event delete removed: each needs a tombstone
        on the faces topic, so compaction erases the photo's faces there too.
        """
        return self._apply(self._state(partition), offset, event_id, photo_id, faces)

    def cover(self, partition: int, offset: int) -> None:
        """Mark a faces offset as handled, applied or rejected (replay moves past it)."""
        state = self._state(partition)
        state.next_offset = offset + 1
        state.last_applied = offset
        state.dirty_records += 1

    def _state(self, partition: int) -> PartitionState:
        return self.partitions.setdefault(partition, PartitionState(partition))

    def _apply(self, state: PartitionState, offset: int, event_id: str, photo_id: str | None,
               faces: PhotoFaces | None) -> list[str]:
        if faces is None:
            if photo_id:
                self._delete_photo(state, offset, event_id, photo_id)
            return []
        if faces.op == "DELETE_EVENT":
            return self._delete_event(state, offset, event_id)
        if state.superseded(offset, event_id, faces.photo_id):
            return []  # older than a delete this state has seen: never bring it back
        self._check_model(faces)
        index = state.events.get(event_id)
        if index is not None and index.model_id != faces.model_id:
            raise PoisonRecord("model_mismatch", f"event {event_id} is indexed with {index.model_id}; "
                               f"faces of {faces.model_id} cannot join it")
        if index is None:
            index = state.events[event_id] = EventIndex(self.config.dim, faces.model_id, self.config.index)
        index.upsert(faces.photo_id, faces.faces, faces.occurred_at)
        state.deleted_photos.pop(photo_key(event_id, faces.photo_id), None)
        return []

    def _check_model(self, faces: PhotoFaces) -> None:
        if faces.model_id != self.config.model_id:
            raise PoisonRecord("model_mismatch", f"faces of {faces.model_id} ({faces.dim}-d); this indexer "
                               f"serves {self.config.model_id} ({self.config.dim}-d)")
        if faces.dim != self.config.dim:
            raise PoisonRecord("dim_mismatch", f"faces of {faces.model_id} have dim {faces.dim}; "
                               f"this indexer serves {self.config.model_id} ({self.config.dim}-d)")

    @staticmethod
    def _delete_photo(state: PartitionState, offset: int, event_id: str, photo_id: str) -> None:
        pending = state.pending_tombstones.get(event_id)
        if pending is not None:
            pending.discard(photo_id)  # our tombstone is on the topic now
            if not pending:
                del state.pending_tombstones[event_id]
        index = state.events.get(event_id)
        if index is None or not index.delete(photo_id):
            return
        state.deleted_photos[photo_key(event_id, photo_id)] = offset
        if index.photos == 0:
            del state.events[event_id]

    @staticmethod
    def _delete_event(state: PartitionState, offset: int, event_id: str) -> list[str]:
        # A redelivered delete (its tombstones not acknowledged) returns the photos
        # still pending again. Replay from a snapshot re-applies it: photos the
        # snapshot still holds get tombstones again, photos already gone get none.
        index = state.events.pop(event_id, None)
        erased = set(index.photo_faces) if index is not None else set()
        erased |= state.pending_tombstones.get(event_id, set())
        if erased:
            state.pending_tombstones[event_id] = erased
        state.deleted_events[event_id] = max(offset, state.deleted_events.get(event_id, -1))
        prefix = photo_key(event_id, "")
        for key in [k for k in state.deleted_photos if k.startswith(prefix)]:
            del state.deleted_photos[key]  # the event's delete (a later offset) covers them
        return sorted(erased)

    def answer(self, partition: int, request: MatchRequest) -> MatchReply:
        """Match one query against its event; errors become ERROR replies."""
        started = time.perf_counter()
        state = self.partitions.get(partition)
        index = state.events.get(request.event_id) if state else None
        offset = state.last_applied if state else -1
        threshold = self.config.default_threshold if request.threshold is None else float(request.threshold)
        reply = MatchReply(request_id=request.request_id, event_id=request.event_id, status="ERROR",
                           faces_offset=offset, threshold=threshold)
        problem = self._check(request)
        if problem:
            return replace(reply, error=problem)
        if index is not None:
            reply = replace(reply, newest_face_at=index.newest_at)
        if index is None or index.size == 0:
            return replace(reply, status="NO_FACES", photos_indexed=index.photos if index else 0)
        query = normalize_embedding(request.embedding, self.config.dim)
        matches = index.search(query, request.top_k, threshold)
        return replace(reply, status="OK", matches=matches, index_size=index.size, photos_indexed=index.photos,
                       search_ms=(time.perf_counter() - started) * 1000)

    def error_reply(self, request: MatchRequest, message: str) -> MatchReply:
        """An ERROR reply that still carries the request's identity."""
        return MatchReply(request_id=request.request_id, event_id=request.event_id,
                          status="ERROR", error=message)

    def _check(self, request: MatchRequest) -> str | None:
        try:
            normalize_embedding(request.embedding, self.config.dim, "user_embedding")
        except InvalidEmbedding as exc:
            return f"{exc} (model {self.config.model_id})"
        if not 1 <= request.top_k <= self.config.max_top_k:
            return f"top_k must be between 1 and {self.config.max_top_k}"
        if request.threshold is not None and not -1.0 <= request.threshold <= 1.0:
            return "threshold must be between -1 and 1"
        return None

    def drop(self, partition: int) -> PartitionState | None:
        """Forget a partition (revoked); returns its state for a last snapshot."""
        return self.partitions.pop(partition, None)
