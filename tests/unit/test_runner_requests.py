"""The indexer's request handling without Kafka: reply partition header, default deadline."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PoisonRecord
from pipeline.headers import CORRELATION, REPLY_PARTITION, REPLY_TOPIC
from pipeline.indexer.core import IndexerConfig, IndexerCore
from pipeline.indexer.stage import DEFAULT_REQUEST_TTL_MS, IndexerStage
from pipeline.kafka import Output
from pipeline.metrics import create_metrics
from pipeline.records import MatchRequest, now_ms
from pipeline.serde import MATCH_REQUEST, SchemaRegistry
from pipeline.settings import IndexerSettings, TopicSettings
from pipeline.stage_api import Incoming
from pipeline.topics import partition_for
from tests.unit.indexer_fakes import nothing_to_restore

DIM = 8
PARTITIONS = 3
SERDE = SchemaRegistry.load()
TOPICS = TopicSettings(prefix="u.", partitions=PARTITIONS)


def stage(tmp_path: Path) -> IndexerStage:
    core = IndexerCore(IndexerConfig(DIM, "test-model", 0.5))
    return IndexerStage(core, SERDE, TOPICS, PARTITIONS, IndexerSettings(state_dir=tmp_path), create_metrics(),
                        nothing_to_restore)


def request(deadline_ms: int = 0, timestamp_ms: int = 0, reply_partition: bytes | None = None) -> Incoming:
    query = MatchRequest("r1", "EV", np.ones(DIM, dtype=np.float32) / np.sqrt(DIM), deadline_ms=deadline_ms)
    headers = {CORRELATION: b"c1", REPLY_TOPIC: b"u.match-replies"}
    if reply_partition is not None:
        headers[REPLY_PARTITION] = reply_partition
    return Incoming(TOPICS.match_requests, partition_for("EV", PARTITIONS), 0, b"EV",
                    SERDE.encode(MATCH_REQUEST, query.to_avro()), headers, timestamp_ms)


def test_reply_goes_to_the_partition_the_header_names(tmp_path: Path) -> None:
    [outcome] = stage(tmp_path).handle([request(reply_partition=struct.pack(">i", 1), timestamp_ms=now_ms())])
    assert isinstance(outcome, list)
    [reply] = outcome
    assert isinstance(reply, Output) and (reply.topic, reply.partition) == ("u.match-replies", 1)


@pytest.mark.parametrize("raw", [struct.pack(">i", -1), b"\x00\x01"])
def test_a_negative_or_malformed_reply_partition_is_poison(tmp_path: Path, raw: bytes) -> None:
    [outcome] = stage(tmp_path).handle([request(reply_partition=raw, timestamp_ms=now_ms())])
    assert isinstance(outcome, PoisonRecord) and outcome.reason == "bad_reply_partition"


def test_a_request_without_a_deadline_expires_after_the_default(tmp_path: Path) -> None:
    indexer = stage(tmp_path)
    old = now_ms() - DEFAULT_REQUEST_TTL_MS - 1000
    assert indexer.handle([request(timestamp_ms=old)]) == [[]]  # dropped, counted as expired
    expired = indexer.metrics.registry.get_sample_value("facematch_records_total",
                                                        {"stage": "indexer", "outcome": "expired"})
    assert expired == 1
    [fresh] = indexer.handle([request(timestamp_ms=now_ms())])
    assert isinstance(fresh, list) and len(fresh) == 1
    # An explicit deadline wins over the record's age.
    [explicit] = indexer.handle([request(deadline_ms=now_ms() + 60_000, timestamp_ms=old)])
    assert isinstance(explicit, list) and len(explicit) == 1
