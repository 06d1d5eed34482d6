"""confluent-kafka client configs shared by every service."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaException, Producer

from pipeline.settings import KafkaSettings, RunnerSettings

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def consumer_config(kafka: KafkaSettings, group_id: str, runner: RunnerSettings,
                    **overrides: Any) -> dict[str, Any]:
    """Consumer for the shared runner: offsets stored by hand after outputs are acked."""
    conf = kafka.to_librdkafka()
    conf.update({
        "group.id": group_id,
        # librdkafka commits what we *stored*; we store only after the batch's
        # outputs are acknowledged, which gives at-least-once delivery.
        "enable.auto.commit": True,
        "enable.auto.offset.store": False,
        "auto.commit.interval.ms": 1000,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": kafka.session_timeout_ms,
        "heartbeat.interval.ms": kafka.heartbeat_interval_ms,
        # The member is evicted (and its batch redone elsewhere) when poll() is
        # not called for this long: one batch's handle() + flushes must fit in it.
        "max.poll.interval.ms": runner.max_poll_interval_ms,
        # Range assigns the same partition numbers of co-partitioned topics to
        # the same member: the indexer relies on that for faces + requests.
        "partition.assignment.strategy": "range",
        "fetch.wait.max.ms": runner.fetch_wait_max_ms,
        "fetch.max.bytes": 4 * MAX_MESSAGE_BYTES,
        "max.partition.fetch.bytes": MAX_MESSAGE_BYTES,
        "statistics.interval.ms": runner.stats_interval_ms,
    })
    conf.update(overrides)
    return conf


def producer_config(kafka: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """Idempotent producer that partitions keys like the Java client."""
    conf = kafka.to_librdkafka()
    conf.update({
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 2,
        "compression.type": "lz4",
        # Same key -> same partition in Java, kafka-python and librdkafka.
        "partitioner": "murmur2_random",
        "message.max.bytes": MAX_MESSAGE_BYTES,
        # Topics come from `facematch topics` with co-partitioned counts; a producer that reaches a
        # broker before them (a restart, a new producer) must not create one with the broker's default.
        "allow.auto.create.topics": False,
    })
    conf.update(overrides)
    return conf


def replace_producer(old: Producer, conf: dict[str, Any]) -> Producer:
    """A new producer in place of a fenced or fatally failed one, which is purged and abandoned.

    An idempotent producer in that state refuses every record from then on. What it still
    holds is dropped, not delivered late: purge() fails those records' delivery callbacks
    at once (served by the poll), so their callers redo or report them now.
    """
    new = Producer(conf)
    try:
        old.purge(in_queue=True, in_flight=True)
        old.poll(0)
    except KafkaException as exc:
        logger.warning("abandoning the old producer: %s", exc)
    return new


@dataclass(frozen=True)
class Output:
    """A record to produce; partition None lets the murmur2 partitioner choose."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None
    headers: list[tuple[str, bytes]] | None = None


def produce_with_retry(producer: Producer, out: Output, on_delivery: Callable[[Any, Any], None]) -> None:
    """Queue one record; while the local queue is full, serve delivery reports and try again."""
    kwargs: dict[str, Any] = {"key": out.key, "value": out.value, "on_delivery": on_delivery}
    if out.partition is not None:
        kwargs["partition"] = out.partition
    if out.headers:
        kwargs["headers"] = out.headers
    while True:
        try:
            producer.produce(out.topic, **kwargs)
            return
        except BufferError:  # acks free queue space only when their callbacks are served
            producer.poll(0.1)
