"""A bridge whose broker dies answers 503 + Retry-After, in bounded time, instead of hanging."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.devbroker import EmbeddedBroker
from pipeline.settings import KafkaSettings, TopicSettings
from pipeline.topics import create_topics
from tests.conftest import Stack, stack_env
from tests.integration.helpers import wait_for

DIM = 512
REPLIES_BEFORE = 300


def request(method: str, url: str, body: Any = None, timeout_s: float = 20.0) -> tuple[int, dict, Any]:
    """(status, JSON body, headers) for every status; the timeout is the test's bound on hanging."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}"), exc.headers


@pytest.fixture
def private_stack(private_broker: EmbeddedBroker, tmp_path: Path,
                  request: pytest.FixtureRequest) -> Iterator[Stack]:
    topics = TopicSettings(prefix=f"t{uuid.uuid4().hex[:10]}.", partitions=2, reply_partitions=1,
                           dlq_partitions=1)
    create_topics(KafkaSettings(bootstrap_servers=private_broker.bootstrap), topics)
    stack = Stack(private_broker.bootstrap, topics, tmp_path, stack_env(private_broker.bootstrap, topics))
    yield stack
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(stack.logs())
    stack.stop_all()


def test_ingest_and_match_answer_503_with_retry_after_when_the_broker_is_down(
        private_stack: Stack, private_broker: EmbeddedBroker) -> None:
    private_stack.indexer()
    base = private_stack.bridge(FACEMATCH_BRIDGE_TIMEOUT_S="3.0")  # waits for /health 200: ready
    photo = {"event_id": "E", "photo_id": "p1", "embedding": [0.1] * DIM}
    status, body, _ = request("POST", f"{base}/api/v2/ingest", photo)
    assert status == 202, body  # the broker is up: accepted
    # Replies well past what probes alone write: a bridge that waits at its old reply offset on the
    # new, empty log (Tansu answers such fetches empty, not OFFSET_OUT_OF_RANGE) would lose the
    # next REPLIES_BEFORE replies, and /health would stay 503 for minutes.
    for _ in range(REPLIES_BEFORE):
        status, body, _ = request("POST", f"{base}/api/v2/match", {"event_id": "E", "user_embedding": [0.1] * DIM})
        assert status == 200, body

    private_broker.stop()

    # Bounded by message.timeout.ms (5 s by default); the 20 s client timeout is the "it hangs" failure.
    status, body, headers = request("POST", f"{base}/api/v2/ingest", {**photo, "photo_id": "p2"})
    assert status == 503, body
    assert int(headers["Retry-After"]) > 0 and "Kafka is unavailable" in body["error"]
    # The indexer that owns the event may still answer directly (pipeline/direct.py) until librdkafka
    # declares its assignment lost (session.timeout.ms without a heartbeat: 6 s here); then Kafka's 503.
    outcomes: list[int] = []

    def refused() -> bool:
        query = {"event_id": "E", "user_embedding": [0.1] * DIM}
        status, body, headers = request("POST", f"{base}/api/v2/match", query)
        outcomes.append(status)
        if status == 503:
            assert headers["Retry-After"] and "error" in body, body
        return status == 503
    wait_for(refused, 60, "match refused with 503 once the indexer has lost its partitions", interval_s=0.5)
    assert set(outcomes) <= {200, 503}, outcomes

    status, health, _ = request("GET", f"{base}/health")
    assert status == 503 and health["ready"] is False and health["broker"]["reachable"] is False
    assert health["status"] == "degraded"

    # The broker comes back (empty: memory storage): ingest works again without restarting the bridge,
    # even if the old idempotent producer turned fatal meanwhile (it is replaced).
    private_broker.restart()
    create_topics(KafkaSettings(bootstrap_servers=private_broker.bootstrap), private_stack.topics)
    answers: list[int] = []

    def accepted() -> bool:
        status, body, _ = request("POST", f"{base}/api/v2/ingest", {**photo, "photo_id": "p3"})
        answers.append(status)
        return status == 202
    wait_for(accepted, 60, "ingest accepted again after the broker is back", interval_s=0.5)
    assert set(answers) <= {202, 503}, answers

    # Load balancers act on /health: it turns 200 again once the indexer owns every partition anew.
    def healthy() -> dict[str, Any] | None:
        status, health, _ = request("GET", f"{base}/health")
        return health if status == 200 and health["ready"] else None
    health = wait_for(healthy, 120, "/health 200 after the broker is back", interval_s=0.5)
    assert health["broker"]["reachable"] and health["partitions_owned"] == health["partitions"]
    status, body, _ = request("POST", f"{base}/api/v2/match", {"event_id": "E", "user_embedding": [0.1] * DIM})
    assert status == 200, body
