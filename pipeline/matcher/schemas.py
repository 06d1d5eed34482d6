"""HTTP bodies of the bridge (pydantic; they make the OpenAPI document)."""

from __future__ import annotations

from pydantic import BaseModel, Field

ID_REGEX = r"^[^/\x00]{1,256}$"


class IngestBody(BaseModel):
    """The seed's ingest body; `embedding` or `faces` skip image fetching."""

    event_id: str = Field(..., pattern=ID_REGEX, examples=["EVENT123"])
    photo_id: str = Field(..., pattern=ID_REGEX, examples=["photo_abc123"])
    image_url: str | None = Field(None, max_length=4096, examples=["https://res.cloudinary.com/x.jpg"])
    embedding: list[float] | None = Field(None, description="Optional pre-computed embedding of one face")
    faces: list[list[float]] | None = Field(None, description="Optional pre-computed embeddings, one per face")


class IngestAccepted(BaseModel):
    """Where the photo event went."""

    status: str = "accepted"
    event_id: str
    photo_id: str | None = None
    topic: str
    partition: int
    offset: int


class MatchBody(BaseModel):
    """The seed's match body."""

    event_id: str = Field(..., pattern=ID_REGEX)
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
    """Matches plus freshness: index size and the faces offset the answer reflects."""

    event_id: str
    matches: list[PhotoMatchOut]
    count: int
    event_has_faces: bool
    index_size: int
    photos_indexed: int
    faces_offset: int
    threshold: float
    search_ms: float
    took_ms: float
