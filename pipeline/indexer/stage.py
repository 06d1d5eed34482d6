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

import logging
import struct
import time
from collections.abc import Sequence

from confluent_kafka import OFFSET_BEGINNING

from pipeline.errors import PoisonRecord
from pipeline.headers import CORRELATION, REPLY_PARTITION, REPLY_TOPIC
from pipeline.indexer.core import IndexerCore
from pipeline.indexer.state import load_snapshot, remove_stale_snapshots, save_snapshot, snapshot_path
from pipeline.kafka import Output
from pipeline.metrics import Metrics, Probe
from pipeline.records import MatchRequest, PhotoFaces, faces_key, now_ms, parse_faces_key
from pipeline.serde import MATCH_REPLY, MATCH_REQUEST, PHOTO_FACES, SchemaRegistry
from pipeline.settings import IndexerSettings, TopicSettings
from pipeline.stage_api import BaseStage, Control, Incoming, Outcome
from pipeline.topics import SNAPSHOT_MAX_AGE_S, partition_for

logger = logging.getLogger(__name__)

DEFAULT_REQUEST_TTL_MS = 30_000  # deadline of a request that names none, from its timestamp


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
                 partitions: int, settings: IndexerSettings, metrics: Metrics) -> None:
        self.core, self.serde, self.topics, self.partitions = core, serde, topics, partitions
        self.settings, self.metrics = settings, metrics
        self.sensitive_topics = frozenset({topics.match_requests})  # selfie embeddings
        self.replaying: set[int] = set()
        self._last_sweep = 0.0

    # -- records -------------------------------------------------------------
    def handle(self, batch: Sequence[Incoming]) -> list[Outcome]:
        """Faces update the index; requests produce replies."""
        outcomes: list[Outcome] = []
        for item in batch:
            try:
                if item.topic == self.topics.faces:
                    outcomes.append(self._apply(item))
                else:
                    outcomes.append(self._answer(item))
            except PoisonRecord as exc:
                outcomes.append(exc)
        self._update_gauges()
        return outcomes

    def _apply(self, item: Incoming) -> list[Output]:
        try:
            event_id, photo_id = parse_faces_key(item.key)
            if partition_for(event_id, self.partitions) != item.partition:
                raise PoisonRecord("wrong_partition", f"event {event_id} belongs on partition "
                                   f"{partition_for(event_id, self.partitions)}, found on {item.partition}")
            faces = None
            if item.value is not None:
                faces = PhotoFaces.from_avro(self.serde.decode(PHOTO_FACES, item.value))
            erased = self.core.apply_faces(item.partition, item.offset, event_id, photo_id, faces)
            self._observe_searchable(item.partition, event_id, faces)
        finally:
            self.core.cover(item.partition, item.offset)
            if item.partition in self.replaying:
                self.metrics.replay_records.inc()
        if erased:
            logger.info("event %s deleted: tombstoning %d photos", event_id, len(erased))
        return [Output(self.topics.faces, faces_key(event_id, photo), None, item.partition) for photo in erased]

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
            return []  # the caller has given up (HTTP 504 already sent)
        started = time.perf_counter()
        expected = partition_for(request.event_id, self.partitions)
        if expected != item.partition:
            reply = self.core.error_reply(request, f"request for event {request.event_id} sent to "
                                          f"partition {item.partition}, expected {expected}: use murmur2")
        else:
            reply = self.core.answer(item.partition, request)
        self.metrics.match_seconds.observe(time.perf_counter() - started)
        return [Output(reply_topic.decode(), item.key, self.serde.encode(MATCH_REPLY, reply.to_avro()),
                       partition=partition, headers=[(CORRELATION, correlation)])]

    # -- partitions ------------------------------------------------------------
    def on_assign(self, partitions: list[tuple[str, int]], control: Control) -> dict[tuple[str, int], int]:
        """Load snapshots; replay each faces partition from its snapshot's offset."""
        starts = {}
        for topic, partition in partitions:
            if topic != self.topics.faces:
                continue
            path = snapshot_path(self.settings.state_dir, topic, partition)
            state = load_snapshot(path, partition, self.core.config.dim, self.core.config.model_id,
                                  SNAPSHOT_MAX_AGE_S, options=self.core.config.index)
            if state is None:
                self.core.drop(partition)
                starts[(topic, partition)] = OFFSET_BEGINNING
            else:
                self.core.partitions[partition] = state
                starts[(topic, partition)] = state.next_offset
                logger.info("partition %d: snapshot at offset %d (%d events)", partition,
                            state.next_offset, len(state.events))
            self.replaying.add(partition)
        return starts

    def after_assign(self, partitions: list[tuple[str, int]], control: Control) -> None:
        """Hold queries until their faces partition has caught up."""
        for topic, partition in partitions:
            if topic == self.topics.match_requests and partition in self.replaying:
                control.pause(topic, partition)

    def after_batch(self, control: Control) -> None:
        """Resume caught-up partitions; snapshot on schedule."""
        for partition in sorted(self.replaying):
            high = control.high_watermark(self.topics.faces, partition)
            state = self.core.partitions.get(partition)
            position = state.next_offset if state else 0
            if high >= 0 and position >= high:
                self.replaying.discard(partition)
                control.resume(self.topics.match_requests, partition)
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

    def on_revoke(self, partitions: list[tuple[str, int]]) -> None:
        """Snapshot and drop what we no longer own."""
        for topic, partition in partitions:
            if topic == self.topics.faces:
                self._snapshot(partition)
                self.core.drop(partition)
                self.replaying.discard(partition)
        self._update_gauges()

    def close(self) -> None:
        """Snapshot everything on graceful stop."""
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
