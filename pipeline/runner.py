"""The one consume -> process -> produce -> commit loop every stage uses.

Guarantees: at-least-once (a record's offset is stored only after everything
it produced is acknowledged by the brokers), commit on revoke and on stop,
graceful stop on SIGTERM/SIGINT (finish the batch, flush, commit, close),
poison records to the DLQ with reason headers, transient errors retried with
bounded backoff then dead-lettered. Stages never see a Kafka object.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from pipeline.deadletter import DeadLetterSource, dead_letter_output
from pipeline.errors import PoisonRecord, TransientError
from pipeline.kafka import Output, produce_with_retry
from pipeline.metrics import Metrics
from pipeline.serde import SchemaRegistry
from pipeline.settings import RunnerSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Incoming:
    """A consumed record, without Kafka objects."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)
    timestamp_ms: int = 0


Outcome = list[Output] | BaseException


class Control(Protocol):
    """What a stage may ask of the consumer, between batches."""

    def pause(self, topic: str, partition: int) -> None: ...
    def resume(self, topic: str, partition: int) -> None: ...
    def high_watermark(self, topic: str, partition: int) -> int: ...


class Stage(Protocol):
    """A stage adapter: decodes, calls its pure core, encodes outputs."""

    name: str

    def handle(self, batch: Sequence[Incoming]) -> list[Outcome]:
        """One outcome per record, in order: outputs, or the exception it raised."""
        ...

    def on_assign(self, partitions: list[tuple[str, int]], control: Control) -> dict[tuple[str, int], int]:
        """Called on assignment; returns start offsets to override (e.g. snapshots)."""
        ...

    def after_assign(self, partitions: list[tuple[str, int]], control: Control) -> None:
        """Called once the assignment is in effect (pausing works from here)."""
        ...

    def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        """Called before partitions go away (snapshot, drop state)."""
        ...

    def after_batch(self, control: Control) -> None:
        """Periodic work between batches (snapshots, resuming caught-up partitions)."""
        ...

    def close(self) -> None:
        """Final flush of the stage's own state on graceful stop."""
        ...


class BaseStage:
    """No-op hooks, so a stateless stage only writes `handle`."""

    name = "stage"

    def on_assign(self, partitions: list[tuple[str, int]], control: Control) -> dict[tuple[str, int], int]:
        """No start offsets to override."""
        return {}

    def after_assign(self, partitions: list[tuple[str, int]], control: Control) -> None:
        """Nothing to pause."""

    def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        """No state to drop."""

    def after_batch(self, control: Control) -> None:
        """No periodic work."""

    def close(self) -> None:
        """No state to flush."""


class _KafkaControl:
    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer

    def pause(self, topic: str, partition: int) -> None:
        self._consumer.pause([TopicPartition(topic, partition)])

    def resume(self, topic: str, partition: int) -> None:
        self._consumer.resume([TopicPartition(topic, partition)])

    def high_watermark(self, topic: str, partition: int) -> int:
        # The cached watermark comes with fetch responses; it is right on every
        # broker, while ListOffsets is not on some (see FACTS). -1 = unknown yet.
        low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
        return int(high) if high is not None and high >= 0 else -1


def _incoming(msg: Message) -> Incoming:
    headers = {k: (v or b"") for k, v in (msg.headers() or [])}
    return Incoming(topic=msg.topic(), partition=msg.partition(), offset=msg.offset(),
                    key=msg.key(), value=msg.value(), headers=headers,
                    timestamp_ms=msg.timestamp()[1])


