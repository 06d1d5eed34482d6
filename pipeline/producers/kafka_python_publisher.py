"""A pure-Python publisher (kafka-python) for upstream systems without librdkafka.

It writes the same Avro single-object records, keyed by event_id; kafka-python's
default partitioner is Java's murmur2, so events land where the services expect.
"""

from __future__ import annotations

from typing import Any

from pipeline.records import PhotoEvent
from pipeline.serde import PHOTO_EVENT, SchemaRegistry


def make_producer(bootstrap_servers: str, **overrides: Any) -> Any:
    """An idempotent-enough kafka-python producer (acks=all, retries)."""
    from kafka import KafkaProducer

    conf: dict[str, Any] = {"bootstrap_servers": bootstrap_servers, "acks": "all", "retries": 5,
                            "linger_ms": 5}
    conf.update(overrides)
    return KafkaProducer(**conf)


def publish_photo_event(producer: Any, topic: str, event: PhotoEvent, serde: SchemaRegistry) -> Any:
    """Send one photo event; returns kafka-python's future (call .get() to wait for the ack)."""
    value = serde.encode(PHOTO_EVENT, event.to_avro())
    return producer.send(topic, key=event.event_id.encode(), value=value)
