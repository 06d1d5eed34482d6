"""Reply partition claims of bridge processes (lock files; no Kafka)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pipeline.facelib.model import DetectedFace
from pipeline.matcher.main import selfie_reader
from pipeline.matcher.replies import NoReplyPartition, claim_reply_partition, parse_partition_set
from pipeline.settings import EmbedderSettings

TOPIC = "facematch.match-replies"


def test_partition_sets_parse_ranges_and_refuse_partitions_the_topic_lacks() -> None:
    assert parse_partition_set("", 3) == [0, 1, 2]
    assert parse_partition_set("0-2, 5,4", 8) == [0, 1, 2, 4, 5]
    for bad in ("8", "2-1", "x", "-1"):
        with pytest.raises(ValueError, match="FACEMATCH_BRIDGE_REPLY_PARTITIONS"):
            parse_partition_set(bad, 8)


def test_each_claim_gets_its_own_partition_until_none_is_left(tmp_path: Path) -> None:
    first = claim_reply_partition(tmp_path, "b:9092", TOPIC, [0, 1])
    second = claim_reply_partition(tmp_path, "b:9092", TOPIC, [0, 1])
    assert (first.partition, second.partition) == (0, 1) and first.exclusive and second.exclusive
    with pytest.raises(NoReplyPartition, match="run fewer bridge workers"):
        claim_reply_partition(tmp_path, "b:9092", TOPIC, [0, 1])
    other_cluster = claim_reply_partition(tmp_path, "other:9092", TOPIC, [0, 1])
    assert other_cluster.partition == 0  # same topic name, another cluster: another partition
    first.release()
    assert claim_reply_partition(tmp_path, "b:9092", TOPIC, [0, 1]).partition == 0  # freed, claimed again


def test_a_pinned_partition_is_shared_with_a_warning_not_refused(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    held = claim_reply_partition(tmp_path, "b:9092", TOPIC, [0, 1])
    pinned = claim_reply_partition(tmp_path, "b:9092", TOPIC, [0, 1], pinned=held.partition)
    assert pinned.partition == held.partition and not pinned.exclusive
    assert "also read by another bridge" in caplog.text


def test_a_dead_process_frees_its_partition(tmp_path: Path) -> None:
    code = ("import sys, time; from pathlib import Path; from pipeline.matcher.replies import claim_reply_partition;"
            f"c = claim_reply_partition(Path({str(tmp_path)!r}), 'b:9092', {TOPIC!r}, [0, 1]);"
            "print(c.partition, flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "0"
        assert claim_reply_partition(tmp_path, "b:9092", TOPIC, [0, 1]).partition == 1
        child.kill()  # SIGKILL: no cleanup code runs, the kernel drops the lock
        child.wait(timeout=10)
        assert claim_reply_partition(tmp_path, "b:9092", TOPIC, [0, 1]).partition == 0
    finally:
        child.kill()
        child.wait(timeout=10)


class SlowModel:
    """Counts how many threads run it at once; one face per image."""

    def __init__(self) -> None:
        self.running, self.most, self.calls = 0, 0, 0
        self.guard = threading.Lock()

    def detect_and_embed(self, images: list[Any]) -> list[list[DetectedFace]]:
        with self.guard:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)
        with self.guard:
            self.running -= 1
        return [[DetectedFace((1.0, 1.0, 4.0, 4.0), 0.9, None, np.ones(4, dtype=np.float32))] for _ in images]


def test_selfies_run_on_a_pool_of_model_instances_each_used_by_one_thread_at_a_time() -> None:
    models = [SlowModel(), SlowModel()]
    faces_in_image = selfie_reader(models, EmbedderSettings())  # type: ignore[arg-type]
    ok, png = cv2.imencode(".png", np.zeros((32, 32, 3), dtype=np.uint8))
    assert ok
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: faces_in_image(png.tobytes()), range(16)))
    assert all(len(faces) == 1 for faces in answers)
    assert [m.most for m in models] == [1, 1]  # never two threads in one instance
    assert sum(m.calls for m in models) == 16 and min(m.calls for m in models) > 0  # both instances worked
