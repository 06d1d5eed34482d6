"""Request/reply over Kafka for the HTTP bridge (Spring-Kafka compatible headers).

Each bridge process (each uvicorn worker) reads one partition of the reply
topic, its own, which it names in kafka_replyPartition; replies are matched by
kafka_correlationId. The partition is claimed with an exclusive lock file per
partition (claim_reply_partition), so workers on one host never need to be told
which partition is theirs. One background thread polls both the reply consumer
and the producer.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from pipeline.delivery import UNCONFIRMED, breaks_producer, calls_for_new_producer, has_offset
from pipeline.direct import ADDRESS_HEADER
from pipeline.headers import CORRELATION, REPLY_PARTITION, REPLY_TOPIC
from pipeline.kafka import replace_producer
from pipeline.matcher.direct import DirectQueries
from pipeline.records import MatchReply, MatchRequest, now_ms
from pipeline.serde import MATCH_REPLY, MATCH_REQUEST, SchemaRegistry
from pipeline.settings import KafkaSettings
from pipeline.topics import partition_for

logger = logging.getLogger(__name__)

REPLY_BATCH = 256  # replies taken from the fetched queue per wakeup of the waiters' event loops
UNCONFIRMED_ATTEMPTS = 3  # publishes acknowledged without an offset before the caller gets a 503
STALL_S = 1.0  # the broker holds replies past our position, yet none arrived for this long: a stalled fetch
FETCH_WAIT_GROWTH = 4  # each stall multiplies the reply consumer's fetch.wait.max.ms by this
FETCH_WAIT_MAX_MS = 2000  # up to this


class ReplyTimeout(TimeoutError):
    """No reply arrived in time although the broker took the request (the bridge answers 504)."""


class PublishFailed(RuntimeError):
    """The broker did not acknowledge a record in time, or refused it (the bridge answers 503)."""


class NoReplyPartition(RuntimeError):
    """Every reply partition this host may use is claimed by a running bridge process."""


@dataclass
class ReplyClaim:
    """A reply partition this process reads; `exclusive` while it holds the partition's lock file."""

    partition: int
    lock_path: Path | None = None
    _fd: int | None = None

    @property
    def exclusive(self) -> bool:
        """True when no other bridge process on this host reads this partition."""
        return self._fd is not None

    def release(self) -> None:
        """Give the partition back (the kernel also does it when the process dies, even by SIGKILL)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def default_runtime_dir() -> Path:
    """<tmp>/facematch-<uid>: shared by every bridge of this user on this host."""
    return Path(tempfile.gettempdir()) / f"facematch-{os.getuid()}"


def parse_partition_set(spec: str, count: int) -> list[int]:
    """"0-3,8" -> [0, 1, 2, 3, 8], checked against the topic's partition count; "" -> all of them."""
    if not spec.strip():
        return list(range(count))
    chosen: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.strip().partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError as exc:
            raise ValueError(f"FACEMATCH_BRIDGE_REPLY_PARTITIONS: {part!r} is not N or N-M") from exc
        if first < 0 or last >= count or first > last:
            raise ValueError(f"FACEMATCH_BRIDGE_REPLY_PARTITIONS: {part!r} is outside 0-{count - 1}")
        chosen.update(range(first, last + 1))
    return sorted(chosen)


def _lock_path(runtime_dir: Path, bootstrap: str, reply_topic: str, partition: int) -> Path:
    # The same topic name on another cluster is another partition: the bootstrap list is part of the name.
    cluster = hashlib.sha256(bootstrap.encode()).hexdigest()[:12]
    return runtime_dir / f"reply-{reply_topic}-{cluster}-{partition}.lock"


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for operators
    return fd


