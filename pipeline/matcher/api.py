"""The HTTP bridge: the seed's API on top of Kafka request/reply (OpenAPI at /docs)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.formparsers import MultiPartParser

from pipeline.errors import PoisonRecord
from pipeline.facelib.model import DetectedFace
from pipeline.facelib.spec import ModelSpec
from pipeline.facelib.vectors import InvalidEmbedding, normalize_embedding
from pipeline.matcher.auth import AuthError, Authorizer
from pipeline.matcher.replies import KafkaRequester, ReplyTimeout
from pipeline.matcher.schemas import IngestAccepted, IngestBody, MatchBody, MatchOut
from pipeline.matcher.selfie import SelfieError, analyze_payload, pick_single_face
from pipeline.metrics import Metrics
from pipeline.records import PhotoEvent, PrecomputedFace
from pipeline.serde import PHOTO_EVENT, SchemaRegistry
from pipeline.settings import BridgeSettings, TopicSettings

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP error with a message for the caller."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.extra = status, extra


@dataclass
class BridgeServices:
    """Everything the routes need, built in main() (or by tests)."""

    requester: KafkaRequester
    serde: SchemaRegistry
    topics: TopicSettings
    settings: BridgeSettings
    spec: ModelSpec
    metrics: Metrics
    auth: Authorizer
    health: Callable[[], Awaitable[dict[str, Any]]]
    faces_in_image: Callable[[bytes], list[DetectedFace]] | None = None


def _key(x_api_key: str | None, authorization: str | None) -> str | None:
    if x_api_key:
        return x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def create_app(services: BridgeServices) -> FastAPI:
    """Build the FastAPI app around ready services."""
    app = FastAPI(title="FaceMatch bridge", version="2.0",
                  description="Find a guest's photos: ingest photos, match a face, analyze a selfie.")
    _install_error_handlers(app, services)
    app.add_middleware(BodyLimitMiddleware, max_bytes=services.settings.bridge_max_image_bytes + 256 * 1024)
    app.add_middleware(MetricsMiddleware, metrics=services.metrics)
    # Uploaded selfies must never touch the disk: Starlette spools multipart files to a temp
    # file above this size, so keep the whole (already capped) upload in memory.
    MultiPartParser.spool_max_size = services.settings.bridge_max_image_bytes + 256 * 1024
    spec, topics = services.spec, services.topics

    def authorize(x_api_key: str | None, authorization: str | None, role: str, event_id: str | None) -> None:
        services.auth.check(_key(x_api_key, authorization), role, event_id)

    async def publish(event: PhotoEvent) -> IngestAccepted:
        value = services.serde.encode(PHOTO_EVENT, event.to_avro())
        partition, offset = await services.requester.publish(topics.photo_events, event.event_id.encode(), value)
        return IngestAccepted(event_id=event.event_id, photo_id=event.photo_id or None,
                              topic=topics.photo_events, partition=partition, offset=offset)

    @app.post("/api/v2/ingest", status_code=202, response_model=IngestAccepted)
    async def ingest(body: IngestBody, x_api_key: str | None = Header(None),
                     authorization: str | None = Header(None)) -> IngestAccepted:
        """Queue a photo for indexing (by image_url, or with precomputed embeddings)."""
        authorize(x_api_key, authorization, "ingest", body.event_id)
        vectors = body.faces if body.faces is not None else ([body.embedding] if body.embedding else None)
        if vectors is None and not body.image_url:
            raise ApiError(422, "give image_url, embedding or faces")
        for i, vector in enumerate(vectors or []):
            _check_vector(f"faces[{i}]" if body.faces is not None else "embedding", vector, spec.dim)
        faces = None if vectors is None else [PrecomputedFace(embedding=v) for v in vectors]
        return await publish(PhotoEvent(event_id=body.event_id, photo_id=body.photo_id,
                                        image_url=body.image_url, faces=faces, source="http-ingest"))

    @app.delete("/api/v2/events/{event_id}/photos/{photo_id}", status_code=202, response_model=IngestAccepted)
    async def delete_photo(event_id: str, photo_id: str, x_api_key: str | None = Header(None),
                           authorization: str | None = Header(None)) -> IngestAccepted:
        """Remove one photo from its event's index."""
        authorize(x_api_key, authorization, "ingest", event_id)
        return await publish(PhotoEvent(event_id=event_id, photo_id=photo_id, op="DELETE", source="http-ingest"))

    @app.delete("/api/v2/events/{event_id}", status_code=202, response_model=IngestAccepted)
    async def delete_event(event_id: str, x_api_key: str | None = Header(None),
                           authorization: str | None = Header(None)) -> IngestAccepted:
        """Remove every photo of an event."""
        authorize(x_api_key, authorization, "admin", event_id)
        return await publish(PhotoEvent(event_id=event_id, photo_id="", op="DELETE_EVENT", source="http-ingest"))

    @app.post("/api/v2/match", response_model=MatchOut)
    async def match(body: MatchBody, x_api_key: str | None = Header(None),
                    authorization: str | None = Header(None)) -> Response:
        """Photos of the event showing this face, best first."""
        authorize(x_api_key, authorization, "match", body.event_id)
        vector = _check_vector("user_embedding", body.user_embedding, spec.dim)
        return await _match(services, body.event_id, vector, body.top_k, body.threshold)

    @app.post("/api/v2/match/image", response_model=MatchOut)
    async def match_image(event_id: str = Form(..., pattern=r"^[^/\x00]{1,256}$"),
                          image: UploadFile = File(...), top_k: int = Form(20, ge=1, le=1000),
                          threshold: float | None = Form(None, ge=-1.0, le=1.0),
                          x_api_key: str | None = Header(None),
                          authorization: str | None = Header(None)) -> Response:
        """Match by selfie: exactly one face must be visible. The image is never stored."""
        authorize(x_api_key, authorization, "match", event_id)
        faces = await _faces(services, image)
        try:
            face = pick_single_face(faces)
        except SelfieError as exc:
            raise ApiError(422, str(exc), faces_found=len(faces)) from exc
        return await _match(services, event_id, face.embedding, top_k, threshold)

    @app.post("/api/face/analyze")
    async def analyze(image: UploadFile = File(...), x_api_key: str | None = Header(None),
                      authorization: str | None = Header(None)) -> dict[str, Any]:
        """V1: the most prominent face's `descriptor`, plus every face with its box."""
        authorize(x_api_key, authorization, "match", None)
        faces = await _faces(services, image)
        return analyze_payload(faces, spec)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Broker, indexer partitions, model and embedding_dim."""
        body = await services.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus exposition."""
        return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _check_vector(field: str, values: list[float], dim: int) -> np.ndarray:
    try:
        normalize_embedding(values, dim, field)
    except InvalidEmbedding as exc:
        raise ApiError(422, str(exc), embedding_dim=dim) from exc
    return np.asarray(values, dtype=np.float32)


