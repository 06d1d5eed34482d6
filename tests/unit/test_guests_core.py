"""Guests in the indexer core, without Kafka: enrolment, pushes, forget me, restore, and the readers' fold."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.errors import PoisonRecord
from pipeline.guest_records import GUEST_NOT_ENROLLED, MODEL_MISMATCH, GuestRecord, MatchNotification, notification_key
from pipeline.indexer.core import Changes, IndexerConfig, IndexerCore
from pipeline.indexer.event_index import EventIndex
from pipeline.indexer.guests import search_with_set
from pipeline.indexer.promotion import IndexOptions
from pipeline.matcher.notifications import _Fold
from pipeline.records import Face, MatchedFace, MatchRequest, PhotoFaces
from pipeline.serde import MATCH_NOTIFICATION, SchemaRegistry

DIM = 32
THRESHOLD = 0.5


def axis(i: int) -> np.ndarray:
    """A person: one basis vector, so different people score exactly 0 against each other."""
    v = np.zeros(DIM, dtype=np.float32)
    v[i] = 1.0
    return v


def blend(a: np.ndarray, b: np.ndarray, weight: float) -> np.ndarray:
    """A face scoring `weight` against a and sqrt(1 - weight^2) against b (a, b orthonormal)."""
    v = weight * a + np.sqrt(1.0 - weight * weight) * b
    return (v / np.linalg.norm(v)).astype(np.float32)


ANNA, BEN, CARL, DORA = axis(0), axis(1), axis(2), axis(3)


def photo(photo_id: str, vectors: list[np.ndarray], event: str = "E") -> PhotoFaces:
    faces = [Face(bbox=(float(i), float(i), 10.0, 10.0), det_score=0.9, embedding=v) for i, v in enumerate(vectors)]
    return PhotoFaces(event_id=event, photo_id=photo_id, model_id="m", dim=DIM, faces=faces,
                      image_url=f"https://img/{photo_id}.jpg", occurred_at=1_700_000_000_000)


def enrol(guest: str, selfies: list[np.ndarray], event: str = "E", model_id: str = "m",
          dim: int = DIM) -> GuestRecord:
    return GuestRecord(event_id=event, guest_id=guest, model_id=model_id, dim=dim,
                       selfies=np.stack(selfies).astype(np.float32))


def forget(guest: str, selfies: list[np.ndarray] | None = None, erase_faces: bool = True,
           event: str = "E") -> GuestRecord:
    rows = np.stack(selfies).astype(np.float32) if selfies else np.zeros((0, DIM), dtype=np.float32)
    return GuestRecord(event_id=event, guest_id=guest, model_id="m", dim=DIM, selfies=rows, op="FORGET",
                       erase_faces=erase_faces)


def pushed(changes: Changes) -> list[tuple[str, str]]:
    return sorted((n.guest_id, n.photo_id) for n in changes.notifications)


def ask(core: IndexerCore, vector: np.ndarray | None = None, guest_id: str | None = None,
        model_id: str | None = None, event: str = "E"):
    embedding = np.zeros(0, dtype=np.float32) if vector is None else vector
    return core.answer(0, MatchRequest("r", event, embedding, top_k=10, threshold=None, guest_id=guest_id,
                                       model_id=model_id))


class Feed:
    """Applies faces records at increasing offsets, as the faces topic would deliver them."""

    def __init__(self, core: IndexerCore) -> None:
        self.core, self.offset = core, -1

    def add(self, record: PhotoFaces, again: bool = False) -> Changes:
        self.offset += 1
        return self.core.apply_faces(0, self.offset, record.event_id, record.photo_id, record, again)

    def delete(self, photo_id: str, event: str = "E") -> Changes:
        self.offset += 1
        return self.core.apply_faces(0, self.offset, event, photo_id, None)

    def delete_event(self, event: str = "E") -> Changes:
        self.offset += 1
        return self.core.apply_faces(0, self.offset, event, None, PhotoFaces(event, "", "m", DIM, op="DELETE_EVENT"))


@pytest.fixture
def core() -> IndexerCore:
    return IndexerCore(IndexerConfig(dim=DIM, model_id="m", default_threshold=THRESHOLD))


@pytest.fixture
def feed(core: IndexerCore) -> Feed:
    return Feed(core)


# -- enrolment and pushes --------------------------------------------------------------------

def test_enrol_pushes_each_matching_photo_once_and_nobody_elses(core: IndexerCore, feed: Feed) -> None:
    feed.add(photo("p1", [BEN, ANNA]))
    feed.add(photo("p2", [BEN]))
    feed.add(photo("p3", [blend(ANNA, CARL, 0.8)]))
    changes = core.apply_guest(0, "E", "anna", enrol("anna", [ANNA]))
    assert pushed(changes) == [("anna", "p1"), ("anna", "p3")]
    by_photo = {n.photo_id: n for n in changes.notifications}
    assert by_photo["p1"].score == pytest.approx(1.0, abs=1e-5)
    assert by_photo["p1"].faces[0].bbox == (1.0, 1.0, 10.0, 10.0)  # Anna's face, not Ben's
    assert by_photo["p3"].score == pytest.approx(0.8, abs=1e-5)
    assert all(n.model_id == "m" and n.event_id == "E" for n in changes.notifications)
    # The same ENROL delivered again (not a redo) pushes nothing new.
    assert pushed(core.apply_guest(0, "E", "anna", enrol("anna", [ANNA]))) == []


def test_later_photo_pushed_once_and_again_only_on_a_redo(core: IndexerCore, feed: Feed) -> None:
    core.apply_guest(0, "E", "anna", enrol("anna", [ANNA]))
    core.apply_guest(0, "E", "ben", enrol("ben", [BEN]))
    record = photo("p1", [CARL, ANNA])
    first = feed.add(record)
    assert pushed(first) == [("anna", "p1")]
    assert first.notifications[0].photo_occurred_at == record.occurred_at
    assert pushed(feed.add(photo("p2", [CARL]))) == []
    # Redelivered at the same offset (outputs were delivered): not pushed again.
    assert pushed(core.apply_faces(0, 0, "E", "p1", record)) == []
    # Handled again because its outputs were not delivered: pushed again.
    assert pushed(core.apply_faces(0, 0, "E", "p1", record, again=True)) == [("anna", "p1")]


def test_enrol_again_on_a_redo_pushes_every_match_again(core: IndexerCore, feed: Feed) -> None:
    feed.add(photo("p1", [ANNA]))
    assert pushed(core.apply_guest(0, "E", "anna", enrol("anna", [ANNA]))) == [("anna", "p1")]
    assert pushed(core.apply_guest(0, "E", "anna", enrol("anna", [ANNA]), again=True)) == [("anna", "p1")]


# -- several selfies: max rule ---------------------------------------------------------------

def test_a_set_of_selfies_finds_the_union_scored_by_the_best_selfie(core: IndexerCore, feed: Feed) -> None:
    front, side = ANNA, CARL  # two selfies of one guest, far apart (profile against frontal)
    both = blend(front, side, 0.6)  # 0.6 to front, 0.8 to side
    feed.add(photo("front", [front, BEN]))
    feed.add(photo("side", [side]))
    feed.add(photo("both", [both]))
    feed.add(photo("other", [BEN, DORA]))
    index = core.partitions[0].events["E"]
    selfies = np.stack([front, side])

    alone = {tuple(sorted(m.photo_id for m in index.search(s, 10, THRESHOLD))) for s in selfies}
    assert alone == {("both", "front"), ("both", "side")}
    together = search_with_set(index, selfies, 10, THRESHOLD)
    assert sorted(m.photo_id for m in together) == ["both", "front", "side"]
    scores = {m.photo_id: m.score for m in together}
    assert scores["both"] == pytest.approx(0.8, abs=1e-5)  # max over selfies, not the mean (0.7)
    both_match = next(m for m in together if m.photo_id == "both")
    assert both_match.faces == [MatchedFace(bbox=(0.0, 0.0, 10.0, 10.0), score=pytest.approx(0.8, abs=1e-5))]
    assert [m.photo_id for m in together][-1] == "both"  # ranked by score

    core.apply_guest(0, "E", "anna", enrol("anna", [front, side]))
    reply = ask(core, guest_id="anna")
    assert reply.status == "OK"
    assert reply.threshold == pytest.approx(THRESHOLD)
    assert {m.photo_id: round(m.score, 4) for m in reply.matches} == {"front": 1.0, "side": 1.0, "both": 0.8}


def test_enrolment_with_two_selfies_pushes_the_union(core: IndexerCore, feed: Feed) -> None:
    feed.add(photo("front", [ANNA]))
    feed.add(photo("side", [CARL]))
    feed.add(photo("other", [BEN]))
    assert pushed(core.apply_guest(0, "E", "anna", enrol("anna", [ANNA, CARL]))) == [("anna", "front"),
                                                                                      ("anna", "side")]


def test_guest_threshold_is_kept_and_used(core: IndexerCore, feed: Feed) -> None:
    feed.add(photo("close", [blend(ANNA, BEN, 0.9)]))
    feed.add(photo("far", [blend(ANNA, BEN, 0.6)]))
    strict = GuestRecord(event_id="E", guest_id="anna", model_id="m", dim=DIM, selfies=ANNA[None, :], threshold=0.85)
    assert pushed(core.apply_guest(0, "E", "anna", strict)) == [("anna", "close")]
    reply = ask(core, guest_id="anna")
    assert reply.threshold == pytest.approx(0.85)
    assert [m.photo_id for m in reply.matches] == ["close"]


# -- errors ----------------------------------------------------------------------------------

def test_unknown_guest_and_other_model_get_error_replies(core: IndexerCore, feed: Feed) -> None:
    feed.add(photo("p1", [ANNA]))
    core.apply_guest(0, "E", "anna", enrol("anna", [ANNA]))
    unknown = ask(core, guest_id="nobody")
    assert unknown.status == "ERROR" and unknown.error is not None
    assert unknown.error.startswith(GUEST_NOT_ENROLLED)
    elsewhere = ask(core, guest_id="anna", event="OTHER")
    assert elsewhere.status == "ERROR" and (elsewhere.error or "").startswith(GUEST_NOT_ENROLLED)
    other_model = ask(core, ANNA, model_id="other-model")
    assert other_model.status == "ERROR" and (other_model.error or "").startswith(MODEL_MISMATCH)
    assert ask(core, guest_id="anna", model_id="other-model").error.startswith(MODEL_MISMATCH)
    assert ask(core, ANNA, model_id="m").status == "OK"


@pytest.mark.parametrize("record", [
    enrol("anna", [ANNA], model_id="other-model"),
    GuestRecord(event_id="E", guest_id="anna", model_id="m", dim=DIM + 1, selfies=np.ones((1, DIM + 1), np.float32)),
], ids=["model", "dim"])
def test_enrol_with_another_model_is_poison(core: IndexerCore, record: GuestRecord) -> None:
    with pytest.raises(PoisonRecord) as caught:
        core.apply_guest(0, "E", "anna", record)
    assert caught.value.reason == "model_mismatch"
    assert ask(core, guest_id="anna").error.startswith(GUEST_NOT_ENROLLED)


@pytest.mark.parametrize("count", [0, 6])
def test_enrol_with_0_or_6_selfies_is_poison(core: IndexerCore, count: int) -> None:
    selfies = np.stack([axis(i) for i in range(count)]) if count else np.zeros((0, DIM), np.float32)
    record = GuestRecord(event_id="E", guest_id="anna", model_id="m", dim=DIM, selfies=selfies)
    with pytest.raises(PoisonRecord) as caught:
        core.apply_guest(0, "E", "anna", record)
    assert caught.value.reason == "invalid_guest"


def test_five_selfies_are_allowed(core: IndexerCore) -> None:
    core.apply_guest(0, "E", "anna", enrol("anna", [axis(i) for i in range(5)]))
    assert ask(core, guest_id="anna").status == "NO_FACES"  # enrolled; nothing indexed yet


# -- forget me -------------------------------------------------------------------------------

def test_forget_with_erase_withdraws_erases_and_keeps_the_face_out(core: IndexerCore, feed: Feed) -> None:
    feed.add(photo("group", [BEN, ANNA, CARL]))
    feed.add(photo("solo", [blend(ANNA, DORA, 0.9)]))
    feed.add(photo("ben", [BEN]))
    core.apply_guest(0, "E", "anna", enrol("anna", [ANNA]))
    index = core.partitions[0].events["E"]
    assert (index.size, index.photos) == (5, 3)

    changes = core.apply_guest(0, "E", "anna", forget("anna"))
    assert sorted(changes.withdrawn) == [("anna", "group"), ("anna", "solo")]
    assert changes.notifications == []
    assert (index.size, index.photos) == (3, 3)  # Anna's two faces gone, every photo stays
    rewrites = {r.photo_id: r for _, r in changes.rewrites}
    assert sorted(tail for tail, _ in changes.rewrites) == ["group", "solo"]  # plain keys: event/photo
    assert sorted(rewrites) == ["group", "solo"]
    group = rewrites["group"]
    assert (group.event_id, group.model_id, group.dim) == ("E", "m", DIM)
    assert group.image_url == "https://img/group.jpg"
    assert [f.bbox for f in group.faces] == [(0.0, 0.0, 10.0, 10.0), (2.0, 2.0, 10.0, 10.0)]
    assert float(group.faces[0].embedding @ BEN) == pytest.approx(1.0, abs=1e-5)
    assert float(group.faces[1].embedding @ CARL) == pytest.approx(1.0, abs=1e-5)
    assert rewrites["solo"].faces == [] and rewrites["solo"].image_url == "https://img/solo.jpg"
    assert index.photo_url["group"] == "https://img/group.jpg"  # a later erase keeps the url too

    assert ask(core, ANNA).matches == []  # her face finds nothing, whoever asks
    assert [m.photo_id for m in ask(core, BEN).matches] == ["ben", "group"]
    assert ask(core, guest_id="anna").error.startswith(GUEST_NOT_ENROLLED)

    # A lookalike enrolled afterwards is not pushed the erased photos, nor a new photo of Anna.
    assert pushed(core.apply_guest(0, "E", "dora", enrol("dora", [ANNA]))) == []
    later = feed.add(photo("later", [ANNA, CARL]))
    assert later.notifications == []
    assert [(r.photo_id, [f.bbox for f in r.faces]) for _, r in later.rewrites] == [("later", [(1.0, 1.0, 10.0, 10.0)])]
    assert later.rewrites[0][1].image_url == "https://img/later.jpg"
    assert (index.size, index.photos) == (4, 4)
    assert [m.photo_id for m in ask(core, CARL).matches] == ["group", "later"]


def test_forget_without_erase_keeps_old_faces_but_filters_queries_and_new_photos(core: IndexerCore,
                                                                                 feed: Feed) -> None:
    feed.add(photo("old", [ANNA, BEN]))
    core.apply_guest(0, "E", "anna", enrol("anna", [ANNA]))
    changes = core.apply_guest(0, "E", "anna", forget("anna", erase_faces=False))
    assert changes.withdrawn == [("anna", "old")] and changes.rewrites == []
    assert core.partitions[0].events["E"].size == 2
    assert ask(core, ANNA).matches == []
    later = feed.add(photo("new", [ANNA]))
    assert [r.faces for _, r in later.rewrites] == [[]]


def test_forget_without_selfies_republishes_the_enrolled_ones(core: IndexerCore) -> None:
    selfies = [ANNA * 2.0, CARL]  # not normalized on the wire: the resolved FORGET carries unit rows
    core.apply_guest(0, "E", "anna", enrol("anna", selfies))
    changes = core.apply_guest(0, "E", "anna", forget("anna", erase_faces=True))
    assert len(changes.guests) == 1
    resolved = changes.guests[0]
    assert (resolved.op, resolved.event_id, resolved.guest_id, resolved.erase_faces) == ("FORGET", "E", "anna", True)
    assert (resolved.model_id, resolved.dim) == ("m", DIM)
    assert np.allclose(resolved.selfies, np.stack([ANNA, CARL]))
    # The exclusion holds: a new photo with either selfie's face is indexed without it.
    later = Feed(core).add(photo("p", [CARL, BEN]))
    assert [[f.bbox for f in r.faces] for _, r in later.rewrites] == [[(1.0, 1.0, 10.0, 10.0)]]


def test_forget_with_its_own_selfies_is_not_republished(core: IndexerCore, feed: Feed) -> None:
    core.apply_guest(0, "E", "anna", enrol("anna", [ANNA]))
    changes = core.apply_guest(0, "E", "anna", forget("anna", [ANNA]))
    assert changes.guests == []
    assert [r.faces for _, r in feed.add(photo("p", [ANNA])).rewrites] == [[]]


def test_forget_of_a_stranger_without_selfies_keeps_nothing(core: IndexerCore, feed: Feed) -> None:
    changes = core.apply_guest(0, "E", "ghost", forget("ghost"))
    assert not changes
    assert "E" not in core.partitions[0].guests
    later = feed.add(photo("p", [ANNA, BEN]))
    assert later.rewrites == [] and core.partitions[0].events["E"].size == 2


# -- tombstones and deletes ------------------------------------------------------------------

def test_guest_tombstone_removes_enrolment_and_withdraws(core: IndexerCore, feed: Feed) -> None:
    feed.add(photo("p1", [ANNA]))
    feed.add(photo("p2", [ANNA, BEN]))
    core.apply_guest(0, "E", "anna", enrol("anna", [ANNA]))
    changes = core.apply_guest(0, "E", "anna", None)
    assert sorted(changes.withdrawn) == [("anna", "p1"), ("anna", "p2")]
    assert ask(core, guest_id="anna").error.startswith(GUEST_NOT_ENROLLED)
    assert feed.add(photo("p3", [ANNA])).notifications == []
    assert "E" not in core.partitions[0].guests


def test_guest_tombstone_lifts_an_exclusion(core: IndexerCore, feed: Feed) -> None:
    core.apply_guest(0, "E", "anna", forget("anna", [ANNA]))
    assert [r.faces for _, r in feed.add(photo("p1", [ANNA])).rewrites] == [[]]
    changes = core.apply_guest(0, "E", "anna", None)
    assert changes.withdrawn == []
    assert feed.add(photo("p2", [ANNA])).rewrites == []
    assert [m.photo_id for m in ask(core, ANNA).matches] == ["p2"]


def test_photo_delete_withdraws_its_notifications_only(core: IndexerCore, feed: Feed) -> None:
    core.apply_guest(0, "E", "anna", enrol("anna", [ANNA]))
    core.apply_guest(0, "E", "ben", enrol("ben", [BEN]))
    core.apply_guest(0, "E", "carl", enrol("carl", [CARL]))
    feed.add(photo("p1", [ANNA, BEN]))
    feed.add(photo("p2", [ANNA]))
    assert sorted(feed.delete("p1").withdrawn) == [("anna", "p1"), ("ben", "p1")]
    assert feed.delete("p1").withdrawn == []  # redelivered: withdrawn once
    assert feed.delete("missing").withdrawn == []
    # Uploaded again: pushed again, since its notifications were withdrawn.
    assert pushed(feed.add(photo("p1", [ANNA]))) == [("anna", "p1")]


def test_delete_event_erases_guests_and_withdraws_everything(core: IndexerCore, feed: Feed) -> None:
    core.apply_guest(0, "E", "anna", enrol("anna", [ANNA]))
    core.apply_guest(0, "E", "ben", enrol("ben", [BEN]))
    core.apply_guest(0, "E", "carl", forget("carl", [CARL]))
    core.apply_guest(0, "F", "anna", enrol("anna", [ANNA], event="F"))
    feed.add(photo("p1", [ANNA, BEN]))
    feed.add(photo("p2", [BEN]))
    feed.add(photo("q1", [ANNA], event="F"))
    changes = feed.delete_event("E")
    assert changes.erased_guests == ["anna", "ben", "carl"]
    assert sorted(changes.withdrawn) == [("anna", "p1"), ("ben", "p1"), ("ben", "p2")]
    assert changes.erased_photos == ["p1", "p2"]
    assert "E" not in core.partitions[0].guests
    assert ask(core, guest_id="anna").error.startswith(GUEST_NOT_ENROLLED)
    assert [m.photo_id for m in ask(core, guest_id="anna", event="F").matches] == ["q1"]


# -- restore after a rebalance ---------------------------------------------------------------

def test_restore_then_reconcile_pushes_only_what_was_never_pushed(core: IndexerCore, feed: Feed) -> None:
    for photo_id in ("p1", "p2", "p3"):
        feed.add(photo(photo_id, [ANNA]))
    feed.add(photo("p4", [BEN]))
    core.restore_notification(0, "E", "anna", "p1", present=True)
    core.restore_notification(0, "E", "anna", "p2", present=True)
    core.restore_notification(0, "E", "anna", "p3", present=True)
    core.restore_notification(0, "E", "anna", "p3", present=False)  # withdrawn later
    assert core.restore_guest(0, "E", "anna", enrol("anna", [ANNA])) is None
    core.restore_guest(0, "E", "ben", enrol("ben", [BEN]))
    found = core.reconcile(0)
    assert sorted((n.guest_id, n.photo_id) for n in found) == [("anna", "p3"), ("ben", "p4")]
    assert core.reconcile(0) == []
    assert core.reconcile(7) == []  # a partition this instance does not own
    assert feed.add(photo("p1", [ANNA, BEN])).notifications[0].guest_id == "ben"


def test_restored_exclusion_and_tombstone(core: IndexerCore, feed: Feed) -> None:
    core.restore_guest(0, "E", "anna", enrol("anna", [ANNA]))
    core.restore_guest(0, "E", "anna", forget("anna", [ANNA]))  # a later FORGET replaces the enrolment
    assert ask(core, guest_id="anna").error.startswith(GUEST_NOT_ENROLLED)
    assert [r.faces for _, r in feed.add(photo("p1", [ANNA])).rewrites] == [[]]
    core.restore_guest(0, "E", "anna", None)
    assert feed.add(photo("p2", [ANNA])).rewrites == []


# -- erasure on a promoted index -------------------------------------------------------------

def test_erase_matching_on_a_promoted_index() -> None:
    rng = np.random.default_rng(0)
    index = EventIndex(DIM, "m", IndexOptions(promote_at=500, nprobe=16))
    me = rng.normal(size=DIM).astype(np.float32)
    me /= np.linalg.norm(me)
    mine = set()
    for i in range(400):
        vectors = rng.normal(size=(2, DIM)).astype(np.float32)
        rows = list(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
        if i % 50 == 7:
            near = me + 0.1 * rows[0]
            rows.insert(1, near / np.linalg.norm(near))
            mine.add(f"p{i}")
        index.upsert(f"p{i}", [Face(bbox=(float(j), 0.0, 10.0, 10.0), det_score=0.9, embedding=v)
                               for j, v in enumerate(rows)], image_url=f"u{i}")
    index.delete("p3")  # ids are no longer 0..n-1
    index.promote_now()
    assert index.kind == "ivf-sq8"
    before, photos = index.size, index.photos
    assert [m.photo_id for m in index.search(rows[0], 1, 0.9)] == ["p399"]

    changed = index.erase_matching(me[None, :], 0.9)
    assert set(changed) == mine
    assert (index.size, index.photos) == (before - len(mine), photos)
    assert all([f.bbox for f in faces] == [(0.0, 0.0, 10.0, 10.0), (2.0, 0.0, 10.0, 10.0)]
               for faces in changed.values())
    assert index.photo_url["p7"] == "u7"
    assert index.search(me, 10, 0.9) == []
    assert [m.photo_id for m in index.search(rows[0], 1, 0.9)] == ["p399"]
    # Erasing again after more changes still works, and finds only the new face.
    index.upsert("late", [Face(bbox=(0.0, 0.0, 1.0, 1.0), det_score=0.9, embedding=me)])
    assert list(index.erase_matching(me[None, :], 0.9)) == ["late"]


def test_forget_erases_on_a_promoted_event_through_the_core() -> None:
    core = IndexerCore(IndexerConfig(dim=DIM, model_id="m", default_threshold=THRESHOLD,
                                     index=IndexOptions(promote_at=300, nprobe=16)))
    feed = Feed(core)
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(602, DIM)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    me, someone = rows[600], rows[601]
    for i in range(300):
        feed.add(photo(f"p{i}", [rows[2 * i], rows[2 * i + 1]]))
        if i == 200:
            feed.add(photo("mine", [someone, me]))
    index = core.partitions[0].events["E"]
    index.promote_now()
    assert index.kind == "ivf-sq8" and index.size == 602
    strict = 0.9  # random 32-d faces never come this close to her
    core.apply_guest(0, "E", "anna", replace(enrol("anna", [me]), threshold=strict))
    changes = core.apply_guest(0, "E", "anna", replace(forget("anna"), threshold=strict))
    assert changes.withdrawn == [("anna", "mine")]
    assert [(r.photo_id, [f.bbox for f in r.faces]) for _, r in changes.rewrites] == [
        ("mine", [(0.0, 0.0, 10.0, 10.0)])]
    assert float(changes.rewrites[0][1].faces[0].embedding @ someone) > 0.98  # 8-bit codes decoded
    assert index.size == 601
    assert ask(core, me).matches == []


# -- the readers' fold of the notifications topic --------------------------------------------

@pytest.fixture(scope="module")
def serde() -> SchemaRegistry:
    return SchemaRegistry.load()


def test_fold_dedupes_by_photo_withdraws_once_and_skips_before_after(serde: SchemaRegistry) -> None:
    def value(photo_id: str, guest: str = "anna") -> bytes:
        note = MatchNotification(event_id="E", guest_id=guest, photo_id=photo_id, score=0.9, model_id="m",
                                 faces=[MatchedFace(bbox=(1.0, 2.0, 3.0, 4.0), score=0.9)], notified_at=1)
        return serde.encode(MATCH_NOTIFICATION, note.to_avro())

    def key(photo_id: str, guest: str = "anna") -> bytes:
        return notification_key("E", guest, photo_id)

    fold = _Fold(notification_key("E", "anna", ""), 2, serde)
    log = [
        (key("p1"), value("p1")),  # 0: before `after`: skipped, still remembered
        (key("p9"), None),  # 1: withdrawal of a photo never shown
        (key("p1"), value("p1")),  # 2: pushed again after a redo: already had it
        (key("p1"), value("p1")),  # 3: again, after `after`: still a duplicate
        (key("p2"), value("p2")),  # 4: new
        (key("p2", "annabel"), value("p2", "annabel")),  # 5: another guest (key prefix must end at "/")
        (key("p2"), value("p2")),  # 6: duplicate
        (key("p2"), None),  # 7: withdrawn
        (key("p2"), None),  # 8: withdrawn again: nothing to withdraw
        (key("p2"), value("p2")),  # 9: pushed again after the withdrawal: shown again
        (None, value("p3")),  # 10: no key
        (key("p1"), None),  # 11: withdrawal of p1 (shown before `after`)
    ]
    entries = [e for offset, (k, v) in enumerate(log) for e in fold.take(k, v, offset)]
    assert [(e.offset, e.photo_id, e.notification is not None) for e in entries] == [
        (4, "p2", True), (7, "p2", False), (9, "p2", True), (11, "p1", False)]
    assert entries[0].notification is not None
    assert entries[0].notification.faces == [MatchedFace(bbox=(1.0, 2.0, 3.0, 4.0), score=pytest.approx(0.9))]


def test_fold_withdrawal_at_or_before_after_is_not_repeated(serde: SchemaRegistry) -> None:
    fold = _Fold(notification_key("E", "anna", ""), 1, serde)
    note = MatchNotification(event_id="E", guest_id="anna", photo_id="p1", score=0.9, model_id="m")
    data = serde.encode(MATCH_NOTIFICATION, note.to_avro())
    assert fold.take(notification_key("E", "anna", "p1"), data, 0) == []
    assert fold.take(notification_key("E", "anna", "p1"), None, 1) == []
    # Shown and withdrawn before the client's offset: a new push afterwards is shown.
    entries = fold.take(notification_key("E", "anna", "p1"), data, 2)
    assert [(e.offset, e.photo_id) for e in entries] == [(2, "p1")]
