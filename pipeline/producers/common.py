"""Flags, settings and wiring shared by the three Firestore producer commands."""

from __future__ import annotations

import argparse
import logging
import signal
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.metrics import create_metrics, serve_metrics
from pipeline.producers.firestore_source import FirestoreSettings, make_client
from pipeline.producers.ledger import Ledger
from pipeline.producers.publisher import PhotoPublisher
from pipeline.producers.sync import Syncer
from pipeline.serde import SchemaRegistry
from pipeline.settings import KafkaSettings, ModelSettings, TopicSettings

logger = logging.getLogger(__name__)


def add_common_args(parser: argparse.ArgumentParser, tool: str) -> None:
    """Firestore, Kafka and checkpoint flags every producer takes."""
    parser.add_argument("--firebase-config", type=Path,
                        help="Firebase service-account JSON (the project comes from it)")
    parser.add_argument("--project", help="Firestore project id (else FACEMATCH_FIRESTORE_PROJECT, "
                                          "GOOGLE_CLOUD_PROJECT, the service account's project)")
    parser.add_argument("--collection", "--events-collection", dest="events_collection",
                        help="collection holding the event documents (default: events)")
    parser.add_argument("--photos-collection", help="subcollection of photos under each event (default: photos)")
    parser.add_argument("--state-file", type=Path, default=Path(f".state/{tool}.ledger"),
                        help="checkpoint ledger; one process at a time (default: %(default)s)")
    parser.add_argument("--bootstrap-servers", help="Kafka bootstrap servers (else FACEMATCH_KAFKA_*)")
    parser.add_argument("--embedding-dim", type=int,
                        help="length of precomputed embeddings (default: the configured model's)")
    parser.add_argument("--max-batch", type=int, help="changes per checkpoint (default: 500)")
    parser.add_argument("--metrics-port", type=int, default=0, help="serve /metrics (0: off)")


@dataclass(frozen=True)
class ProducerSettings:
    """What a producer command runs with: the environment's settings with its flags on top."""

    firestore: FirestoreSettings
    kafka: KafkaSettings
    topics: TopicSettings
    embedding_dim: int


def producer_settings(args: argparse.Namespace, firestore: FirestoreSettings, kafka: KafkaSettings,
                      topics: TopicSettings, model: ModelSettings) -> ProducerSettings:
    """Apply the command-line flags to settings main() built from the environment."""
    overrides: dict[str, Any] = {"project": args.project, "credentials_file": args.firebase_config,
                                 "events_collection": args.events_collection,
                                 "photos_collection": args.photos_collection,
                                 "max_batch": args.max_batch, "page_size": getattr(args, "page_size", None)}
    firestore = firestore.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    if args.bootstrap_servers:
        kafka = kafka.model_copy(update={"bootstrap_servers": args.bootstrap_servers})
    return ProducerSettings(firestore, kafka, topics, embedding_dim(args.embedding_dim, model))


def embedding_dim(flag: int | None, model: ModelSettings) -> int:
    """The dimension the embedder will demand of precomputed embeddings: the flag's, else the model's."""
    if flag:
        return int(flag)
    from pipeline.facelib.spec import spec_for

    return spec_for(model.model, model.embedding_dim).dim


@dataclass
class Context:
    """Everything a producer command runs on; close() releases it."""

    settings: FirestoreSettings
    client: Any
    ledger: Ledger
    publisher: PhotoPublisher
    syncer: Syncer

    def close(self) -> None:
        """Deliver what is queued, then release the ledger lock."""
        try:
            self.publisher.close()
        finally:
            self.ledger.close()


def build_context(settings: ProducerSettings, state_file: Path, metrics_port: int, stage: str,
                  force: bool = False) -> Context:
    """The Firestore client, the ledger and the publisher, from settings main() built."""
    firestore, kafka, dim = settings.firestore, settings.kafka, settings.embedding_dim
    metrics = create_metrics()
    serve_metrics(metrics, metrics_port)
    client = make_client(firestore)
    ledger = Ledger.open(state_file)
    try:
        publisher = PhotoPublisher(kafka, settings.topics, SchemaRegistry.load(), stage, metrics)
        publisher.warm_up()
    except Exception:
        ledger.close()
        raise
    syncer = Syncer(ledger, publisher, firestore.layout, dim, source=stage, force=force)
    logger.info("%s: project %s, %s/*/%s, embedding dim %d, kafka %s, topic %s", stage, client.project,
                firestore.events_collection, firestore.photos_collection, dim, kafka.bootstrap_servers,
                publisher.topics.photo_events)
    return Context(firestore, client, ledger, publisher, syncer)


def on_stop_signals(callback: Callable[[], None]) -> None:
    """SIGTERM/SIGINT only call `callback` (set a flag); the loop finishes its step."""
    def handler(signum: int, frame: object) -> None:
        logger.info("signal %d: stopping after the current step", signum)
        callback()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def latency_line(latencies_ms: list[int]) -> str:
    """p50/p99/max of Firestore update time -> Kafka ack, for logs."""
    if not latencies_ms:
        return "no latency samples"
    ordered = sorted(latencies_ms)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"write->ack latency p50 {statistics.median(ordered):.0f} ms, p99 {p99} ms, "
            f"max {ordered[-1]} ms over {len(ordered)}")
