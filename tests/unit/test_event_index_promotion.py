"""Large events: promotion from exact to IVF-SQ8, while answering, with deletes and snapshots."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from pipeline.indexer import promotion
from pipeline.indexer.core import IndexerConfig, IndexerCore
from pipeline.indexer.event_index import EventIndex, dumps_meta
from pipeline.indexer.promotion import IndexOptions
from pipeline.indexer.state import load_snapshot, save_snapshot
from pipeline.records import Face, MatchRequest, PhotoFaces

DIM = 32
SMALL = IndexOptions(promote_at=2000, nprobe=16)


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def faces_of(vectors: np.ndarray) -> list[Face]:
    return [Face(bbox=(i, 2 * i, 10, 12), det_score=0.9, embedding=v) for i, v in enumerate(vectors)]


def fill(index: EventIndex, vectors: np.ndarray, per_photo: int = 2, prefix: str = "p") -> list[str]:
    photos = []
    for start in range(0, len(vectors), per_photo):
        photo_id = f"{prefix}{start // per_photo}"
        index.upsert(photo_id, faces_of(vectors[start:start + per_photo]))
        photos.append(photo_id)
    return photos


def top(index: EventIndex, vector: np.ndarray, top_k: int = 1, threshold: float = 0.9) -> list[str]:
    return [m.photo_id for m in index.search(vector, top_k, threshold)]


def wait_promoted(index: EventIndex) -> None:
    # A quick build may already have been swapped in by a later upsert (which polls it).
    if index.promotion is not None:
        assert index.promotion.wait(60)
    index.poll()
    assert index.kind == "ivf-sq8" and index.promotion is None


def test_promotes_above_the_threshold_and_finds_each_photo_first() -> None:
    rng = np.random.default_rng(0)
    vectors = unit_rows(rng, 2400)
    index, exact = EventIndex(DIM, "m", SMALL), EventIndex(DIM, "m", IndexOptions(promote_at=0))
    photos = fill(index, vectors)
    fill(exact, vectors)
    assert exact.kind == "flat" and exact.promotion is None
    wait_promoted(index)
    assert index.size == exact.size == 2400 and index.photos == 1200
    for row in range(0, 2400, 7):
        assert top(index, vectors[row]) == top(exact, vectors[row]) == [photos[row // 2]]
    match = index.search(vectors[5], 1, 0.5)[0]
    assert match.photo_id == "p2" and match.score == pytest.approx(1.0, abs=0.02)
    assert match.faces[0].bbox == (1.0, 2.0, 10.0, 12.0)


def test_keeps_answering_during_promotion_and_replays_changes_at_the_swap(monkeypatch: Any) -> None:
    release = threading.Event()
    real_build = promotion.build_ivf_sq8

    def slow_build(vectors: np.ndarray, ids: np.ndarray, nprobe: int) -> Any:
        assert release.wait(30)
        return real_build(vectors, ids, nprobe)

    monkeypatch.setattr(promotion, "build_ivf_sq8", slow_build)
    rng = np.random.default_rng(1)
    vectors = unit_rows(rng, 2000)
    index = EventIndex(DIM, "m", SMALL)
    fill(index, vectors)
    assert index.promotion is not None  # started by the upsert that crossed the threshold

    late = unit_rows(rng, 3)
    index.upsert("new", faces_of(late[:1]))       # added after the copy was taken
    index.delete("p10")                            # deleted from the copy
    index.upsert("p11", faces_of(late[1:2]))       # replaced: old faces gone, new one in
    index.upsert("gone", faces_of(late[2:3]))
    index.delete("gone")                           # added and removed during the build
    # Answered meanwhile by the exact index, changes included.
    assert index.kind == "flat"
    assert top(index, late[0]) == ["new"] and top(index, vectors[20]) == []
    assert top(index, late[1]) == ["p11"] and top(index, vectors[22]) == []

    release.set()
    wait_promoted(index)
    assert index.size == 2000 - 2 - 2 + 1 + 1
    assert top(index, late[0]) == ["new"] and top(index, late[1]) == ["p11"]
    assert top(index, late[2]) == [] and top(index, vectors[20]) == [] and top(index, vectors[22]) == []
    assert top(index, vectors[40]) == ["p20"]


def test_deleted_photos_never_come_back_from_a_promoted_index() -> None:
    rng = np.random.default_rng(2)
    vectors = unit_rows(rng, 2200)
    index = EventIndex(DIM, "m", SMALL)
    photos = fill(index, vectors)
    wait_promoted(index)
    deleted = set(photos[::3])
    for photo_id in deleted:
        assert index.delete(photo_id)
    assert not index.delete(photos[0])
    for row in range(0, 2200, 3):
        found = top(index, vectors[row], top_k=50, threshold=-1.0)
        assert not deleted & set(found)
        assert (photos[row // 2] in deleted) != (found[0] == photos[row // 2])
    index.upsert(photos[0], faces_of(vectors[:1]))  # re-ingested after its delete
    assert top(index, vectors[0]) == [photos[0]]


def test_an_event_that_grows_past_its_build_is_rebuilt() -> None:
    rng = np.random.default_rng(3)
    vectors = unit_rows(rng, 3000)
    index = EventIndex(DIM, "m", IndexOptions(promote_at=1000, nprobe=16, regrow_factor=2.0))
    fill(index, vectors[:1000])
    wait_promoted(index)
    assert index.built_at == 1000
    fill(index, vectors[1000:], prefix="q")
    if index.promotion is not None:  # the rebuild started at 2,000 faces may still be running
        wait_promoted(index)
    assert index.built_at >= 2000 and index.size == 3000
    assert top(index, vectors[1]) == ["p0"] and top(index, vectors[2999]) == ["q999"]


def photo(photo_id: str, vectors: np.ndarray) -> PhotoFaces:
    return PhotoFaces(event_id="E", photo_id=photo_id, model_id="m", dim=DIM, faces=faces_of(vectors))


def test_snapshot_of_a_promoted_event_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    vectors = unit_rows(rng, 2100)
    config = IndexerConfig(dim=DIM, model_id="m", default_threshold=0.4, index=SMALL)
    core = IndexerCore(config)
    for offset, start in enumerate(range(0, 2100, 3)):
        core.apply_faces(0, offset, "E", f"p{offset}", photo(f"p{offset}", vectors[start:start + 3]))
        core.cover(0, offset)
    wait_promoted(core.partitions[0].events["E"])
    core.apply_faces(0, 700, "E", "p1", None)
    core.cover(0, 700)
    path = tmp_path / "s.npz"
    save_snapshot(core.partitions[0], path)
    state = load_snapshot(path, 0, DIM, "m", options=SMALL)
    assert state is not None and state.events["E"].kind == "ivf-sq8" and state.next_offset == 701
    restored = IndexerCore(config)
    restored.partitions[0] = state
    for row in range(0, 2100, 11):
        request = MatchRequest("r", "E", vectors[row], top_k=5, threshold=0.3)
        assert core.answer(0, request).matches == restored.answer(0, request).matches
    assert "p1" not in state.events["E"].photo_faces and state.events["E"].photos == 699
    state.events["E"].upsert("later", faces_of(vectors[3:4]))  # still writable after the load
    assert top(state.events["E"], vectors[3]) == ["later"]


@pytest.mark.parametrize("version", [1, 2])
def test_snapshots_of_older_versions_still_load(tmp_path: Path, version: int) -> None:
    rng = np.random.default_rng(5)
    vectors = unit_rows(rng, 3)
    flat: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    flat.add_with_ids(vectors, np.arange(1, 4, dtype=np.int64))  # id 0 was replaced before
    event = {"event_id": "E", "dim": DIM, "model_id": "m", "next_id": 4,
             "photos": {"a": [1, 2], "b": [3], "empty": []},
             "bboxes": {"1": [1, 1, 5, 5], "2": [2, 2, 6, 6], "3": [3, 3, 7, 7]}}
    header: dict[str, Any] = {"version": version, "partition": 0, "next_offset": 9, "last_applied": 8,
                              "events": [event]}
    if version == 2:
        event["newest_at"] = 1234
        header.update(saved_at_ms=int(time.time() * 1000), deleted_events={"X": 4}, deleted_photos={"E/z": 5})
    path = tmp_path / "old.npz"
    np.savez(path, index_0=faiss.serialize_index(flat), header=dumps_meta(header))

    state = load_snapshot(path, 0, DIM, "m", max_age_s=600)
    assert state is not None and state.next_offset == 9
    index = state.events["E"]
    assert index.photos == 3 and index.size == 3 and index.newest_at == (1234 if version == 2 else 0)
    assert top(index, vectors[1]) == ["a"] and top(index, vectors[2]) == ["b"]
    assert index.search(vectors[2], 1, 0.5)[0].faces[0].bbox == (3.0, 3.0, 7.0, 7.0)
    index.upsert("c", faces_of(vectors[:1]))  # new ids continue after the old ones
    assert top(index, vectors[0], top_k=2) == ["a", "c"] or top(index, vectors[0], top_k=2) == ["c", "a"]
    assert index.delete("a") and top(index, vectors[1]) == []
