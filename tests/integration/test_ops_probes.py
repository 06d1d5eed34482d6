"""/healthz and /readyz of real consumer processes, next to their /metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from pipeline.devbroker import free_port
from tests.integration.helpers import wait_for


def probe(port: int, path: str) -> tuple[int, dict[str, Any]] | None:
    """(status, JSON body); None while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return None


def test_indexer_is_ready_only_once_it_owns_and_has_replayed_its_partitions(stack) -> None:
    port = free_port()
    indexer = stack.indexer(FACEMATCH_INDEXER_METRICS_PORT=str(port))
    answers: list[tuple[int, dict[str, Any]]] = []

    def ready() -> bool:
        answer = probe(port, "/readyz")
        if answer is not None:
            answers.append(answer)
        return answer is not None and answer[0] == 200
    wait_for(ready, 90, "indexer /readyz 200", interval_s=0.05)
    # The probe server is up before the group join, which takes seconds: it said 503 first.
    assert answers[0][0] == 503, answers[:3]
    for status, body in answers[:-1]:
        # Every 503 says why: no partition owned yet, a partition still replaying, or the loop not started.
        assert status == 503 and body["status"] == "unavailable", body
        assert body.get("assigned") == [] or body.get("replaying") or body.get("running") is False, body
    status, body = answers[-1]
    partitions = stack.topics.partitions
    assert body["status"] == "ok" and body["replaying"] == [] and body["stage"] == "indexer"
    assert len(body["assigned"]) == 3 * partitions  # faces, match-requests and guests, co-partitioned

    status, body = probe(port, "/healthz") or (0, {})
    assert status == 200 and body["running"] is True and body["last_poll_s_ago"] <= body["liveness_timeout_s"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert b"facematch_assigned_partitions" in response.read()
    assert (probe(port, "/nope") or (0, {}))[0] == 404
    assert indexer.stop() == 0


def test_embedder_probes(stack) -> None:
    port = free_port()
    stack.embedder(FACEMATCH_EMBEDDER_METRICS_PORT=str(port))
    wait_for(lambda: (probe(port, "/readyz") or (0, {}))[0] == 200, 90, "embedder /readyz 200")
    status, body = probe(port, "/readyz") or (0, {})
    assert body["stage"] == "embedder" and len(body["assigned"]) == stack.topics.partitions
    assert (probe(port, "/healthz") or (0, {}))[0] == 200
