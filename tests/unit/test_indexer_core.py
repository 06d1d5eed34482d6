"""The indexer core without Kafka: upserts, deletes, photo-level matching, snapshots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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
