"""Bridge service: wires settings, Kafka request/reply, the selfie model and uvicorn."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import uuid
from typing import Any

import numpy as np
import uvicorn
from confluent_kafka.admin import AdminClient

from pipeline.facelib.geometry import to_original
from pipeline.facelib.model import FaceModel
from pipeline.facelib.spec import ModelSpec
from pipeline.kafka import producer_config
from pipeline.logs import setup_logging
from pipeline.matcher.api import BridgeServices, create_app
from pipeline.matcher.auth import Authorizer, parse_api_keys
from pipeline.matcher.replies import KafkaRequester
from pipeline.metrics import create_metrics
from pipeline.serde import SchemaRegistry
from pipeline.settings import BridgeSettings, EmbedderSettings, KafkaSettings, LogSettings, ModelSettings, TopicSettings
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
        answers = await asyncio.gather(*(self.requester.match(event_id, probe, 1, None, 1.0)
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
                   publish_timeout_s: float | None = None) -> BridgeServices:
    """Everything the app needs; starts the reply thread.

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
        model.load()
        faces_in_image = _selfie_reader(model, embedder)
    serde = SchemaRegistry.load()
    admin = AdminClient(kafka.to_librdkafka())
    partitions = partition_count(admin, topics.match_requests)
    consumer_conf = {**kafka.to_librdkafka(), "group.id": f"facematch-bridge-{uuid.uuid4().hex[:8]}",
                     "enable.auto.commit": False, "fetch.wait.max.ms": 5}
    if publish_timeout_s is None:
        publish_timeout_s = bridge.bridge_publish_timeout_s
    # Without message.timeout.ms librdkafka retries for 300 s while the broker is down.
    producer_conf = producer_config(kafka, **{"linger.ms": 0, "compression.type": "none",
                                              "message.timeout.ms": int(publish_timeout_s * 1000)})
    requester = KafkaRequester(producer_conf, consumer_conf, serde, topics.match_requests, partitions,
                               topics.match_replies, bridge.bridge_reply_partition,
                               delivery_timeout_s=publish_timeout_s)
    requester.start()
    health = HealthProbe(admin, topics, requester, spec, model, model_settings.model)
    auth = Authorizer(parse_api_keys(bridge.api_keys))
    if not auth.enabled:
        logger.warning("FACEMATCH_API_KEYS is empty: the bridge accepts every request (development mode)")
    elif auth.plain_text_keys:
        logger.warning("FACEMATCH_API_KEYS holds %d plain-text key(s): accepted for compatibility, but store "
                       "their hashes instead (`facematch keys hash` prints sha256:<hex>)", auth.plain_text_keys)
    return BridgeServices(requester=requester, serde=serde, topics=topics, settings=bridge, spec=spec,
                          metrics=create_metrics(), auth=auth, health=health,
                          faces_in_image=faces_in_image)


def _selfie_reader(model: FaceModel, embedder: EmbedderSettings) -> Any:
    from pipeline.facelib.images import DecodePolicy, decode_image

    policy = DecodePolicy(max_pixels=embedder.fetch_max_pixels, max_side=embedder.embedder_max_side)
    lock = threading.Lock()  # one model instance; onnxruntime/OpenCV calls are serialized

    def faces_in_image(data: bytes) -> list[Any]:
        image = decode_image(data, policy)
        with lock:
            faces = model.detect_and_embed([image.bgr])[0]
        return [to_original(f, image.scale) for f in faces]

    return faces_in_image


def main(argv: list[str] | None = None) -> int:
    """`facematch bridge`."""
    setup_logging(LogSettings().log_level)
    kafka, topics, bridge, model = KafkaSettings(), TopicSettings(), BridgeSettings(), ModelSettings()
    services = build_services(kafka, topics, bridge, model, EmbedderSettings())
    app = create_app(services)
    try:
        uvicorn.run(app, host=bridge.http_host, port=bridge.http_port, log_level="warning",
                    access_log=False)
    finally:
        services.requester.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
