"""Typed records of the contract (schemas/*.avsc) and their Avro dict forms.

Stage cores work on these dataclasses only; Kafka and Avro stay at the edges.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import PoisonRecord

# Ids become Kafka keys "event/photo" and appear in URL paths: no '/', no control
# characters, not "." or ".." (a path segment a proxy or client would rewrite).
ID_REGEX = r"^[^/\x00-\x1f\x7f]{1,256}$"
ID_PATTERN = re.compile(ID_REGEX)
ID_RULE = "1-256 characters, without '/' or control characters, and not '.' or '..'"


def id_problem(value: object) -> str | None:
    """Why value is not a valid event or photo id, or None if it is."""
    if not isinstance(value, str) or not ID_PATTERN.match(value) or value in (".", ".."):
        return f"must be {ID_RULE} (got {value!r:.80})"
    return None


def now_ms() -> int:
    """Wall-clock epoch milliseconds."""
    return int(time.time() * 1000)


def iso_utc(epoch_ms: int) -> str | None:
    """Epoch ms as ISO-8601 UTC with milliseconds ("2026-01-31T12:00:00.250Z"); None for 0 (unknown)."""
    if epoch_ms <= 0:
        return None
    moment = dt.datetime.fromtimestamp(epoch_ms / 1000, tz=dt.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(value: Any) -> int:
    # fastavro turns timestamp-millis into aware datetimes on read.
    if isinstance(value, dt.datetime):
        return int(value.timestamp() * 1000)
    return int(value or 0)


def check_id(kind: str, value: str) -> str:
    """The id, or PoisonRecord(invalid_<kind>) saying what the rule is."""
    problem = id_problem(value)
    if problem:
        raise PoisonRecord(f"invalid_{kind}", f"{kind} {problem}")
    return value


def vector_to_bytes(vector: np.ndarray | Sequence[float]) -> bytes:
    """float32 little-endian, the contract's embedding encoding."""
    return np.asarray(vector, dtype="<f4").tobytes()


def bytes_to_vector(data: bytes) -> np.ndarray:
    """Inverse of vector_to_bytes (a read-only view is copied to be writable)."""
    if len(data) % 4:
        raise PoisonRecord("invalid_embedding", f"embedding bytes length {len(data)} not a multiple of 4")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def faces_key(event_id: str, photo_id: str | None, model_id: str | None = None) -> bytes:
    """Compaction key of the faces topic: one per photo (per photo and model), or the event alone.

    `event/photo/model` keys let a second model's faces of a photo live beside the
    first's while an event is re-embedded (blue/green; docs/reembed.md).
    """
    if not photo_id:
        return event_id.encode()
    return (f"{event_id}/{photo_id}/{model_id}" if model_id else f"{event_id}/{photo_id}").encode()


def parse_faces_key(key: bytes | None) -> tuple[str, str | None]:
    """Inverse of faces_key without the model, used for tombstones (which carry no value)."""
    event_id, photo_id, _ = parse_faces_key_model(key)
    return event_id, photo_id


def parse_faces_key_model(key: bytes | None) -> tuple[str, str | None, str | None]:
    """(event, photo or None, model or None) of a faces key."""
    if not key:
        raise PoisonRecord("invalid_key", "faces record without a key")
    text = key.decode("utf-8", errors="replace")
    event_id, _, rest = text.partition("/")
    photo_id, _, model_id = rest.partition("/")
    return event_id, (photo_id or None), (model_id or None)


@dataclass(frozen=True, eq=False)
class PrecomputedFace:
    """A face embedded upstream of the pipeline (a list of floats, or float32 once read back)."""

    embedding: Sequence[float] | np.ndarray
    bbox: list[float] | None = None
    det_score: float = 1.0

    def to_avro(self) -> dict[str, Any]:
        """Written packed (embedding_f32): a 128-d photo event decodes in 11.5 us instead of 21 as floats."""
        return {"embedding": [], "embedding_f32": vector_to_bytes(self.embedding), "bbox": self.bbox,
                "det_score": float(self.det_score)}

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> PrecomputedFace:
        """From either form of the embedding; PoisonRecord if both are given."""
        packed, floats = data.get("embedding_f32"), data.get("embedding") or []
        if packed is not None and floats:
            raise PoisonRecord("invalid_embedding", "give embedding or embedding_f32, not both")
        embedding = bytes_to_vector(packed) if packed is not None else floats
        return cls(embedding=embedding, bbox=data.get("bbox"), det_score=data.get("det_score", 1.0))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrecomputedFace):
            return NotImplemented
        return (self.bbox == other.bbox and self.det_score == other.det_score
                and np.array_equal(np.asarray(self.embedding, dtype=np.float32),
                                   np.asarray(other.embedding, dtype=np.float32)))


@dataclass(frozen=True)
class PhotoEvent:
    """A photo uploaded, changed or deleted (schemas/photo_event.avsc)."""

    event_id: str
    photo_id: str
    op: str = "UPSERT"
    image_url: str | None = None
    faces: list[PrecomputedFace] | None = None
    source: str = "unknown"
    occurred_at: int = 0

    def to_avro(self) -> dict[str, Any]:
        """The dict fastavro writes."""
        faces = None if self.faces is None else [f.to_avro() for f in self.faces]
        return {"event_id": self.event_id, "photo_id": self.photo_id, "op": self.op,
                "image_url": self.image_url, "faces": faces, "source": self.source,
                "occurred_at": self.occurred_at or now_ms()}

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> PhotoEvent:
        """From the dict fastavro reads."""
        faces = data.get("faces")
        return cls(event_id=data["event_id"], photo_id=data["photo_id"], op=data["op"],
                   image_url=data.get("image_url"),
                   faces=None if faces is None else [PrecomputedFace.from_avro(f) for f in faces],
                   source=data.get("source", "unknown"), occurred_at=_ms(data.get("occurred_at")))


