"""Pure core of the Firestore producers: a photo document in, a PhotoEvent out.

No Firestore client and no Kafka here. A document at
`{events}/{event_id}/{photos}/{photo_id}` becomes an UPSERT PhotoEvent, or a
PoisonRecord whose reason says precisely what is wrong with it. The
fingerprint decides whether a changed document is worth republishing.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from pipeline.errors import PoisonRecord
from pipeline.facelib.vectors import normalize_embedding
from pipeline.records import PhotoEvent, PrecomputedFace, check_id

UPSERT, REMOVE = "upsert", "remove"
# Only these fields reach the index; a caption or a like count changing must
# not re-embed a photo.
FINGERPRINT_FIELDS = ("image_url", "embedding", "faces")


@dataclass(frozen=True)
class DocChange:
    """One document seen in Firestore: present (upsert) or gone (remove)."""

    kind: str
    path: str
    data: dict[str, Any] | None = None
    update_ms: int = 0


@dataclass(frozen=True)
class PhotoRef:
    """Where a photo document lives."""

    event_id: str
    photo_id: str


@dataclass(frozen=True)
class Layout:
    """Collection names: {events}/{event_id}/{photos}/{photo_id}."""

    events: str = "events"
    photos: str = "photos"


def photo_ref(path: str, layout: Layout) -> PhotoRef | None:
    """The event and photo of a document path; None for a 'photos' collection elsewhere."""
    parts = path.strip("/").split("/")
    # A collection-group query on "photos" also returns users/u/photos/x and
    # the like: only photos whose parent is an event document are ours.
    if len(parts) < 4 or len(parts) % 2 or parts[-2] != layout.photos or parts[-4] != layout.events:
        return None
    return PhotoRef(event_id=check_id("event_id", parts[-3]), photo_id=check_id("photo_id", parts[-1]))


def fingerprint(data: dict[str, Any] | None) -> str:
    """Short stable hash of the fields that matter to the index."""
    relevant = {name: (data or {}).get(name) for name in FINGERPRINT_FIELDS}
    # default=repr: Firestore values such as timestamps or references still
    # hash deterministically, even though they are invalid here.
    blob = json.dumps(relevant, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def to_photo_event(change: DocChange, layout: Layout, dim: int, source: str) -> PhotoEvent | None:
    """The PhotoEvent a document change publishes; None when the document is not a photo of ours."""
    ref = photo_ref(change.path, layout)
    if ref is None:
        return None
    if change.kind == REMOVE:
        return PhotoEvent(event_id=ref.event_id, photo_id=ref.photo_id, op="DELETE", source=source,
                          occurred_at=change.update_ms)
    data = change.data or {}
    image_url = _image_url(data.get("image_url"))
    faces = _faces(data, dim)
    if image_url is None and faces is None:
        raise PoisonRecord("missing_image_url",
                           "photo document has neither image_url nor embedding/faces")
    return PhotoEvent(event_id=ref.event_id, photo_id=ref.photo_id, op="UPSERT", image_url=image_url,
                      faces=faces, source=source, occurred_at=change.update_ms)


def _image_url(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise PoisonRecord("wrong_type", f"image_url must be a string, got {type(value).__name__}")
    if not value.strip():
        return None
    # The embedder only fetches http(s); saying so here names the document.
    if not value.lower().startswith(("http://", "https://")):
        raise PoisonRecord("invalid_image_url", f"image_url must be http(s), got {value[:80]!r}")
    return value


def _faces(data: dict[str, Any], dim: int) -> list[PrecomputedFace] | None:
    embedding, faces = data.get("embedding"), data.get("faces")
    if embedding is not None and faces is not None:
        raise PoisonRecord("ambiguous_faces", "photo document has both embedding and faces; keep one")
    if embedding is not None:
        return [PrecomputedFace(embedding=_vector(embedding, dim, "embedding"))]
    if faces is None:
        return None
    if not isinstance(faces, list):
        raise PoisonRecord("wrong_type", f"faces must be a list, got {type(faces).__name__}")
    return [_face(face, dim, i) for i, face in enumerate(faces)]


def _face(face: Any, dim: int, index: int) -> PrecomputedFace:
    # Firestore cannot store an array inside an array, so real documents hold
    # a list of maps; plain lists are accepted from other writers of the same dict.
    if isinstance(face, list):
        return PrecomputedFace(embedding=_vector(face, dim, f"faces[{index}]"))
    if not isinstance(face, dict):
        raise PoisonRecord("wrong_type", f"faces[{index}] must be a map with an embedding, "
                                         f"got {type(face).__name__}")
    vector = _vector(face.get("embedding"), dim, f"faces[{index}].embedding")
    bbox = face.get("bbox")
    if bbox is not None:
        bbox = _numbers(bbox, f"faces[{index}].bbox", "wrong_type")
        if len(bbox) != 4:
            raise PoisonRecord("invalid_bbox", f"faces[{index}].bbox must be [x, y, width, height]")
    score = face.get("det_score", 1.0)
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise PoisonRecord("wrong_type", f"faces[{index}].det_score must be a finite number")
    return PrecomputedFace(embedding=vector, bbox=bbox, det_score=float(score))


def _vector(value: Any, dim: int, name: str) -> list[float]:
    vector = _numbers(value, name, "wrong_type")
    normalize_embedding(vector, dim, name)  # refuses here what the embedder would dead-letter later
    return vector


def _numbers(value: Any, name: str, reason: str) -> list[float]:
    if not isinstance(value, list):
        raise PoisonRecord(reason, f"{name} must be a list of numbers, got {type(value).__name__}")
    # bool is an int in Python; True in an embedding is a writer's bug.
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise PoisonRecord(reason, f"{name} must contain only numbers")
    return [float(x) for x in value]


def document_bytes(change: DocChange) -> bytes:
    """The document as JSON, the 'original bytes' a dead letter carries."""
    return json.dumps({"path": change.path, "update_ms": change.update_ms, "data": change.data},
                      sort_keys=True, default=repr).encode()
