"""The Firestore producers' pure parts: documents -> PhotoEvents, fingerprints, the ledger, one sync step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from pipeline.errors import PoisonRecord
from pipeline.metrics import create_metrics
from pipeline.producers.documents import REMOVE, UPSERT, DocChange, Layout, fingerprint, photo_ref, to_photo_event
from pipeline.producers.ledger import Entry, Ledger, LedgerLocked
from pipeline.producers.publisher import Acks
from pipeline.producers.sync import Syncer, coalesce, removed_since

DIM = 4
LAYOUT = Layout()
GOOD = [0.1, 0.2, 0.3, 0.4]


def upsert(data: dict[str, Any], path: str = "events/E1/photos/P1", update_ms: int = 1000) -> DocChange:
    return DocChange(kind=UPSERT, path=path, data=data, update_ms=update_ms)


def event_of(data: dict[str, Any], path: str = "events/E1/photos/P1"):
    return to_photo_event(upsert(data, path), LAYOUT, DIM, "test")


def reason_of(data: dict[str, Any]) -> str:
    with pytest.raises(PoisonRecord) as info:
        event_of(data)
    return info.value.reason


def test_image_url_document_becomes_an_upsert() -> None:
    event = event_of({"image_url": "https://cdn.example/p1.jpg", "caption": "hi"})
    assert (event.event_id, event.photo_id, event.op) == ("E1", "P1", "UPSERT")
    assert event.image_url == "https://cdn.example/p1.jpg" and event.faces is None
    assert event.occurred_at == 1000 and event.source == "test"


def test_embedding_and_faces_become_precomputed_faces() -> None:
    assert event_of({"embedding": [1, 2, 3, 4]}).faces[0].embedding == [1.0, 2.0, 3.0, 4.0]
    # Firestore forbids arrays in arrays: real documents carry a list of maps.
    faces = event_of({"faces": [{"embedding": GOOD, "bbox": [1, 2, 3, 4], "det_score": 0.9},
                                {"embedding": GOOD}]}).faces
    assert [f.bbox for f in faces] == [[1.0, 2.0, 3.0, 4.0], None]
    assert faces[0].det_score == pytest.approx(0.9)
    assert len(event_of({"faces": [GOOD, GOOD]}).faces) == 2  # plain lists, from non-Firestore writers
    assert event_of({"faces": [], "image_url": "http://x/y.jpg"}).faces == []


def test_nested_event_path_and_foreign_photos() -> None:
    assert photo_ref("orgs/O/events/E9/photos/P9", LAYOUT).event_id == "E9"
    assert event_of({"image_url": "http://x/a.jpg"}, path="users/U/photos/P") is None
    assert photo_ref("events/E/photos/P", Layout(events="albums")) is None
    assert photo_ref("albums/E/pics/P", Layout(events="albums", photos="pics")).photo_id == "P"


@pytest.mark.parametrize("data, reason", [
    ({}, "missing_image_url"),
    ({"caption": "no image"}, "missing_image_url"),
    ({"image_url": ""}, "missing_image_url"),
    ({"image_url": 42}, "wrong_type"),
    ({"image_url": "ftp://x/y.jpg"}, "invalid_image_url"),
    ({"embedding": "0.1,0.2"}, "wrong_type"),
    ({"embedding": [0.1, "a", 0.3, 0.4]}, "wrong_type"),
    ({"embedding": [True, 0.2, 0.3, 0.4]}, "wrong_type"),
    ({"embedding": [0.1, 0.2]}, "invalid_embedding"),
    ({"embedding": [math.nan, 0.2, 0.3, 0.4]}, "invalid_embedding"),
    ({"embedding": [math.inf, 0.2, 0.3, 0.4]}, "invalid_embedding"),
    ({"embedding": [0, 0, 0, 0]}, "invalid_embedding"),
    ({"faces": {"embedding": GOOD}}, "wrong_type"),
    ({"faces": ["x"]}, "wrong_type"),
    ({"faces": [{"embedding": GOOD, "bbox": [1, 2]}]}, "invalid_bbox"),
    ({"faces": [{"embedding": GOOD, "det_score": "high"}]}, "wrong_type"),
    ({"faces": [{"bbox": [1, 2, 3, 4]}]}, "wrong_type"),
    ({"embedding": GOOD, "faces": [GOOD]}, "ambiguous_faces"),
])
def test_malformed_documents_name_their_fault(data: dict[str, Any], reason: str) -> None:
    assert reason_of(data) == reason


def test_invalid_ids_are_poison() -> None:
    with pytest.raises(PoisonRecord) as info:
        event_of({"image_url": "http://x/a.jpg"}, path=f"events/{'e' * 300}/photos/P")
    assert info.value.reason == "invalid_event_id"


def test_remove_becomes_a_delete() -> None:
    event = to_photo_event(DocChange(kind=REMOVE, path="events/E1/photos/P1", update_ms=5), LAYOUT, DIM, "t")
    assert (event.op, event.event_id, event.photo_id, event.image_url) == ("DELETE", "E1", "P1", None)


def test_fingerprint_sees_only_what_the_index_uses() -> None:
    base = {"image_url": "http://x/a.jpg", "embedding": GOOD}
    assert fingerprint(base) == fingerprint({**base, "caption": "new", "likes": 3})
    assert fingerprint(base) != fingerprint({**base, "image_url": "http://x/b.jpg"})
    assert fingerprint(base) != fingerprint({**base, "embedding": [*GOOD[:3], 0.5]})
    assert fingerprint({"image_url": object.__new__(object)}) is not None  # odd Firestore values hash


def test_ledger_survives_reopen_torn_lines_and_locks(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ledger"
    ledger = Ledger.open(path)
    ledger.commit({"events/E/photos/a": Entry("f1", 1), "events/E/photos/b": Entry("f2", 2)}, meta={"w": "x"})
    ledger.commit({"events/E/photos/a": None, "events/E/photos/b": Entry("f3", 3)})
    with pytest.raises(LedgerLocked):
        Ledger.open(path)
    ledger.close()
    with path.open("a") as f:
        f.write('{"k": "events/E/photos/c", "f": "torn')  # a crash mid-append
    reopened = Ledger.open(path)
    assert dict(reopened.entries) == {"events/E/photos/b": Entry("f3", 3)}
    assert reopened.meta == {"w": "x"}
    reopened.commit({"events/E/photos/d": Entry("f4", 4)})
    reopened.close()
    assert set(Ledger.open(path).entries) == {"events/E/photos/b", "events/E/photos/d"}


def test_ledger_compacts_its_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.producers.ledger.MIN_COMPACT_LINES", 10)
    ledger = Ledger.open(tmp_path / "ledger")
    for i in range(50):
        ledger.commit({"events/E/photos/a": Entry(f"f{i}", i)})
    ledger.close()
    assert len((tmp_path / "ledger").read_text().splitlines()) < 25
    assert Ledger.open(tmp_path / "ledger").get("events/E/photos/a") == Entry("f49", 49)


class FakePublisher:
    """Records sends; acks all except the tokens in `drop`."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.drop: set[str] = set()
        self.metrics = create_metrics()
        self._tokens: list[str] = []

    def send(self, token: str, event: Any) -> None:
        self.sent.append(("event", event))
        self._tokens.append(token)

    def dead_letter(self, token: str, change: DocChange, error: PoisonRecord) -> None:
        self.sent.append(("dlq", error.reason))
        self._tokens.append(token)

    def wait(self, timeout_s: float = 30.0) -> Acks:
        acks = Acks()
        for token in self._tokens:
            if token in self.drop:
                acks.failed[token] = "dropped"
            else:
                acks.acked.add(token)
                acks.ack_ms[token] = 2000
        self._tokens = []
        return acks