class Runner:
    """Owns one consumer and one producer, and drives a Stage."""

    def __init__(self, stage: Stage, topics: list[str], consumer_conf: dict[str, Any],
                 producer_conf: dict[str, Any], dlq_topic: str, settings: RunnerSettings,
                 metrics: Metrics, serde: SchemaRegistry) -> None:
        self.stage, self.topics, self.dlq_topic = stage, topics, dlq_topic
        self.settings, self.metrics, self.serde = settings, metrics, serde
        self.group = consumer_conf["group.id"]
        consumer_conf = dict(consumer_conf)
        consumer_conf["stats_cb"] = lambda s: metrics.update_lag_from_stats(self.group, s)
        consumer_conf["error_cb"] = lambda err: logger.warning("kafka: %s", err)
        self.consumer = Consumer(consumer_conf)
        self.producer = Producer(producer_conf)
        self.control = _KafkaControl(self.consumer)
        self._stopping = False
        self._delivery_errors: list[str] = []

    def stop(self, *_: object) -> None:
        """Ask the loop to finish its batch and exit (signal-handler safe)."""
        self._stopping = True

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT only set the stop flag."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def run(self) -> None:
        """Loop until stop(); always flushes, commits and closes."""
        self.consumer.subscribe(self.topics, on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_lost)
        logger.info("%s: consuming %s as group %s", self.stage.name, self.topics, self.group)
        try:
            while not self._stopping:
                batch = self._poll_batch()
                if batch:
                    self._process(batch)
                self.stage.after_batch(self.control)
        finally:
            self._shutdown()

    def _poll_batch(self) -> list[Message]:
        self.producer.poll(0)
        # poll() returns at the first record; consume(timeout=0) then takes what
        # is already fetched, so a lone request never waits for a full batch.
        first = self.consumer.poll(self.settings.poll_timeout_s)
        if first is None:
            return []
        rest = self.consumer.consume(self.settings.batch_size - 1, timeout=0) if self.settings.batch_size > 1 else []
        good = []
        for msg in [first, *rest]:
            if msg.error():
                if msg.error().fatal():
                    raise KafkaException(msg.error())
                logger.warning("consumer error: %s", msg.error())
                continue
            good.append(msg)
        return good

    def _process(self, messages: list[Message]) -> None:
        started = time.perf_counter()
        batch = [_incoming(m) for m in messages]
        outcomes = self._safe_handle(batch)
        for item, outcome in zip(batch, outcomes):
            outcome, attempts = self._retry_transient(item, outcome)
            if isinstance(outcome, BaseException):
                self._dead_letter(item, outcome, attempts)
            else:
                for out in outcome:
                    self._produce(out)
                self.metrics.records.labels(self.stage.name, "ok").inc()
        self._flush_or_raise()
        self._store_offsets(batch)
        self.metrics.batch_seconds.labels(self.stage.name).observe(time.perf_counter() - started)

    def _safe_handle(self, batch: Sequence[Incoming]) -> list[Outcome]:
        try:
            outcomes = self.stage.handle(batch)
        except Exception as exc:  # a stage bug must not lose the batch
            logger.exception("%s: batch handler failed; handling records one by one", self.stage.name)
            if len(batch) == 1:
                return [exc]
            return [self._safe_handle([item])[0] for item in batch]
        if len(outcomes) != len(batch):
            raise RuntimeError(f"{self.stage.name} returned {len(outcomes)} outcomes for {len(batch)} records")
        return outcomes

    def _retry_transient(self, item: Incoming, outcome: Outcome) -> tuple[Outcome, int]:
        """Retry while transient, with backoff; returns the last outcome and the attempts made."""
        attempt, delay = 1, self.settings.backoff_initial_s
        while isinstance(outcome, TransientError) and attempt < self.settings.max_attempts:
            self.metrics.retries.labels(self.stage.name, outcome.reason).inc()
            logger.info("%s: transient %s at %s[%d]@%d, retry %d in %.1fs", self.stage.name,
                        outcome.reason, item.topic, item.partition, item.offset, attempt, delay)
            time.sleep(delay)
            self.producer.poll(0)
            delay = min(delay * 2, self.settings.backoff_max_s)
            attempt += 1
            outcome = self._safe_handle([item])[0]
        return outcome, attempt

    def _dead_letter(self, item: Incoming, error: BaseException, attempts: int) -> None:
        reason = getattr(error, "reason", None) or "unexpected_error"
        if not isinstance(error, (PoisonRecord, TransientError)):
            logger.error("%s: unexpected %r at %s[%d]@%d", self.stage.name, error,
                         item.topic, item.partition, item.offset)
        else:
            logger.warning("%s: dead-letter %s at %s[%d]@%d: %s", self.stage.name, reason,
                           item.topic, item.partition, item.offset, error)
        source = DeadLetterSource(item.topic, item.partition, item.offset, item.key, item.value)
        self._produce(dead_letter_output(self.serde, self.dlq_topic, self.stage.name, source,
                                         reason, error, attempts))
        self.metrics.dead_letters.labels(self.stage.name, reason).inc()
        self.metrics.records.labels(self.stage.name, "dead_letter").inc()

    def _produce(self, out: Output) -> None:
        produce_with_retry(self.producer, out, self._on_delivery)

    def _on_delivery(self, err: Any, msg: Message) -> None:
        if err is not None:
            self._delivery_errors.append(f"{msg.topic()}: {err}")

    def _flush_or_raise(self) -> None:
        remaining = self.producer.flush(30)
        if remaining or self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            # Offsets are not stored, so the batch is redelivered after restart.
            raise KafkaException(f"{remaining} outputs unacknowledged; delivery errors: {errors[:3]}")

    def _store_offsets(self, batch: Sequence[Incoming]) -> None:
        highest: dict[tuple[str, int], int] = {}
        for item in batch:
            highest[(item.topic, item.partition)] = max(highest.get((item.topic, item.partition), -1), item.offset)
        tps = [TopicPartition(t, p, o + 1) for (t, p), o in highest.items()]
        try:
            self.consumer.store_offsets(offsets=tps)
        except KafkaException as exc:  # partition revoked meanwhile: next owner redoes it
            logger.info("store_offsets skipped: %s", exc)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        logger.info("%s: assigned %s", self.stage.name, keys)
        starts = self.stage.on_assign(keys, self.control)
        for tp in partitions:
            if (tp.topic, tp.partition) in starts:
                tp.offset = starts[(tp.topic, tp.partition)]
        consumer.assign(partitions)
        self.stage.after_assign(keys, self.control)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        logger.info("%s: revoked %s", self.stage.name, keys)
        self.stage.on_revoke(keys)
        self._commit_sync()

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        logger.warning("%s: lost %s (no commit: another member owns them)", self.stage.name, keys)
        self.stage.on_revoke(keys)

    def _commit_sync(self) -> None:
        try:
            self.consumer.commit(asynchronous=False)
        except KafkaException as exc:  # _NO_OFFSET: nothing stored since last commit
            logger.debug("commit: %s", exc)

    def _shutdown(self) -> None:
        logger.info("%s: stopping: flush, commit, close", self.stage.name)
        try:
            self.producer.flush(30)
            self.stage.close()
            self._commit_sync()
        finally:
            self.consumer.close()