def claim_reply_partition(runtime_dir: Path, bootstrap: str, reply_topic: str, candidates: Sequence[int],
                          pinned: int | None = None) -> ReplyClaim:
    """Claim the first free partition of `candidates` (or the pinned one) for this process.

    Locks are per host: bridges on different hosts should claim disjoint sets
    (FACEMATCH_BRIDGE_REPLY_PARTITIONS). A pinned partition already claimed is
    shared, with a warning: replies still reach their caller, since each bridge
    drops replies whose correlation id it did not send, but both read all of them.
    """
    runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if pinned is not None:
        path = _lock_path(runtime_dir, bootstrap, reply_topic, pinned)
        fd = _try_lock(path)
        if fd is None:
            logger.warning("reply partition %d of %s (pinned by FACEMATCH_BRIDGE_REPLY_PARTITION) is also read by "
                           "another bridge on this host (%s): both filter by correlation id", pinned, reply_topic,
                           path)
        return ReplyClaim(pinned, path, fd)
    for partition in candidates:
        path = _lock_path(runtime_dir, bootstrap, reply_topic, partition)
        fd = _try_lock(path)
        if fd is not None:
            logger.info("reading reply partition %d of %s (claimed with %s)", partition, reply_topic, path)
            return ReplyClaim(partition, path, fd)
    raise NoReplyPartition(
        f"all {len(candidates)} reply partitions of {reply_topic} this host may use ({list(candidates)}) are "
        f"claimed by running bridge processes (locks in {runtime_dir}): run fewer bridge workers, or give the "
        f"reply topic more partitions (FACEMATCH_TOPIC_REPLY_PARTITIONS)")