def test_sync_publishes_changes_once_and_checkpoints_only_acks(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "ledger")
    publisher = FakePublisher()
    syncer = Syncer(ledger, publisher, LAYOUT, DIM, "test")  # type: ignore[arg-type]
    docs = [upsert({"embedding": GOOD}, f"events/E/photos/p{i}") for i in range(3)]
    stats, retry = syncer.apply(docs + [upsert({}, "events/E/photos/bad"), upsert({"x": 1}, "users/u/photos/z")])
    assert (stats.published, stats.dead_lettered, stats.ignored, retry) == (3, 1, 1, [])
    assert stats.latencies_ms == [1000, 1000, 1000]
    # The SDK re-delivers everything after a reset: nothing is republished, the bad one is not re-lettered.
    stats, _ = syncer.apply(docs + [upsert({}, "events/E/photos/bad")])
    assert (stats.published, stats.skipped, len(publisher.sent)) == (0, 4, 4)
    # A caption edit is skipped; a new image_url is republished.
    stats, _ = syncer.apply([upsert({"embedding": GOOD, "caption": "c"}, "events/E/photos/p0"),
                             upsert({"embedding": GOOD, "image_url": "http://x/new.jpg"}, "events/E/photos/p1")])
    assert (stats.published, stats.skipped) == (1, 1)
    # Unacked records are not checkpointed and come back for retry.
    publisher.drop = {"events/E/photos/p9"}
    stats, retry = syncer.apply([upsert({"embedding": GOOD}, "events/E/photos/p9")])
    assert stats.published == 0 and [c.path for c in retry] == ["events/E/photos/p9"]
    assert ledger.get("events/E/photos/p9") is None
    # Removing publishes a DELETE and forgets the photo.
    stats, _ = syncer.apply([DocChange(kind=REMOVE, path="events/E/photos/p2")])
    assert stats.deleted == 1 and ledger.get("events/E/photos/p2") is None
    assert publisher.sent[-1][1].op == "DELETE"


