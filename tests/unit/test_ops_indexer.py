"""Freshness of answers and time-to-searchable, without Kafka: newest_face_at, the histogram, readiness."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.indexer.core import IndexerConfig, IndexerCore
from pipeline.indexer.stage import IndexerStage
from pipeline.indexer.state import load_snapshot, save_snapshot
from pipeline.metrics import create_metrics
from pipeline.records import Face, MatchReply, MatchRequest, PhotoFaces, faces_key, iso_utc, now_ms
from pipeline.serde import MATCH_REPLY, PHOTO_FACES, SCHEMA_DIR, SchemaRegistry
from pipeline.settings import IndexerSettings, TopicSettings
from pipeline.stage_api import Incoming
from pipeline.topics import partition_for
from tests.unit.indexer_fakes import CaughtUp, nothing_to_restore

DIM = 8
PARTITIONS = 3
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@pytest.fixture(scope="module")
def serde() -> SchemaRegistry:
    return SchemaRegistry.load()


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def photo(event: str, photo_id: str, occurred_at: int, faces: int = 1) -> PhotoFaces:
    return PhotoFaces(event, photo_id, "m", DIM, occurred_at=occurred_at,
                      faces=[Face(bbox=(0, 0, 1, 1), det_score=1.0, embedding=unit(i)) for i in range(faces)])


def ask(core: IndexerCore, event: str) -> MatchReply:
    return core.answer(0, MatchRequest("r", event, unit(0), top_k=5, threshold=-1.0))


@pytest.fixture
def core() -> IndexerCore:
    return IndexerCore(IndexerConfig(dim=DIM, model_id="m", default_threshold=0.3))


def test_reply_carries_the_newest_occurred_at_applied_to_the_event(core: IndexerCore) -> None:
    assert ask(core, "E").newest_face_at == 0  # nothing applied: unknown
    core.apply_faces(0, 0, "E", "p1", photo("E", "p1", T0 + 5000))
    core.apply_faces(0, 1, "E", "p0", photo("E", "p0", T0))  # an older photo applied later
    core.apply_faces(0, 2, "OTHER", "q", photo("OTHER", "q", T0 + 9000))
    reply = ask(core, "E")
    assert reply.status == "OK" and reply.newest_face_at == T0 + 5000  # the newest, per event
    core.apply_faces(0, 3, "E", "p1", None)  # deleting a photo does not make the data older
    assert ask(core, "E").newest_face_at == T0 + 5000


def test_a_photo_without_faces_counts_and_an_event_delete_resets(core: IndexerCore) -> None:
    core.apply_faces(0, 0, "E", "empty", photo("E", "empty", T0 + 1, faces=0))
    reply = ask(core, "E")
    assert reply.status == "NO_FACES" and reply.photos_indexed == 1 and reply.newest_face_at == T0 + 1
    core.apply_faces(0, 1, "E", None, PhotoFaces("E", "", "m", DIM, op="DELETE_EVENT"))
    assert ask(core, "E").newest_face_at == 0


def test_newest_face_at_survives_a_snapshot_and_old_snapshots_read_as_unknown(
        core: IndexerCore, tmp_path: Path) -> None:
    core.apply_faces(0, 0, "E", "p", photo("E", "p", T0 + 7))
    state = core.partitions[0]
    save_snapshot(state, tmp_path / "s.npz")
    loaded = load_snapshot(tmp_path / "s.npz", 0, DIM, "m")
    assert loaded is not None and loaded.events["E"].newest_at == T0 + 7
    blob, meta = state.events["E"].to_snapshot()
    del meta["newest_at"]  # written before the field existed
    from pipeline.indexer.event_index import EventIndex
    assert EventIndex.from_snapshot(blob, meta).newest_at == 0


def test_match_reply_round_trip_and_old_writers(serde: SchemaRegistry) -> None:
    reply = MatchReply("r", "E", "OK", newest_face_at=T0 + 250)
    assert MatchReply.from_avro(serde.decode(MATCH_REPLY, serde.encode(MATCH_REPLY, reply.to_avro()))) == reply
    # A reply from an indexer that predates the field reads as unknown (0).
    old = json.loads((SCHEMA_DIR / "match_reply.avsc").read_text())
    old = copy.deepcopy(old)
    old["fields"] = [f for f in old["fields"] if f["name"] != "newest_face_at"]
    old_writer, reader = SchemaRegistry(), SchemaRegistry.load()
    old_writer.add_reader(old)
    reader.add_writer(old)
    data = {k: v for k, v in reply.to_avro().items() if k != "newest_face_at"}
    decoded = MatchReply.from_avro(reader.decode(MATCH_REPLY, old_writer.encode(MATCH_REPLY, data)))
    assert decoded.newest_face_at == 0 and decoded.request_id == "r"


def test_iso_utc() -> None:
    assert iso_utc(T0 + 250) == "2026-01-01T00:00:00.250Z"
    assert iso_utc(0) is None


# -- the stage: time to searchable, readiness ---------------------------------------------

@pytest.fixture
def stage(tmp_path: Path, serde: SchemaRegistry) -> IndexerStage:
    core = IndexerCore(IndexerConfig(dim=DIM, model_id="m", default_threshold=0.3))
    settings = IndexerSettings(state_dir=tmp_path / "state", snapshot_interval_s=3600)
    return IndexerStage(core, serde, TopicSettings(prefix="u."), PARTITIONS, settings, create_metrics(),
                        nothing_to_restore)


def record(serde: SchemaRegistry, offset: int, faces: PhotoFaces) -> Incoming:
    return Incoming("u.faces", partition_for(faces.event_id, PARTITIONS), offset,
                    faces_key(faces.event_id, faces.photo_id), serde.encode(PHOTO_FACES, faces.to_avro()))


def searchable(stage: IndexerStage) -> tuple[float, float]:
    registry = stage.metrics.registry
    count = registry.get_sample_value("facematch_time_to_searchable_seconds_count") or 0.0
    total = registry.get_sample_value("facematch_time_to_searchable_seconds_sum") or 0.0
    return count, total


def test_time_to_searchable_counts_live_photos_only(stage: IndexerStage, serde: SchemaRegistry) -> None:
    partition = partition_for("E", PARTITIONS)
    stage.on_assign([("u.faces", partition), ("u.match-requests", partition)], CaughtUp(stage))
    assert not stage.readiness().ok and stage.readiness().detail == {"replaying": [partition]}
    stage.handle([record(serde, 0, photo("E", "old", now_ms() - 3_600_000))])  # replayed: not counted
    assert searchable(stage) == (0, 0)
    stage.after_batch(CaughtUp(stage))  # caught up
    assert stage.readiness().ok
    stage.handle([record(serde, 1, photo("E", "live", now_ms() - 2000))])
    count, total = searchable(stage)
    assert count == 1 and total >= 2.0  # at least the 2 s the photo waited before it was applied
    # Not counted: a tombstone, an event delete.
    stage.handle([Incoming("u.faces", partition, 3, faces_key("E", "live"), None)])
    stage.handle([record(serde, 4, PhotoFaces("E", "", "m", DIM, op="DELETE_EVENT", occurred_at=now_ms()))])
    assert searchable(stage)[0] == 1


def test_a_clock_ahead_of_the_indexer_is_never_a_negative_latency(stage: IndexerStage, serde: SchemaRegistry) -> None:
    partition = partition_for("E", PARTITIONS)
    stage.on_assign([("u.faces", partition)], CaughtUp(stage))
    stage.after_batch(CaughtUp(stage))
    stage.handle([record(serde, 0, photo("E", "future", now_ms() + 60_000))])
    assert searchable(stage) == (1, 0)


def test_the_faces_gauge_counts_a_loaded_snapshot_before_any_record(
        stage: IndexerStage, serde: SchemaRegistry) -> None:
    # CI: with direct queries an indexer that took back an up-to-date snapshot handled no record,
    # and facematch_index_faces read 0 while it answered from that snapshot.
    partition = partition_for("E", PARTITIONS)
    stage.on_assign([("u.faces", partition)], CaughtUp(stage))
    stage.handle([record(serde, 0, photo("E", "p0", now_ms(), faces=3))])
    faces = stage.metrics.registry.get_sample_value
    assert faces("facematch_index_faces") == 3
    stage.on_revoke([("u.faces", partition)])  # snapshots, then drops the partition
    assert faces("facematch_index_faces") == 0
    stage.on_assign([("u.faces", partition)], CaughtUp(stage))  # loads the snapshot; no record follows
    assert faces("facematch_index_faces") == 3 and faces("facematch_index_events") == 1

