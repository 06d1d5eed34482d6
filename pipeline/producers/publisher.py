"""Kafka side of the Firestore producers: photo events and dead letters, acked before checkpointing.

The producer is idempotent (no duplicates from librdkafka's own retries,
per-key order kept) and keys by event_id with murmur2, so an event's photos
share a partition with every other producer's. Callers send a batch, then
`wait()` tells them which records the brokers acknowledged: only those may be
checkpointed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Producer

from pipeline.deadletter import DeadLetterSource, dead_letter_output
from pipeline.delivery import UNCONFIRMED, calls_for_new_producer, has_offset
from pipeline.errors import PoisonRecord
from pipeline.kafka import Output, produce_with_retry, producer_config, replace_producer
from pipeline.metrics import Metrics
from pipeline.producers.documents import DocChange, document_bytes
from pipeline.records import PhotoEvent
from pipeline.serde import PHOTO_EVENT, SchemaRegistry
from pipeline.settings import KafkaSettings, TopicSettings

logger = logging.getLogger(__name__)

SOURCE_TOPIC_PREFIX = "firestore:"


@dataclass
class Acks:
    """Which tokens of one batch were acknowledged, and the errors of the others."""

    acked: set[Any] = field(default_factory=set)
    failed: dict[Any, str] = field(default_factory=dict)
    ack_ms: dict[Any, int] = field(default_factory=dict)


class PhotoPublisher:
    """Sends PhotoEvents and dead letters; reports delivery per caller token."""

    def __init__(self, kafka: KafkaSettings, topics: TopicSettings, serde: SchemaRegistry,
                 stage: str, metrics: Metrics) -> None:
        self.topics, self.serde, self.stage, self.metrics = topics, serde, stage, metrics
        self._conf = producer_config(kafka, **{"client.id": f"facematch-{stage}", "error_cb": self._on_client_error})
        self.producer = Producer(self._conf)
        self._needs_new_producer: object | None = None  # why the next wait() replaces the producer
        self._acks = Acks()
        self._in_flight: set[Any] = set()

    def warm_up(self, timeout_s: float = 15.0) -> None:
        """Fetch topic metadata now: fail fast on a wrong broker, and spare the first photo the wait."""
        for topic in (self.topics.photo_events, self.topics.dlq):
            metadata = self.producer.list_topics(topic, timeout=timeout_s)
            error = metadata.topics[topic].error
            if error is not None:
                logger.warning("%s: topic %s: %s", self.stage, topic, error)

    def send(self, token: Any, event: PhotoEvent) -> None:
        """Queue one photo event (key event_id)."""
        value = self.serde.encode(PHOTO_EVENT, event.to_avro())
        self._produce(token, Output(self.topics.photo_events, event.event_id.encode(), value))

    def dead_letter(self, token: Any, change: DocChange, error: PoisonRecord) -> None:
        """Queue a DLQ record for a malformed document, in the runner's envelope and headers."""
        ref = _safe_ref(change.path)
        source = DeadLetterSource(topic=f"{SOURCE_TOPIC_PREFIX}{change.path}", partition=-1, offset=-1,
                                  key=ref.encode() if ref else None, value=document_bytes(change))
        logger.warning("%s: dead-letter %s: %s: %s", self.stage, change.path, error.reason, error)
        self.metrics.dead_letters.labels(self.stage, error.reason).inc()
        self._produce(token, dead_letter_output(self.serde, self.topics.dlq, self.stage, source,
                                                error.reason, error, attempts=1))

    def _produce(self, token: Any, out: Output) -> None:
        self._in_flight.add(token)
        produce_with_retry(self.producer, out, self._callback(token))

    def _callback(self, token: Any) -> Callable[[Any, Any], None]:
        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None and calls_for_new_producer(err):
                self._needs_new_producer = err
            if err is None and has_offset(msg):
                self._acks.acked.add(token)
                self._acks.ack_ms[token] = int(time.time() * 1000)
            else:  # not checkpointed: sent again (an ack without an offset may be a record the broker lost)
                self._acks.failed[token] = str(err) if err is not None else UNCONFIRMED
        return on_delivery

    def wait(self, timeout_s: float = 30.0) -> Acks:
        """Block until every queued record is acked or failed (or timeout); returns this batch's acks."""
        remaining = self.producer.flush(timeout_s)
        if remaining or self._needs_new_producer is not None:
            # Broken, or stuck with records unreported (delivery.calls_for_new_producer). What it
            # still holds is purged now, so this batch's acks mark those records failed: resent.
            logger.error("%s: producer unusable (%s): starting a new one", self.stage,
                         self._needs_new_producer or f"{remaining} records unacknowledged")
            self.producer = replace_producer(self.producer, self._conf)
            self._needs_new_producer = None
        acks, self._acks = self._acks, Acks()
        for token in self._in_flight - acks.acked - set(acks.failed):
            # Still queued after the timeout: not acked, so not checkpointed.
            acks.failed[token] = "delivery timed out"
        self._in_flight = set()
        if remaining or acks.failed:
            logger.warning("%s: %d records not acknowledged (%s)", self.stage, len(acks.failed),
                           next(iter(acks.failed.values()), "?"))
        return acks

    def _on_client_error(self, err: Any) -> None:
        logger.warning("kafka: %s", err)
        if err.fatal():
            self._needs_new_producer = err

    def poll(self) -> None:
        """Serve delivery reports and client errors between batches."""
        self.producer.poll(0)

    def close(self, timeout_s: float = 30.0) -> None:
        """Deliver what is queued."""
        self.producer.flush(timeout_s)


def _safe_ref(path: str) -> str | None:
    # The DLQ key is event_id when the path yields one, so dead letters of an
    # event stay together; a path with bad ids still gets its letter.
    parts = path.strip("/").split("/")
    return parts[-3] if len(parts) >= 4 else None