def test_force_republishes_and_coalesce_keeps_the_last_change(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "ledger")
    doc = upsert({"embedding": GOOD})
    Syncer(ledger, FakePublisher(), LAYOUT, DIM, "t").apply([doc])  # type: ignore[arg-type]
    stats, _ = Syncer(ledger, FakePublisher(), LAYOUT, DIM, "t", force=True).apply([doc])  # type: ignore[arg-type]
    assert stats.published == 1
    gone = DocChange(kind=REMOVE, path=doc.path)
    assert list(coalesce([doc, gone]).values()) == [gone]


def test_removed_since_finds_photos_deleted_while_away(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path / "ledger")
    ledger.commit({"events/E/photos/a": Entry("f"), "events/E/photos/b": Entry("f"),
                   "events/F/photos/c": Entry("f")})
    assert [c.path for c in removed_since(ledger, ["events/E/photos/a"], LAYOUT)] == \
        ["events/E/photos/b", "events/F/photos/c"]
    assert [c.path for c in removed_since(ledger, [], LAYOUT, event_prefix="events/F/")] == ["events/F/photos/c"]


def test_a_crash_between_acks_and_checkpoint_republishes_only_that_step(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger"
    ledger = Ledger.open(path)
    syncer = Syncer(ledger, FakePublisher(), LAYOUT, DIM, "t")  # type: ignore[arg-type]
    first = [upsert({"embedding": GOOD}, f"events/E/photos/a{i}") for i in range(5)]
    second = [upsert({"embedding": GOOD}, f"events/E/photos/b{i}") for i in range(3)]
    syncer.apply(first)

    def killed(*_: Any, **__: Any) -> None:
        raise SystemExit("SIGKILL after the acks, before the fsync")

    monkeypatch.setattr(ledger, "commit", killed)
    with pytest.raises(SystemExit):
        syncer.apply(second)
    ledger.close()
    # Restart: the initial snapshot re-delivers everything; only the unfinished step goes out again.
    publisher = FakePublisher()
    stats, _ = Syncer(Ledger.open(path), publisher, LAYOUT, DIM, "t").apply(first + second)  # type: ignore[arg-type]
    assert (stats.published, stats.skipped) == (len(second), len(first))