async def _faces(services: BridgeServices, image: UploadFile) -> list[DetectedFace]:
    if services.faces_in_image is None:
        raise ApiError(503, "no face model is loaded in this bridge (FACEMATCH_MODEL=none)")
    data = await image.read(services.settings.bridge_max_image_bytes + 1)
    if len(data) > services.settings.bridge_max_image_bytes:
        raise ApiError(413, f"image larger than {services.settings.bridge_max_image_bytes} bytes")
    try:  # the selfie stays in memory: never written to disk or Kafka
        return await asyncio.get_running_loop().run_in_executor(None, services.faces_in_image, data)
    except PoisonRecord as exc:
        raise ApiError(422, str(exc), reason=exc.reason) from exc


async def _match(services: BridgeServices, event_id: str, vector: np.ndarray, top_k: int,
                 threshold: float | None) -> Response:
    started = time.perf_counter()
    try:
        reply = await services.requester.match(event_id, vector, top_k, threshold,
                                               services.settings.bridge_timeout_s)
    except ReplyTimeout as exc:
        raise ApiError(504, f"{exc}: is an indexer running and caught up? see /health") from exc
    if reply.status == "ERROR":
        raise ApiError(422, reply.error or "match failed")
    matches = [{"photo_id": m.photo_id, "score": m.score, "similarity": m.score,
                "faces": [{"bbox": list(f.bbox), "score": f.score} for f in m.faces]}
               for m in reply.matches]
    body = {"event_id": event_id, "matches": matches, "count": len(matches),
            "event_has_faces": reply.status == "OK", "index_size": reply.index_size,
            "photos_indexed": reply.photos_indexed, "faces_offset": reply.faces_offset,
            "threshold": reply.threshold, "search_ms": reply.search_ms,
            "took_ms": (time.perf_counter() - started) * 1000}
    # Serialized directly: the shape is MatchOut (documented), validating it again costs time.
    return Response(orjson.dumps(body), media_type="application/json")


def _install_error_handlers(app: FastAPI, services: BridgeServices) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(exc), **exc.extra}, status_code=exc.status)

    @app.exception_handler(AuthError)
    async def auth_error(request: Request, exc: AuthError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = ["{}: {}".format(".".join(str(p) for p in e["loc"] if p != "body"), e["msg"])
                    for e in exc.errors()]
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()[:10]]
        return JSONResponse({"error": "; ".join(problems), "detail": detail}, status_code=422)


class BodyLimitMiddleware:
    """413 for bodies over the cap, before anything buffers them (declared or streamed)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"error": f"request body larger than {self.max_bytes} bytes"}, status_code=413)
            await response(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, f"request body larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, counting_receive, send)


class MetricsMiddleware:
    """Counts and times requests by route template (plain ASGI: BaseHTTPMiddleware costs ~1 ms)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_and_record(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.http_requests.labels(path, str(status)).inc()
            self.metrics.http_seconds.labels(path).observe(time.perf_counter() - started)
