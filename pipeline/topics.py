"""Topic layout: creation, partitioning by event_id, co-partitioning checks."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.settings import KafkaSettings, TopicSettings

logger = logging.getLogger(__name__)

# Retention bounds for personal data (docs/retention.md derives the end-to-end bounds).
#
# faces (compacted): an event delete writes a tombstone per photo. The cleaner never
# touches the active segment, and a segment rolls on the first append after
# min(segment.ms, max.compaction.lag.ms), so superseded faces are removed within
# FACES_MAX_COMPACTION_LAG_MS (+ cleaner back-off) of the partition's next write.
# Tombstones then stay FACES_DELETE_RETENTION_MS, so any indexer whose snapshot is
# younger than that replays them; SNAPSHOT_MAX_AGE_S keeps a safety margin of half.
FACES_SEGMENT_MS = 3_600_000
FACES_MAX_COMPACTION_LAG_MS = 3_600_000
FACES_MIN_COMPACTION_LAG_MS = 0
FACES_DELETE_RETENTION_MS = 86_400_000
SNAPSHOT_MAX_AGE_S = FACES_DELETE_RETENTION_MS / 1000 / 2

# match-requests carry a selfie's embedding (biometric data) and match-replies name
# the photos it matched; both are useless once the bridge has timed out (seconds).
# Kafka deletes whole segments whose newest record is older than retention.ms, so a
# short segment.ms is what bounds them: a record is gone within
# segment.ms + retention.ms + the broker's log.retention.check.interval.ms (5 min
# default) + file.delete.delay.ms (1 min default), about 9 minutes with these values.
# TopicSettings.request_retention_ms can lower the retention, never raise it above this.
REQUEST_RETENTION_MS = 120_000
REQUEST_SEGMENT_MS = 60_000

# photo-events hold image URLs and precomputed embeddings until the embedder has
# turned them into faces (seconds); a week leaves room to re-embed after an outage.
# Dead letters keep the refused bytes for an operator to inspect and replay, but
# never a selfie (the indexer's dead letters of match requests leave the value out).
PHOTO_EVENTS_RETENTION_MS = 7 * 86_400_000
DLQ_RETENTION_MS = 14 * 86_400_000
LOG_SEGMENT_MS = 86_400_000  # daily segments, so retention is met within a day of its bound


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's Utils.murmur2), as a signed 32-bit int."""
    length = len(data)
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    tail = length % 4
    base = length - tail
    if tail == 3:
        h ^= data[base + 2] << 16
    if tail >= 2:
        h ^= data[base + 1] << 8
    if tail >= 1:
        h ^= data[base]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(event_id: str, partitions: int) -> int:
    """The partition every client (Java, kafka-python, librdkafka murmur2) picks."""
    return (murmur2(event_id.encode()) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class TopicSpec:
    """One topic to create."""

    name: str
    partitions: int
    config: dict[str, str]


def topic_specs(topics: TopicSettings) -> list[TopicSpec]:
    """Every topic of the pipeline with its partitions and configs."""
    retention_ms = min(topics.request_retention_ms, REQUEST_RETENTION_MS)
    short = {"cleanup.policy": "delete", "retention.ms": str(retention_ms),
             "segment.ms": str(min(REQUEST_SEGMENT_MS, retention_ms))}
    compacted = {"cleanup.policy": "compact", "segment.ms": str(FACES_SEGMENT_MS),
                 "min.compaction.lag.ms": str(FACES_MIN_COMPACTION_LAG_MS),
                 "max.compaction.lag.ms": str(FACES_MAX_COMPACTION_LAG_MS),
                 "delete.retention.ms": str(FACES_DELETE_RETENTION_MS)}
    return [
        TopicSpec(topics.photo_events, topics.partitions,
                  {"cleanup.policy": "delete", "retention.ms": str(PHOTO_EVENTS_RETENTION_MS),
                   "segment.ms": str(LOG_SEGMENT_MS)}),
        # The faces topic is the indexes' changelog: compaction keeps the latest
        # faces of each photo and tombstones erase photos, so replay rebuilds state.
        TopicSpec(topics.faces, topics.partitions, compacted),
        # Guests' selfies and exclusions, and what was pushed to them: compacted like faces,
        # so a removal's tombstone erases them within the same bounds (docs/retention.md).
        TopicSpec(topics.guests, topics.partitions, compacted),
        TopicSpec(topics.notifications, topics.partitions, compacted),
        TopicSpec(topics.match_requests, topics.partitions, short),
        TopicSpec(topics.match_replies, topics.reply_partitions, short),
        TopicSpec(topics.dlq, topics.dlq_partitions,
                  {"cleanup.policy": "delete", "retention.ms": str(DLQ_RETENTION_MS),
                   "segment.ms": str(LOG_SEGMENT_MS)}),
    ]


def create_topics(kafka: KafkaSettings, topics: TopicSettings, timeout_s: float = 30.0) -> dict[str, str]:
    """Create every topic; existing ones are left alone (idempotent).

    Configs apply at creation only: an existing topic keeps its configs, so a
    deployment created before these bounds needs `kafka-configs --alter` (docs/retention.md).
    """
    admin = AdminClient(kafka.to_librdkafka())
    new = [NewTopic(s.name, s.partitions, topics.replication_factor, config=s.config)
           for s in topic_specs(topics)]
    outcome: dict[str, str] = {}
    for name, future in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            outcome[name] = "created"
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            outcome[name] = "exists"
    for topic in (topics.match_requests, topics.guests, topics.notifications):
        check_copartitioned(admin, topics.faces, topic)
    return outcome


def partition_count(admin: AdminClient, topic: str, timeout_s: float = 10.0) -> int:
    """Partitions of a topic; raises if it does not exist."""
    metadata = admin.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if metadata is None or metadata.error is not None or not metadata.partitions:
        raise RuntimeError(f"topic {topic} does not exist: run `facematch topics create`")
    return len(metadata.partitions)


def check_copartitioned(admin: AdminClient, first: str, second: str) -> int:
    """Fail fast unless both topics have the same partition count."""
    left, right = partition_count(admin, first), partition_count(admin, second)
    if left != right:
        raise RuntimeError(
            f"{first} has {left} partitions but {second} has {right}: they must be "
            "co-partitioned (same count) so one indexer owns an event's faces and its queries")
    return left


def main(argv: list[str] | None = None) -> int:
    """`facematch topics create|list`."""
    parser = argparse.ArgumentParser(prog="facematch topics")
    parser.add_argument("action", choices=["create", "list"])
    args = parser.parse_args(argv)
    kafka, topics = KafkaSettings(), TopicSettings()
    if args.action == "create":
        for name, state in create_topics(kafka, topics).items():
            print(f"{name}: {state}")
    else:
        admin = AdminClient(kafka.to_librdkafka())
        for spec in topic_specs(topics):
            try:
                print(f"{spec.name}: {partition_count(admin, spec.name)} partitions")
            except RuntimeError as exc:
                print(f"{spec.name}: missing ({exc})")
    return 0
