"""Indexer scaling, failover, snapshots and replay, with real processes on the real broker."""

from __future__ import annotations

import shutil
import threading
import urllib.request

import numpy as np

from pipeline.devbroker import free_port
from pipeline.stack import ServiceProcess
from pipeline.topics import partition_for
from tests.integration.helpers import http, match, unit_vectors, wait_for, wait_index_size

DIM = 512
EVENTS = [f"LC{i}" for i in range(12)]  # spread over all 6 test partitions
PHOTOS = 8


def ingest(base: str, vectors: np.ndarray, events: list[str], start: int = 0) -> None:
    for e, event in enumerate(events):
        for k in range(start, start + PHOTOS):
            body = {"event_id": event, "photo_id": f"{event}-p{k}",
                    "embedding": vectors[e * 100 + k].tolist()}
            status, answer = http("POST", f"{base}/api/v2/ingest", body)
            assert status == 202, answer


def snapshot_answers(base: str, vectors: np.ndarray, photos: int = PHOTOS) -> dict:
    answers = {}
    for e, event in enumerate(EVENTS):
        for k in range(0, photos, 3):
            status, body = match(base, event, vectors[e * 100 + k], top_k=20, threshold=-1)
            assert status == 200, body
            answers[(event, k)] = [(m["photo_id"], round(m["score"], 5), m["faces"]) for m in body["matches"]]
    return answers


class Watcher(threading.Thread):
    """Queries every event in a loop; any 200 answer must be right."""

    def __init__(self, base: str, vectors: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.base, self.vectors = base, vectors
        self.stop_flag = threading.Event()
        self.ok = self.wrong = self.failed = 0
        self.wrong_examples: list[str] = []

    def run(self) -> None:
        while not self.stop_flag.is_set():
            for e, event in enumerate(EVENTS):
                status, body = match(self.base, event, self.vectors[e * 100], top_k=3)
                if status != 200:
                    self.failed += 1
                elif body["matches"] and body["matches"][0]["photo_id"] == f"{event}-p0":
                    self.ok += 1
                else:
                    self.wrong += 1
                    self.wrong_examples.append(f"{event}: {body}")


class Indexer:
    """An indexer process and its /metrics, the state the tests wait on."""

    def __init__(self, stack, name: str, **extra: str) -> None:  # type: ignore[no-untyped-def]
        self.port = free_port()
        self.proc: ServiceProcess = stack.indexer(name, FACEMATCH_INDEXER_METRICS_PORT=str(self.port), **extra)

    def metric(self, name: str) -> float:
        """One unlabelled sample of its /metrics; -1 while the endpoint is not up."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return -1.0
        for line in text.splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
        raise AssertionError(f"{self.proc.name} exports no {name}")

    def faces(self) -> float:
        """Faces held in the indexes of the partitions it owns."""
        return self.metric("facematch_index_faces")


def all_events_match(base: str, vectors: np.ndarray) -> bool:
    """Every event answers with its own first photo on top (through whichever indexer owns it)."""
    for e, event in enumerate(EVENTS):
        status, body = match(base, event, vectors[e * 100])
        if status != 200 or not body["matches"] or body["matches"][0]["photo_id"] != f"{event}-p0":
            return False
    return True


def test_two_indexers_split_partitions_and_fail_over(stack) -> None:
    first = Indexer(stack, "indexer-a")
    stack.embedder()
    base = stack.bridge()
    vectors = unit_vectors(100 * len(EVENTS), DIM, seed=21)
    ingest(base, vectors, EVENTS)
    for e, event in enumerate(EVENTS):
        wait_index_size(base, event, vectors[e * 100], PHOTOS)
    total = len(EVENTS) * PHOTOS
    wait_for(lambda: first.faces() == total, 30, f"indexer-a holding all {total} faces")

    watcher = Watcher(base, vectors)
    watcher.start()
    second = Indexer(stack, "indexer-b")
    # The split is done when each holds a share and together they hold every face exactly once.
    wait_for(lambda: 0 < first.faces() < total and 0 < second.faces() < total
             and first.faces() + second.faces() == total, 60, "indexer-a and indexer-b splitting the faces")
    # Both members now answer: every event matches (no /health here: its answer is cached for 2 s).
    wait_for(lambda: all_events_match(base, vectors), 60, "every event answered after the split")

    assert second.proc.stop() == 0  # graceful: its partitions go back to indexer-a
    wait_for(lambda: first.faces() == total, 60, "indexer-a holding every face again")
    wait_for(lambda: all_events_match(base, vectors), 60, "every event answered by indexer-a alone")
    watcher.stop_flag.set()
    watcher.join(30)
    assert watcher.wrong == 0, watcher.wrong_examples[:3]
    assert watcher.ok > len(EVENTS)


def test_restart_from_snapshot_and_rebuild_by_replay(stack) -> None:
    state_dir = stack.workdir / "indexer-state"
    indexer = Indexer(stack, "indexer-1", state_dir=state_dir)
    stack.embedder()
    base = stack.bridge()
    vectors = unit_vectors(100 * len(EVENTS), DIM, seed=31)
    ingest(base, vectors, EVENTS)
    for e, event in enumerate(EVENTS):
        wait_index_size(base, event, vectors[e * 100], PHOTOS)
    before = snapshot_answers(base, vectors)

    assert indexer.proc.stop() == 0
    snapshots = list(state_dir.rglob("partition-*.npz"))
    used = {partition_for(event, stack.topics.partitions) for event in EVENTS}
    assert len(snapshots) == len(used), snapshots  # graceful stop snapshots every partition with data
    # Photos arriving while no indexer runs must be replayed on top of the snapshot.
    ingest(base, vectors, EVENTS[:2], start=PHOTOS)
    restarted = Indexer(stack, "indexer-2", state_dir=state_dir)
    wait_index_size(base, EVENTS[0], vectors[0], 2 * PHOTOS)
    wait_index_size(base, EVENTS[1], vectors[100], 2 * PHOTOS)
    wait_for(lambda: all_events_match(base, vectors), 60, "restarted indexer answering every event")
    # It started from the snapshots: it replayed at most the photos that arrived while it was down.
    assert 0 <= restarted.metric("facematch_replay_records_total") <= 2 * PHOTOS
    after = snapshot_answers(base, vectors)
    unchanged = {k: v for k, v in before.items() if k[0] not in EVENTS[:2]}
    assert {k: after[k] for k in unchanged} == unchanged
    full = snapshot_answers(base, vectors, photos=2 * PHOTOS)

    assert restarted.proc.stop() == 0
    shutil.rmtree(state_dir)
    rebuilt = Indexer(stack, "indexer-3", state_dir=state_dir)
    everything = (len(EVENTS) + 2) * PHOTOS
    wait_for(lambda: rebuilt.faces() == everything, 60, f"the rebuilt indexer holding all {everything} faces")
    wait_for(lambda: all_events_match(base, vectors), 60, "rebuilt indexer answering every event")
    # No snapshots: it replayed the whole faces log.
    assert rebuilt.metric("facematch_replay_records_total") >= everything
    assert snapshot_answers(base, vectors, photos=2 * PHOTOS) == full
