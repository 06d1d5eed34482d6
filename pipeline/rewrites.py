"""Notice a partition log that the broker rewrote under a consumer, and say where to read it again.

Apache Kafka fences this with leader epochs (KIP-320): a consumer whose position lies past a
truncated log's end gets OFFSET_OUT_OF_RANGE or a truncation error, and resets. Tansu does
neither. After a SIGKILL its S3 engine can come back with a log that ends a few records before
what it had acknowledged and served, and it answers fetches past that end with nothing; new
records then land at offsets the group had already passed (its committed offsets survived), and
nobody ever reads them. CI lost 8 retried photos that way. A memory-mode broker that restarts is
the extreme case: an empty log, new records from offset 0.

So the runner remembers, per partition, the last records it handled (offset and a digest of
timestamp, key and value). After the broker was unreachable it reads those offsets back: it
resumes right after the newest remembered record that the log still holds unchanged, or at the
log's start when not even the oldest one is still there. Every stage is fine with a record handled
twice (see Runner._redo_undelivered), so rewinding further than needed costs time, never data.

`HandledLog` and `resume_offset` are the pure core; `read_back` is the Kafka shell.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

TP = tuple[str, int]
FROM_START = -2  # librdkafka's OFFSET_BEGINNING: the log's first offset, whatever it is now
DEPTH = 256  # records remembered per partition: covers any plausible lost tail of a broker crash


@dataclass(frozen=True)
class Seen:
    """A handled record: where it was and what it was."""

    offset: int
    digest: bytes


def fingerprint(offset: int, timestamp_ms: int, key: bytes | None, value: bytes | None) -> Seen:
    """Two different records at one offset (a rewritten log) differ here."""
    h = hashlib.blake2b(digest_size=12)
    h.update(timestamp_ms.to_bytes(8, "big", signed=True))
    for part in (key, value):
        h.update(b"\x00" if part is None else b"\x01" + len(part).to_bytes(8, "big") + part)
    return Seen(offset, h.digest())


class HandledLog:
    """The last DEPTH handled records of each partition, oldest first."""

    def __init__(self, depth: int = DEPTH) -> None:
        self.depth = depth
        self._windows: dict[TP, deque[Seen]] = {}

    def remember(self, key: TP, seen: Seen) -> None:
        window = self._windows.setdefault(key, deque(maxlen=self.depth))
        # Read again from an earlier offset (a retry, a rewind): what followed it is history now.
        while window and window[-1].offset >= seen.offset:
            window.pop()
        window.append(seen)

    def window(self, key: TP) -> list[Seen]:
        return list(self._windows.get(key, ()))

    def partitions(self) -> Iterable[TP]:
        return [key for key, window in self._windows.items() if window]


@dataclass(frozen=True)
class LogNow:
    """What the log holds now between the window's first offset and the log's end (`high`)."""

    high: int
    records: Mapping[int, Seen]


def resume_offset(window: Sequence[Seen], now: LogNow) -> int | None:
    """None while the log still holds every remembered record; otherwise where to read again.

    A remembered offset below `high` with no record is a compaction gap, not a rewrite: skipped.
    """
    last_kept: int | None = None
    for seen in window:
        if seen.offset < now.high and seen.offset not in now.records:
            continue  # compacted away (or removed by retention): says nothing either way
        if now.records.get(seen.offset) != seen:
            return FROM_START if last_kept is None else last_kept + 1
        last_kept = seen.offset
    return None


def read_back(consumer_conf: Mapping[str, Any], spans: Mapping[TP, tuple[int, int]],
              timeout_s: float) -> dict[TP, LogNow]:
    """What each partition holds now at offsets first..last (fewer where its log ends sooner).

    Partitions the broker did not answer for in time are left out: nothing can be said about them yet.
    """
    from confluent_kafka import Consumer, TopicPartition  # the pure core above needs no Kafka

    conf = {k: v for k, v in consumer_conf.items() if k not in _GROUP_ONLY and not callable(v)}
    conf.update({"group.id": f"facematch-readback-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
                 "auto.offset.reset": "earliest", "fetch.wait.max.ms": 500})
    consumer = Consumer(conf)
    records: dict[TP, dict[int, Seen]] = {key: {} for key in spans}
    next_offset = {key: first for key, (first, _) in spans.items()}
    done: dict[TP, LogNow] = {}
    try:
        consumer.assign([TopicPartition(topic, partition, first) for (topic, partition), (first, _) in spans.items()])
        deadline = time.monotonic() + timeout_s
        while len(done) < len(spans) and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.5):
                key = (msg.topic(), msg.partition())
                if msg.error() is None and key in records:
                    records[key][msg.offset()] = fingerprint(msg.offset(), msg.timestamp()[1], msg.key(), msg.value())
                    next_offset[key] = max(next_offset[key], msg.offset() + 1)
            for key, (_, last) in spans.items():
                # The watermark that came with the last fetch answer (ListOffsets can be stale on Tansu).
                _, high = consumer.get_watermark_offsets(TopicPartition(*key), cached=True)
                if key not in done and high is not None and high >= 0 and (
                        next_offset[key] > last or next_offset[key] >= high):
                    done[key] = LogNow(int(high), records[key])
        return done
    finally:
        consumer.close()


# Settings that belong to the runner's group membership, not to a throwaway reader.
_GROUP_ONLY = frozenset({"group.instance.id", "partition.assignment.strategy", "enable.auto.offset.store",
                         "auto.commit.interval.ms", "session.timeout.ms", "heartbeat.interval.ms",
                         "max.poll.interval.ms", "statistics.interval.ms"})


STALL_S = 3.0  # a position past the log's end for this long is no fetch in flight: the log was cut
CHECK_EVERY_S = 2.0
RECENT_OUTAGE_S = 600.0  # a rejoin after an outage may hand back committed offsets from the old log
READ_BACK_TIMEOUT_S = 5.0


class RewriteWatch:
    """The runner's side: when to read back, and where each partition must read again.

    It looks (1) at every assigned partition it handled before, once the broker was unreachable
    (librdkafka's "all brokers down"); (2) at partitions assigned again within RECENT_OUTAGE_S of
    such an outage; (3) at any partition whose position stays past the log's end for STALL_S, the
    only sign left to a process that handled nothing there yet (it then reads from the start).
    """

    def __init__(self, consumer: Any, consumer_conf: Mapping[str, Any], stage_name: str) -> None:
        self._consumer, self._conf, self._stage = consumer, dict(consumer_conf), stage_name
        self.handled = HandledLog()
        self._suspect: set[TP] = set()
        self._outage_at: float | None = None
        self._behind_since: dict[TP, float] = {}
        # Where a partition with nothing consumed since its assignment fetches from: asked once per
        # assignment (an OffsetFetch round trip), since nobody else commits for a partition we own.
        self._start_of: dict[TP, int] = {}
        self._next_look = 0.0

    def remember(self, topic: str, partition: int, offset: int, timestamp_ms: int,
                 key: bytes | None, value: bytes | None) -> None:
        self.handled.remember((topic, partition), fingerprint(offset, timestamp_ms, key, value))

    def broker_down(self) -> None:
        self._outage_at = time.monotonic()
        self._suspect.update(self.handled.partitions())

    def assigned(self, keys: Iterable[TP]) -> None:
        """A new assignment: its start is the committed offset again; look again at partitions handled
        before if they come back soon after an outage."""
        keys = list(keys)
        for key in keys:
            self._start_of.pop(key, None)
        if self._outage_at is not None and time.monotonic() - self._outage_at < RECENT_OUTAGE_S:
            self._suspect.update(key for key in keys if self.handled.window(key))

    def retry(self, key: TP) -> None:
        """The rewind could not be applied (the partition was not fetching yet): decide again later."""
        self._start_of.pop(key, None)
        if self.handled.window(key):
            self._suspect.add(key)

    def rewinds(self, assigned: Iterable[TP]) -> dict[TP, int]:
        """Where partitions must read again now (empty almost always; cheap when nothing is suspect)."""
        now = time.monotonic()
        if now < self._next_look:
            return {}
        self._next_look = now + CHECK_EVERY_S
        owned = set(assigned)
        behind = self._past_the_end(owned, now)
        due = (self._suspect & owned) | behind
        if not due or not self._broker_answers(next(iter(due))[0]):
            return {}
        spans = {key: (w[0].offset, w[-1].offset) for key in due if (w := self.handled.window(key))}
        logs = read_back(self._conf, spans, READ_BACK_TIMEOUT_S) if spans else {}
        targets: dict[TP, int] = {}
        for key in due:
            window = self.handled.window(key)
            if window and key not in logs:
                continue  # no answer yet: still suspect, asked again on a later look
            self._suspect.discard(key)
            resume = resume_offset(window, logs[key]) if window else None
            if resume is None and key in behind:
                # Our records are intact but the position lies past the end: read on after them.
                resume = window[-1].offset + 1 if window else FROM_START
            if resume is not None:
                self._behind_since.pop(key, None)
                self._start_of[key] = max(resume, 0)  # where it fetches from now, consumed or not
                # The window stays until those offsets are handled again: a look before then (the
                # rejoin after an outage may reset the position) rewinds again rather than trusting it.
                targets[key] = resume
        return targets

    def _past_the_end(self, owned: set[TP], now: float) -> set[TP]:
        """Partitions whose fetch position has stayed past the log's end for STALL_S."""
        from confluent_kafka import TopicPartition

        behind: set[TP] = set()
        try:
            where = self._fetch_positions([TopicPartition(*key) for key in sorted(owned)])
        except Exception:  # noqa: BLE001 - a rebalance or an outage in between: look again next time
            return behind
        for key, (position, high) in where.items():
            if not 0 <= high < position:
                self._behind_since.pop(key, None)
                continue
            since = self._behind_since.setdefault(key, now)
            if now - since >= STALL_S:
                behind.add(key)
        for key in set(self._behind_since) - owned:
            del self._behind_since[key]
        return behind

    def _fetch_positions(self, tps: list[Any]) -> dict[TP, tuple[int, int]]:
        """(next offset to fetch, log end from the last fetch answer) of partitions that had an answer."""
        where: dict[TP, tuple[int, int]] = {}
        unread = []
        for tp in self._consumer.position(tps):
            _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high is None or high < 0:
                continue  # no fetch answered yet
            if tp.offset >= 0:
                where[(tp.topic, tp.partition)] = (tp.offset, high)
            else:
                unread.append((tp, high))
        unknown = [tp for tp, _ in unread if (tp.topic, tp.partition) not in self._start_of]
        if unknown:  # nothing consumed since the assignment: it fetches from the committed offset
            for tp in self._consumer.committed(unknown, timeout=2):
                self._start_of[(tp.topic, tp.partition)] = tp.offset
        for tp, high in unread:
            start = self._start_of.get((tp.topic, tp.partition), -1)
            if start >= 0:
                where[(tp.topic, tp.partition)] = (start, high)
        return where

    def _broker_answers(self, topic: str) -> bool:
        """A broker that is down answers nothing, and the watermarks we hold are stale: no verdict."""
        try:
            self._consumer.list_topics(topic, timeout=2)
        except Exception:  # noqa: BLE001 - KafkaException: down or unreachable
            return False
        return True
