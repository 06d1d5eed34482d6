"""The indexer core without Kafka: upserts, deletes, photo-level matching, snapshots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PoisonRecord
from pipeline.indexer.core import IndexerConfig, IndexerCore
from pipeline.indexer.state import load_snapshot, save_snapshot
from pipeline.records import Face, MatchRequest, PhotoFaces

DIM = 32


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def photo(event: str, photo_id: str, vectors: list[np.ndarray]) -> PhotoFaces:
    faces = [Face(bbox=(i, i, 10, 10), det_score=0.9, embedding=v) for i, v in enumerate(vectors)]
    return PhotoFaces(event_id=event, photo_id=photo_id, model_id="m", dim=DIM, faces=faces)


def ask(core: IndexerCore, event: str, vector: np.ndarray, top_k: int = 5, threshold: float | None = 0.5):
    return core.answer(0, MatchRequest("r", event, vector, top_k=top_k, threshold=threshold))


@pytest.fixture
def core() -> IndexerCore:
    return IndexerCore(IndexerConfig(dim=DIM, model_id="m", default_threshold=0.4))


def test_match_returns_photos_scored_by_best_face(core: IndexerCore) -> None:
    rng = np.random.default_rng(0)
    me, other = unit(rng), unit(rng)
    core.apply_faces(0, 0, "E", "p1", photo("E", "p1", [other, me]))
    core.apply_faces(0, 1, "E", "p2", photo("E", "p2", [other]))
    reply = ask(core, "E", me)
    assert reply.status == "OK"
    assert [m.photo_id for m in reply.matches] == ["p1"]
    assert reply.matches[0].score == pytest.approx(1.0, abs=1e-5)
    assert reply.index_size == 3 and reply.photos_indexed == 2


def test_upsert_replaces_and_tombstone_deletes(core: IndexerCore) -> None:
    rng = np.random.default_rng(1)
    a, b = unit(rng), unit(rng)
    core.apply_faces(0, 0, "E", "p1", photo("E", "p1", [a]))
    core.apply_faces(0, 1, "E", "p1", photo("E", "p1", [b]))
    assert ask(core, "E", a).matches == []
    assert ask(core, "E", b).index_size == 1
    core.apply_faces(0, 2, "E", "p1", None)
    assert ask(core, "E", b).status == "NO_FACES"


def test_delete_event_and_isolation(core: IndexerCore) -> None:
    rng = np.random.default_rng(2)
    v = unit(rng)
    core.apply_faces(0, 0, "E1", "p", photo("E1", "p", [v]))
    core.apply_faces(0, 1, "E2", "q", photo("E2", "q", [v]))
    assert [m.photo_id for m in ask(core, "E1", v).matches] == ["p"]
    core.apply_faces(0, 2, "E1", None, PhotoFaces("E1", "", "m", DIM, op="DELETE_EVENT"))
    assert ask(core, "E1", v).status == "NO_FACES"
    assert [m.photo_id for m in ask(core, "E2", v).matches] == ["q"]


def test_top_k_counts_photos_not_faces(core: IndexerCore) -> None:
    rng = np.random.default_rng(3)
    q = unit(rng)
    # 40 photos each with 3 near-identical faces: top_k=10 must still give 10 photos.
    for i in range(40):
        near = [q + 0.05 * unit(rng) for _ in range(3)]
        core.apply_faces(0, i, "E", f"p{i}", photo("E", f"p{i}", [n / np.linalg.norm(n) for n in near]))
    reply = ask(core, "E", q, top_k=10, threshold=0.0)
    assert len({m.photo_id for m in reply.matches}) == 10
    assert [m.score for m in reply.matches] == sorted((m.score for m in reply.matches), reverse=True)


def test_bad_requests_get_error_replies(core: IndexerCore) -> None:
    assert ask(core, "E", np.ones(DIM + 1, dtype=np.float32)).status == "ERROR"
    assert ask(core, "E", np.zeros(DIM, dtype=np.float32)).status == "ERROR"
    assert ask(core, "E", np.ones(DIM, dtype=np.float32), top_k=0).status == "ERROR"


def test_default_threshold_comes_from_the_model(core: IndexerCore) -> None:
    assert ask(core, "E", np.ones(DIM, dtype=np.float32), threshold=None).threshold == pytest.approx(0.4)


def test_snapshot_round_trip_answers_identically(core: IndexerCore, tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    vectors = [unit(rng) for _ in range(50)]
    for i, v in enumerate(vectors):
        core.apply_faces(0, i, f"E{i % 3}", f"p{i}", photo(f"E{i % 3}", f"p{i}", [v, unit(rng)]))
        core.cover(0, i)
    core.apply_faces(0, 50, "E0", "p0", None)
    core.cover(0, 50)
    path = tmp_path / "snap.npz"
    save_snapshot(core.partitions[0], path)
    restored = IndexerCore(core.config)
    state = load_snapshot(path, 0, DIM)
    assert state is not None and state.next_offset == 51
    restored.partitions[0] = state
    for i, v in enumerate(vectors):
        before, after = ask(core, f"E{i % 3}", v, threshold=-1), ask(restored, f"E{i % 3}", v, threshold=-1)
        assert before.matches == after.matches


def test_snapshot_for_another_dimension_is_ignored(core: IndexerCore, tmp_path: Path) -> None:
    core.apply_faces(0, 0, "E", "p", photo("E", "p", [unit(np.random.default_rng(5))]))
    save_snapshot(core.partitions[0], tmp_path / "s.npz")
    assert load_snapshot(tmp_path / "s.npz", 0, DIM * 2) is None


# -- erasure: event deletes, the delete ledger, stale snapshots -----------------------------

def delete_event(event: str) -> PhotoFaces:
    return PhotoFaces(event, "", "m", DIM, op="DELETE_EVENT")


def apply(core: IndexerCore, offset: int, event: str, photo_id: str | None, faces: PhotoFaces | None) -> list[str]:
    erased = core.apply_faces(0, offset, event, photo_id, faces).erased_photos
    core.cover(0, offset)
    return erased


def test_event_delete_returns_its_photos_once(core: IndexerCore) -> None:
    rng = np.random.default_rng(6)
    apply(core, 0, "E", "p1", photo("E", "p1", [unit(rng)]))
    apply(core, 1, "E", "p2", photo("E", "p2", [unit(rng), unit(rng)]))
    apply(core, 2, "F", "q", photo("F", "q", [unit(rng)]))
    assert apply(core, 3, "E", None, delete_event("E")) == ["p1", "p2"]
    # Redelivered before its tombstones reached the topic (delivery failed): emit them again.
    assert apply(core, 3, "E", None, delete_event("E")) == ["p1", "p2"]
    assert apply(core, 4, "E", "p1", None) == []  # its own tombstones come back through the topic
    assert apply(core, 3, "E", None, delete_event("E")) == ["p2"]
    apply(core, 5, "E", "p2", None)
    assert core.partitions[0].pending_tombstones == {}
    assert apply(core, 3, "E", None, delete_event("E")) == []  # replayed again: nothing left to erase
    assert ask(core, "E", unit(rng)).status == "NO_FACES"
    assert ask(core, "F", unit(rng), threshold=-1).index_size == 1


def test_faces_older_than_a_recorded_delete_are_skipped(core: IndexerCore) -> None:
    rng = np.random.default_rng(7)
    v = unit(rng)
    apply(core, 10, "E", None, delete_event("E"))
    apply(core, 11, "G", "g", photo("G", "g", [v]))
    apply(core, 12, "G", "g", None)
    # Records from before those deletes (e.g. merged from elsewhere) must not resurrect anything.
    core.apply_faces(0, 5, "E", "p1", photo("E", "p1", [v]))
    core.apply_faces(0, 11, "G", "g", photo("G", "g", [v]))
    assert ask(core, "E", v).status == "NO_FACES" and ask(core, "G", v).status == "NO_FACES"
    # A re-upload after the delete is new data and is indexed.
    apply(core, 13, "E", "p1", photo("E", "p1", [v]))
    assert [m.photo_id for m in ask(core, "E", v).matches] == ["p1"]


def test_stale_snapshot_then_compacted_replay_keeps_deleted_faces_gone(core: IndexerCore, tmp_path: Path) -> None:
    """Another indexer's snapshot from before the delete, then the compacted log replayed from it."""
    rng = np.random.default_rng(8)
    vectors = {f"p{i}": unit(rng) for i in range(4)}
    for i, (photo_id, v) in enumerate(vectors.items()):
        apply(core, i, "E", photo_id, photo("E", photo_id, [v]))
    keep = unit(rng)
    apply(core, 4, "F", "f", photo("F", "f", [keep]))
    stale = tmp_path / "stale.npz"
    save_snapshot(core.partitions[0], stale)  # covers offsets 0-4: E has every face
    erased = apply(core, 5, "E", None, delete_event("E"))
    for j, photo_id in enumerate(erased):
        apply(core, 6 + j, "E", photo_id, None)  # the tombstones the stage produced
    fresh = tmp_path / "fresh.npz"
    save_snapshot(core.partitions[0], fresh)
    assert load_snapshot(fresh, 0, DIM, "m") is not None
    assert load_snapshot(fresh, 0, DIM, "m").deleted_events == {"E": 5}  # type: ignore[union-attr]

    # After compaction the log keeps the DELETE_EVENT (its key is the event) and maybe some
    # per-photo records; tombstones may be purged. Every variant leaves E empty.
    compacted_logs: list[list[tuple[int, str | None, PhotoFaces | None]]] = [
        [(5, None, delete_event("E"))],                                       # tombstones purged
        [(5, None, delete_event("E")), (6, "p0", None), (7, "p1", None)],     # some tombstones left
        [(3, "p3", photo("E", "p3", [vectors["p3"]])), (5, None, delete_event("E"))],  # not yet compacted
    ]
    for log in compacted_logs:
        restored = IndexerCore(core.config)
        state = load_snapshot(stale, 0, DIM, "m")
        assert state is not None
        restored.partitions[0] = state
        for offset, photo_id, faces in log:
            if offset >= state.next_offset:
                restored.apply_faces(0, offset, "E", photo_id, faces)
                restored.cover(0, offset)
        for v in vectors.values():
            assert ask(restored, "E", v, threshold=-1).status == "NO_FACES"
        assert [m.photo_id for m in ask(restored, "F", keep).matches] == ["f"]
        # A snapshot written now carries the delete, so it cannot bring E back either.
        save_snapshot(restored.partitions[0], tmp_path / "again.npz")
        again = load_snapshot(tmp_path / "again.npz", 0, DIM, "m")
        assert again is not None and "E" not in again.events and again.deleted_events["E"] == 5


