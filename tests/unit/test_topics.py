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
