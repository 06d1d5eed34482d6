"""HTTP bodies of the bridge (pydantic; they make the OpenAPI document)."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from pipeline.records import ID_REGEX, id_problem

MAX_URL_LENGTH = 2048  # what browsers, CDNs and most object stores accept
URL_SCHEMES = frozenset({"http", "https"})


def check_image_url(url: str) -> str:
    """The URL if it is an absolute http(s) URL with a host and no credentials; else ValueError.

    Syntax only: the embedder still resolves the host and refuses private
    addresses on every hop when it fetches, as defence in depth.
    """
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError("must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port out of range or not a number)
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from exc
    if parts.scheme.lower() not in URL_SCHEMES:
        raise ValueError(f"scheme must be http or https, not {parts.scheme or 'missing'!r}")
    if "@" in parts.netloc:
        raise ValueError("must not contain credentials (user:password@)")
    if not parts.hostname:
        raise ValueError("must name a host")
    return url


def _valid_id(value: str) -> str:
    problem = id_problem(value)
    if problem:
        raise ValueError(problem)
    return value


# The pattern documents the rule in the OpenAPI; the validator adds "not . or ..".
Id = Annotated[str, Field(pattern=ID_REGEX), AfterValidator(_valid_id)]


class IngestBody(BaseModel):
    """The v2 ingest body; `embedding` or `faces` skip image fetching."""

    # Unknown fields are refused, so a misspelt "embeding" is an error, not a silent URL-less photo.
    model_config = ConfigDict(extra="forbid")

    event_id: Id = Field(..., examples=["EVENT123"])
    photo_id: Id = Field(..., examples=["photo_abc123"])
    image_url: str | None = Field(None, max_length=MAX_URL_LENGTH, examples=["https://res.cloudinary.com/x.jpg"],
                                  description=f"http(s) URL with a host, no credentials, "
                                              f"at most {MAX_URL_LENGTH} characters")
    embedding: list[float] | None = Field(None, description="Optional pre-computed embedding of one face")
    faces: list[list[float]] | None = Field(None, description="Optional pre-computed embeddings, one per face")

    @field_validator("image_url")
    @classmethod
    def _image_url(cls, value: str | None) -> str | None:
        # "" means "no URL" (clients that always send the key); the route then wants embeddings.
        return check_image_url(value) if value else None


class IngestAccepted(BaseModel):
    """Where the photo event went."""

    status: str = "accepted"
    event_id: str
    photo_id: str | None = None
    topic: str
    partition: int
    offset: int


MAX_INGEST_BATCH = 500  # photos per batch POST: 500 x 512 floats is ~5.5 MB of JSON, half the body cap


class IngestBatchBody(BaseModel):
    """Many photos in one ingest request, each as the single ingest's body."""

    model_config = ConfigDict(extra="forbid")

    photos: list[IngestBody] = Field(..., min_length=1, max_length=MAX_INGEST_BATCH)


class IngestBatchAccepted(BaseModel):
    """Where each photo event of a batch went, in the body's order."""

    status: str = "accepted"
    count: int
    photos: list[IngestAccepted]


class MatchBody(BaseModel):
    """The v2 match body."""

    model_config = ConfigDict(extra="forbid")

    event_id: Id
    user_embedding: list[float] = Field(..., min_length=1)
    top_k: int = Field(20, ge=1, le=1000)
    threshold: float | None = Field(None, ge=-1.0, le=1.0,
                                    description="Cosine similarity; default: the model's threshold")


class MatchedFaceOut(BaseModel):
    """A face of a matching photo."""

    bbox: list[float]
    score: float


class PhotoMatchOut(BaseModel):
    """A matching photo, scored by its best face."""

    photo_id: str
    score: float
    similarity: float = Field(..., description="Same as score (seed clients read this name)")
    faces: list[MatchedFaceOut]


class MatchOut(BaseModel):
    """Matches plus freshness: index size, the faces offset and the newest photo time the answer reflects."""

    event_id: str
    matches: list[PhotoMatchOut]
    count: int
    event_has_faces: bool
    index_size: int
    photos_indexed: int
    faces_offset: int
    newest_face_at: str | None = Field(
        None, examples=["2026-01-31T12:00:00.250Z"],
        description="ISO-8601 UTC: the newest occurred_at (the photo event's time) of the photos "
                    "applied to this event's index, with or without faces: how recent the data "
                    "answering is. null: no photo applied yet, or none carried a time")
    model: str | None = Field(None, description="Model of the index that answered; null when the event "
                                                "has no index yet")
    threshold: float
    search_ms: float
    took_ms: float


class ErrorOut(BaseModel):
    """Every error: a message naming the field or the cause, sometimes with details."""

    error: str
