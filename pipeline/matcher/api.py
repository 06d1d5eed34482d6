"""The HTTP bridge: the FaceMatch v2 API on top of Kafka request/reply (OpenAPI at /docs)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartParser

from pipeline.errors import PoisonRecord
from pipeline.facelib.model import DetectedFace
from pipeline.facelib.quality import NO_GATE, QualityGate
from pipeline.facelib.spec import ModelSpec
from pipeline.facelib.vectors import InvalidEmbedding, normalize_embedding
from pipeline.guest_records import MODEL_MISMATCH
from pipeline.matcher.auth import AuthError, Authorizer
from pipeline.matcher.guest_tokens import GuestTokens
from pipeline.matcher.notifications import NotificationReader
from pipeline.matcher.replies import KafkaRequester, PublishFailed, ReplyTimeout
from pipeline.matcher.schemas import ErrorOut, MatchBody, MatchOut
from pipeline.matcher.selfie import SelfieError, analyze_payload, pick_single_face
from pipeline.metrics import Metrics
from pipeline.records import ID_REGEX, id_problem, iso_utc
from pipeline.serde import SchemaRegistry
from pipeline.settings import BridgeSettings, TopicSettings

logger = logging.getLogger(__name__)


RETRY_AFTER_S = 5  # what a 503 asks clients to wait: about one broker reconnect + delivery timeout


class ApiError(Exception):
    """An HTTP error with a message for the caller."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.extra, self.headers = status, extra, headers


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
    quality_gate: QualityGate = NO_GATE  # selfies' faces must pass it (FACEMATCH_QUALITY_*)
    notifications: NotificationReader | None = None  # guests' match notifications (SSE)
    guest_tokens: GuestTokens | None = None  # tokens scoped to one guest (FACEMATCH_GUEST_TOKEN_SECRET)


def _key(x_api_key: str | None, authorization: str | None) -> str | None:
    if x_api_key:
        return x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


class _OrjsonRequest(Request):
    """A Request whose JSON body is parsed by orjson (a 512-float embedding: ~30 us instead of ~350 us)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = orjson.loads(body)
            except orjson.JSONDecodeError:
                # NaN/Infinity literals and huge integers: the stdlib accepts them (validation then
                # refuses them with its usual message), or raises the same JSONDecodeError as before.
                self._json = json.loads(body)
        return self._json


class _OrjsonRoute(APIRoute):
    """Routes hand FastAPI an _OrjsonRequest: same validation and errors, faster JSON bodies."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def orjson_handler(request: Request) -> Response:
            return await handler(_OrjsonRequest(request.scope, request.receive))

        return orjson_handler


