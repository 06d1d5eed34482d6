"""The indexer's runner adapter: faces records update IndexerCore, match requests get replies.

The member that owns partition p of the faces topic also owns partition p of
the request topic (range assignor), so it answers queries from local state.
On assignment it loads the partition's snapshot and replays the faces topic
from the snapshot's offset; the partition's requests stay paused until that
replay reaches the end, so no query is answered from a stale index.

facematch_time_to_searchable_seconds is observed for live records only: a
record replayed after an assignment was searchable before (on the previous
owner) or waited out a downtime, and its age would measure that instead of
the pipeline. Replay shows up in the lag and facematch_replay_records_total.
"""

from __future__ import annotations

import functools
import logging
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from confluent_kafka import OFFSET_BEGINNING

from pipeline.direct import ADDRESS_HEADER, NOT_MINE
from pipeline.errors import PoisonRecord
from pipeline.guest_records import (
    GuestRecord,
    MatchNotification,
    guest_key,
    notification_key,
    parse_guest_key,
    parse_notification_key,
)
from pipeline.headers import CORRELATION, REPLY_PARTITION, REPLY_TOPIC
from pipeline.indexer.core import Changes, IndexerCore
from pipeline.indexer.state import load_snapshot, remove_stale_snapshots, save_snapshot, snapshot_path
from pipeline.kafka import Output
from pipeline.metrics import Metrics, Probe
from pipeline.records import MatchReply, MatchRequest, PhotoFaces, check_id, faces_key, now_ms, parse_faces_key_model
from pipeline.restore import TP, Restored
from pipeline.serde import GUEST, MATCH_NOTIFICATION, MATCH_REPLY, MATCH_REQUEST, PHOTO_FACES, SchemaRegistry
from pipeline.settings import IndexerSettings, TopicSettings
from pipeline.stage_api import BaseStage, Control, Incoming, Outcome
from pipeline.topics import SNAPSHOT_MAX_AGE_S, partition_for

logger = logging.getLogger(__name__)

DEFAULT_REQUEST_TTL_MS = 30_000  # deadline of a request that names none, from its timestamp

Method = TypeVar("Method", bound=Callable[..., Any])


