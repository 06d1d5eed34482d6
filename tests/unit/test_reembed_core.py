"""Blue/green by model in the indexer core, without Kafka: staging, the switch, retired models, snapshots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PoisonRecord
from pipeline.guest_records import MODEL_MISMATCH, GuestRecord
from pipeline.indexer.core import IndexerConfig, IndexerCore
from pipeline.indexer.state import load_snapshot, save_snapshot
from pipeline.records import Face, MatchRequest, PhotoEvent, PhotoFaces
from pipeline.reembed import event_photos
from pipeline.serde import PHOTO_FACES, SchemaRegistry

BLUE, GREEN, BLUE_DIM, GREEN_DIM = "blue", "green", 8, 16


def vec(dim: int, axis: int) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    v[axis] = 1.0
    return v


def faces(photo_id: str, model: str, axes: list[int], op: str = "UPSERT") -> PhotoFaces:
    dim = BLUE_DIM if model == BLUE else GREEN_DIM
    return PhotoFaces(event_id="E", photo_id=photo_id, model_id=model, dim=dim, op=op,
                      faces=[Face(bbox=(a, 0, 10, 10), det_score=1.0, embedding=vec(dim, a)) for a in axes],
                      image_url=f"https://img/{photo_id}.jpg")


def ask(core: IndexerCore, model: str | None, axis: int) -> tuple[str, list[str], str | None]:
    dim = BLUE_DIM if model in (None, BLUE) else GREEN_DIM
    reply = core.answer(0, MatchRequest("r", "E", vec(dim, axis), threshold=0.5, model_id=model))
    return reply.status, [m.photo_id for m in reply.matches], reply.error


@pytest.fixture
def core() -> IndexerCore:
    return IndexerCore(IndexerConfig(dim=BLUE_DIM, model_id=BLUE, default_threshold=0.5,
                                     extra_models=((GREEN, GREEN_DIM),)))


def build(core: IndexerCore) -> None:
    core.apply_faces(0, 0, "E", "p1", faces("p1", BLUE, [1]))
    core.apply_faces(0, 1, "E", "p2", faces("p2", BLUE, [2]))
    core.apply_faces(0, 2, "E", "p1", faces("p1", GREEN, [1]), key_model=GREEN)
    core.apply_faces(0, 3, "E", "p2", faces("p2", GREEN, [2]), key_model=GREEN)


def test_the_new_model_builds_beside_and_answers_only_after_the_switch(core: IndexerCore) -> None:
    build(core)
    assert ask(core, BLUE, 1)[:2] == ("OK", ["p1"])
    status, _, error = ask(core, GREEN, 1)
    assert status == "ERROR" and error is not None and error.startswith(MODEL_MISMATCH)
    changes = core.apply_faces(0, 4, "E", None, faces("", GREEN, [], op="ACTIVATE_MODEL"))
    assert sorted(changes.erased_photos) == ["p1", "p2"]  # blue's plain keys are tombstoned
    assert ask(core, GREEN, 2)[:2] == ("OK", ["p2"])
    assert ask(core, BLUE, 1)[0] == "ERROR"
    reply = core.answer(0, MatchRequest("r", "E", vec(GREEN_DIM, 1), threshold=0.5, model_id=GREEN))
    assert reply.model_id == GREEN


def test_a_retired_models_late_faces_are_dropped_and_tombstoned(core: IndexerCore) -> None:
    build(core)
    core.apply_faces(0, 4, "E", None, faces("", GREEN, [], op="ACTIVATE_MODEL"))
    late = core.apply_faces(0, 5, "E", "p3", faces("p3", BLUE, [3]))
    assert late.erased_photos == ["p3"]
    assert ask(core, GREEN, 3)[:2] == ("OK", [])
    core.apply_faces(0, 6, "E", "p3", faces("p3", GREEN, [3]), key_model=GREEN)
    assert ask(core, GREEN, 3)[:2] == ("OK", ["p3"])


def test_two_models_under_plain_keys_are_refused(core: IndexerCore) -> None:
    core.apply_faces(0, 0, "E", "p1", faces("p1", BLUE, [1]))
    with pytest.raises(PoisonRecord) as refused:
        core.apply_faces(0, 1, "E", "p1", faces("p1", GREEN, [1]))
    assert refused.value.reason == "invalid_key" and "FACEMATCH_EMBEDDER_MODEL_KEYS" in str(refused.value)


def test_switching_without_a_staged_index_or_with_exclusions_is_refused(core: IndexerCore) -> None:
    core.apply_faces(0, 0, "E", "p1", faces("p1", BLUE, [1]))
    with pytest.raises(PoisonRecord) as nothing:
        core.apply_faces(0, 1, "E", None, faces("", GREEN, [], op="ACTIVATE_MODEL"))
    assert nothing.value.reason == "nothing_staged"
    core.apply_faces(0, 2, "E", "p1", faces("p1", GREEN, [1]), key_model=GREEN)
    core.apply_guest(0, "E", "g", GuestRecord("E", "g", BLUE, BLUE_DIM, np.stack([vec(BLUE_DIM, 5)]), op="FORGET"))
    with pytest.raises(PoisonRecord) as blocked:
        core.apply_faces(0, 3, "E", None, faces("", GREEN, [], op="ACTIVATE_MODEL"))
    assert blocked.value.reason == "exclusions_block_switch"


def test_guests_of_the_old_model_must_enrol_again(core: IndexerCore) -> None:
    build(core)
    first = core.apply_guest(0, "E", "ann", GuestRecord("E", "ann", BLUE, BLUE_DIM, np.stack([vec(BLUE_DIM, 1)])))
    assert [n.photo_id for n in first.notifications] == ["p1"]
    core.apply_faces(0, 4, "E", None, faces("", GREEN, [], op="ACTIVATE_MODEL"))
    reply = core.answer(0, MatchRequest("r", "E", np.zeros(0, np.float32), guest_id="ann"))
    assert reply.status == "ERROR" and reply.error is not None and "enrol again" in reply.error
    pushed = core.apply_faces(0, 5, "E", "p9", faces("p9", GREEN, [1]), key_model=GREEN)
    assert pushed.notifications == []  # blue selfies are never scored against green faces
    again = core.apply_guest(0, "E", "ann", GuestRecord("E", "ann", GREEN, GREEN_DIM, np.stack([vec(GREEN_DIM, 1)])))
    assert [n.photo_id for n in again.notifications] == ["p9"]  # p1 was pushed already: once per photo


def test_staged_indexes_and_retired_models_survive_a_snapshot(core: IndexerCore, tmp_path: Path) -> None:
    core.apply_faces(0, 0, "E", "p1", faces("p1", BLUE, [1]))
    core.apply_faces(0, 1, "E", "p1", faces("p1", GREEN, [1]), key_model=GREEN)
    core.cover(0, 1)
    save_snapshot(core.partitions[0], tmp_path / "s.npz")
    state = load_snapshot(tmp_path / "s.npz", 0, BLUE_DIM, BLUE, accepted=core.config.accepted)
    assert state is not None and state.staged["E"].model_id == GREEN and state.events["E"].model_id == BLUE
    assert state.staged["E"].keyed_by_model and state.staged["E"].key_tail("p1") == f"p1/{GREEN}"
    restored = IndexerCore(core.config)
    restored.partitions[0] = state
    restored.apply_faces(0, 2, "E", None, faces("", GREEN, [], op="ACTIVATE_MODEL"))
    save_snapshot(restored.partitions[0], tmp_path / "s.npz")
    again = load_snapshot(tmp_path / "s.npz", 0, BLUE_DIM, BLUE, accepted=core.config.accepted)
    assert again is not None and again.retired == {"E": [BLUE]} and again.events["E"].model_id == GREEN
    assert load_snapshot(tmp_path / "s.npz", 0, BLUE_DIM, BLUE) is None  # an indexer without green: replay


def test_reembed_plan_lists_photos_still_in_the_old_model() -> None:
    serde = SchemaRegistry.load()
    records: list[tuple[bytes | None, bytes | None]] = [
        (b"E/p1", serde.encode(PHOTO_FACES, faces("p1", BLUE, [1]).to_avro())),
        (b"E/p2", serde.encode(PHOTO_FACES, faces("p2", BLUE, [2]).to_avro())),
        (f"E/p2/{GREEN}".encode(), serde.encode(PHOTO_FACES, faces("p2", GREEN, [2]).to_avro())),
        (b"E/p3", serde.encode(PHOTO_FACES, faces("p3", BLUE, [3]).to_avro())),
        (b"E/p3", None),  # deleted
        (b"OTHER/q", serde.encode(PHOTO_FACES, faces("q", BLUE, [1]).to_avro())),
    ]
    plan = event_photos(records, serde, "E", GREEN)
    assert plan.urls == {"p1": "https://img/p1.jpg"} and plan.done == {"p2"} and plan.dim == GREEN_DIM
    assert PhotoEvent("E", "p1", image_url=plan.urls["p1"]).image_url == "https://img/p1.jpg"