def test_snapshot_older_than_tombstone_retention_is_ignored(core: IndexerCore, tmp_path: Path) -> None:
    apply(core, 0, "E", "p", photo("E", "p", [unit(np.random.default_rng(9))]))
    path = tmp_path / "s.npz"
    save_snapshot(core.partitions[0], path)
    assert load_snapshot(path, 0, DIM, "m", max_age_s=60) is not None
    assert load_snapshot(path, 0, DIM, "m", max_age_s=-1) is None  # "older than" the limit: replay instead


def test_stale_unowned_snapshots_are_removed(tmp_path: Path) -> None:
    import os
    import time

    from pipeline.indexer.state import remove_stale_snapshots

    owned, old, young = (tmp_path / f"partition-{i:04d}.npz" for i in range(3))
    for path in (owned, old, young):
        path.write_bytes(b"x")
    long_ago = time.time() - 3600
    os.utime(owned, (long_ago, long_ago))
    os.utime(old, (long_ago, long_ago))
    assert remove_stale_snapshots(tmp_path, {owned}, max_age_s=60) == [old]
    assert owned.exists() and young.exists() and not old.exists()


def test_torn_snapshot_temp_files_are_removed(tmp_path: Path) -> None:
    """A crash mid-write leaves partition-NNNN.tmp<pid>; the sweep removes it, not a write in progress."""
    import os
    import time

    from pipeline.indexer.state import remove_stale_snapshots

    torn = tmp_path / "partition-0001.tmp999999999"  # another (dead) process's write
    writing = tmp_path / f"partition-0002.tmp{os.getpid()}"  # ours, fresh: maybe being written
    old_own = tmp_path / f"partition-0003.tmp{os.getpid()}"
    for path in (torn, writing, old_own):
        path.write_bytes(b"half a snapshot")
    long_ago = time.time() - 3600
    os.utime(old_own, (long_ago, long_ago))
    removed = remove_stale_snapshots(tmp_path, set(), max_age_s=60)
    assert sorted(removed) == sorted([torn, old_own])
    assert writing.exists() and not torn.exists() and not old_own.exists()