def _locked(method: Method) -> Method:
    """Runs under the stage's lock: direct queries read the index from another thread."""
    @functools.wraps(method)
    def wrapper(self: IndexerStage, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


def _reply_partition(raw: bytes | None) -> int | None:
    """The kafka_replyPartition header (4-byte big-endian); None lets the partitioner choose."""
    if not raw:
        return None
    if len(raw) != 4:
        raise PoisonRecord("bad_reply_partition", f"{REPLY_PARTITION} must be 4 bytes, got {len(raw)}")
    partition = int(struct.unpack(">i", raw)[0])
    if partition < 0:
        raise PoisonRecord("bad_reply_partition", f"{REPLY_PARTITION} is negative: {partition}")
    return partition


class IndexerStage(BaseStage):
    """Adapter between the runner and IndexerCore."""

    name = "indexer"

    def __init__(self, core: IndexerCore, serde: SchemaRegistry, topics: TopicSettings,
                 partitions: int, settings: IndexerSettings, metrics: Metrics,
                 restore: Callable[[Sequence[TP]], dict[TP, Restored]]) -> None:
        self.core, self.serde, self.topics, self.partitions = core, serde, topics, partitions
        self.settings, self.metrics, self.restore = settings, metrics, restore
        # Selfie embeddings: match requests, and guests' enrolled selfies and exclusion templates.
        self.sensitive_topics = frozenset({topics.match_requests, topics.guests})
        self.replaying: set[int] = set()
        self._guests_next: dict[int, int] = {}  # next guests offset per partition (a lower one is a redo)
        self._reconcile: dict[int, list[Output]] = {}  # pushed with the partition's next record
        self._last_sweep = 0.0
        # Direct queries (pipeline/direct.py): the runner thread changes the index under this lock,
        # the listener's threads answer under it. `polling` says the runner still polls, so a member
        # that lost its partitions hears of it (librdkafka reports a lost assignment in poll()).
        self.lock = threading.RLock()
        self.owned: set[int] = set()
        self.query_address: bytes | None = None  # advertised in every reply sent through Kafka
        self.polling: Callable[[], bool] = lambda: True

    # -- records -------------------------------------------------------------
    @_locked
    def handle(self, batch: Sequence[Incoming]) -> list[Outcome]:
        """Faces update the index; requests produce replies."""
        outcomes: list[Outcome] = []
        for item in batch:
            try:
                if item.topic == self.topics.faces:
                    outputs = self._apply(item)
                elif item.topic == self.topics.guests:
                    outputs = self._apply_guest(item)
                else:
                    outputs = self._answer(item)
                outcomes.append(outputs + self._reconcile.pop(item.partition, []))
            except PoisonRecord as exc:
                outcomes.append(exc)
        self._update_gauges()
        return outcomes

    def _apply(self, item: Incoming) -> list[Output]:
        state = self.core.partitions.get(item.partition)
        again = state is not None and item.offset < state.next_offset  # redone: outputs were not delivered
        try:
            event_id, photo_id, key_model = parse_faces_key_model(item.key)
            self._check_partition(event_id, item.partition)
            faces = None
            if item.value is not None:
                faces = PhotoFaces.from_avro(self.serde.decode(PHOTO_FACES, item.value))
            changes = self.core.apply_faces(item.partition, item.offset, event_id, photo_id, faces, again, key_model)
            self._observe_searchable(item.partition, event_id, faces)
        finally:
            self.core.cover(item.partition, item.offset)
            if item.partition in self.replaying:
                self.metrics.replay_records.inc()
        if changes.erased_photos and faces is not None and faces.op != "UPSERT":
            logger.info("event %s: %s, tombstoning %d photos", event_id, faces.op.lower(), len(changes.erased_photos))
        live = faces is not None and item.partition not in self.replaying and faces.occurred_at > 0
        for _ in changes.notifications:
            if live and faces is not None:
                self.metrics.time_to_notified.observe(max(0, now_ms() - faces.occurred_at) / 1000)
        return self._outputs(event_id, item.partition, changes, "photo")

    def _apply_guest(self, item: Incoming) -> list[Output]:
        again = item.offset < self._guests_next.get(item.partition, 0)
        self._guests_next[item.partition] = max(item.offset + 1, self._guests_next.get(item.partition, 0))
        event_id, guest_id = parse_guest_key(item.key)
        check_id("guest_id", guest_id)
        self._check_partition(event_id, item.partition)
        record = None
        if item.value is not None:
            record = GuestRecord.from_avro(self.serde.decode(GUEST, item.value))
            if (record.event_id, record.guest_id) != (event_id, guest_id):
                raise PoisonRecord("invalid_key", f"guests record of {record.event_id}/{record.guest_id} "
                                   f"under key {event_id}/{guest_id}")
        changes = self.core.apply_guest(item.partition, event_id, guest_id, record, again)
        logger.info("guest %s of event %s: %s (%d photos pushed, %d withdrawn)", guest_id, event_id,
                    "removed" if record is None else record.op.lower(), len(changes.notifications),
                    len(changes.withdrawn))
        return self._outputs(event_id, item.partition, changes, "enrol")

    def _outputs_of(self, notifications: list[MatchNotification], partition: int) -> list[Output]:
        self.metrics.notifications.labels("reconcile").inc(len(notifications))
        return [Output(self.topics.notifications, n.key, self.serde.encode(MATCH_NOTIFICATION, n.to_avro()),
                       partition) for n in notifications]

    def _check_partition(self, event_id: str, partition: int) -> None:
        expected = partition_for(event_id, self.partitions)
        if expected != partition:
            raise PoisonRecord("wrong_partition", f"event {event_id} belongs on partition {expected}, "
                               f"found on {partition}")

    def _outputs(self, event_id: str, partition: int, changes: Changes, kind: str) -> list[Output]:
        """Everything a change publishes; all of it stays on the event's partition."""
        topics, encode = self.topics, self.serde.encode
        outputs = [Output(topics.faces, faces_key(event_id, photo), None, partition)
                   for photo in changes.erased_photos]
        outputs += [Output(topics.faces, faces_key(event_id, tail), encode(PHOTO_FACES, f.to_avro()), partition)
                    for tail, f in changes.rewrites]
        outputs += [Output(topics.guests, guest_key(event_id, g), None, partition) for g in changes.erased_guests]
        outputs += [Output(topics.guests, guest_key(event_id, g.guest_id), encode(GUEST, g.to_avro()), partition)
                    for g in changes.guests]
        outputs += [Output(topics.notifications, notification_key(event_id, guest, photo), None, partition)
                    for guest, photo in changes.withdrawn]
        outputs += [Output(topics.notifications, n.key, encode(MATCH_NOTIFICATION, n.to_avro()), partition)
                    for n in changes.notifications]
        if changes.notifications:
            self.metrics.notifications.labels(kind).inc(len(changes.notifications))
        if changes.withdrawn:
            self.metrics.notifications.labels("withdrawn").inc(len(changes.withdrawn))
        return outputs

    def _observe_searchable(self, partition: int, event_id: str, faces: PhotoFaces | None) -> None:
        """Photo event -> faces applied, for live upserts that carry their event's time."""
        if faces is None or faces.op != "UPSERT" or faces.occurred_at <= 0 or partition in self.replaying:
            return
        state = self.core.partitions.get(partition)
        index = state.events.get(event_id) if state else None
        if index is None or faces.photo_id not in index.photo_faces:
            return  # superseded by a later delete: never became searchable
        # Clocks of producers and indexers differ a little: never a negative latency.
        self.metrics.time_to_searchable.observe(max(0, now_ms() - faces.occurred_at) / 1000)

    def readiness(self) -> Probe:
        """Ready when no owned faces partition is still replaying (its queries are paused)."""
        replaying = sorted(self.replaying.copy())  # copy(): atomic while the poll thread changes it
        return Probe(not replaying, {"replaying": replaying})

    def _answer(self, item: Incoming) -> list[Output]:
        reply_topic = item.headers.get(REPLY_TOPIC)
        correlation = item.headers.get(CORRELATION)
        if not reply_topic or not correlation:
            raise PoisonRecord("no_reply_topic", f"match request lacks {REPLY_TOPIC}/{CORRELATION} headers")
        partition = _reply_partition(item.headers.get(REPLY_PARTITION))
        request = MatchRequest.from_avro(self.serde.decode(MATCH_REQUEST, item.value))
        # A request without a deadline still expires: after an outage nobody
        # waits for answers to requests queued long ago.
        received = item.timestamp_ms if item.timestamp_ms > 0 else now_ms()
        deadline = request.deadline_ms or received + DEFAULT_REQUEST_TTL_MS
        if deadline < now_ms():
            self.metrics.records.labels(self.name, "expired").inc()
            logger.info("match request %s at %s[%d]@%d read %d ms after it was produced, past its deadline: "
                        "not answered", request.request_id, item.topic, item.partition, item.offset,
                        now_ms() - received)
            return []  # the caller has given up (HTTP 504 already sent)
        expected = partition_for(request.event_id, self.partitions)
        if expected != item.partition:
            reply = self.core.error_reply(request, f"request for event {request.event_id} sent to "
                                          f"partition {item.partition}, expected {expected}: use murmur2")
        else:
            reply = self._search(item.partition, request)
        headers = [(CORRELATION, correlation)]
        if self.query_address is not None:
            headers.append((ADDRESS_HEADER, self.query_address))
        return [Output(reply_topic.decode(), item.key, self.serde.encode(MATCH_REPLY, reply.to_avro()),
                       partition=partition, headers=headers)]

    def answer_direct(self, payload: bytes) -> bytes:
        """A direct query: its reply record, or NOT_MINE unless the event's partition is ours and caught up."""
        try:
            request = MatchRequest.from_avro(self.serde.decode(MATCH_REQUEST, payload))
        except PoisonRecord as exc:  # the Kafka path dead-letters it with its reason
            logger.warning("direct query: %s", exc)
            return NOT_MINE
        partition = partition_for(request.event_id, self.partitions)
        with self.lock:
            if partition not in self.owned or partition in self.replaying or not self.polling():
                self.metrics.direct_queries.labels("not_mine").inc()
                return NOT_MINE
            reply = self._search(partition, request)
        self.metrics.direct_queries.labels("answered").inc()
        return self.serde.encode(MATCH_REPLY, reply.to_avro())

    def _search(self, partition: int, request: MatchRequest) -> MatchReply:
        """The answer from the partition's index, timed into facematch_match_seconds (both paths)."""
        started = time.perf_counter()
        reply = self.core.answer(partition, request)
        self.metrics.match_seconds.observe(time.perf_counter() - started)
        return reply

    # -- partitions ------------------------------------------------------------
    @_locked
    def on_assign(self, partitions: list[tuple[str, int]], control: Control) -> dict[tuple[str, int], int]:
        """Load snapshots; restore guests; replay each faces partition from its snapshot's offset."""
        starts: dict[tuple[str, int], int] = {}
        owned = sorted(p for t, p in partitions if t == self.topics.faces)
        for partition in owned:
            topic = self.topics.faces
            path = snapshot_path(self.settings.state_dir, topic, partition)
            state = load_snapshot(path, partition, self.core.config.dim, self.core.config.model_id,
                                  SNAPSHOT_MAX_AGE_S, options=self.core.config.index,
                                  accepted=self.core.config.accepted)
            if state is None:
                self.core.drop(partition)
                starts[(topic, partition)] = OFFSET_BEGINNING
            else:
                self.core.partitions[partition] = state
                starts[(topic, partition)] = state.next_offset
                logger.info("partition %d: snapshot at offset %d (%d events)", partition,
                            state.next_offset, len(state.events))
            self.replaying.add(partition)
            self.owned.add(partition)
        starts.update(self._restore_guests(owned))
        # Now, not at the next record: with direct queries no record may come for a long time
        # (a snapshot that is up to date, queries answered over HTTP), and the gauge read 0.
        self._update_gauges()
        return starts

    def _restore_guests(self, owned: list[int]) -> dict[tuple[str, int], int]:
        """Enrolments, exclusions and what was pushed, read whole from their compacted topics.

        Nothing is pushed here: once the faces partition has caught up, anything
        matching an enrolled guest and never pushed is (see after_batch).
        """
        topics = self.topics
        restored = self.restore([(t, p) for p in owned for t in (topics.notifications, topics.guests)])
        starts = {}
        for partition in owned:
            for key, value in restored[(topics.notifications, partition)].records:
                try:
                    event_id, guest_id, photo_id = parse_notification_key(key)
                except PoisonRecord:
                    continue  # not ours to judge: the topic's consumers dead-letter it
                self.core.restore_notification(partition, event_id, guest_id, photo_id, value is not None)
            guests = restored[(topics.guests, partition)]
            for key, value in guests.records:
                try:
                    event_id, guest_id = parse_guest_key(key)
                    record = None if value is None else GuestRecord.from_avro(self.serde.decode(GUEST, value))
                    self.core.restore_guest(partition, event_id, guest_id, record)
                except PoisonRecord as exc:  # was dead-lettered when it first arrived
                    logger.warning("partition %d: skipping guests record %r: %s", partition, key, exc)
            self._guests_next[partition] = guests.end
            starts[(topics.guests, partition)] = guests.end
        return starts

    @_locked
    def after_assign(self, partitions: list[tuple[str, int]], control: Control) -> None:
        """Hold queries until their faces partition has caught up."""
        for topic, partition in partitions:
            if topic == self.topics.match_requests and partition in self.replaying:
                control.pause(topic, partition)

    @_locked
    def after_batch(self, control: Control) -> None:
        """Resume caught-up partitions; snapshot on schedule."""
        for partition in sorted(self.replaying):
            high = control.high_watermark(self.topics.faces, partition)
            state = self.core.partitions.get(partition)
            position = state.next_offset if state else 0
            if high >= 0 and position >= high:
                self.replaying.discard(partition)
                control.resume(self.topics.match_requests, partition)
                found = self.core.reconcile(partition)
                if found:
                    logger.info("partition %d: %d matches of enrolled guests were never pushed", partition, len(found))
                    pending = self._reconcile.setdefault(partition, [])
                    pending += self._outputs_of(found, partition)
                logger.info("partition %d caught up at offset %d: answering queries", partition, high)
        now = time.monotonic()
        for state in list(self.core.partitions.values()):
            due = now - state.last_snapshot >= self.settings.snapshot_interval_s
            # A quiet partition's snapshot is refreshed too, so it never ages past SNAPSHOT_MAX_AGE_S.
            stale = now - state.last_snapshot >= SNAPSHOT_MAX_AGE_S / 2 and state.partition not in self.replaying
            if (due and state.dirty_records >= self.settings.snapshot_min_records) or stale:
                self._snapshot(state.partition, force=stale)
        if now - self._last_sweep >= self.settings.snapshot_interval_s:
            self._last_sweep = now
            self._sweep_snapshots()

    @_locked
    def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        """Snapshot and drop what we no longer own."""
        for topic, partition in partitions:
            if topic == self.topics.faces:
                self.owned.discard(partition)
                self._snapshot(partition)
                self.core.drop(partition)
                self.replaying.discard(partition)
                self._reconcile.pop(partition, None)
                self._guests_next.pop(partition, None)
        self._update_gauges()

    @_locked
    def close(self) -> None:
        """Snapshot everything on graceful stop."""
        self.owned.clear()
        for partition in list(self.core.partitions):
            self._snapshot(partition)

    def _snapshot(self, partition: int, force: bool = False) -> None:
        state = self.core.partitions.get(partition)
        if state is None or (state.dirty_records == 0 and not force):
            return
        if state.pending_tombstones:
            # Until our tombstones come back through the faces topic, no snapshot
            # may cover the delete: replay from the older one re-emits them.
            logger.info("partition %d: %d events await their tombstones; snapshot deferred",
                        partition, len(state.pending_tombstones))
            return
        save_snapshot(state, snapshot_path(self.settings.state_dir, self.topics.faces, partition))
        self.metrics.snapshots.inc()

    def _sweep_snapshots(self) -> None:
        owned = {snapshot_path(self.settings.state_dir, self.topics.faces, p) for p in self.core.partitions}
        directory = snapshot_path(self.settings.state_dir, self.topics.faces, 0).parent
        for path in remove_stale_snapshots(directory, owned, SNAPSHOT_MAX_AGE_S):
            logger.info("removed %s: not owned and too old to load", path)

    def _update_gauges(self) -> None:
        states = self.core.partitions.values()
        self.metrics.index_faces.set(sum(s.faces for s in states))
        self.metrics.index_events.set(sum(len(s.events) for s in states))
