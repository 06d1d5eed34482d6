"""Embedder service: photo-events -> faces, wired on the shared runner."""

from __future__ import annotations

import logging
import sys
import threading

from confluent_kafka.admin import AdminClient

from pipeline.embedder.core import EmbedderCore
from pipeline.embedder.stage import EmbedderStage
from pipeline.kafka import consumer_config, producer_config
from pipeline.logs import setup_logging
from pipeline.metrics import create_metrics, serve_metrics
from pipeline.runner import Runner
from pipeline.serde import SchemaRegistry
from pipeline.settings import (
    EmbedderSettings,
    KafkaSettings,
    LogSettings,
    ModelSettings,
    QualitySettings,
    RunnerSettings,
    TopicSettings,
)
from pipeline.summary import start_summaries
from pipeline.topics import partition_count

logger = logging.getLogger(__name__)


def build_core(model_settings: ModelSettings, embedder: EmbedderSettings,
               quality: QualitySettings | None = None) -> EmbedderCore:
    """Load the model (or refuse with the fix) and the safe fetcher; no quality settings: no gate."""
    from pipeline.embedder.fetch import FetchPolicy, ImageFetcher, parse_allow_list
    from pipeline.facelib.images import DecodePolicy, decode_image
    from pipeline.facelib.packs import load_model
    from pipeline.facelib.quality import NO_GATE, QualityGate
    from pipeline.facelib.spec import spec_for

    spec = spec_for(model_settings.model, model_settings.embedding_dim)
    model = load_model(model_settings.model, model_settings.model_root,
                       det_threshold=model_settings.det_threshold)
    if model is not None:
        model.load()  # ModelUnavailable names the fix; better than dead-lettering every photo
        logger.info("model %s (%d-d) on %s", spec.model_id, spec.dim, model.provider)
    fetch_policy = FetchPolicy(
        connect_timeout_s=embedder.fetch_connect_timeout_s, read_timeout_s=embedder.fetch_read_timeout_s,
        total_timeout_s=embedder.fetch_total_timeout_s, max_bytes=embedder.fetch_max_bytes,
        allow_list=parse_allow_list(embedder.fetch_allow_list))
    fetchers = threading.local()  # requests.Session is not thread-safe: one per fetch thread

    def fetch(url: str) -> bytes:
        if not hasattr(fetchers, "fetcher"):
            fetchers.fetcher = ImageFetcher(fetch_policy)
        return bytes(fetchers.fetcher.fetch(url))

    policy = DecodePolicy(max_pixels=embedder.fetch_max_pixels, max_side=embedder.embedder_max_side)
    gate = QualityGate.from_settings(quality) if quality is not None else NO_GATE
    logger.info("quality gate: %s", gate)
    return EmbedderCore(spec, model, fetch, lambda data: decode_image(data, policy), gate=gate)


def main(argv: list[str] | None = None) -> int:
    """`facematch embedder`."""
    log_settings = LogSettings()
    setup_logging(log_settings.log_level, log_settings.log_format)
    kafka, topics, runner_settings = KafkaSettings(), TopicSettings(), RunnerSettings()
    embedder = EmbedderSettings()
    from pipeline.facelib.model import ModelUnavailable
    try:
        core = build_core(ModelSettings(), embedder, QualitySettings())
    except ModelUnavailable as exc:
        logger.error("embedder cannot start: %s", exc)
        return 2
    metrics = create_metrics()
    start_summaries("embedder", metrics.registry, log_settings.log_summary_interval_s)
    serde = SchemaRegistry.load()
    faces_partitions = partition_count(AdminClient(kafka.to_librdkafka()), topics.faces)
    stage = EmbedderStage(core, serde, topics.faces, faces_partitions, metrics, embedder.embedder_model_keys)
    batch_size = embedder.embedder_batch_size if core.model is not None else embedder.embedder_precomputed_batch_size
    runner_settings = runner_settings.model_copy(update={"batch_size": batch_size})
    runner = Runner(stage, [topics.photo_events],
                    consumer_config(kafka, embedder.embedder_group, runner_settings),
                    producer_config(kafka, **{"linger.ms": 5}), topics.dlq, runner_settings,
                    metrics, serde)
    serve_metrics(metrics, embedder.embedder_metrics_port, runner.liveness, runner.readiness)
    runner.install_signal_handlers()
    runner.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
