"""Embedder service: photo-events -> faces, wired on the shared runner."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Sequence

from confluent_kafka.admin import AdminClient

from pipeline.embedder.core import EmbedderCore, Tombstone
from pipeline.errors import PoisonRecord
from pipeline.kafka import consumer_config, producer_config
from pipeline.logs import setup_logging
from pipeline.metrics import Metrics, create_metrics, serve_metrics
from pipeline.records import PhotoEvent, faces_key
from pipeline.runner import BaseStage, Incoming, Outcome, Output, Runner
from pipeline.serde import PHOTO_EVENT, PHOTO_FACES, SchemaRegistry
from pipeline.settings import EmbedderSettings, KafkaSettings, ModelSettings, RunnerSettings, TopicSettings
from pipeline.topics import partition_count, partition_for

logger = logging.getLogger(__name__)


class EmbedderStage(BaseStage):
    """Decode photo events, run the core, encode faces records."""

    name = "embedder"

    def __init__(self, core: EmbedderCore, serde: SchemaRegistry, faces_topic: str,
                 faces_partitions: int, metrics: Metrics) -> None:
        self.core, self.serde, self.metrics = core, serde, metrics
        self.faces_topic, self.faces_partitions = faces_topic, faces_partitions

    def handle(self, batch: Sequence[Incoming]) -> list[Outcome]:
        """One outcome per record: faces output(s) or the error."""
        outcomes: list[Outcome | None] = [None] * len(batch)
        events, positions = [], []
        for i, item in enumerate(batch):
            try:
                events.append(PhotoEvent.from_avro(self.serde.decode(PHOTO_EVENT, item.value)))
                positions.append(i)
            except PoisonRecord as exc:
                outcomes[i] = exc
        self.core.last_fetch_s = self.core.last_model_s = 0.0
        results = self.core.process(events)
        if self.core.last_model_s:
            self.metrics.fetch_seconds.observe(self.core.last_fetch_s)
            self.metrics.embed_seconds.observe(self.core.last_model_s)
            logger.debug("batch of %d: fetch+decode %.0f ms, model %.0f ms", len(events),
                         self.core.last_fetch_s * 1000, self.core.last_model_s * 1000)
        for i, result in zip(positions, results, strict=True):
            outcomes[i] = result if isinstance(result, BaseException) else [self._output(result)]
        assert all(o is not None for o in outcomes)
        return outcomes  # type: ignore[return-value]

    def _output(self, change: object) -> Output:
        # The key names the photo (compaction), the partition comes from
        # event_id alone, so an event's faces and queries share a partition.
        if isinstance(change, Tombstone):
            return Output(self.faces_topic, faces_key(change.event_id, change.photo_id), None,
                          partition_for(change.event_id, self.faces_partitions))
        value = self.serde.encode(PHOTO_FACES, change.to_avro())  # type: ignore[attr-defined]
        self.metrics.faces_embedded.inc(len(change.faces))  # type: ignore[attr-defined]
        return Output(self.faces_topic, faces_key(change.event_id, change.photo_id or None),  # type: ignore[attr-defined]
                      value, partition_for(change.event_id, self.faces_partitions))  # type: ignore[attr-defined]


def build_core(model_settings: ModelSettings, embedder: EmbedderSettings) -> EmbedderCore:
    """Load the model (or refuse with the fix) and the safe fetcher."""
    from pipeline.embedder.fetch import FetchPolicy, ImageFetcher, parse_allow_list
    from pipeline.embedder.images import DecodePolicy, decode_image
    from pipeline.embedder.packs import load_model, spec_for

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
        return fetchers.fetcher.fetch(url)

    policy = DecodePolicy(max_pixels=embedder.fetch_max_pixels, max_side=embedder.embedder_max_side)
    return EmbedderCore(spec, model, fetch, lambda data: decode_image(data, policy))


def main(argv: list[str] | None = None) -> int:
    """`facematch embedder`."""
    setup_logging()
    kafka, topics, runner_settings = KafkaSettings(), TopicSettings(), RunnerSettings()
    embedder = EmbedderSettings()
    from pipeline.embedder.model import ModelUnavailable
    try:
        core = build_core(ModelSettings(), embedder)
    except ModelUnavailable as exc:
        logger.error("embedder cannot start: %s", exc)
        return 2
    metrics = create_metrics()
    serve_metrics(metrics, embedder.embedder_metrics_port)
    serde = SchemaRegistry.load()
    faces_partitions = partition_count(AdminClient(kafka.to_librdkafka()), topics.faces)
    stage = EmbedderStage(core, serde, topics.faces, faces_partitions, metrics)
    runner_settings = runner_settings.model_copy(update={"batch_size": embedder.embedder_batch_size})
    runner = Runner(stage, [topics.photo_events],
                    consumer_config(kafka, embedder.embedder_group, runner_settings),
                    producer_config(kafka, **{"linger.ms": 5}), topics.dlq, runner_settings,
                    metrics, serde)
    runner.install_signal_handlers()
    runner.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
