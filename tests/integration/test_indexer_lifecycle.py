"""Indexer scaling, failover, snapshots and replay, with real processes on the real broker."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np

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


def log_has(proc, text: str) -> bool:
    return text in proc.log_path.read_text(errors="replace")


def test_two_indexers_split_partitions_and_fail_over(stack) -> None:
    first = stack.indexer("indexer-a")
    stack.embedder()
    base = stack.bridge()
    vectors = unit_vectors(100 * len(EVENTS), DIM, seed=21)
    ingest(base, vectors, EVENTS)
    for e, event in enumerate(EVENTS):
        wait_index_size(base, event, vectors[e * 100], PHOTOS)

    watcher = Watcher(base, vectors)
    watcher.start()
    second = stack.indexer("indexer-b")
    wait_for(lambda: log_has(second, "caught up"), 60, "indexer-b to own and replay partitions")
    wait_for(lambda: http("GET", f"{base}/health")[1].get("ready"), 60, "all partitions answering")
    assert log_has(first, "revoked"), "indexer-a never gave partitions away"
    # Both members now answer: every event still matches.
    for e, event in enumerate(EVENTS):
        assert match(base, event, vectors[e * 100])[1]["matches"][0]["photo_id"] == f"{event}-p0"

    assert second.stop() == 0  # graceful: its partitions go back to indexer-a
    time.sleep(1)
    wait_for(lambda: http("GET", f"{base}/health")[1].get("ready"), 60, "indexer-a owning everything")
    for e, event in enumerate(EVENTS):
        assert match(base, event, vectors[e * 100])[1]["matches"][0]["photo_id"] == f"{event}-p0"
    watcher.stop_flag.set()
    watcher.join(30)
    assert watcher.wrong == 0, watcher.wrong_examples[:3]
    assert watcher.ok > len(EVENTS)


def test_restart_from_snapshot_and_rebuild_by_replay(stack) -> None:
    state_dir = stack.workdir / "indexer-state"
    indexer = stack.indexer("indexer-1", state_dir=state_dir)
    stack.embedder()
    base = stack.bridge()
    vectors = unit_vectors(100 * len(EVENTS), DIM, seed=31)
    ingest(base, vectors, EVENTS)
    for e, event in enumerate(EVENTS):
        wait_index_size(base, event, vectors[e * 100], PHOTOS)
    before = snapshot_answers(base, vectors)

    assert indexer.stop() == 0
    snapshots = list(state_dir.rglob("partition-*.npz"))
    used = {partition_for(event, stack.topics.partitions) for event in EVENTS}
    assert len(snapshots) == len(used), snapshots  # graceful stop snapshots every partition with data
    # Photos arriving while no indexer runs must be replayed on top of the snapshot.
    ingest(base, vectors, EVENTS[:2], start=PHOTOS)
    restarted = stack.indexer("indexer-2", state_dir=state_dir)
    wait_for(lambda: http("GET", f"{base}/health")[1].get("ready"), 60, "restarted indexer ready")
    assert log_has(restarted, "snapshot at offset")
    wait_index_size(base, EVENTS[0], vectors[0], 2 * PHOTOS)
    wait_index_size(base, EVENTS[1], vectors[100], 2 * PHOTOS)
    after = snapshot_answers(base, vectors)
    unchanged = {k: v for k, v in before.items() if k[0] not in EVENTS[:2]}
    assert {k: after[k] for k in unchanged} == unchanged
    full = snapshot_answers(base, vectors, photos=2 * PHOTOS)

    assert restarted.stop() == 0
    shutil.rmtree(state_dir)
    rebuilt = stack.indexer("indexer-3", state_dir=state_dir)
    wait_for(lambda: http("GET", f"{base}/health")[1].get("ready"), 60, "rebuilt indexer ready")
    assert not log_has(rebuilt, "snapshot at offset")
    assert snapshot_answers(base, vectors, photos=2 * PHOTOS) == full
