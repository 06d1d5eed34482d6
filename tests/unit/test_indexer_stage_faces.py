"""The indexer stage's faces path without Kafka: event deletes become tombstones, snapshots hold no selfies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.headers import CORRELATION, REPLY_TOPIC
from pipeline.indexer.core import IndexerConfig, IndexerCore
from pipeline.indexer.stage import IndexerStage
from pipeline.indexer.state import snapshot_path
from pipeline.metrics import create_metrics
from pipeline.records import Face, MatchReply, MatchRequest, PhotoFaces, faces_key
from pipeline.serde import MATCH_REPLY, MATCH_REQUEST, PHOTO_FACES, SchemaRegistry
from pipeline.settings import IndexerSettings, TopicSettings
from pipeline.stage_api import Incoming
from pipeline.topics import partition_for
from tests.unit.indexer_fakes import CaughtUp, nothing_to_restore

DIM = 16
PARTITIONS = 3


@pytest.fixture
def serde() -> SchemaRegistry:
    return SchemaRegistry.load()


@pytest.fixture
def stage(tmp_path: Path, serde: SchemaRegistry) -> IndexerStage:
    core = IndexerCore(IndexerConfig(dim=DIM, model_id="m", default_threshold=0.3))
    settings = IndexerSettings(state_dir=tmp_path / "state", snapshot_interval_s=0.0)
    return IndexerStage(core, serde, TopicSettings(prefix="u."), PARTITIONS, settings, create_metrics(),
                        nothing_to_restore)


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def faces_record(serde: SchemaRegistry, offset: int, event: str, photo_id: str | None,
                 faces: PhotoFaces | None) -> Incoming:
    value = None if faces is None else serde.encode(PHOTO_FACES, faces.to_avro())
    return Incoming("u.faces", partition_for(event, PARTITIONS), offset, faces_key(event, photo_id), value)


def upload(serde: SchemaRegistry, offset: int, event: str, photo_id: str, seed: int) -> Incoming:
    face = Face(bbox=(0, 0, 1, 1), det_score=1.0, embedding=unit(seed))
    return faces_record(serde, offset, event, photo_id, PhotoFaces(event, photo_id, "m", DIM, faces=[face]))


def test_event_delete_produces_a_tombstone_per_photo_on_the_event_partition(
        stage: IndexerStage, serde: SchemaRegistry) -> None:
    batch = [upload(serde, i, "EV", f"p{i}", i) for i in range(3)]
    batch.append(faces_record(serde, 3, "EV", None, PhotoFaces("EV", "", "m", DIM, op="DELETE_EVENT")))
    outcomes = stage.handle(batch)
    assert outcomes[:3] == [[], [], []]
    tombstones = outcomes[3]
    assert isinstance(tombstones, list)
    assert [(o.topic, o.key, o.value, o.partition) for o in tombstones] == [
        ("u.faces", f"EV/p{i}".encode(), None, partition_for("EV", PARTITIONS)) for i in range(3)]
    # The tombstones come back through the faces topic; a replayed delete then finds nothing to erase.
    stage.handle([faces_record(serde, 4 + i, "EV", f"p{i}", None) for i in range(3)])
    again = stage.handle([faces_record(serde, 3, "EV", None, PhotoFaces("EV", "", "m", DIM, op="DELETE_EVENT"))])
    assert again == [[]]


def test_no_snapshot_covers_a_delete_until_its_tombstones_are_on_the_topic(
        stage: IndexerStage, serde: SchemaRegistry) -> None:
    partition = partition_for("EV", PARTITIONS)
    path = snapshot_path(stage.settings.state_dir, "u.faces", partition)
    stage.handle([upload(serde, 0, "EV", "p0", 0)])
    stage.after_batch(CaughtUp(stage))
    assert path.exists()  # snapshot at offset 1
    before = path.read_bytes()
    stage.handle([faces_record(serde, 1, "EV", None, PhotoFaces("EV", "", "m", DIM, op="DELETE_EVENT"))])
    stage.after_batch(CaughtUp(stage))
    stage.close()  # e.g. delivery failed and the runner is shutting down
    assert path.read_bytes() == before  # replay from offset 1 will emit the tombstone again
    stage.handle([faces_record(serde, 2, "EV", "p0", None)])  # the tombstone, read back
    stage.after_batch(CaughtUp(stage))
    assert path.read_bytes() != before


def test_snapshots_never_hold_the_selfie_embedding(stage: IndexerStage, serde: SchemaRegistry) -> None:
    for i in range(4):
        stage.handle([upload(serde, i, "EV", f"p{i}", i)])
    selfie = np.linspace(0.11, 0.97, DIM, dtype=np.float32)
    selfie /= np.linalg.norm(selfie)
    request = MatchRequest("req-1", "EV", selfie, top_k=3, threshold=-1.0)
    incoming = Incoming("u.match-requests", partition_for("EV", PARTITIONS), 0, b"EV",
                        serde.encode(MATCH_REQUEST, request.to_avro()),
                        headers={REPLY_TOPIC: b"u.match-replies", CORRELATION: b"req-1"})
    [outcome] = stage.handle([incoming])
    assert isinstance(outcome, list)
    reply = MatchReply.from_avro(serde.decode(MATCH_REPLY, outcome[0].value))
    assert reply.status == "OK" and len(reply.matches) == 3
    stage.after_batch(CaughtUp(stage))
    stage.close()
    files = [p for p in stage.settings.state_dir.rglob("*") if p.is_file()]
    assert files, "the indexer wrote no snapshot"
    needle = selfie.astype("<f4").tobytes()
    indexed_face = unit(0).astype("<f4").tobytes()  # control: the search does find stored vectors
    assert any(indexed_face in path.read_bytes() for path in files)
    for path in files:
        data = path.read_bytes()
        assert needle not in data and needle[: DIM * 2] not in data, path
