"""Bridge service: wires settings, Kafka request/reply, the selfie model and uvicorn.

`facematch bridge` runs FACEMATCH_BRIDGE_WORKERS uvicorn worker processes
(default 1); each one builds its own services through `create_worker_app`,
the factory `uvicorn pipeline.matcher.main:create_worker_app --factory` runs
too, and claims its own reply partition (pipeline/matcher/replies.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import secrets
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import uvicorn
from confluent_kafka.admin import AdminClient
from fastapi import FastAPI

from pipeline.direct import Routes
from pipeline.facelib.geometry import to_original
from pipeline.facelib.model import FaceModel
from pipeline.facelib.quality import NO_GATE, QualityGate
from pipeline.facelib.spec import ModelSpec
from pipeline.kafka import producer_config
from pipeline.logs import setup_logging
from pipeline.matcher.api import BridgeServices, create_app
from pipeline.matcher.auth import Authorizer, parse_api_keys
from pipeline.matcher.direct import DirectQueries
from pipeline.matcher.guest_tokens import GuestTokens
from pipeline.matcher.notifications import NotificationReader
from pipeline.matcher.replies import (
    KafkaRequester,
    NoReplyPartition,
    claim_reply_partition,
    default_runtime_dir,
    parse_partition_set,
    reply_consumer_config,
)
from pipeline.metrics import create_metrics
from pipeline.serde import SchemaRegistry
from pipeline.settings import (
    BridgeSettings,
    EmbedderSettings,
    KafkaSettings,
    LogSettings,
    ModelSettings,
    QualitySettings,
    TopicSettings,
)
from pipeline.summary import SummaryLogger, start_summaries
from pipeline.topics import partition_count, partition_for

logger = logging.getLogger(__name__)

DEFAULT_PUBLISH_TIMEOUT_S = 5.0


class HealthProbe:
    """Answers /health from cached facts: broker metadata, and a probe query per partition.

    A partition counts as owned when an indexer answers a probe query routed to
    it; one still replaying after a rebalance keeps its queries paused and does
    not answer, so `ready` means "matches will be answered now", on any broker.
    """

    def __init__(self, admin: AdminClient, topics: TopicSettings, requester: KafkaRequester,
                 spec: ModelSpec, model: FaceModel | None, model_name: str) -> None:
        self.admin, self.topics, self.requester = admin, topics, requester
        self.spec, self.model, self.model_name = spec, model, model_name
        self._cache: dict[str, Any] = {}
        self._checked = 0.0
        self._lock = asyncio.Lock()

    async def __call__(self) -> dict[str, Any]:
        async with self._lock:
            if time.monotonic() - self._checked > 2.0:
                self._cache = await self._probe()
                self._checked = time.monotonic()
            facts = dict(self._cache)
        model_loaded = self.model is not None or self.model_name == "none"
        ready = bool(facts["broker_reachable"] and model_loaded and facts["partitions"]
                     and facts["partitions_owned"] == facts["partitions"])
        # /health is 200 only when ready: broker up, model loaded, every partition's indexer answering.
        status = "ok" if ready else ("degraded" if not facts["broker_reachable"] else "starting")
        return {"status": status, "ready": ready,
                "broker": {"reachable": facts["broker_reachable"], "error": facts.get("error")},
                "partitions": facts["partitions"], "partitions_owned": facts["partitions_owned"],
                # The FaceMatch v2 name, kept for existing clients: "V2 can serve" (model loaded, broker up),
                # whatever the model is (SFace by default, InsightFace only when configured).
                "insightface_ready": bool(facts["broker_reachable"] and model_loaded),
                "model_ready": model_loaded,
                "embedding_dim": self.spec.dim,
                # Which bridge process answered (several uvicorn workers share one port).
                "worker": {"pid": os.getpid(), "reply_partition": self.requester.reply_partition},
                # Partitions whose indexer this worker asks directly (pipeline/direct.py); null: disabled.
                "direct_routes": (len(self.requester.direct.routes.known())
                                  if self.requester.direct is not None else None),
                "models": {"name": self.model_name, "model_id": self.spec.model_id,
                           "loaded": model_loaded, "license": self.spec.license,
                           "default_threshold": self.spec.default_threshold,
                           "provider": self.model.provider if self.model is not None else None}}

    async def _probe(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"broker_reachable": False, "partitions": None, "partitions_owned": 0}
        loop = asyncio.get_running_loop()
        try:
            facts["partitions"] = await loop.run_in_executor(
                None, lambda: partition_count(self.admin, self.topics.match_requests, timeout_s=2))
            facts["broker_reachable"] = True
        except Exception as exc:  # report, do not raise: /health must answer
            facts["error"] = str(exc)
            return facts
        probe = np.ones(self.spec.dim, dtype=np.float32)
        # Through Kafka: the probe checks the broker path (and its replies teach direct routes).
        answers = await asyncio.gather(*(self.requester.match(event_id, probe, 1, None, 1.0, direct=False)
                                         for event_id in probe_events(facts["partitions"])),
                                       return_exceptions=True)
        facts["partitions_owned"] = sum(1 for a in answers if not isinstance(a, BaseException))
        return facts


def probe_events(partitions: int) -> list[str]:
    """One synthetic event id per partition, so a probe query reaches every owner."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < partitions:
        found.setdefault(partition_for(f"__health-probe-{i}", partitions), f"__health-probe-{i}")
        i += 1
    return [found[p] for p in range(partitions)]