def reply_consumer_config(kafka: KafkaSettings) -> dict[str, Any]:
    """The reply consumer: assign()ed, never commits, and a short fetch wait for low latency.

    Apache Kafka answers a fetch as soon as a record arrives, whatever the wait; Tansu answers
    at the end of the wait, so a short one is its latency floor. KafkaRequester lengthens it
    when the broker needs more time than that to read the partition (see _check_stalled).
    """
    return {**kafka.to_librdkafka(), "group.id": f"facematch-bridge-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False, "fetch.wait.max.ms": 5}


class KafkaRequester:
    """Sends match requests and awaits their replies; also publishes records."""

    def __init__(self, producer_conf: dict[str, Any], consumer_conf: dict[str, Any],
                 serde: SchemaRegistry, request_topic: str, request_partitions: int,
                 reply_topic: str, reply_partition: int, delivery_timeout_s: float = 5.0,
                 claim: ReplyClaim | None = None, direct: DirectQueries | None = None) -> None:
        self.serde, self.request_topic = serde, request_topic
        self.direct = direct  # asks the owning indexer first; its address comes in our replies' headers
        self.claim = claim  # released by close()
        # librdkafka fails a record after message.timeout.ms; the await gets a little
        # more, so the broker's own verdict normally arrives first.
        self.delivery_timeout_s = delivery_timeout_s
        self.request_partitions = request_partitions
        self.reply_topic, self.reply_partition = reply_topic, reply_partition
        self._producer_conf = {**producer_conf, "error_cb": self._on_client_error}
        self._fatal: Any = None  # the producer is unusable (or stuck): the next produce replaces it
        self.producer = Producer(self._producer_conf)
        self._producer_since = time.monotonic()
        self._consumer_conf = dict(consumer_conf)
        self.consumer = Consumer(self._consumer_conf)
        self._next_offset = 0  # of the reply partition: where a new consumer would resume
        self._behind_since: float | None = None  # when the broker was first seen holding replies we lack
        self._pending: dict[bytes, tuple[asyncio.AbstractEventLoop, asyncio.Future[MatchReply]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kafka-replies", daemon=True)

    def start(self) -> None:
        """Assign our reply partition at its current end, then start polling."""
        tp = TopicPartition(self.reply_topic, self.reply_partition)
        _, high = self.consumer.get_watermark_offsets(tp, timeout=10)
        # An explicit start offset (not OFFSET_END resolved later) means no reply
        # to a request sent after start() can be skipped; older ones are filtered.
        self._next_offset = max(high, 0)
        self.consumer.assign([TopicPartition(self.reply_topic, self.reply_partition, self._next_offset)])
        self._thread.start()

    @property
    def fetch_wait_ms(self) -> int:
        """The reply consumer's fetch.wait.max.ms now (it grows when the broker needs longer)."""
        return int(self._consumer_conf.get("fetch.wait.max.ms", 500))

    def close(self) -> None:
        """Stop polling, flush, close (once: the app's shutdown and main() may both call it)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.producer.flush(10)
        self.consumer.close()
        if self.claim is not None:
            self.claim.release()

    async def match(self, event_id: str, embedding: np.ndarray, top_k: int,
                    threshold: float | None, timeout_s: float, guest_id: str | None = None,
                    model_id: str | None = None, direct: bool = True) -> MatchReply:
        """Send one request and wait for its reply; PublishFailed or ReplyTimeout otherwise.

        direct=False: through Kafka even when the owner could be asked directly (the health probe).
        """
        request_id = uuid.uuid4().hex
        correlation = request_id.encode()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[MatchReply] = loop.create_future()
        acked: list[int] = []  # the request's offset, from the delivery report: the broker has it

        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                self._note_delivery_error(err)
                loop.call_soon_threadsafe(_set_exception, future, PublishFailed(f"broker refused: {err}"))
            else:
                acked.append(msg.offset())

        request = MatchRequest(request_id=request_id, event_id=event_id, embedding=embedding,
                               top_k=top_k, threshold=threshold, guest_id=guest_id, model_id=model_id,
                               deadline_ms=now_ms() + int(timeout_s * 1000))
        value = self.serde.encode(MATCH_REQUEST, request.to_avro())
        partition = partition_for(event_id, self.request_partitions)
        if direct and self.direct is not None:
            started = time.monotonic()
            reply = await self.direct.ask(partition, request_id, value, timeout_s / 2)
            if reply is not None:
                return reply
            timeout_s -= time.monotonic() - started
        headers = [(CORRELATION, correlation), (REPLY_TOPIC, self.reply_topic.encode()),
                   (REPLY_PARTITION, struct.pack(">i", self.reply_partition))]
        with self._lock:
            self._pending[correlation] = (loop, future)
        try:
            self._produce(self.request_topic, key=event_id.encode(), value=value, partition=partition,
                          headers=headers, on_delivery=on_delivery)
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError as exc:
            if not acked:  # the request never reached the broker: nobody could have answered
                raise PublishFailed(f"broker did not acknowledge the request within {timeout_s}s") from exc
            # Logged with where the request is, so that the indexer's log of that offset can be found.
            logger.warning("no reply within %.1fs to request %s for event %s at %s[%d]@%d", timeout_s, request_id,
                           event_id, self.request_topic, partition, acked[0])
            raise ReplyTimeout(f"no reply for event {event_id} within {timeout_s}s") from exc
        finally:
            with self._lock:
                self._pending.pop(correlation, None)

    async def publish(self, topic: str, key: bytes, value: bytes | None,
                      partition: int | None = None) -> tuple[int, int]:
        """Produce and wait for the broker's ack; returns (partition, offset), or raises PublishFailed.

        `partition` None: murmur2 of the key chooses (keys that are the event id).
        """
        for attempt in range(UNCONFIRMED_ATTEMPTS):
            partition_offset = await self._publish_once(topic, key, value, partition)
            if partition_offset is not None:
                return partition_offset
            logger.warning("publish to %s: %s (attempt %d); producing it again", topic, UNCONFIRMED, attempt + 1)
        raise PublishFailed(f"broker {UNCONFIRMED}")

    async def _publish_once(self, topic: str, key: bytes, value: bytes | None,
                            partition: int | None) -> tuple[int, int] | None:
        """(partition, offset) once acked; None for an ack without an offset (see delivery.has_offset)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, int] | None] = loop.create_future()

        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                self._note_delivery_error(err)
                loop.call_soon_threadsafe(_set_exception, future, PublishFailed(f"broker refused: {err}"))
            else:
                acked = (msg.partition(), msg.offset()) if has_offset(msg) else None
                loop.call_soon_threadsafe(_set_result, future, acked)

        where = {} if partition is None else {"partition": partition}
        self._produce(topic, key=key, value=value, on_delivery=on_delivery, **where)
        try:
            # Bounded: with the broker down, librdkafka would otherwise retry until message.timeout.ms
            # (and a producer without one waits 300 s). Timing out here does not unsend the record:
            # it may still land, and a client retry re-ingests the same photo, which is idempotent.
            return await asyncio.wait_for(future, self.delivery_timeout_s + 1.0)
        except asyncio.TimeoutError as exc:
            raise PublishFailed(f"broker did not acknowledge within {self.delivery_timeout_s}s") from exc

    def _note_delivery_error(self, err: Any) -> None:
        # A broker that lost its producer state (restart, failover) fences the idempotent producer
        # record by record, never as a fatal client error: without a new producer every later
        # publish would be refused until the bridge restarts.
        if breaks_producer(err):
            self._fatal = err
        elif calls_for_new_producer(err) and time.monotonic() - self._producer_since >= self.delivery_timeout_s:
            # Timed out: maybe a broker that is down, maybe a producer stuck bumping its epoch
            # (delivery.calls_for_new_producer). At most one new producer per timeout, not one per record.
            self._fatal = err

    def _on_client_error(self, err: Any) -> None:
        if err.fatal():
            self._fatal = err
        # Connection errors repeat at every reconnect attempt; "all brokers down" says it once.
        important = err.fatal() or err.code() == KafkaError._ALL_BROKERS_DOWN
        logger.log(logging.WARNING if important else logging.DEBUG, "bridge producer: %s", err)

    def _produce(self, topic: str, **kwargs: Any) -> None:
        if self._fatal is not None:
            self._replace_producer()
        try:
            self.producer.produce(topic, **kwargs)
        except BufferError as exc:  # local queue full: the broker has been unreachable for a while
            raise PublishFailed(f"producer queue full: {exc}") from exc
        except KafkaException as exc:
            if exc.args and exc.args[0].fatal():
                self._fatal = exc.args[0]
            raise PublishFailed(f"produce failed: {exc}") from exc
        self._poll_producer()

    def _replace_producer(self) -> None:
        # An idempotent producer whose records timed out can turn fatal once the broker is back
        # (e.g. UNKNOWN_PRODUCER_ID when the broker lost its state); it refuses everything after
        # that, so a new one takes over. Records still queued in the old one are abandoned: their
        # callbacks fail their waiters (503) now, not at their timeout. The callbacks never take _lock.
        with self._lock:
            if self._fatal is None:
                return
            logger.error("bridge producer unusable (%s): starting a new one", self._fatal)
            self._fatal = None
            self.producer = replace_producer(self.producer, self._producer_conf)
            self._producer_since = time.monotonic()

    def _poll_producer(self) -> None:
        try:
            self.producer.poll(0)
        except KafkaException as exc:  # a fatal error surfaces here too; never kill the reply thread
            if exc.args and exc.args[0].fatal():
                self._fatal = exc.args[0]
            logger.warning("bridge producer: %s", exc)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._poll_producer()
            first = self.consumer.poll(0.05)
            if first is None:
                self._check_stalled()
                continue
            # poll() returns at the first reply; consume(timeout=0) takes what is already fetched,
            # so a burst of replies wakes each event loop once, not once per reply.
            messages = [first, *self.consumer.consume(REPLY_BATCH - 1, timeout=0)]
            ready: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[MatchReply], Any]]] = {}
            for msg in messages:
                if msg.error():
                    logger.warning("reply consumer: %s", msg.error())
                    continue
                self._next_offset, self._behind_since = msg.offset() + 1, None
                self._deliver(msg, ready)
            for loop, settled in ready.items():
                loop.call_soon_threadsafe(_settle_all, settled)

    def _check_stalled(self) -> None:
        """Resume with a longer fetch wait when the broker keeps answering our fetches with nothing.

        A fetch whose wait runs out before the broker has read the records is answered empty, with
        no error, and librdkafka asks again at the same offset: when reading always takes longer
        than the wait (Tansu's S3 engine lists every batch object of the partition per fetch, a
        list that grows with the partition), no reply ever arrives. The high watermark that comes
        with those empty answers shows it: the broker has records past our position. The same
        watermark shows a log that now ends before our position (see _rewind_to_start_of_new_log).
        """
        tp = TopicPartition(self.reply_topic, self.reply_partition)
        _, cached_high = self.consumer.get_watermark_offsets(tp, cached=True)
        shrunk = 0 <= cached_high < self._next_offset  # the log now ends before our position
        if not (shrunk or cached_high > self._next_offset):
            self._behind_since = None  # caught up, or nothing fetched yet (OFFSET_INVALID)
            return
        now = time.monotonic()
        if self._behind_since is None:
            self._behind_since = now
            return
        if now - self._behind_since < STALL_S:
            return
        self._behind_since = now  # the next verdict comes STALL_S later at the earliest
        try:  # a broker that is down answers nothing at all: that is no stall, and its watermark is stale
            self.consumer.list_topics(self.reply_topic, timeout=STALL_S)
        except KafkaException:
            return
        if shrunk:
            self._rewind_to_start_of_new_log(cached_high)
        else:
            self._resume_with_longer_wait(cached_high)

    def _rewind_to_start_of_new_log(self, high: int) -> None:
        """Read the reply partition from its start when its log ends before our position.

        The partition was recreated or truncated (a broker that restarted empty, an unclean leader
        election). Apache Kafka answers such a fetch with OFFSET_OUT_OF_RANGE, but Tansu answers it
        empty, so librdkafka would wait at the old position until the new log grows past it, and
        every reply written meanwhile (health probes, matches) would be lost. From the new log's
        start nothing is missed; replies of other bridge lives are dropped by correlation id.
        """
        tp = TopicPartition(self.reply_topic, self.reply_partition)
        try:
            low, _ = self.consumer.get_watermark_offsets(tp, timeout=STALL_S)
        except KafkaException:
            return  # asked again at the next check
        logger.warning("reply partition %s[%d] now ends at offset %d, before our position %d (recreated or "
                       "truncated): reading it again from offset %d", self.reply_topic, self.reply_partition,
                       high, self._next_offset, low)
        self._next_offset = max(low, 0)
        self.consumer.assign([TopicPartition(self.reply_topic, self.reply_partition, self._next_offset)])

    def _resume_with_longer_wait(self, high: int) -> None:
        """A new reply consumer at our position (no reply skipped), with a longer fetch.wait.max.ms."""
        wait = min(FETCH_WAIT_MAX_MS, self.fetch_wait_ms * FETCH_WAIT_GROWTH)
        logger.warning("reply partition %s[%d]: the broker holds replies up to offset %d, but answered every "
                       "fetch at %d with none for %.1fs (fetch.wait.max.ms=%d is shorter than it needs): "
                       "reading on with fetch.wait.max.ms=%d", self.reply_topic, self.reply_partition, high,
                       self._next_offset, STALL_S, self.fetch_wait_ms, wait)
        self._consumer_conf["fetch.wait.max.ms"] = wait
        old, self.consumer = self.consumer, Consumer(self._consumer_conf)
        self.consumer.assign([TopicPartition(self.reply_topic, self.reply_partition, self._next_offset)])
        old.close()

    def _deliver(self, msg: Any, ready: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[MatchReply],
                                                                               Any]]]) -> None:
        headers = msg.headers()
        correlation = next((v for k, v in headers if k == CORRELATION), None) if headers else None
        with self._lock:
            waiter = self._pending.get(correlation) if correlation else None
        if waiter is None:
            return  # a reply for another bridge life or a timed-out request
        outcome: Any
        try:
            outcome = MatchReply.from_avro(self.serde.decode(MATCH_REPLY, msg.value()))
            address = next((v for k, v in headers if k == ADDRESS_HEADER), None)
            if address and self.direct is not None:
                self.direct.routes.learn(partition_for(outcome.event_id, self.request_partitions),
                                         address.decode(errors="replace"))
        except Exception as exc:  # undecodable reply: fail that request loudly
            outcome = exc
        ready.setdefault(waiter[0], []).append((waiter[1], outcome))


def _settle_all(settled: list[tuple[asyncio.Future[Any], Any]]) -> None:
    """On the waiters' loop: each future gets its reply, or the exception that replaced it."""
    for future, outcome in settled:
        if isinstance(outcome, BaseException):
            _set_exception(future, outcome)
        else:
            _set_result(future, outcome)


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