def create_app(services: BridgeServices) -> FastAPI:
    """Build the FastAPI app around ready services."""
    app = FastAPI(title="FaceMatch bridge", version="2.0",
                  description="Find a guest's photos: ingest photos, match a face, analyze a selfie.")
    app.router.route_class = _OrjsonRoute  # before any route is added
    _install_error_handlers(app, services)
    app.add_middleware(BodyLimitMiddleware, max_bytes=services.settings.bridge_max_image_bytes + 256 * 1024)
    app.add_middleware(MetricsMiddleware, metrics=services.metrics)
    # Uploaded selfies must never touch the disk: Starlette spools multipart files to a temp
    # file above this size, so keep the whole (already capped) upload in memory.
    MultiPartParser.spool_max_size = services.settings.bridge_max_image_bytes + 256 * 1024
    spec = services.spec

    def authorize(x_api_key: str | None, authorization: str | None, role: str, event_id: str | None) -> None:
        services.auth.check(_key(x_api_key, authorization), role, event_id)

    from pipeline.matcher.ingest_api import install_ingest_routes  # it builds on this module's helpers

    install_ingest_routes(app, services)

    @app.post("/api/v2/match", response_model=MatchOut, responses=_errors(400, 401, 403, 409, 413, 503, 504))
    async def match(body: MatchBody, x_api_key: str | None = Header(None),
                    authorization: str | None = Header(None)) -> Response:
        """Photos of the event showing this face, best first."""
        authorize(x_api_key, authorization, "match", body.event_id)
        vector = _check_vector("user_embedding", body.user_embedding, spec.dim)
        return await _match(services, body.event_id, vector, body.top_k, body.threshold)

    @app.post("/api/v2/match/image", response_model=MatchOut,
              responses=_errors(400, 401, 403, 409, 413, 503, 504))
    async def match_image(event_id: str = Form(..., pattern=ID_REGEX),
                          image: UploadFile = File(...), top_k: int = Form(20, ge=1, le=1000),
                          threshold: float | None = Form(None, ge=-1.0, le=1.0),
                          x_api_key: str | None = Header(None),
                          authorization: str | None = Header(None)) -> Response:
        """Match by selfie: exactly one face must be visible. The image is never stored."""
        _check_path_id("event_id", event_id)
        authorize(x_api_key, authorization, "match", event_id)
        faces = await _faces(services, image)
        try:
            face = pick_single_face(faces, services.quality_gate)
        except SelfieError as exc:
            raise ApiError(422, str(exc), faces_found=len(faces), reason=exc.reason) from exc
        return await _match(services, event_id, face.embedding, top_k, threshold)

    @app.post("/api/face/analyze", responses=_errors(400, 401, 403, 413, 503))
    async def analyze(image: UploadFile = File(...), x_api_key: str | None = Header(None),
                      authorization: str | None = Header(None)) -> dict[str, Any]:
        """V1: the most prominent face's `descriptor`, plus every face with its box."""
        authorize(x_api_key, authorization, "match", None)
        faces = await _faces(services, image)
        return analyze_payload(faces, spec)

    @app.get("/health", responses={503: {"description": "Not ready: same body, `ready` false"}})
    async def health() -> JSONResponse:
        """Broker, indexer partitions, model and embedding_dim; 200 when ready to match, else 503."""
        body = await services.health()
        return JSONResponse(body, status_code=200 if body.get("ready") else 503)

    from pipeline.matcher.guests_api import install_guest_routes  # it builds on this module's helpers

    install_guest_routes(app, services)

    @app.get("/metrics", include_in_schema=False)  # Prometheus text for scrapers, not part of the API
    async def metrics() -> Response:
        """Prometheus exposition."""
        return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