def build_services(kafka: KafkaSettings, topics: TopicSettings, bridge: BridgeSettings,
                   model_settings: ModelSettings, embedder: EmbedderSettings,
                   publish_timeout_s: float | None = None, quality: QualitySettings | None = None) -> BridgeServices:
    """Everything the app needs; starts the reply thread. Selfies pass the quality gate when `quality` is given.

    publish_timeout_s bounds how long a produce may wait for the broker's ack
    (librdkafka's message.timeout.ms) before the bridge answers 503.
    """
    from pipeline.facelib.packs import load_model
    from pipeline.facelib.spec import spec_for

    spec = spec_for(model_settings.model, model_settings.embedding_dim)
    model = load_model(model_settings.model, model_settings.model_root,
                       det_threshold=model_settings.det_threshold)
    faces_in_image = None
    if model is not None:
        models = [model] + [load_model(model_settings.model, model_settings.model_root,
                                       det_threshold=model_settings.det_threshold)
                            for _ in range(bridge.bridge_model_instances - 1)]
        for instance in models:
            if instance is not None:
                instance.load()
        faces_in_image = selfie_reader([m for m in models if m is not None], embedder)
    serde = SchemaRegistry.load()
    admin = AdminClient(kafka.to_librdkafka())
    partitions = partition_count(admin, topics.match_requests)
    claim = claim_reply_partition(
        bridge.bridge_runtime_dir or default_runtime_dir(), kafka.bootstrap_servers, topics.match_replies,
        parse_partition_set(bridge.bridge_reply_partitions, partition_count(admin, topics.match_replies)),
        pinned=bridge.bridge_reply_partition)
    consumer_conf = reply_consumer_config(kafka)
    if publish_timeout_s is None:
        publish_timeout_s = bridge.bridge_publish_timeout_s
    # Without message.timeout.ms librdkafka retries for 300 s while the broker is down.
    producer_conf = producer_config(kafka, **{"linger.ms": 0, "compression.type": "none",
                                              "message.timeout.ms": int(publish_timeout_s * 1000)})
    metrics = create_metrics()
    direct = (DirectQueries(serde, Routes(), bridge.bridge_direct_timeout_s, metrics)
              if bridge.bridge_direct_queries else None)
    requester = KafkaRequester(producer_conf, consumer_conf, serde, topics.match_requests, partitions,
                               topics.match_replies, claim.partition,
                               delivery_timeout_s=publish_timeout_s, claim=claim, direct=direct)
    requester.start()
    health = HealthProbe(admin, topics, requester, spec, model, model_settings.model)
    auth = Authorizer(parse_api_keys(bridge.api_keys))
    if not auth.enabled:
        logger.warning("FACEMATCH_API_KEYS is empty: the bridge accepts every request (development mode)")
    elif auth.plain_text_keys:
        logger.warning("FACEMATCH_API_KEYS holds %d plain-text key(s): accepted for compatibility, but store "
                       "their hashes instead (`facematch keys hash` prints sha256:<hex>)", auth.plain_text_keys)
    return BridgeServices(requester=requester, serde=serde, topics=topics, settings=bridge, spec=spec,
                          metrics=metrics, auth=auth, health=health,
                          faces_in_image=faces_in_image,
                          quality_gate=QualityGate.from_settings(quality) if quality is not None else NO_GATE,
                          notifications=NotificationReader(kafka.to_librdkafka(), topics.notifications,
                                                           partitions, serde),
                          guest_tokens=guest_tokens(bridge))


def guest_tokens(bridge: BridgeSettings) -> GuestTokens:
    """Tokens scoped to one guest; a random secret (with a warning) when none is configured."""
    if bridge.guest_token_secret is None:
        logger.warning("FACEMATCH_GUEST_TOKEN_SECRET is unset: guest tokens are signed with a random secret and "
                       "only work in this process (set one shared secret for every bridge)")
        return GuestTokens(secrets.token_bytes(32), bridge.guest_token_ttl_s)
    return GuestTokens(bridge.guest_token_secret.get_secret_value().encode(), bridge.guest_token_ttl_s)