# -- model identity ------------------------------------------------------------------------------

def test_faces_of_another_model_are_refused_even_with_the_same_dim(core: IndexerCore) -> None:
    v = unit(np.random.default_rng(10))
    other = PhotoFaces("E", "p", model_id="other-model", dim=DIM,
                       faces=[Face(bbox=(0, 0, 1, 1), det_score=1.0, embedding=v)])
    with pytest.raises(PoisonRecord) as info:
        core.apply_faces(0, 0, "E", "p", other)
    assert info.value.reason == "model_mismatch"
    assert ask(core, "E", v).status == "NO_FACES"
    # Deletes carry a model_id too, but erasing never depends on it.
    core.apply_faces(0, 1, "E", "p", photo("E", "p", [v]))
    changes = core.apply_faces(0, 2, "E", None, PhotoFaces("E", "", "other-model", DIM, op="DELETE_EVENT"))
    assert changes.erased_photos == ["p"]


def test_precomputed_model_id_works_with_model_none() -> None:
    from pipeline.facelib.spec import precomputed_spec

    spec = precomputed_spec(DIM)
    core = IndexerCore(IndexerConfig(spec.dim, spec.model_id, spec.default_threshold))
    v = unit(np.random.default_rng(11))
    faces = PhotoFaces("E", "p", model_id="precomputed", dim=DIM,
                       faces=[Face(bbox=(0, 0, 1, 1), det_score=1.0, embedding=v)])
    core.apply_faces(0, 0, "E", "p", faces)
    assert [m.photo_id for m in ask(core, "E", v).matches] == ["p"]


def test_snapshot_of_another_model_is_ignored(core: IndexerCore, tmp_path: Path) -> None:
    core.apply_faces(0, 0, "E", "p", photo("E", "p", [unit(np.random.default_rng(12))]))
    save_snapshot(core.partitions[0], tmp_path / "s.npz")
    assert load_snapshot(tmp_path / "s.npz", 0, DIM, "m") is not None
    assert load_snapshot(tmp_path / "s.npz", 0, DIM, "another-model-of-the-same-dim") is None
