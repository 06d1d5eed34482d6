"""Erasure on the real broker: an event delete tombstones every photo, replay keeps it gone, no selfie persists."""

from __future__ import annotations

import time
import uuid

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.records import Face, PhotoFaces, faces_key
from pipeline.serde import PHOTO_FACES, SchemaRegistry
from pipeline.topics import partition_for
from tests.integration.helpers import http, match, read_topic, unit_vectors, wait_for, wait_index_size

DIM = 512
PHOTOS = 6


def faces_topic_records(bootstrap: str, topic: str, partition: int) -> list[tuple[int, bytes, bytes | None]]:
    """(offset, key, value) of one faces partition, from the beginning to its current end."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, partition, 0)])
    records: list[tuple[int, bytes, bytes | None]] = []
    deadline, idle_since = time.monotonic() + 20, time.monotonic()
    try:
        while time.monotonic() < deadline and time.monotonic() - idle_since < 2:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                records.append((msg.offset(), msg.key(), msg.value()))
                idle_since = time.monotonic()
    finally:
        consumer.close()
    return records


def test_event_delete_tombstones_every_photo_and_stays_deleted_on_replay(stack) -> None:
    stack.indexer()
    stack.embedder()
    base = stack.bridge()
    vectors = unit_vectors(2 * PHOTOS, DIM, seed=21)
    for event, offset in (("GONE", 0), ("KEEP", PHOTOS)):
        for k in range(PHOTOS):
            body = {"event_id": event, "photo_id": f"p{k}", "embedding": vectors[offset + k].tolist()}
            assert http("POST", f"{base}/api/v2/ingest", body)[0] == 202
    wait_index_size(base, "GONE", vectors[0], PHOTOS)
    wait_index_size(base, "KEEP", vectors[PHOTOS], PHOTOS)

    # A selfie with a recognizable byte pattern; it must not land in any indexer file.
    selfie = np.linspace(0.013, 0.991, DIM, dtype=np.float32)
    selfie /= np.linalg.norm(selfie)
    assert match(base, "GONE", selfie, threshold=-1)[0] == 200

    assert http("DELETE", f"{base}/api/v2/events/GONE")[0] == 202
    partition = partition_for("GONE", stack.topics.partitions)
    expected = {faces_key("GONE", f"p{k}") for k in range(PHOTOS)}

    def tombstoned() -> set[bytes] | None:
        records = faces_topic_records(stack.bootstrap, stack.topics.faces, partition)
        delete_at = [o for o, key, value in records if key == b"GONE" and value is not None]
        if not delete_at:
            return None
        latest = {key: value for _, key, value in records if key in expected}  # compaction's view
        tombs = {key for o, key, value in records if value is None and key in expected and o > delete_at[0]}
        return tombs if tombs == expected and all(v is None for v in latest.values()) else None
    wait_for(tombstoned, 30, "a tombstone for every photo of the deleted event", interval_s=0.5)

    first = stack.procs[0]
    assert first.stop() == 0  # graceful: writes its snapshots
    fresh_state = stack.workdir / "state-fresh"
    stack.indexer("fresh", state_dir=fresh_state)  # no snapshot: replays the faces topic from offset 0

    def replayed() -> dict | None:
        status, body = match(base, "KEEP", vectors[PHOTOS], threshold=0.5)
        return body if status == 200 and body["index_size"] == PHOTOS else None
    wait_for(replayed, 90, "the fresh indexer to replay the faces topic")
    for k in range(PHOTOS):
        status, body = match(base, "GONE", vectors[k], threshold=-1)
        assert status == 200 and body["event_has_faces"] is False and body["matches"] == [], body
        assert body["index_size"] == 0

    # Model identity: faces of another model with the same dimension are dead-lettered, not mixed in.
    serde = SchemaRegistry.load()
    alien = PhotoFaces("KEEP", "alien", model_id="insightface-other", dim=DIM,
                       faces=[Face(bbox=(0, 0, 1, 1), det_score=1.0, embedding=vectors[0])])
    producer = Producer({"bootstrap.servers": stack.bootstrap})
    producer.produce(stack.topics.faces, key=faces_key("KEEP", "alien"),
                     value=serde.encode(PHOTO_FACES, alien.to_avro()),
                     partition=partition_for("KEEP", stack.topics.partitions))
    producer.flush(10)
    [letter] = read_topic(stack.bootstrap, stack.topics.dlq, 1, expect=1)
    assert dict(letter.headers())["dlq.reason"] == b"model_mismatch"
    assert match(base, "KEEP", vectors[0], threshold=0.9)[1]["matches"] == []

    stack.stop_all()
    needle = selfie.astype("<f4").tobytes()
    files = [p for d in (stack.workdir / "state-indexer", fresh_state) for p in d.rglob("*") if p.is_file()]
    assert files, "no indexer wrote a snapshot"
    for path in files:
        assert needle[:256] not in path.read_bytes(), f"selfie embedding found in {path}"
    # Nor in any service's log, as bytes or as printed numbers (logs are shipped and kept for weeks).
    printed = [f"{v:.6f}"[:7] for v in selfie[:3]]
    logs = [p for p in (stack.workdir / "logs").rglob("*") if p.is_file()]
    assert logs, "the services wrote no logs"
    for path in logs:
        text = path.read_bytes()
        assert needle[:64] not in text, f"selfie bytes in {path}"
        assert not all(number.encode() in text for number in printed), f"selfie numbers in {path}"