@dataclass(frozen=True)
class Face:
    """One face of a photo, embedding L2-normalized."""

    bbox: tuple[float, ...]
    det_score: float
    embedding: np.ndarray
    landmarks: tuple[float, ...] | None = None


@dataclass(frozen=True)
class PhotoFaces:
    """Every face of one photo (schemas/faces.avsc); the index's changelog record."""

    event_id: str
    photo_id: str
    model_id: str
    dim: int
    faces: list[Face] = field(default_factory=list)
    op: str = "UPSERT"
    image_url: str | None = None
    occurred_at: int = 0

    def to_avro(self) -> dict[str, Any]:
        """The dict fastavro writes."""
        return {"event_id": self.event_id, "photo_id": self.photo_id, "op": self.op,
                "model_id": self.model_id, "dim": self.dim, "image_url": self.image_url,
                "occurred_at": self.occurred_at or now_ms(),
                "faces": [{"bbox": [float(v) for v in f.bbox], "det_score": float(f.det_score),
                           "landmarks": None if f.landmarks is None else [float(v) for v in f.landmarks],
                           "embedding": vector_to_bytes(f.embedding)} for f in self.faces]}

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> PhotoFaces:
        """From the dict fastavro reads."""
        faces = [Face(bbox=tuple(f["bbox"]), det_score=f["det_score"],
                      embedding=bytes_to_vector(f["embedding"]),
                      landmarks=None if f.get("landmarks") is None else tuple(f["landmarks"]))
                 for f in data["faces"]]
        return cls(event_id=data["event_id"], photo_id=data["photo_id"], model_id=data["model_id"],
                   dim=data["dim"], faces=faces, op=data["op"], image_url=data.get("image_url"),
                   occurred_at=_ms(data.get("occurred_at")))


@dataclass(frozen=True)
class MatchRequest:
    """A query: which photos of this event show this face? (schemas/match_request.avsc)."""

    request_id: str
    event_id: str
    embedding: np.ndarray
    top_k: int = 20
    threshold: float | None = None
    deadline_ms: int = 0
    guest_id: str | None = None  # match with this enrolled guest's selfies (embedding empty)
    model_id: str | None = None  # the embedding's model; None: the indexer's own

    def to_avro(self) -> dict[str, Any]:
        """The dict fastavro writes."""
        return {"request_id": self.request_id, "event_id": self.event_id,
                "embedding": vector_to_bytes(self.embedding), "top_k": self.top_k,
                "threshold": self.threshold, "deadline_ms": self.deadline_ms,
                "guest_id": self.guest_id, "model_id": self.model_id}

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> MatchRequest:
        """From the dict fastavro reads."""
        return cls(request_id=data["request_id"], event_id=data["event_id"],
                   embedding=bytes_to_vector(data["embedding"]), top_k=data["top_k"],
                   threshold=data.get("threshold"), deadline_ms=data.get("deadline_ms", 0),
                   guest_id=data.get("guest_id"), model_id=data.get("model_id"))


@dataclass(frozen=True)
class MatchedFace:
    """A face of a matching photo and its similarity to the query."""

    bbox: tuple[float, ...]
    score: float


@dataclass(frozen=True)
class PhotoMatch:
    """A photo scored by its best face."""

    photo_id: str
    score: float
    faces: list[MatchedFace]


@dataclass(frozen=True)
class MatchReply:
    """The answer to a MatchRequest (schemas/match_reply.avsc)."""

    request_id: str
    event_id: str
    status: str
    matches: list[PhotoMatch] = field(default_factory=list)
    error: str | None = None
    index_size: int = 0
    photos_indexed: int = 0
    faces_offset: int = -1
    threshold: float = 0.0
    search_ms: float = 0.0
    newest_face_at: int = 0  # epoch ms: newest occurred_at applied to the event's index; 0 = unknown
    model_id: str | None = None  # the model of the index that answered

    def to_avro(self) -> dict[str, Any]:
        """The dict fastavro writes."""
        return {"request_id": self.request_id, "event_id": self.event_id, "status": self.status,
                "error": self.error, "index_size": self.index_size,
                "photos_indexed": self.photos_indexed, "faces_offset": self.faces_offset,
                "threshold": self.threshold, "search_ms": self.search_ms,
                "newest_face_at": self.newest_face_at, "model_id": self.model_id,
                "matches": [{"photo_id": m.photo_id, "score": m.score,
                             "faces": [{"bbox": list(f.bbox), "score": f.score} for f in m.faces]}
                            for m in self.matches]}

    @classmethod
    def from_avro(cls, data: dict[str, Any]) -> MatchReply:
        """From the dict fastavro reads."""
        matches = [PhotoMatch(photo_id=m["photo_id"], score=m["score"],
                              faces=[MatchedFace(bbox=tuple(f["bbox"]), score=f["score"])
                                     for f in m["faces"]]) for m in data["matches"]]
        return cls(request_id=data["request_id"], event_id=data["event_id"],
                   status=data["status"], matches=matches, error=data.get("error"),
                   index_size=data["index_size"], photos_indexed=data["photos_indexed"],
                   faces_offset=data["faces_offset"], threshold=data["threshold"],
                   search_ms=data["search_ms"], newest_face_at=_ms(data.get("newest_face_at")),
                   model_id=data.get("model_id"))
