"""Ingest routes of the bridge: queue photos (one, or a batch), delete a photo or an event.

Each photo becomes one PhotoEvent on the photo-events topic, keyed by its event;
a 202 means the broker acknowledged it. Re-ingesting a photo replaces its faces,
so a client that got a 503 retries the same body, batch or not.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Header

from pipeline.matcher.api import ApiError, BridgeServices, _check_path_id, _check_vector, _errors, _unavailable
from pipeline.matcher.api import _key as presented_key
from pipeline.matcher.replies import PublishFailed
from pipeline.matcher.schemas import IngestAccepted, IngestBatchAccepted, IngestBatchBody, IngestBody
from pipeline.records import PhotoEvent, PrecomputedFace
from pipeline.serde import PHOTO_EVENT


def photo_event(body: IngestBody, dim: int, where: str = "") -> PhotoEvent:
    """The photo event of one ingest body, or ApiError(422) naming the field (prefixed by `where`)."""
    vectors = body.faces if body.faces is not None else ([body.embedding] if body.embedding else None)
    if vectors is None and not body.image_url:
        raise ApiError(422, f"{where}give image_url, embedding or faces")
    faces = None if vectors is None else [
        PrecomputedFace(embedding=_check_vector(f"{where}faces[{i}]" if body.faces is not None
                                                else f"{where}embedding", vector, dim))
        for i, vector in enumerate(vectors)]
    return PhotoEvent(event_id=body.event_id, photo_id=body.photo_id, image_url=body.image_url, faces=faces,
                      source="http-ingest")


def install_ingest_routes(app: FastAPI, services: BridgeServices) -> None:
    """Add the ingest and delete routes to the bridge's app."""
    topic = services.topics.photo_events

    def authorize(x_api_key: str | None, authorization: str | None, role: str, event_id: str) -> None:
        services.auth.check(presented_key(x_api_key, authorization), role, event_id)

    async def publish(event: PhotoEvent) -> IngestAccepted:
        """Produce one photo event and wait for the broker's ack (PublishFailed otherwise)."""
        value = services.serde.encode(PHOTO_EVENT, event.to_avro())
        partition, offset = await services.requester.publish(topic, event.event_id.encode(), value)
        return IngestAccepted(event_id=event.event_id, photo_id=event.photo_id or None,
                              topic=topic, partition=partition, offset=offset)

    async def publish_or_503(event: PhotoEvent) -> IngestAccepted:
        try:
            return await publish(event)
        except PublishFailed as exc:
            raise _unavailable(exc) from exc

    @app.post("/api/v2/ingest", status_code=202, response_model=IngestAccepted,
              responses=_errors(400, 401, 403, 413, 503))
    async def ingest(body: IngestBody, x_api_key: str | None = Header(None),
                     authorization: str | None = Header(None)) -> IngestAccepted:
        """Queue a photo for indexing (by image_url, or with precomputed embeddings)."""
        authorize(x_api_key, authorization, "ingest", body.event_id)
        return await publish_or_503(photo_event(body, services.spec.dim))

    @app.post("/api/v2/ingest/batch", status_code=202, response_model=IngestBatchAccepted,
              responses=_errors(400, 401, 403, 413, 503))
    async def ingest_batch(body: IngestBatchBody, x_api_key: str | None = Header(None),
                           authorization: str | None = Header(None)) -> IngestBatchAccepted:
        """Queue many photos in one request: all are checked before any is sent, and the 202 lists each one's offset.

        One POST per photo spends its time waiting for the broker's ack; a batch is produced at
        once and waits for all acks together. A 503 says how many were acknowledged; retrying
        the whole batch is safe (re-ingesting a photo replaces its faces).
        """
        for event_id in sorted({photo.event_id for photo in body.photos}):
            authorize(x_api_key, authorization, "ingest", event_id)
        events = [photo_event(photo, services.spec.dim, f"photos[{i}].") for i, photo in enumerate(body.photos)]
        # gather runs each publish up to its first await, so every record is produced before any
        # ack is awaited, in the body's order (a photo listed twice: the later one wins).
        outcomes = await asyncio.gather(*(publish(event) for event in events), return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            unexpected = [f for f in failures if not isinstance(f, PublishFailed)]
            if unexpected:
                raise unexpected[0]
            error = _unavailable(PublishFailed(f"{len(events) - len(failures)} of {len(events)} photos "
                                               f"acknowledged; {failures[0]}"))
            error.extra.update(accepted=len(events) - len(failures), failed=len(failures))
            raise error
        accepted = [o for o in outcomes if isinstance(o, IngestAccepted)]
        return IngestBatchAccepted(count=len(accepted), photos=accepted)

    @app.delete("/api/v2/events/{event_id}/photos/{photo_id}", status_code=202, response_model=IngestAccepted,
                responses=_errors(401, 403, 503))
    async def delete_photo(event_id: str, photo_id: str, x_api_key: str | None = Header(None),
                           authorization: str | None = Header(None)) -> IngestAccepted:
        """Remove one photo from its event's index."""
        _check_path_id("event_id", event_id)
        _check_path_id("photo_id", photo_id)
        authorize(x_api_key, authorization, "ingest", event_id)
        return await publish_or_503(PhotoEvent(event_id=event_id, photo_id=photo_id, op="DELETE",
                                               source="http-ingest"))

    @app.delete("/api/v2/events/{event_id}", status_code=202, response_model=IngestAccepted,
                responses=_errors(401, 403, 503))
    async def delete_event(event_id: str, x_api_key: str | None = Header(None),
                           authorization: str | None = Header(None)) -> IngestAccepted:
        """Remove every photo of an event."""
        _check_path_id("event_id", event_id)
        authorize(x_api_key, authorization, "admin", event_id)
        return await publish_or_503(PhotoEvent(event_id=event_id, photo_id="", op="DELETE_EVENT",
                                               source="http-ingest"))
