"""A guest's match notifications, read from the compacted match-notifications topic.

The topic holds one record per guest and photo (later tombstoned if the photo
is deleted or the guest forgotten); the indexer may publish a record twice
when it redoes undelivered work, so readers dedupe by photo: each photo is
shown to the guest once. A stream reads the event's partition from its
beginning (everything pushed so far), then follows it; `after` (the SSE
Last-Event-ID) skips what the client already has.

Each stream owns one consumer and one thread: fine for thousands of guests per
bridge; beyond that, fan out from one consumer per partition.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from pipeline.guest_records import MatchNotification, notification_key
from pipeline.restore import read_to_end
from pipeline.serde import MATCH_NOTIFICATION, SchemaRegistry
from pipeline.topics import partition_for

POLL_S = 0.5


@dataclass(frozen=True)
class Entry:
    """One change a guest sees: a notification, or its withdrawal (notification None)."""

    offset: int
    photo_id: str
    notification: MatchNotification | None


class NotificationReader:
    """Reads the notifications of one guest of one event."""

    def __init__(self, conf: dict[str, Any], topic: str, partitions: int, serde: SchemaRegistry) -> None:
        self.conf, self.topic, self.partitions, self.serde = conf, topic, partitions, serde

    def current(self, event_id: str, guest_id: str) -> list[Entry]:
        """What the guest has now (blocking): one entry per photo, oldest first."""
        where = (self.topic, partition_for(event_id, self.partitions))
        restored = read_to_end(self.conf, [where])[where]
        fold = _Fold(notification_key(event_id, guest_id, ""), -1, self.serde)
        latest: dict[str, Entry] = {}
        for offset, (key, value) in zip(restored.offsets, restored.records):
            for entry in fold.take(key, value, offset):
                if entry.notification is None:
                    latest.pop(entry.photo_id, None)
                else:
                    latest[entry.photo_id] = entry
        return sorted(latest.values(), key=lambda e: e.offset)

    async def follow(self, event_id: str, guest_id: str, after: int = -1) -> AsyncIterator[Entry | None]:
        """Every entry after offset `after`, then new ones as they come; None every POLL_S while idle."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[Message]] = asyncio.Queue()
        stop = threading.Event()
        partition = partition_for(event_id, self.partitions)
        thread = threading.Thread(target=self._poll, args=(partition, loop, queue, stop),
                                  name=f"notifications-{guest_id[:16]}", daemon=True)
        thread.start()
        fold = _Fold(notification_key(event_id, guest_id, ""), after, self.serde)
        try:
            while True:
                try:
                    batch = await asyncio.wait_for(queue.get(), POLL_S)
                except asyncio.TimeoutError:
                    yield None
                    continue
                for msg in batch:
                    for entry in fold.take(msg.key(), msg.value(), int(msg.offset())):
                        yield entry
        finally:
            stop.set()  # the thread closes its consumer (a consumer is used by one thread only)

    def _poll(self, partition: int, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[list[Message]],
              stop: threading.Event) -> None:
        consumer = Consumer({**self.conf, "group.id": f"facematch-notify-{uuid.uuid4().hex[:12]}",
                             "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        try:
            consumer.assign([TopicPartition(self.topic, partition, OFFSET_BEGINNING)])
            while not stop.is_set():
                # poll() returns on the first record; consume(n, timeout) would wait out the timeout for n.
                first = consumer.poll(POLL_S)
                if first is None:
                    continue
                batch = [m for m in [first, *consumer.consume(499, timeout=0)] if m.error() is None]
                if batch and not stop.is_set():
                    loop.call_soon_threadsafe(queue.put_nowait, batch)
        except RuntimeError:
            return  # the event loop closed under us: nobody is listening
        finally:
            consumer.close()


class _Fold:
    """Turns a partition's records into one guest's entries: dedupe by photo, withdrawals once."""

    def __init__(self, prefix: bytes, after: int, serde: SchemaRegistry) -> None:
        self.prefix, self.after, self.serde = prefix, after, serde
        self.shown: set[str] = set()

    def take(self, key: bytes | None, value: bytes | None, offset: int) -> list[Entry]:
        if not key or not key.startswith(self.prefix):
            return []
        photo_id = key[len(self.prefix):].decode("utf-8", errors="replace")
        if value is None:
            if photo_id not in self.shown:
                return []
            self.shown.discard(photo_id)
            return [Entry(offset, photo_id, None)] if offset > self.after else []
        if photo_id in self.shown:
            return []  # pushed again after a redo: the guest has it
        self.shown.add(photo_id)
        if offset <= self.after:
            return []
        notification = MatchNotification.from_avro(self.serde.decode(MATCH_NOTIFICATION, value))
        return [Entry(offset, photo_id, notification)]
