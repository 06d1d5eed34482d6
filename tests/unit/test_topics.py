"""Partitioning must agree with the Java client (kafka-python implements the same murmur2)."""

from __future__ import annotations

import random

from kafka.partitioner.default import murmur2 as kafka_python_murmur2

from pipeline.records import faces_key, parse_faces_key
from pipeline.topics import murmur2, partition_for


def test_murmur2_matches_kafka_python_on_many_keys() -> None:
    rng = random.Random(7)
    keys = [b"", b"a", b"EVENT123"] + [rng.randbytes(rng.randint(1, 40)) for _ in range(500)]
    for key in keys:
        assert murmur2(key) & 0x7FFFFFFF == kafka_python_murmur2(key) & 0x7FFFFFFF, key


def test_known_java_partitions() -> None:
    # Values from the Java client's Utils.murmur2 (also asserted in kafka-python's tests).
    assert murmur2(b"21") == -973932308
    assert murmur2(b"foobar") == -790332482
    assert partition_for("EVENT123", 12) == (murmur2(b"EVENT123") & 0x7FFFFFFF) % 12


def test_faces_key_round_trip() -> None:
    assert parse_faces_key(faces_key("E1", "p1")) == ("E1", "p1")
    assert parse_faces_key(faces_key("E1", None)) == ("E1", None)


def test_topic_configs_bound_how_long_personal_data_stays() -> None:
    """What create_topics asks the broker for (Tansu's describe_configs answers nothing, so no broker here)."""
    from pipeline.settings import TopicSettings
    from pipeline.topics import SNAPSHOT_MAX_AGE_S, topic_specs

    topics = TopicSettings(prefix="x.")
    specs = {spec.name: spec.config for spec in topic_specs(topics)}
    faces = specs[topics.faces]
    assert faces["cleanup.policy"] == "compact"
    # Erased faces leave within an hour of the partition's next write; tombstones outlive any loadable snapshot.
    assert int(faces["segment.ms"]) <= 3_600_000 and int(faces["max.compaction.lag.ms"]) <= 3_600_000
    assert int(faces["min.compaction.lag.ms"]) <= int(faces["max.compaction.lag.ms"])
    assert int(faces["delete.retention.ms"]) >= 2 * SNAPSHOT_MAX_AGE_S * 1000
    for name in (topics.match_requests, topics.match_replies):
        config = specs[name]
        assert config["cleanup.policy"] == "delete"
        # Selfie embeddings: gone within minutes, not the 7-day default segment age.
        assert 60_000 <= int(config["retention.ms"]) <= 300_000
        assert int(config["segment.ms"]) <= int(config["retention.ms"])
    for name in (topics.photo_events, topics.dlq):  # every topic has a stated bound, none the broker default
        assert int(specs[name]["retention.ms"]) <= 14 * 86_400_000 and int(specs[name]["segment.ms"]) <= 86_400_000
    shorter = {s.name: s.config for s in topic_specs(TopicSettings(prefix="x.", request_retention_ms=30_000))}
    assert shorter[topics.match_requests]["retention.ms"] == "30000"
    assert int(shorter[topics.match_requests]["segment.ms"]) <= 30_000


def test_create_topics_passes_the_configs(monkeypatch) -> None:
    from confluent_kafka.admin import NewTopic

    from pipeline import topics as topics_module
    from pipeline.settings import KafkaSettings, TopicSettings

    asked: list[NewTopic] = []

    class FakeFuture:
        def result(self, timeout: float) -> None:
            return None

    class FakeAdmin:
        def __init__(self, conf: dict) -> None:
            pass

        def create_topics(self, new: list[NewTopic], request_timeout: float) -> dict[str, FakeFuture]:
            asked.extend(new)
            return {t.topic: FakeFuture() for t in new}

    monkeypatch.setattr(topics_module, "AdminClient", FakeAdmin)
    monkeypatch.setattr(topics_module, "check_copartitioned", lambda admin, a, b: 12)
    settings = TopicSettings(prefix="y.")
    topics_module.create_topics(KafkaSettings(), settings)
    by_name = {t.topic: t for t in asked}
    assert by_name[settings.match_requests].config["segment.ms"] == str(topics_module.REQUEST_SEGMENT_MS)
    assert by_name[settings.faces].config["delete.retention.ms"] == str(topics_module.FACES_DELETE_RETENTION_MS)
