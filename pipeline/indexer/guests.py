"""Guests of one event, pure: enrolled selfies (standing queries), exclusions, what was pushed.

Rule for several selfies (measured in docs/guests.md on the labelled real
photos): a photo's score for a guest is the best similarity of any of its faces
to any of the guest's selfies (max over selfies). A set therefore finds at
least what each of its selfies finds alone, and one bad selfie cannot drag a
good match below the threshold the way averaging the embeddings can.

An exclusion ("forget me") keeps a guest's template so that their face in a
later photo is dropped before it is indexed or matched against anyone's
subscription, and so that a query with their face finds nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from pipeline.indexer.event_index import EventIndex
from pipeline.records import Face, MatchedFace, PhotoMatch


@dataclass
class Template:
    """A guest's selfies (rows L2-normalized) and the similarity that counts as them."""

    selfies: np.ndarray
    threshold: float
    model_id: str = ""  # the model of the selfies: they are compared with that model's faces only

    def scores(self, vectors: np.ndarray) -> np.ndarray:
        """Best similarity of each row of `vectors` to any selfie (max over selfies)."""
        if len(vectors) == 0 or len(self.selfies) == 0:
            return np.full(len(vectors), -1.0, dtype=np.float32)
        best: np.ndarray = np.asarray(vectors @ self.selfies.T, dtype=np.float32).max(axis=1)
        return best


@dataclass
class EventGuests:
    """The guests of one event on this partition."""

    enrolled: dict[str, Template] = field(default_factory=dict)
    excluded: dict[str, Template] = field(default_factory=dict)
    notified: dict[str, set[str]] = field(default_factory=dict)  # guest -> photos pushed to them

    @property
    def empty(self) -> bool:
        """Nothing left to keep for this event."""
        return not (self.enrolled or self.excluded or any(self.notified.values()))

    def excluded_rows(self, vectors: np.ndarray, model_id: str) -> np.ndarray:
        """Which faces (of `model_id`) belong to a guest who asked to be forgotten."""
        hit = np.zeros(len(vectors), dtype=bool)
        for template in self.excluded.values():
            if template.model_id == model_id:
                hit |= template.scores(vectors) >= template.threshold
        return hit

    def query_excluded(self, query: np.ndarray, model_id: str) -> bool:
        """True when a query face is an excluded guest's: it must find nothing."""
        return bool(self.excluded_rows(np.asarray(query, dtype=np.float32).reshape(1, -1), model_id)[0])

    def match_photo(self, photo_id: str, faces: list[Face], again: bool = False,
                    model_id: str = "") -> list[tuple[str, PhotoMatch]]:
        """Enrolled guests this photo shows and has not been pushed to yet; marks them pushed.

        `again`: the record is handled a second time (its outputs were not delivered):
        push to every matching guest, pushed before or not (the topic is compacted and
        readers dedupe by key, so a repeat is harmless; a loss is not).
        """
        if not faces or not self.enrolled:
            return []
        vectors = np.stack([np.asarray(f.embedding, dtype=np.float32) for f in faces])
        found = []
        for guest_id, template in sorted(self.enrolled.items()):
            if template.model_id != model_id:
                continue  # selfies of another model (the event was re-embedded): enrol again
            if photo_id in self.notified.get(guest_id, ()) and not again:
                continue
            scores = template.scores(vectors)
            hits = [MatchedFace(bbox=tuple(float(v) for v in f.bbox), score=float(s))
                    for f, s in zip(faces, scores.tolist()) if s >= template.threshold]
            if hits:
                best = max(h.score for h in hits)
                found.append((guest_id, PhotoMatch(photo_id=photo_id, score=best, faces=hits)))
                self.notified.setdefault(guest_id, set()).add(photo_id)
        return found

    def unpushed(self, guest_id: str, index: EventIndex | None, again: bool = False) -> list[PhotoMatch]:
        """Photos already indexed that match the guest and were never pushed (`again`: all); marks them pushed."""
        template = self.enrolled.get(guest_id)
        if template is None or index is None or index.size == 0 or template.model_id != index.model_id:
            return []
        pushed = self.notified.setdefault(guest_id, set())
        fresh = [m for m in search_with_set(index, template.selfies, index.photos, template.threshold)
                 if again or m.photo_id not in pushed]
        pushed.update(m.photo_id for m in fresh)
        return fresh

    def withdraw(self, guest_id: str) -> list[str]:
        """Forget what was pushed to a guest; returns those photo ids (their notifications get tombstones)."""
        return sorted(self.notified.pop(guest_id, set()))

    def withdraw_photo(self, photo_id: str) -> list[str]:
        """A photo was deleted: the guests it had been pushed to (their notifications get tombstones)."""
        guests = []
        for guest_id, photos in self.notified.items():
            if photo_id in photos:
                photos.discard(photo_id)
                guests.append(guest_id)
        return sorted(guests)


def search_with_set(index: EventIndex, selfies: np.ndarray, top_k: int, threshold: float) -> list[PhotoMatch]:
    """Best photos for a set of selfies: each photo scored by its best (face, selfie) pair."""
    merged: dict[str, PhotoMatch] = {}
    for selfie in selfies:
        for match in index.search(selfie, top_k, threshold):
            known = merged.get(match.photo_id)
            if known is None:
                merged[match.photo_id] = match
            else:
                merged[match.photo_id] = _union(known, match)
    ranked = sorted(merged.values(), key=lambda m: (-m.score, m.photo_id))
    return ranked[:top_k]


def _union(left: PhotoMatch, right: PhotoMatch) -> PhotoMatch:
    # The same face found by two selfies keeps its best score.
    faces: dict[tuple[float, ...], float] = {}
    for face in [*left.faces, *right.faces]:
        faces[face.bbox] = max(face.score, faces.get(face.bbox, -1.0))
    ordered = [MatchedFace(bbox=box, score=score) for box, score in sorted(faces.items(), key=lambda kv: -kv[1])]
    return PhotoMatch(photo_id=left.photo_id, score=max(left.score, right.score), faces=ordered)


def normalized_rows(rows: Iterable[np.ndarray], dim: int) -> np.ndarray:
    """Stack and L2-normalize selfie embeddings (zero rows stay zero: they match nothing)."""
    stacked = np.asarray([np.asarray(r, dtype=np.float32) for r in rows], dtype=np.float32).reshape(-1, dim)
    norms = np.linalg.norm(stacked, axis=1, keepdims=True)
    return np.asarray(np.divide(stacked, norms, out=np.zeros_like(stacked), where=norms > 0), dtype=np.float32)