_ERROR_TEXT = {400: "The body could not be parsed (not UTF-8 JSON, broken multipart)",
               401: "No or unknown API key", 403: "The API key lacks the role or the event",
               404: "The guest is not enrolled in the event",
               409: "The event is indexed with another model than the query's (re-embedded): no mixed scores",
               413: "Body over the size cap", 503: "Kafka unavailable (with Retry-After), or no face model",
               504: "No indexer answered in time"}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the JSON errors a route can answer."""
    return {status: {"model": ErrorOut, "description": _ERROR_TEXT[status]} for status in statuses}


def _check_vector(field: str, values: list[float], dim: int) -> np.ndarray:
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: refused below
        vector = np.asarray(values, dtype=np.float32)  # converted once; checking the array is cheap
    try:
        normalize_embedding(vector, dim, field)
    except InvalidEmbedding as exc:
        raise ApiError(422, str(exc), embedding_dim=dim) from exc
    return vector


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
                 threshold: float | None, guest_id: str | None = None) -> Response:
    started = time.perf_counter()
    try:
        # The bridge's model made the embedding (selfies, and V1 descriptors clients send back): the
        # indexer answers only from an index of that model. Without a model, the indexer's own is assumed.
        model_id = services.spec.model_id if services.spec.name != "none" and guest_id is None else None
        reply = await services.requester.match(event_id, vector, top_k, threshold,
                                               services.settings.bridge_timeout_s, guest_id=guest_id,
                                               model_id=model_id)
    except PublishFailed as exc:
        raise _unavailable(exc) from exc
    except ReplyTimeout as exc:
        raise ApiError(504, f"{exc}: is an indexer running and caught up? see /health") from exc
    if reply.status == "ERROR":
        error = reply.error or "match failed"
        raise ApiError(409 if error.startswith(MODEL_MISMATCH) else 422, error)
    matches = [{"photo_id": m.photo_id, "score": m.score, "similarity": m.score,
                "faces": [{"bbox": list(f.bbox), "score": f.score} for f in m.faces]}
               for m in reply.matches]
    body = {"event_id": event_id, "matches": matches, "count": len(matches),
            "event_has_faces": reply.status == "OK", "index_size": reply.index_size,
            "photos_indexed": reply.photos_indexed, "faces_offset": reply.faces_offset,
            "newest_face_at": iso_utc(reply.newest_face_at), "model": reply.model_id,
            "threshold": reply.threshold, "search_ms": reply.search_ms,
            "took_ms": (time.perf_counter() - started) * 1000}
    # Serialized directly: the shape is MatchOut (documented), validating it again costs time.
    return Response(orjson.dumps(body), media_type="application/json")


def _unavailable(exc: PublishFailed) -> ApiError:
    logger.warning("answering 503: %s", exc)
    return ApiError(503, f"Kafka is unavailable ({exc}); retry after {RETRY_AFTER_S}s",
                    headers={"Retry-After": str(RETRY_AFTER_S)}, retry_after_s=RETRY_AFTER_S)


def _check_path_id(field: str, value: str) -> None:
    problem = id_problem(value)
    if problem:
        raise ApiError(422, f"{field} {problem}")


def _install_error_handlers(app: FastAPI, services: BridgeServices) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing (404/405) and body parsing (400: undecodable JSON, broken multipart) answer
        # in the same {"error": ...} shape as every other refusal.
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": str(exc), **exc.extra}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(AuthError)
    async def auth_error(request: Request, exc: AuthError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = ["{}: {}".format(".".join(str(p) for p in e["loc"] if p != "body"), e["msg"])
                    for e in exc.errors()]
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()[:10]]
        return JSONResponse({"error": "; ".join(problems), "detail": detail}, status_code=422)


class _BodyRefused(Exception):
    """Raised into the app from receive() once the 413 has been sent (the app's answer is dropped)."""


class BodyLimitMiddleware:
    """413 for bodies over the cap, without buffering them (declared or streamed).

    The 413 is written as soon as the cap is known to be exceeded, so a client
    that reads early sees it before sending its body. The response is held open
    while the rest of the body is read and discarded (up to drain_max_bytes and
    drain_timeout_s): a server that closes with unread bytes makes the kernel
    send a reset, and a client still writing gets EPIPE/ECONNRESET instead of
    the 413. Connection: close, since the request stream is then unusable.
    """

    def __init__(self, app: Any, max_bytes: int, drain_max_bytes: int | None = None,
                 drain_timeout_s: float = 10.0) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.drain_max_bytes = 4 * max_bytes if drain_max_bytes is None else drain_max_bytes
        self.drain_timeout_s = drain_timeout_s

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            # Expect: 100-continue clients have not sent the body; reading would invite it.
            drain = (int(declared) <= self.drain_max_bytes
                     and headers.get(b"expect", b"").lower() != b"100-continue")
            await self._refuse(receive, send, drain)
            return
        seen, started, refused = 0, False, False

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen, refused
            message: dict[str, Any] = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                if not started and not refused:
                    refused = True
                    await self._refuse(receive, send, drain=message.get("more_body", False))
                raise _BodyRefused
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if refused:
                return  # the app's answer to the exception (FastAPI makes it a 400): already answered
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_BodyRefused):
            await self.app(scope, counting_receive, guarded_send)

    async def _refuse(self, receive: Any, send: Any, drain: bool) -> None:
        body = orjson.dumps({"error": f"request body larger than {self.max_bytes} bytes",
                             "max_bytes": self.max_bytes})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body, "more_body": drain})
        if not drain:
            return
        try:
            await asyncio.wait_for(self._discard(receive), self.drain_timeout_s)
        except asyncio.TimeoutError:
            logger.info("413: client still sending after %.0fs; closing", self.drain_timeout_s)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _discard(self, receive: Any) -> None:
        discarded = 0
        while discarded <= self.drain_max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away (read the 413 early and closed)
            discarded += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


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
