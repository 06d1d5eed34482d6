"""The one consume -> process -> produce -> commit loop every stage uses.

Guarantees: at-least-once (a record's offset is stored only after everything
it produced is acknowledged by the brokers), commit on revoke and on stop,
graceful stop on SIGTERM/SIGINT (finish the batch, flush, commit, close),
poison records to the DLQ with reason headers, transient errors retried with
bounded backoff then dead-lettered. Stages never see a Kafka object.

Delivery is tracked per record: a record whose output can never be delivered
(unknown topic or partition, too large) is dead-lettered as `delivery_failed`;
any other delivery failure (broker trouble) holds the partition at that record,
unstored, and handles it again after a backoff (with a new producer if the
broker fenced the old one), so services ride out a broker restart by themselves.

Retries never sleep on the poll thread: a transient failure pauses its
partition and seeks it back to the failed record, which is handled again once
the backoff has passed. Later records of that partition wait (per-partition
order); other partitions keep flowing. Time blocked per batch is bounded by
stage.handle(batch) + 2 x flush_timeout_s, which must stay well under
max.poll.interval.ms or the member is evicted and its batch redone elsewhere.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from pipeline.deadletter import DeadLetterSource, dead_letter_output
from pipeline.delivery import DeliveryFailed, DeliveryTrack
from pipeline.errors import PoisonRecord, TransientError
from pipeline.kafka import Output, produce_with_retry, replace_producer
from pipeline.metrics import Metrics, Probe
from pipeline.rewrites import FROM_START, RewriteWatch
from pipeline.serde import SchemaRegistry
from pipeline.settings import RunnerSettings
from pipeline.stage_api import BaseStage, Control, Incoming, Outcome, Stage, StageContractError

# Stages import these from pipeline.stage_api; tests and older code may import them from here.
__all__ = ["BaseStage", "Control", "DeliveryFailed", "Incoming", "Outcome", "Output", "Runner", "Stage",
           "StageContractError"]

logger = logging.getLogger(__name__)

TP = tuple[str, int]
MAX_REWINDS = 3


class _KafkaControl:
    """Pause bookkeeping shared by the stage and the runner's retry holds.

    A partition is paused while either side wants it paused, so a stage's
    resume never releases a retry hold, and releasing a hold never resumes a
    partition the stage holds (e.g. the indexer's requests during replay).
    """

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer
        self.stage_paused: set[TP] = set()
        self.runner_paused: set[TP] = set()

    def pause(self, topic: str, partition: int) -> None:
        self.stage_paused.add((topic, partition))
        self._consumer.pause([TopicPartition(topic, partition)])

    def resume(self, topic: str, partition: int) -> None:
        self.stage_paused.discard((topic, partition))
        if (topic, partition) not in self.runner_paused:
            self._consumer.resume([TopicPartition(topic, partition)])

    def hold(self, key: TP) -> None:
        self.runner_paused.add(key)
        self._consumer.pause([TopicPartition(*key)])

    def release(self, key: TP) -> None:
        self.runner_paused.discard(key)
        if key not in self.stage_paused:
            self._consumer.resume([TopicPartition(*key)])

    def forget(self, keys: Sequence[TP]) -> None:
        """Revoked partitions come back unpaused on their next assignment."""
        self.stage_paused.difference_update(keys)
        self.runner_paused.difference_update(keys)

    def high_watermark(self, topic: str, partition: int) -> int:
        # The cached watermark comes with fetch responses and is right on every
        # broker; a ListOffsets answer is not (Tansu's memory mode). -1 = unknown yet.
        low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
        return int(high) if high is not None and high >= 0 else -1


@dataclass
class _Hold:
    """A partition rewound to `offset`, waiting until `not_before` (monotonic)."""

    offset: int
    attempts: int  # transient failures of the record at `offset` so far
    delay_s: float
    not_before: float
    paused: bool = True
    misses: int = 0  # batches of this partition that came without the held record


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
        consumer_conf["error_cb"] = self._on_consumer_error
        producer_conf = dict(producer_conf)
        # Reply topics come from request headers: never create topics from
        # them, and give up on unknown ones quickly (then dead-letter).
        producer_conf.setdefault("allow.auto.create.topics", False)
        producer_conf.setdefault("topic.metadata.propagation.max.ms", settings.unknown_topic_timeout_ms)
        producer_conf["error_cb"] = self._on_producer_error
        self._producer_conf = producer_conf
        self._producer_broken: object | None = None  # the fatal error, once the producer is unusable
        self.consumer = Consumer(consumer_conf)
        self.producer = Producer(producer_conf)
        self.control = _KafkaControl(self.consumer)
        self._rewrites = RewriteWatch(self.consumer, consumer_conf, stage.name)
        self._holds: dict[TP, _Hold] = {}
        self._stopping = False
        # Probes (/healthz, /readyz) read these from the metrics server's thread.
        self._running = False
        self._last_poll = time.monotonic()
        self._assigned: frozenset[TP] = frozenset()
        # A loop that has not polled for max.poll.interval.ms has been evicted from
        # the group by the broker anyway: past that it is stuck, not busy.
        self.liveness_timeout_s = settings.max_poll_interval_ms / 1000

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
        self._running = True
        try:
            while not self._stopping:
                batch = self._poll_batch()
                if batch:
                    self._process(batch)
                self._release_due_holds()
                self._rewind_rewritten_logs()
                self.stage.after_batch(self.control)
        finally:
            self._running = False
            self._shutdown()

    def liveness(self) -> Probe:
        """Alive: the loop runs and has polled within liveness_timeout_s."""
        since = time.monotonic() - self._last_poll
        ok = self._running and since <= self.liveness_timeout_s
        return Probe(ok, {"running": self._running, "last_poll_s_ago": round(since, 3),
                          "liveness_timeout_s": self.liveness_timeout_s})

    def seconds_since_poll(self) -> float:
        """Since the loop last called poll() (where librdkafka reports revoked and lost partitions)."""
        return time.monotonic() - self._last_poll

    def readiness(self) -> Probe:
        """Ready: alive, not stopping (drain traffic first) and owning at least one partition."""
        alive = self.liveness()
        assigned = sorted(self._assigned)
        return Probe(alive.ok and not self._stopping and bool(assigned),
                     {**alive.detail, "stopping": self._stopping, "stage": self.stage.name,
                      "assigned": [f"{topic}[{partition}]" for topic, partition in assigned]})

    def _poll_batch(self) -> list[Message]:
        self._serve_producer(0)
        # poll() returns at the first record; consume(timeout=0) then takes what
        # is already fetched, so a lone request never waits for a full batch.
        first = self.consumer.poll(self.settings.poll_timeout_s)
        self._last_poll = time.monotonic()
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
        batch = self._admit([_incoming(m) for m in messages])
        outcomes = self._safe_handle(batch) if batch else []
        tracks: list[DeliveryTrack] = []
        held: set[TP] = set()
        for item, outcome in zip(batch, outcomes):
            key = (item.topic, item.partition)
            if key in held:
                continue  # waits behind the failed record: per-partition order
            attempt = self._attempts_before(item) + 1
            if isinstance(outcome, TransientError) and attempt < self.settings.max_attempts:
                self.metrics.retries.labels(self.stage.name, outcome.reason).inc()
                logger.info("%s: transient %s at %s[%d]@%d (attempt %d): %s", self.stage.name,
                            outcome.reason, item.topic, item.partition, item.offset, attempt, outcome)
                self._hold(item, attempt)
                held.add(key)
                continue
            tracks.append(self._emit(item, outcome, attempt))
        self._flush_and_dead_letter(tracks)
        done = self._settle(tracks)
        for item in done:
            self._rewrites.remember(item.topic, item.partition, item.offset, item.timestamp_ms, item.key, item.value)
        self._store_offsets(done)
        self._redo_undelivered(tracks)
        self.metrics.batch_seconds.labels(self.stage.name).observe(time.perf_counter() - started)

    def _admit(self, items: list[Incoming]) -> list[Incoming]:
        """Drop records of a held partition past its failed record; the seek refetches them."""
        present = {(i.topic, i.partition, i.offset) for i in items}
        rewound: set[TP] = set()
        admitted = []
        for item in items:
            key = (item.topic, item.partition)
            hold = self._holds.get(key)
            if hold is None or item.offset <= hold.offset or (*key, hold.offset) in present:
                admitted.append(item)
            elif not hold.paused and key not in rewound:
                # Fetched before the seek took effect, or the held record is gone
                # (compaction, retention): rewind again, and give up after a few tries.
                hold.misses += 1
                if hold.misses > MAX_REWINDS:
                    logger.warning("%s: %s[%d]@%d is gone; going on at %d", self.stage.name,
                                   *key, hold.offset, item.offset)
                    del self._holds[key]
                    admitted.append(item)
                else:
                    rewound.add(key)
                    self.consumer.seek(TopicPartition(*key, hold.offset))
        return admitted

    def _attempts_before(self, item: Incoming) -> int:
        hold = self._holds.get((item.topic, item.partition))
        return hold.attempts if hold is not None and hold.offset == item.offset else 0

    def _safe_handle(self, batch: Sequence[Incoming]) -> list[Outcome]:
        try:
            outcomes = self.stage.handle(batch)
        except Exception as exc:  # a stage bug must not lose the batch
            logger.exception("%s: batch handler failed; handling records one by one", self.stage.name)
            if len(batch) == 1:
                return [exc]
            return [self._safe_handle([item])[0] for item in batch]
        if len(outcomes) != len(batch):
            # Outcomes cannot be matched to records: redo them one by one, and
            # dead-letter a record that alone still gets a wrong count.
            message = f"{self.stage.name} returned {len(outcomes)} outcomes for {len(batch)} records"
            logger.error("%s", message)
            if len(batch) == 1:
                return [StageContractError(message)]
            return [self._safe_handle([item])[0] for item in batch]
        return outcomes

    def _hold(self, item: Incoming, attempts: int) -> None:
        """Pause the partition and rewind it to `item`; it resumes after the backoff."""
        key = (item.topic, item.partition)
        previous = self._holds.get(key)
        delay = self.settings.backoff_initial_s
        if previous is not None and previous.offset == item.offset:
            delay = min(previous.delay_s * 2, self.settings.backoff_max_s)
        self._holds[key] = _Hold(item.offset, attempts, delay, time.monotonic() + delay)
        self.control.hold(key)
        # Without the seek the consumer would go on after the failed record.
        self.consumer.seek(TopicPartition(item.topic, item.partition, item.offset))

    def _on_consumer_error(self, err: KafkaError) -> None:
        logger.warning("kafka: %s", err)
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._rewrites.broker_down()  # it may come back with logs that end earlier: see pipeline/rewrites.py

    def _rewind_rewritten_logs(self) -> None:
        """Read again what a broker that lost records it had served put at offsets we had passed."""
        for key, offset in self._rewrites.rewinds(self._assigned).items():
            where = "its start" if offset == FROM_START else f"offset {offset}"
            logger.warning("%s: the broker rewrote %s[%d] below our position; reading it again from %s",
                           self.stage.name, *key, where)
            self.metrics.retries.labels(self.stage.name, "log_rewritten").inc()
            if self._holds.pop(key, None) is not None:
                self.control.release(key)
            try:
                self.consumer.seek(TopicPartition(*key, offset))
            except KafkaException as exc:  # not fetching yet (just assigned), or revoked meanwhile
                logger.warning("%s: rewind of %s[%d] failed (%s); deciding again later", self.stage.name, *key, exc)
                self._rewrites.retry(key)

    def _release_due_holds(self) -> None:
        now = time.monotonic()
        for key, hold in self._holds.items():
            if hold.paused and now >= hold.not_before:
                hold.paused = False
                self.control.release(key)

    def _emit(self, item: Incoming, outcome: Outcome, attempts: int) -> DeliveryTrack:
        track = DeliveryTrack(item, attempts, dead_letter=isinstance(outcome, BaseException))
        if isinstance(outcome, BaseException):
            self._dead_letter(track, outcome)
        else:
            for out in outcome:
                self._produce(track, out)
        return track

    def _dead_letter(self, track: DeliveryTrack, error: BaseException) -> None:
        item = track.item
        reason = getattr(error, "reason", None) or "unexpected_error"
        if not isinstance(error, (PoisonRecord, TransientError, DeliveryFailed)):
            logger.error("%s: unexpected %r at %s[%d]@%d", self.stage.name, error,
                         item.topic, item.partition, item.offset)
        else:
            logger.warning("%s: dead-letter %s at %s[%d]@%d: %s", self.stage.name, reason,
                           item.topic, item.partition, item.offset, error)
        source = DeadLetterSource(item.topic, item.partition, item.offset, item.key, item.value)
        redact = item.topic in self.stage.sensitive_topics
        self._produce(track, dead_letter_output(self.serde, self.dlq_topic, self.stage.name, source,
                                                reason, error, track.attempts, redact=redact))
        track.dead_letter = True
        self.metrics.dead_letters.labels(self.stage.name, reason).inc()

    def _produce(self, track: DeliveryTrack, out: Output) -> None:
        try:
            produce_with_retry(self.producer, out, track.on_delivery)
            track.pending += 1
        except KafkaException as exc:  # refused locally (too large, unknown partition)
            track.failed(exc.args[0], out.topic, out.partition)

    def _flush_and_dead_letter(self, tracks: Sequence[DeliveryTrack]) -> None:
        """Wait for the acks; dead-letter records whose outputs can never be delivered."""
        self._serve_producer(self.settings.flush_timeout_s)
        undeliverable = [t for t in tracks if t.permanent and not t.transient and not t.dead_letter]
        for track in undeliverable:
            error = DeliveryFailed("; ".join(track.permanent)[:500])
            track.permanent = []  # outputs still in flight keep counting in `pending`
            self._dead_letter(track, error)
        if undeliverable:
            self._serve_producer(self.settings.flush_timeout_s)

    def _settle(self, tracks: Sequence[DeliveryTrack]) -> list[Incoming]:
        """Records whose outputs are all acked, up to the first undelivered one per partition."""
        done: list[Incoming] = []
        stalled: set[TP] = set()
        for track in tracks:
            key = (track.item.topic, track.item.partition)
            if key in stalled or not track.delivered:
                stalled.add(key)
                continue
            hold = self._holds.get(key)
            if hold is not None and hold.offset <= track.item.offset:
                del self._holds[key]  # the held record made it; later ones may be held anew
            self.metrics.records.labels(self.stage.name, "dead_letter" if track.dead_letter else "ok").inc()
            done.append(track.item)
        return done

    def _redo_undelivered(self, tracks: Sequence[DeliveryTrack]) -> None:
        """Broker trouble: hold each partition at its first undelivered record and handle it again later.

        Nothing after that record is stored, so nothing is lost; records handled
        twice are fine for every stage (the embedder is stateless, the indexer's
        upserts, deletes and tombstones are idempotent, a reply twice is filtered
        by correlation id). The attempt count does not grow: an outage is not the
        record's fault, so it never reaches the DLQ for it.
        """
        failed = [t for t in tracks if not t.delivered]
        if not failed:
            return
        if self._producer_broken is not None or any(t.needs_new_producer or t.unreported for t in failed):
            self._replace_producer()
        first: dict[TP, DeliveryTrack] = {}
        for track in failed:
            first.setdefault((track.item.topic, track.item.partition), track)
        for track in first.values():
            item = track.item
            self.metrics.retries.labels(self.stage.name, "delivery").inc()
            logger.warning("%s: outputs of %s[%d]@%d not acknowledged (%s); handling it again later",
                           self.stage.name, item.topic, item.partition, item.offset,
                           "; ".join(track.transient[:2]) or "timed out")
            self._hold(item, self._attempts_before(item))

    def _serve_producer(self, timeout_s: float) -> None:
        """poll(0) or flush: serve delivery reports; a fatal producer error raised from them marks it broken."""
        try:
            if timeout_s:
                self.producer.flush(timeout_s)
            else:
                self.producer.poll(0)
        except (KafkaException, SystemError) as exc:  # SystemError: the fatal error surfaced inside a callback
            logger.warning("%s: producer failed: %s", self.stage.name, exc)
            self._producer_broken = self._producer_broken or exc

    def _on_producer_error(self, err: KafkaError) -> None:
        logger.warning("kafka producer: %s", err)
        if err.fatal():
            self._producer_broken = err

    def _replace_producer(self) -> None:
        """A fenced, fatally failed or stuck idempotent producer delivers nothing more: start a new one."""
        logger.error("%s: producer unusable (%s): starting a new one", self.stage.name,
                     self._producer_broken or "fenced by the broker, or stuck: records unacknowledged")
        # What the old one still holds is redone through the holds.
        self.producer = replace_producer(self.producer, self._producer_conf)
        self._producer_broken = None

    def _store_offsets(self, batch: Sequence[Incoming]) -> None:
        highest: dict[TP, int] = {}
        for item in batch:
            highest[(item.topic, item.partition)] = max(highest.get((item.topic, item.partition), -1), item.offset)
        if not highest:
            return
        tps = [TopicPartition(t, p, o + 1) for (t, p), o in highest.items()]
        try:
            self.consumer.store_offsets(offsets=tps)
        except KafkaException as exc:  # partition revoked meanwhile: next owner redoes it
            logger.info("store_offsets skipped: %s", exc)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        logger.info("%s: assigned %s", self.stage.name, keys)
        self.metrics.rebalances.labels(self.stage.name, "assigned").inc()
        starts = self.stage.on_assign(keys, self.control)
        for tp in partitions:
            if (tp.topic, tp.partition) in starts:
                tp.offset = starts[(tp.topic, tp.partition)]
        consumer.assign(partitions)
        self._rewrites.assigned(keys)
        self.stage.after_assign(keys, self.control)
        self._count_assigned(keys, +1)
        self._assigned = self._assigned | set(keys)

    def _forget(self, keys: list[TP]) -> None:
        for key in keys:
            self._holds.pop(key, None)
        self.control.forget(keys)
        self.metrics.forget_partitions(self.group, keys)
        self._count_assigned(keys, -1)
        self._assigned = self._assigned - set(keys)

    def _count_assigned(self, keys: list[TP], sign: int) -> None:
        for topic in {t for t, _ in keys}:
            self.metrics.assigned_partitions.labels(self.stage.name, topic).inc(
                sign * sum(1 for t, _ in keys if t == topic))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        logger.info("%s: revoked %s", self.stage.name, keys)
        self.metrics.rebalances.labels(self.stage.name, "revoked").inc()
        self.stage.on_revoke(keys)
        self._forget(keys)
        self._commit_sync()

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(tp.topic, tp.partition) for tp in partitions]
        logger.warning("%s: lost %s (no commit: another member owns them)", self.stage.name, keys)
        self.metrics.rebalances.labels(self.stage.name, "lost").inc()
        self.stage.on_revoke(keys)
        self._forget(keys)

    def _commit_sync(self) -> None:
        try:
            self.consumer.commit(asynchronous=False)
        except KafkaException as exc:  # _NO_OFFSET: nothing stored since last commit
            logger.debug("commit: %s", exc)

    def _shutdown(self) -> None:
        logger.info("%s: stopping: flush, commit, close", self.stage.name)
        try:
            self._serve_producer(self.settings.flush_timeout_s)
            self.stage.close()
            self._commit_sync()
        finally:
            self.consumer.close()
