"""The bridge with several uvicorn workers: each claims its own reply partition, every reply finds its caller."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from pipeline.devbroker import free_port
from pipeline.stack import get_json, spawn
from tests.integration.helpers import http, unit_vectors, wait_for, wait_index_size

DIM = 512
EVENTS = [f"W{i}" for i in range(6)]
PHOTOS_PER_EVENT = 20  # 120 photos, 120 concurrent match requests


def start_bridge(stack, workers: int) -> tuple[str, Any]:
    """`python -m pipeline.matcher` with FACEMATCH_BRIDGE_WORKERS and no pinned reply partition."""
    port = free_port()
    env = {k: v for k, v in stack.env.items() if k != "FACEMATCH_BRIDGE_REPLY_PARTITION"}
    env.update(FACEMATCH_HTTP_PORT=str(port), FACEMATCH_BRIDGE_WORKERS=str(workers),
               FACEMATCH_BRIDGE_RUNTIME_DIR=str(stack.workdir / "run"), FACEMATCH_BRIDGE_TIMEOUT_S="15")
    proc = spawn("bridge", "pipeline.matcher", env, stack.workdir / "logs")
    stack.procs.append(proc)
    return f"http://127.0.0.1:{port}", proc


def post_match(base: str, event_id: str, vector: np.ndarray) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST /api/v2/match on a fresh connection; (status, body, headers)."""
    body = json.dumps({"event_id": event_id, "user_embedding": [float(x) for x in vector], "top_k": 3,
                       "threshold": 0.5}).encode()
    request = urllib.request.Request(f"{base}/api/v2/match", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}"), dict(exc.headers)


def test_two_workers_claim_distinct_reply_partitions_and_answer_every_concurrent_caller(stack) -> None:
    stack.indexer()
    stack.embedder()
    base, bridge = start_bridge(stack, workers=2)

    # Both workers ready: /health names the worker and the reply partition it reads.
    seen: dict[int, int] = {}

    def both_workers_ready() -> bool:
        assert bridge.process.poll() is None, bridge.log_tail()
        try:
            status, body = get_json(f"{base}/health")
        except OSError:
            return False
        if status == 200:
            seen[body["worker"]["pid"]] = body["worker"]["reply_partition"]
        return len(seen) == 2
    wait_for(both_workers_ready, 90, "both workers ready", interval_s=0.1)
    assert sorted(seen.values()) == [0, 1], seen  # the test topics have 2 reply partitions

    vectors = unit_vectors(len(EVENTS) * PHOTOS_PER_EVENT, DIM, seed=5)
    for e, event in enumerate(EVENTS):
        for k in range(PHOTOS_PER_EVENT):
            status, body = http("POST", f"{base}/api/v2/ingest", {
                "event_id": event, "photo_id": f"{event}-p{k}",
                "embedding": vectors[e * PHOTOS_PER_EVENT + k].tolist()})
            assert status == 202, body
    for event in EVENTS:
        wait_index_size(base, event, vectors[0], PHOTOS_PER_EVENT)

    callers = [(event, k) for event in EVENTS for k in range(PHOTOS_PER_EVENT)]
    results: dict[tuple[str, int], tuple[int, dict[str, Any], dict[str, str]]] = {}
    start = threading.Barrier(len(callers))

    def call(e: int, event: str, k: int) -> None:
        start.wait()
        results[(event, k)] = post_match(base, event, vectors[e * PHOTOS_PER_EVENT + k])

    threads = [threading.Thread(target=call, args=(EVENTS.index(event), event, k)) for event, k in callers]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    elapsed = time.monotonic() - began

    assert len(results) == len(callers)
    served_by: dict[str, set[str]] = {}
    for (event, k), (status, body, headers) in results.items():
        assert status == 200, (event, k, status, body)
        assert body["matches"][0]["photo_id"] == f"{event}-p{k}", (event, k, body["matches"])
        assert body["matches"][0]["score"] > 0.99
        served_by.setdefault(headers["x-facematch-worker"], set()).add(headers["x-facematch-reply-partition"])
    # Both workers answered callers, each from its own partition, the one /health reported.
    assert len(served_by) == 2, served_by
    assert {int(pid): int(next(iter(parts))) for pid, parts in served_by.items()} == seen, served_by
    print(f"{len(callers)} concurrent matches in {elapsed:.2f}s, per worker: "
          f"{ {pid: sum(1 for r in results.values() if r[2]['x-facematch-worker'] == pid) for pid in served_by} }")


def test_more_workers_than_reply_partitions_refuse_to_start(stack) -> None:
    _, bridge = start_bridge(stack, workers=3)
    assert bridge.process.wait(timeout=60) == 2
    assert "3 workers but only 2 reply partitions" in bridge.log_tail()
