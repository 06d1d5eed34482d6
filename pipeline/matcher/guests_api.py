"""Guest routes of the bridge: enrol selfies, match as the guest, notifications (SSE), "forget me".

Enrolment and "forget me" are records on the compacted guests topic, keyed
event_id/guest_id on the event's partition; the indexer that owns the event
acts on them (docs/guests.md). Routes take an API key (role match; forget
needs admin) or the guest's own token, returned at enrolment.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, File, Header, Query, Request, UploadFile
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from pipeline.guest_records import GUEST_NOT_ENROLLED, MAX_SELFIES, GuestRecord, guest_key
from pipeline.matcher.api import (
    ApiError,
    BridgeServices,
    _check_path_id,
    _check_vector,
    _errors,
    _faces,
    _match,
    _unavailable,
)
from pipeline.matcher.api import _key as presented_key
from pipeline.matcher.auth import AuthError
from pipeline.matcher.guest_tokens import TOKEN_PREFIX
from pipeline.matcher.notifications import Entry
from pipeline.matcher.replies import PublishFailed
from pipeline.matcher.schemas import MatchedFaceOut, MatchOut
from pipeline.matcher.selfie import SelfieError, pick_single_face
from pipeline.records import iso_utc
from pipeline.serde import GUEST
from pipeline.topics import partition_for

KEEPALIVE_POLLS = 30  # idle polls (0.5 s each) between SSE comments that keep proxies from closing


class GuestEnrolBody(BaseModel):
    """Selfie embeddings of one guest (made by the same model as the event's faces)."""

    model_config = ConfigDict(extra="forbid")

    embeddings: list[list[float]] = Field(..., min_length=1, max_length=MAX_SELFIES)
    threshold: float | None = Field(None, ge=-1.0, le=1.0, description="Default: the model's threshold")


class GuestForgetBody(BaseModel):
    """What "forget me" erases besides the enrolment and the notifications."""

    model_config = ConfigDict(extra="forbid")

    erase_faces: bool = Field(True, description="Also erase indexed faces of the guest from the photos")
    embeddings: list[list[float]] | None = Field(
        None, max_length=MAX_SELFIES, description="The guest's face, when never enrolled (default: enrolled selfies)")
    threshold: float | None = Field(None, ge=-1.0, le=1.0)


class GuestMatchBody(BaseModel):
    """Match with the guest's enrolled selfies."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(20, ge=1, le=1000)
    threshold: float | None = Field(None, ge=-1.0, le=1.0)


class NotificationOut(BaseModel):
    """One photo pushed to the guest."""

    photo_id: str
    score: float | None = None
    faces: list[MatchedFaceOut] = Field(default_factory=list)
    photo_occurred_at: str | None = None
    notified_at: str | None = None
    model: str | None = None
    offset: int
    withdrawn: bool = False


class NotificationsOut(BaseModel):
    """stream=false: what the guest has now, one entry per photo, oldest first."""

    event_id: str
    guest_id: str
    count: int
    notifications: list[NotificationOut]


class GuestAccepted(BaseModel):
    """The guests-topic record was stored; the owning indexer applies it within moments."""

    event_id: str
    guest_id: str
    op: str
    selfies: int
    partition: int
    offset: int
    guest_token: str | None = Field(None, description="Lets the guest's app manage only this guest")
    notifications_url: str


def install_guest_routes(app: FastAPI, services: BridgeServices) -> None:
    """Add the guest routes to the bridge app."""
    spec, topics = services.spec, services.topics

    def authorize(key: str | None, event_id: str, guest_id: str, role: str) -> None:
        _check_path_id("event_id", event_id)
        _check_path_id("guest_id", guest_id)
        if key and key.startswith(TOKEN_PREFIX):
            grant = services.guest_tokens.check(key) if services.guest_tokens else None
            if grant is None:
                raise AuthError(401, "invalid or expired guest token")
            if (grant.event_id, grant.guest_id) != (event_id, guest_id):
                raise AuthError(403, "this guest token is for another guest")
            return
        services.auth.check(key, role, event_id)

    async def publish(record: GuestRecord | None, event_id: str, guest_id: str, op: str) -> GuestAccepted:
        value = None if record is None else services.serde.encode(GUEST, record.to_avro())
        try:
            partition, offset = await services.requester.publish(
                topics.guests, guest_key(event_id, guest_id), value,
                partition=partition_for(event_id, topics.partitions))
        except PublishFailed as exc:
            raise _unavailable(exc) from exc
        token = services.guest_tokens.issue(event_id, guest_id) if services.guest_tokens and op == "ENROL" else None
        return GuestAccepted(event_id=event_id, guest_id=guest_id, op=op,
                             selfies=0 if record is None else len(record.selfies), partition=partition,
                             offset=offset, guest_token=token,
                             notifications_url=f"/api/v2/events/{event_id}/guests/{guest_id}/notifications")

    def record(event_id: str, guest_id: str, selfies: list[np.ndarray], op: str, threshold: float | None,
               erase_faces: bool = False) -> GuestRecord:
        rows = np.stack(selfies) if selfies else np.zeros((0, spec.dim), dtype=np.float32)
        return GuestRecord(event_id=event_id, guest_id=guest_id, model_id=spec.model_id, dim=spec.dim,
                           selfies=rows, op=op, threshold=threshold, erase_faces=erase_faces)

    base = "/api/v2/events/{event_id}/guests/{guest_id}"

    @app.put(base, status_code=202, response_model=GuestAccepted, responses=_errors(400, 401, 403, 503))
    async def enrol(event_id: str, guest_id: str, body: GuestEnrolBody, x_api_key: str | None = Header(None),
                    authorization: str | None = Header(None)) -> GuestAccepted:
        """Enrol (or replace) the guest's selfies: photos matching any of them are pushed, once each."""
        authorize(presented_key(x_api_key, authorization), event_id, guest_id, "match")
        selfies = [_check_vector(f"embeddings[{i}]", v, spec.dim) for i, v in enumerate(body.embeddings)]
        return await publish(record(event_id, guest_id, selfies, "ENROL", body.threshold), event_id, guest_id,
                             "ENROL")

    @app.put(base + "/selfies", status_code=202, response_model=GuestAccepted,
             responses=_errors(400, 401, 403, 413, 503))
    async def enrol_images(event_id: str, guest_id: str, images: list[UploadFile] = File(...),
                           x_api_key: str | None = Header(None),
                           authorization: str | None = Header(None)) -> GuestAccepted:
        """Enrol by selfie images (1 to 5): each must show exactly one face that passes the quality gate."""
        authorize(presented_key(x_api_key, authorization), event_id, guest_id, "match")
        if not 1 <= len(images) <= MAX_SELFIES:
            raise ApiError(422, f"send 1 to {MAX_SELFIES} images, got {len(images)}")
        selfies = []
        for i, image in enumerate(images):
            faces = await _faces(services, image)
            try:
                selfies.append(np.asarray(pick_single_face(faces, services.quality_gate).embedding, np.float32))
            except SelfieError as exc:
                raise ApiError(422, f"images[{i}]: {exc}", reason=exc.reason, faces_found=len(faces)) from exc
        return await publish(record(event_id, guest_id, selfies, "ENROL", None), event_id, guest_id, "ENROL")

    @app.delete(base, status_code=202, response_model=GuestAccepted, responses=_errors(401, 403, 503))
    async def unenrol(event_id: str, guest_id: str, x_api_key: str | None = Header(None),
                      authorization: str | None = Header(None)) -> GuestAccepted:
        """Remove the guest: selfies, notifications, and any exclusion (the guest may appear in results again)."""
        authorize(presented_key(x_api_key, authorization), event_id, guest_id, "match")
        return await publish(None, event_id, guest_id, "REMOVE")

    @app.post(base + "/forget", status_code=202, response_model=GuestAccepted,
              responses=_errors(400, 401, 403, 503))
    async def forget(event_id: str, guest_id: str, body: GuestForgetBody, x_api_key: str | None = Header(None),
                     authorization: str | None = Header(None)) -> GuestAccepted:
        """"Forget me": drop selfies and notifications, erase their faces, keep them out of later photos."""
        authorize(presented_key(x_api_key, authorization), event_id, guest_id, "admin")
        selfies = [_check_vector(f"embeddings[{i}]", v, spec.dim) for i, v in enumerate(body.embeddings or [])]
        return await publish(record(event_id, guest_id, selfies, "FORGET", body.threshold, body.erase_faces),
                             event_id, guest_id, "FORGET")

    @app.post(base + "/match", response_model=MatchOut, responses=_errors(400, 401, 403, 404, 409, 503, 504))
    async def match_guest(event_id: str, guest_id: str, body: GuestMatchBody, x_api_key: str | None = Header(None),
                          authorization: str | None = Header(None)) -> Response:
        """Photos of the event showing the guest, scored by the best of their selfies (same body as /match)."""
        authorize(presented_key(x_api_key, authorization), event_id, guest_id, "match")
        try:
            return await _match(services, event_id, np.zeros(0, dtype=np.float32), body.top_k, body.threshold,
                                guest_id=guest_id)
        except ApiError as exc:
            if exc.status == 422 and str(exc).startswith(GUEST_NOT_ENROLLED):
                raise ApiError(404, str(exc)) from exc
            raise

    @app.get(base + "/notifications", response_model=NotificationsOut, responses={
        **_errors(401, 403, 503),
        200: {"description": "Server-Sent Events (`event: match` / `event: withdrawn`, `id:` the offset), or with "
                             "stream=false the current list as JSON",
              "content": {"text/event-stream": {"schema": {"type": "string"}}}}})
    async def notifications(request: Request, event_id: str, guest_id: str,
                            stream: bool = Query(True, description="false: the current list as JSON"),
                            last_event_id: str | None = Header(None),
                            x_api_key: str | None = Header(None),
                            authorization: str | None = Header(None)) -> Response:
        """Server-Sent Events: every photo pushed to the guest so far, then new ones as they are indexed."""
        authorize(presented_key(x_api_key, authorization), event_id, guest_id, "match")
        reader = services.notifications
        if reader is None:
            raise ApiError(503, "notifications are not configured in this bridge")
        if not stream:
            entries = await asyncio.get_running_loop().run_in_executor(None, reader.current, event_id, guest_id)
            body = {"event_id": event_id, "guest_id": guest_id, "count": len(entries),
                    "notifications": [_entry_json(e) for e in entries]}
            return Response(orjson.dumps(body), media_type="application/json")
        after = int(last_event_id) if last_event_id and last_event_id.isdigit() else -1
        return StreamingResponse(_sse(request, reader.follow(event_id, guest_id, after)),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


async def _sse(request: Request, entries: AsyncIterator[Entry | None]) -> AsyncIterator[bytes]:
    yield b"retry: 3000\n\n"
    idle = 0
    try:
        async for entry in entries:
            if entry is None:
                idle += 1
                if await request.is_disconnected():
                    return
                if idle >= KEEPALIVE_POLLS:
                    idle = 0
                    yield b": keepalive\n\n"
                continue
            idle = 0
            kind = b"match" if entry.notification is not None else b"withdrawn"
            yield b"id: %d\nevent: %s\ndata: %s\n\n" % (entry.offset, kind, orjson.dumps(_entry_json(entry)))
    finally:
        await entries.aclose()  # type: ignore[attr-defined]  # an async generator: stops its consumer thread


def _entry_json(entry: Entry) -> dict[str, Any]:
    note = entry.notification
    if note is None:
        return {"photo_id": entry.photo_id, "withdrawn": True, "offset": entry.offset}
    return {"photo_id": note.photo_id, "score": note.score,
            "faces": [{"bbox": list(f.bbox), "score": f.score} for f in note.faces],
            "photo_occurred_at": iso_utc(note.photo_occurred_at), "notified_at": iso_utc(note.notified_at),
            "model": note.model_id, "offset": entry.offset}