def selfie_reader(models: list[FaceModel], embedder: EmbedderSettings) -> Any:
    """faces_in_image(bytes) over a pool of model instances, each used by one thread at a time."""
    from pipeline.facelib.images import DecodePolicy, decode_image

    policy = DecodePolicy(max_pixels=embedder.fetch_max_pixels, max_side=embedder.embedder_max_side)
    # One image at a time per instance: OpenCV's detector keeps per-call state (its input size), so an
    # instance is never shared between threads. FACEMATCH_BRIDGE_MODEL_INSTANCES sizes the pool; each
    # uvicorn worker has its own pool, so workers never wait on each other.
    idle: queue.Queue[FaceModel] = queue.Queue()
    for model in models:
        idle.put(model)

    def faces_in_image(data: bytes) -> list[Any]:
        image = decode_image(data, policy)
        model = idle.get()
        try:
            faces = model.detect_and_embed([image.bgr])[0]
        finally:
            idle.put(model)
        return [to_original(f, image.scale) for f in faces]

    return faces_in_image


class WorkerHeaders:
    """Adds X-FaceMatch-Worker (pid) and X-FaceMatch-Reply-Partition to every response (plain ASGI)."""

    def __init__(self, app: Any, reply_partition: int) -> None:
        self.app = app
        self.headers = [(b"x-facematch-worker", str(os.getpid()).encode()),
                        (b"x-facematch-reply-partition", str(reply_partition).encode())]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def build_app(services: BridgeServices, summaries: SummaryLogger | None = None) -> FastAPI:
    """The app around `services`; its shutdown stops the summaries and closes the requester."""
    app = create_app(services)
    app.add_middleware(WorkerHeaders, reply_partition=services.requester.reply_partition)
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(scope_app: Any) -> AsyncIterator[Any]:
        async with inner(scope_app) as state:
            yield state
        if summaries is not None:
            summaries.stop()
        await asyncio.get_running_loop().run_in_executor(None, services.requester.close)

    app.router.lifespan_context = lifespan
    return app


def create_worker_app() -> FastAPI:
    """App factory for one bridge process: settings from the environment, own reply partition.

    `uvicorn pipeline.matcher.main:create_worker_app --factory --workers N` calls it in each worker.
    """
    log = LogSettings()
    setup_logging(log.log_level, log.log_format)
    bridge = BridgeSettings()
    services = build_services(KafkaSettings(), TopicSettings(), bridge, ModelSettings(), EmbedderSettings(),
                              quality=QualitySettings())
    summaries = start_summaries("bridge", services.metrics.registry, log.log_summary_interval_s)
    logger.info("bridge worker %d: reply partition %d of %s", os.getpid(), services.requester.reply_partition,
                services.topics.match_replies)
    return build_app(services, summaries)


def check_workers(kafka: KafkaSettings, topics: TopicSettings, bridge: BridgeSettings) -> str | None:
    """Why FACEMATCH_BRIDGE_WORKERS cannot work with these settings, or None."""
    if bridge.bridge_workers == 1:
        return None
    if bridge.bridge_reply_partition is not None:
        return (f"FACEMATCH_BRIDGE_REPLY_PARTITION={bridge.bridge_reply_partition} pins every worker to one "
                f"reply partition; unset it so each of the {bridge.bridge_workers} workers claims its own")
    available = parse_partition_set(bridge.bridge_reply_partitions,
                                    partition_count(AdminClient(kafka.to_librdkafka()), topics.match_replies))
    if bridge.bridge_workers > len(available):
        return (f"{bridge.bridge_workers} workers but only {len(available)} reply partitions of "
                f"{topics.match_replies} to claim: run at most {len(available)} workers, or give the reply "
                f"topic more partitions")
    return None


def main(argv: list[str] | None = None) -> int:
    """`facematch bridge` (FACEMATCH_BRIDGE_WORKERS worker processes)."""
    log = LogSettings()
    setup_logging(log.log_level, log.log_format)
    kafka, topics, bridge = KafkaSettings(), TopicSettings(), BridgeSettings()
    if bridge.bridge_workers > 1:
        problem = check_workers(kafka, topics, bridge)
        if problem:
            logger.error("bridge cannot start: %s", problem)
            return 2
        if bridge.guest_token_secret is None:  # one secret for every worker, or tokens work in one only
            os.environ["FACEMATCH_GUEST_TOKEN_SECRET"] = secrets.token_urlsafe(32)
        # Each worker process runs create_worker_app: its own model, Kafka clients and reply partition.
        uvicorn.run("pipeline.matcher.main:create_worker_app", factory=True, workers=bridge.bridge_workers,
                    host=bridge.http_host, port=bridge.http_port, log_level="warning", access_log=False,
                    log_config=None)
        return 0
    try:
        services = build_services(kafka, topics, bridge, ModelSettings(), EmbedderSettings(),
                                  quality=QualitySettings())
    except NoReplyPartition as exc:
        logger.error("bridge cannot start: %s", exc)
        return 2
    summaries = start_summaries("bridge", services.metrics.registry, log.log_summary_interval_s)
    app = build_app(services, summaries)
    try:
        # log_config=None: uvicorn's own lines go through our handler (and format) too.
        uvicorn.run(app, host=bridge.http_host, port=bridge.http_port, log_level="warning",
                    access_log=False, log_config=None)
    finally:
        services.requester.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
