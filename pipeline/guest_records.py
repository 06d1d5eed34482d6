"""Typed records of the guests and match-notifications topics (schemas/guest.avsc, match_notification.avsc).

A guest of an event enrols 1..N selfies: the indexer that owns the event pushes
every photo matching them as a MatchNotification, once per guest and photo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import PoisonRecord
from pipeline.records import MatchedFace, _ms, bytes_to_vector, now_ms, vector_to_bytes

MAX_SELFIES = 5  # per guest and event: enough for angles and lighting, bounded matching cost
# Prefixes of MatchReply.error that the bridge maps to 404 and 409.
GUEST_NOT_ENROLLED = "guest not enrolled"
MODEL_MISMATCH = "model mismatch"


def guest_key(event_id: str, guest_id: str) -> bytes:
    """Compaction key of the guests topic."""
    return f"{event_id}/{guest_id}".encode()


def parse_guest_key(key: bytes | None) -> tuple[str, str]:
    """Inverse of guest_key (tombstones carry only the key)."""
    event_id, _, guest_id = (key or b"").decode("utf-8", errors="replace").partition("/")
    if not event_id or not guest_id:
        raise PoisonRecord("invalid_key", f"guests record key must be event_id/guest_id, got {key!r:.80}")
    return event_id, guest_id


def notification_key(event_id: str, guest_id: str, photo_id: str) -> bytes:
    """Compaction key of the match-notifications topic: one record per guest and photo."""
    return f"{event_id}/{guest_id}/{photo_id}".encode()


def parse_notification_key(key: bytes | None) -> tuple[str, str, str]:
    """Inverse of notification_key."""
    parts = (key or b"").decode("utf-8", errors="replace").split("/")
    if len(parts) != 3 or not all(parts):
        raise PoisonRecord("invalid_key", f"notification key must be event/guest/photo, got {key!r:.80}")
    return parts[0], parts[1], parts[2]


@dataclass(frozen=True)
class GuestRecord:
    """ENROL (selfies to match) or FORGET (exclusion template) of one guest."""

    event_id: str
    guest_id: str
    model_id: str
    dim: int
    selfies: np.ndarray  # (n, dim) float32, rows L2-normalized; (0, dim) for an unresolved FORGET
    op: str = "ENROL"
    threshold: float | None = None
    erase_faces: bool = False
    updated_at: int = 0

    def to_avro(self) -> dict[str, Any]:
        """The dict fastavro writes."""
        return {"event_id": self.event_id, "guest_id": self.guest_id, "op": self.op,
                "model_id": self.model_id, "dim": self.dim,
                "selfies": [vector_to_bytes(row) for row in self.selfies],
                "threshold": self.threshold, "erase_faces": self.erase_faces,
                "updated_at": self.updated_at or now_ms()}

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> GuestRecord:
        """From the dict fastavro reads (selfies of the wrong size are a poison record)."""
        dim = int(data["dim"])
        rows = [bytes_to_vector(b) for b in data["selfies"]]
        if any(len(row) != dim for row in rows):
            raise PoisonRecord("invalid_embedding", f"guest selfies must have {dim} values each")
        selfies = np.stack(rows) if rows else np.zeros((0, dim), dtype=np.float32)
        return cls(event_id=data["event_id"], guest_id=data["guest_id"], model_id=data["model_id"], dim=dim,
                   selfies=selfies, op=data["op"], threshold=data.get("threshold"),
                   erase_faces=bool(data.get("erase_faces", False)), updated_at=_ms(data.get("updated_at")))


@dataclass(frozen=True)
class MatchNotification:
    """A photo of the event matches an enrolled guest (pushed once per guest and photo)."""

    event_id: str
    guest_id: str
    photo_id: str
    score: float
    model_id: str
    faces: list[MatchedFace] = field(default_factory=list)
    photo_occurred_at: int = 0
    notified_at: int = 0

    @property
    def key(self) -> bytes:
        """Its compaction key."""
        return notification_key(self.event_id, self.guest_id, self.photo_id)

    def to_avro(self) -> dict[str, Any]:
        """The dict fastavro writes."""
        return {"event_id": self.event_id, "guest_id": self.guest_id, "photo_id": self.photo_id,
                "score": self.score, "model_id": self.model_id,
                "faces": [{"bbox": [float(v) for v in f.bbox], "score": float(f.score)} for f in self.faces],
                "photo_occurred_at": self.photo_occurred_at, "notified_at": self.notified_at or now_ms()}

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> MatchNotification:
        """From the dict fastavro reads."""
        return cls(event_id=data["event_id"], guest_id=data["guest_id"], photo_id=data["photo_id"],
                   score=float(data["score"]), model_id=data["model_id"],
                   faces=[MatchedFace(bbox=tuple(f["bbox"]), score=float(f["score"])) for f in data["faces"]],
                   photo_occurred_at=_ms(data.get("photo_occurred_at")), notified_at=_ms(data.get("notified_at")))
