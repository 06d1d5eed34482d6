"""`facematch indexer`: wires settings, the co-partition check, IndexerStage and the runner."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import faiss
from confluent_kafka.admin import AdminClient

from pipeline.facelib.spec import spec_for
from pipeline.indexer.core import IndexerConfig, IndexerCore
from pipeline.indexer.promotion import IndexOptions
from pipeline.indexer.queries import QueryListener
from pipeline.indexer.stage import IndexerStage
from pipeline.kafka import consumer_config, producer_config
from pipeline.logs import setup_logging
from pipeline.metrics import all_of, create_metrics, serve_metrics
from pipeline.restore import read_to_end
from pipeline.runner import Runner
from pipeline.serde import SchemaRegistry
from pipeline.settings import IndexerSettings, KafkaSettings, LogSettings, ModelSettings, RunnerSettings, TopicSettings
from pipeline.summary import start_summaries
from pipeline.topics import check_copartitioned

logger = logging.getLogger(__name__)

DIRECT_POLL_BOUND_S = 10.0  # no direct answers from a runner that has not polled for this long


def main(argv: list[str] | None = None) -> int:
    """`facematch indexer`."""
    log_settings = LogSettings()
    setup_logging(log_settings.log_level, log_settings.log_format)
    kafka, topics, runner_settings = KafkaSettings(), TopicSettings(), RunnerSettings()
    settings, model = IndexerSettings(), ModelSettings()
    faiss.omp_set_num_threads(1)  # single queries are 15x slower with 2 OpenMP threads
    spec = spec_for(model.model, model.embedding_dim)
    try:
        admin = AdminClient(kafka.to_librdkafka())
        partitions = check_copartitioned(admin, topics.faces, topics.match_requests)
        for topic in (topics.guests, topics.notifications):
            check_copartitioned(admin, topics.faces, topic)
    except RuntimeError as exc:  # a wrong layout would answer queries from the wrong state
        logger.error("indexer cannot start: %s", exc)
        return 2
    metrics = create_metrics()
    start_summaries("indexer", metrics.registry, log_settings.log_summary_interval_s)
    serde = SchemaRegistry.load()
    options = IndexOptions(promote_at=settings.index_promote_at, nprobe=settings.index_nprobe,
                           probe_fraction=settings.index_probe_fraction,
                           regrow_factor=settings.index_regrow_factor, build_threads=settings.index_build_threads)
    core = IndexerCore(IndexerConfig(spec.dim, spec.model_id, spec.default_threshold, settings.max_top_k, options,
                                     extra_models=settings.extra_model_dims()))
    restore_conf = kafka.to_librdkafka()
    stage = IndexerStage(core, serde, topics, partitions, settings, metrics,
                         restore=lambda tps: read_to_end(restore_conf, tps))
    runner = Runner(stage, [topics.faces, topics.match_requests, topics.guests],
                    consumer_config(kafka, settings.group, runner_settings, **{"auto.offset.reset": "latest"}),
                    producer_config(kafka, **{"linger.ms": 0, "compression.type": "none"}),
                    topics.dlq, runner_settings, metrics, serde)
    # Up before the group join: /readyz says 503 until partitions are owned and replayed.
    serve_metrics(metrics, settings.metrics_port, runner.liveness, all_of(runner.readiness, stage.readiness))
    runner.install_signal_handlers()
    Path(settings.state_dir).mkdir(parents=True, exist_ok=True)
    listener = None
    if settings.direct_queries:
        # OpenMP's thread count is per thread: each connection's thread searches on one, like the runner's.
        listener = QueryListener(settings.query_host, settings.query_port, stage.answer_direct,
                                 settings.query_advertised_host, thread_init=lambda: faiss.omp_set_num_threads(1))
        stage.query_address = listener.address.encode()
        # A loop stuck this long may have lost its partitions without hearing it yet.
        stage.polling = lambda: runner.seconds_since_poll() < DIRECT_POLL_BOUND_S
        listener.start()
    try:
        runner.run()
    finally:
        if listener is not None:
            listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
