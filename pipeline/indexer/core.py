"""The indexer's pure core: apply face changes, answer match requests."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from pipeline.errors import PoisonRecord
from pipeline.facelib.vectors import InvalidEmbedding, normalize_embedding
from pipeline.guest_records import GUEST_NOT_ENROLLED, MAX_SELFIES, MODEL_MISMATCH, GuestRecord, MatchNotification
from pipeline.indexer.event_index import EventIndex
from pipeline.indexer.guests import EventGuests, Template, normalized_rows, search_with_set
from pipeline.indexer.promotion import IndexOptions
from pipeline.indexer.state import PartitionState, photo_key
from pipeline.records import MatchReply, MatchRequest, PhotoFaces, PhotoMatch


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
    # Other models whose faces may build an event's index beside the current one (re-embedding,
    # docs/reembed.md): (model_id, dim) pairs. Each index holds one model; a query is answered
    # only by the index of its own model.
    extra_models: tuple[tuple[str, int], ...] = ()

    @property
    def accepted(self) -> dict[str, int]:
        """Every model served, with its dimension."""
        return {self.model_id: self.dim, **dict(self.extra_models)}


@dataclass
class Changes:
    """What the indexer publishes after applying one record (all keyed by the record's event)."""

    erased_photos: list[str] = field(default_factory=list)  # faces tombstones (event delete)
    # Photos republished without erased faces, with the tail of their key (after `event/`).
    rewrites: list[tuple[str, PhotoFaces]] = field(default_factory=list)
    notifications: list[MatchNotification] = field(default_factory=list)
    withdrawn: list[tuple[str, str]] = field(default_factory=list)  # (guest, photo) notifications to tombstone
    guests: list[GuestRecord] = field(default_factory=list)  # FORGET records resolved with their template
    erased_guests: list[str] = field(default_factory=list)  # guest keys to tombstone (event delete)

    def __bool__(self) -> bool:
        return any((self.erased_photos, self.rewrites, self.notifications, self.withdrawn, self.guests,
                    self.erased_guests))


class IndexerCore:
    """Holds the PartitionStates this instance owns."""

    def __init__(self, config: IndexerConfig) -> None:
        self.config = config
        self.partitions: dict[int, PartitionState] = {}

    def apply_faces(self, partition: int, offset: int, event_id: str, photo_id: str | None,
                    faces: PhotoFaces | None, again: bool = False, key_model: str | None = None) -> Changes:
        """Apply one faces-topic record (faces=None is a tombstone: delete the photo).

        The changes name what to publish: a tombstone per photo an event delete
        removed (so compaction erases its faces on the topic too), photos
        republished without a forgotten guest's faces, and notifications to the
        enrolled guests a new photo shows. `key_model`: the key ended in /<model>.
        """
        state = self._state(partition)
        if faces is not None and faces.op == "ACTIVATE_MODEL":
            return self._activate(state, event_id, faces.model_id)
        return self._apply(state, offset, event_id, photo_id, faces, again, key_model)

    def cover(self, partition: int, offset: int) -> None:
        """Mark a faces offset as handled, applied or rejected (replay moves past it)."""
        state = self._state(partition)
        state.next_offset = offset + 1
        state.last_applied = offset
        state.dirty_records += 1

    def _state(self, partition: int) -> PartitionState:
        return self.partitions.setdefault(partition, PartitionState(partition))

    def _apply(self, state: PartitionState, offset: int, event_id: str, photo_id: str | None,
               faces: PhotoFaces | None, again: bool, key_model: str | None) -> Changes:
        changes = Changes()
        guests = state.guests.get(event_id)
        if faces is None:
            if photo_id:
                tail = photo_id if key_model is None else f"{photo_id}/{key_model}"
                staged = state.staged.get(event_id)
                if staged is not None and staged.key_tail(photo_id) == tail:
                    staged.delete(photo_id)
                    return changes
                if self._delete_photo(state, offset, event_id, photo_id, tail) and guests is not None:
                    changes.withdrawn = [(g, photo_id) for g in guests.withdraw_photo(photo_id)]
            return changes
        if faces.op == "DELETE_EVENT":
            changes.erased_photos = self._delete_event(state, offset, event_id)
            staged = state.staged.pop(event_id, None)
            if staged is not None:
                changes.erased_photos += [staged.key_tail(p) for p in sorted(staged.photo_faces)]
            if guests is not None:  # the event's guests, their selfies and notifications go with it
                del state.guests[event_id]
                changes.withdrawn = [(g, p) for g, photos in sorted(guests.notified.items()) for p in sorted(photos)]
                changes.erased_guests = sorted(set(guests.enrolled) | set(guests.excluded))
            return changes
        self._check_model(faces)
        if key_model is not None and key_model != faces.model_id:
            raise PoisonRecord("invalid_key", f"faces of {faces.model_id} under a key for {key_model}")
        tail = faces.photo_id if key_model is None else f"{faces.photo_id}/{key_model}"
        if state.superseded(offset, event_id, tail):
            return changes  # older than a delete this state has seen: never bring it back
        if faces.model_id in state.retired.get(event_id, ()):
            changes.erased_photos = [tail]  # the event switched away from this model: gone from the topic too
            return changes
        index = self._route(state, event_id, faces.model_id, key_model is not None)
        if index is not state.events.get(event_id):  # staged: nobody matches against it yet
            index.upsert(faces.photo_id, faces.faces, faces.occurred_at, faces.image_url)
            return changes
        if guests is not None and guests.excluded and faces.faces:
            drop = guests.excluded_rows(np.stack([f.embedding for f in faces.faces]), index.model_id)
            if drop.any():  # a forgotten guest's face: never indexed, and gone from the topic too
                faces = replace(faces, faces=[f for f, d in zip(faces.faces, drop.tolist()) if not d])
                changes.rewrites.append((tail, faces))
        index.upsert(faces.photo_id, faces.faces, faces.occurred_at, faces.image_url)
        state.deleted_photos.pop(photo_key(event_id, tail), None)
        if guests is not None:
            for guest_id, match in guests.match_photo(faces.photo_id, faces.faces, again, index.model_id):
                changes.notifications.append(self._notification(event_id, guest_id, match, faces.occurred_at))
        return changes

    # -- guests ------------------------------------------------------------------
    def apply_guest(self, partition: int, event_id: str, guest_id: str, record: GuestRecord | None,
                    again: bool = False) -> Changes:
        """Apply one guests-topic record: enrol (push what already matches), forget, or remove (None).

        `again`: handled a second time (outputs undelivered): push every match again.
        """
        state = self._state(partition)
        guests = state.guests.setdefault(event_id, EventGuests())
        changes = Changes()
        if record is None:
            guests.enrolled.pop(guest_id, None)
            guests.excluded.pop(guest_id, None)
            changes.withdrawn = [(guest_id, p) for p in guests.withdraw(guest_id)]
        elif record.op == "ENROL":
            selfies = self._checked_selfies(record, minimum=1)
            guests.excluded.pop(guest_id, None)  # enrolling again is opting back in
            guests.enrolled[guest_id] = Template(selfies, self._threshold(record.threshold), record.model_id)
            for match in guests.unpushed(guest_id, state.events.get(event_id), again):
                changes.notifications.append(self._notification(event_id, guest_id, match, 0))
        else:
            self._forget(state, guests, record, changes)
        if guests.empty:
            del state.guests[event_id]
        return changes

    def _forget(self, state: PartitionState, guests: EventGuests, record: GuestRecord, changes: Changes) -> None:
        # The template is the FORGET's own selfies, or else the guest's enrolled ones: then the
        # record is republished with them, so the exclusion outlives compaction of the enrolment.
        enrolled = guests.enrolled.pop(record.guest_id, None)
        selfies = self._checked_selfies(record, minimum=0)
        if len(selfies) == 0 and enrolled is not None:
            selfies = enrolled.selfies
            changes.guests.append(replace(record, selfies=selfies, model_id=enrolled.model_id,
                                          dim=int(enrolled.selfies.shape[1])))
        changes.withdrawn = [(record.guest_id, p) for p in guests.withdraw(record.guest_id)]
        if len(selfies) == 0:
            guests.excluded.pop(record.guest_id, None)
            return  # nothing known of the face: nothing to keep out
        template = Template(selfies, self._threshold(record.threshold),
                            enrolled.model_id if enrolled is not None and not len(record.selfies) else record.model_id)
        guests.excluded[record.guest_id] = template
        index = state.events.get(record.event_id)
        if record.erase_faces and index is not None and index.model_id == template.model_id:
            for photo_id, remaining in index.erase_matching(template.selfies, template.threshold).items():
                changes.rewrites.append((index.key_tail(photo_id), PhotoFaces(
                    event_id=record.event_id, photo_id=photo_id, model_id=index.model_id, dim=index.dim,
                    faces=remaining, image_url=index.photo_url.get(photo_id))))

    def _checked_selfies(self, record: GuestRecord, minimum: int) -> np.ndarray:
        if self.config.accepted.get(record.model_id) != record.dim:
            raise PoisonRecord("model_mismatch", f"guest {record.guest_id} enrolled with {record.model_id} "
                               f"({record.dim}-d); this indexer serves {self._served()}")
        if not minimum <= len(record.selfies) <= MAX_SELFIES:
            raise PoisonRecord("invalid_guest", f"guest {record.guest_id} has {len(record.selfies)} selfies; "
                               f"{minimum} to {MAX_SELFIES} allowed")
        for row in record.selfies:
            try:
                normalize_embedding(row, record.dim, "selfies")
            except InvalidEmbedding as exc:
                raise PoisonRecord("invalid_embedding", f"guest {record.guest_id}: {exc}") from exc
        return normalized_rows(record.selfies, record.dim)

    def _served(self) -> str:
        return ", ".join(f"{model} ({dim}-d)" for model, dim in self.config.accepted.items())

    def _threshold(self, threshold: float | None) -> float:
        return self.config.default_threshold if threshold is None else float(threshold)

    def _notification(self, event_id: str, guest_id: str, match: PhotoMatch, occurred_at: int) -> MatchNotification:
        return MatchNotification(event_id=event_id, guest_id=guest_id, photo_id=match.photo_id, score=match.score,
                                 model_id=self.config.model_id, faces=match.faces, photo_occurred_at=occurred_at)

    def restore_guest(self, partition: int, event_id: str, guest_id: str, record: GuestRecord | None) -> None:
        """Rebuild a guest from the guests topic on assignment: nothing is pushed or erased again."""
        guests = self._state(partition).guests.setdefault(event_id, EventGuests())
        guests.enrolled.pop(guest_id, None)
        if record is None:
            guests.excluded.pop(guest_id, None)
        elif record.op == "ENROL":
            guests.excluded.pop(guest_id, None)
            guests.enrolled[guest_id] = Template(self._checked_selfies(record, minimum=1),
                                                 self._threshold(record.threshold), record.model_id)
        else:
            selfies = self._checked_selfies(record, minimum=0)
            if len(selfies):
                guests.excluded[guest_id] = Template(selfies, self._threshold(record.threshold), record.model_id)

    def restore_notification(self, partition: int, event_id: str, guest_id: str, photo_id: str,
                             present: bool) -> None:
        """Rebuild what was pushed from the notifications topic (a tombstone: withdrawn)."""
        guests = self._state(partition).guests.setdefault(event_id, EventGuests())
        pushed = guests.notified.setdefault(guest_id, set())
        if present:
            pushed.add(photo_id)
        else:
            pushed.discard(photo_id)

    def reconcile(self, partition: int) -> list[MatchNotification]:
        """Push what a crash between a match and its delivery left unpushed (run once caught up)."""
        state = self.partitions.get(partition)
        if state is None:
            return []
        found = []
        for event_id, guests in sorted(state.guests.items()):
            for guest_id in sorted(guests.enrolled):
                for match in guests.unpushed(guest_id, state.events.get(event_id)):
                    found.append(self._notification(event_id, guest_id, match, 0))
        return found

    def _check_model(self, faces: PhotoFaces) -> None:
        dim = self.config.accepted.get(faces.model_id)
        if dim is None:
            raise PoisonRecord("model_mismatch", f"faces of {faces.model_id} ({faces.dim}-d); this indexer "
                               f"serves {self._served()}")
        if faces.dim != dim:
            raise PoisonRecord("dim_mismatch", f"faces of {faces.model_id} have dim {faces.dim}; "
                               f"this indexer serves {self._served()}")

    # -- re-embedding (blue/green by model) ----------------------------------------
    def _route(self, state: PartitionState, event_id: str, model_id: str, keyed: bool) -> EventIndex:
        """The index a face record of this model joins: the answering one, or the one built beside it."""
        active, staged = state.events.get(event_id), state.staged.get(event_id)
        for index in (active, staged):
            if index is not None and index.model_id == model_id:
                if index.keyed_by_model != keyed:
                    raise PoisonRecord("invalid_key", f"faces of {model_id} for event {event_id} arrive under "
                                       f"{'model' if keyed else 'plain'} keys; the index has the other kind")
                return index
        new = EventIndex(self.config.accepted[model_id], model_id, self.config.index, keyed_by_model=keyed)
        if active is None and model_id == self.config.model_id:
            state.events[event_id] = new
            return new
        if staged is not None:
            raise PoisonRecord("model_mismatch", f"event {event_id} is being re-embedded with {staged.model_id}; "
                               f"faces of {model_id} cannot join it")
        other = active
        if other is not None and other.keyed_by_model == keyed:
            raise PoisonRecord("invalid_key", f"faces of {model_id} and {other.model_id} of event {event_id} would "
                               "share keys (compaction keeps one): run the re-embedding embedders with "
                               "FACEMATCH_EMBEDDER_MODEL_KEYS=1")
        state.staged[event_id] = new
        return new

    def _activate(self, state: PartitionState, event_id: str, model_id: str) -> Changes:
        """Answer the event's queries from its staged index of `model_id`; drop the old one."""
        staged = state.staged.get(event_id)
        if staged is None or staged.model_id != model_id:
            raise PoisonRecord("nothing_staged", f"event {event_id} has no index of {model_id} to switch to")
        guests = state.guests.get(event_id)
        if guests is not None and guests.excluded:
            raise PoisonRecord("exclusions_block_switch", f"event {event_id} has {len(guests.excluded)} forgotten "
                               f"guests whose faces are known only to the current model; the new index would "
                               f"show them again")
        old = state.events.get(event_id)
        state.events[event_id] = state.staged.pop(event_id)
        changes = Changes()
        if old is not None:
            state.retired.setdefault(event_id, []).append(old.model_id)
            changes.erased_photos = [old.key_tail(p) for p in sorted(old.photo_faces)]
        if guests is not None:
            for guest_id in sorted(guests.enrolled):
                for match in guests.unpushed(guest_id, state.events[event_id]):
                    changes.notifications.append(self._notification(event_id, guest_id, match, 0))
        return changes

    @staticmethod
    def _delete_photo(state: PartitionState, offset: int, event_id: str, photo_id: str, tail: str) -> bool:
        """Delete from the answering index; True if the photo was there."""
        pending = state.pending_tombstones.get(event_id)
        if pending is not None:
            pending.discard(tail)  # our tombstone is on the topic now
            if not pending:
                del state.pending_tombstones[event_id]
        index = state.events.get(event_id)
        if index is None or index.key_tail(photo_id) != tail or not index.delete(photo_id):
            return False
        state.deleted_photos[photo_key(event_id, tail)] = offset
        if index.photos == 0 and event_id not in state.retired:
            del state.events[event_id]
        return True

    @staticmethod
    def _delete_event(state: PartitionState, offset: int, event_id: str) -> list[str]:
        # A redelivered delete (its tombstones not acknowledged) returns the photos
        # still pending again. Replay from a snapshot re-applies it: photos the
        # snapshot still holds get tombstones again, photos already gone get none.
        index = state.events.pop(event_id, None)
        state.retired.pop(event_id, None)
        erased = {index.key_tail(p) for p in index.photo_faces} if index is not None else set()
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
        # An event answers in its index's model only: a query of another model gets an error, never scores.
        model_id = request.model_id or (index.model_id if index is not None and request.guest_id else
                                        self.config.model_id)
        problem = self._check(request, model_id, index)
        if problem:
            return replace(reply, error=problem)
        if index is not None:
            reply = replace(reply, newest_face_at=index.newest_at, model_id=index.model_id)
        guests = state.guests.get(request.event_id) if state else None
        template = None
        if request.guest_id is not None:
            template = guests.enrolled.get(request.guest_id) if guests else None
            if template is None:
                return replace(reply, error=f"{GUEST_NOT_ENROLLED}: guest {request.guest_id} of event "
                                            f"{request.event_id}")
            if index is not None and template.model_id != index.model_id:
                return replace(reply, error=f"{MODEL_MISMATCH}: guest {request.guest_id} enrolled selfies of "
                                            f"{template.model_id}; the event is indexed with {index.model_id}: "
                                            "enrol again")
            if request.threshold is None:
                reply = replace(reply, threshold=template.threshold)
        if index is None or index.size == 0:
            return replace(reply, status="NO_FACES", photos_indexed=index.photos if index else 0)
        if template is not None:
            matches = search_with_set(index, template.selfies, request.top_k, reply.threshold)
        else:
            query = normalize_embedding(request.embedding, index.dim)
            # A forgotten guest's face finds nothing, whoever asks.
            excluded = guests is not None and guests.query_excluded(query, index.model_id)
            matches = [] if excluded else index.search(query, request.top_k, threshold)
        return replace(reply, status="OK", matches=matches, index_size=index.size, photos_indexed=index.photos,
                       search_ms=(time.perf_counter() - started) * 1000)

    def error_reply(self, request: MatchRequest, message: str) -> MatchReply:
        """An ERROR reply that still carries the request's identity."""
        return MatchReply(request_id=request.request_id, event_id=request.event_id,
                          status="ERROR", error=message)

    def _check(self, request: MatchRequest, model_id: str, index: EventIndex | None) -> str | None:
        indexed_with = index.model_id if index is not None else None
        if model_id not in self.config.accepted or indexed_with not in (None, model_id):
            return (f"{MODEL_MISMATCH}: the query was embedded with {model_id}; this event is "
                    f"indexed with {indexed_with or self.config.model_id}")
        try:
            if request.guest_id is None:
                normalize_embedding(request.embedding, self.config.accepted[model_id], "user_embedding")
        except InvalidEmbedding as exc:
            return f"{exc} (model {model_id})"
        if not 1 <= request.top_k <= self.config.max_top_k:
            return f"top_k must be between 1 and {self.config.max_top_k}"
        if request.threshold is not None and not -1.0 <= request.threshold <= 1.0:
            return "threshold must be between -1 and 1"
        return None

    def drop(self, partition: int) -> PartitionState | None:
        """Forget a partition (revoked); returns its state for a last snapshot."""
        return self.partitions.pop(partition, None)
