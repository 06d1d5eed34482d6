"""Direct queries on the real broker: the bridge learns each partition's owner from its Kafka
replies, then asks it over TCP; answers equal the Kafka path's, and a killed owner is replaced
by whoever the Kafka path names next."""

from __future__ import annotations

import urllib.request

import numpy as np

from pipeline.devbroker import free_port
from tests.integration.helpers import http, match, unit_vectors, wait_for, wait_index_size

DIM = 512
EVENTS = [f"DQ{i}" for i in range(6)]
PHOTOS = 5


def counter(url: str, outcome: str) -> float:
    """facematch_direct_queries_total{outcome=...} of a /metrics page; -1 while it is not up."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return -1.0
    prefix = f'facematch_direct_queries_total{{outcome="{outcome}"}} '
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def answers(base: str, vectors: np.ndarray) -> list[list[tuple[str, float]]]:
    out = []
    for e, event in enumerate(EVENTS):
        status, body = match(base, event, vectors[e * 10], top_k=10, threshold=-1)
        assert status == 200, body
        out.append([(m["photo_id"], round(m["score"], 5)) for m in body["matches"]])
    return out


def test_direct_answers_equal_kafka_answers_and_survive_an_owner_restart(stack) -> None:
    metrics_port = free_port()
    indexer = stack.indexer(FACEMATCH_INDEXER_METRICS_PORT=str(metrics_port))
    stack.embedder()
    direct = stack.bridge("bridge-direct", reply_partition=0)
    via_kafka = stack.bridge("bridge-kafka", reply_partition=1, FACEMATCH_BRIDGE_DIRECT_QUERIES="false")
    vectors = unit_vectors(10 * len(EVENTS), DIM, seed=41)
    for e, event in enumerate(EVENTS):
        for k in range(PHOTOS):
            photo = {"event_id": event, "photo_id": f"{event}-p{k}", "embedding": vectors[e * 10 + k].tolist()}
            status, body = http("POST", f"{direct}/api/v2/ingest", photo)
            assert status == 202, body
    for e, event in enumerate(EVENTS):
        wait_index_size(direct, event, vectors[e * 10], PHOTOS)
    indexer_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    before = counter(indexer_metrics, "answered")

    expected = answers(via_kafka, vectors)
    assert all(found[0][0] == f"{event}-p0" for event, found in zip(EVENTS, expected, strict=True))
    assert answers(direct, vectors) == expected
    assert counter(indexer_metrics, "answered") >= before + len(EVENTS)  # the direct bridge asked it
    assert counter(f"{direct}/metrics", "answered") >= len(EVENTS)
    status, health = http("GET", f"{direct}/health")
    assert health["direct_routes"] >= 1, health

    indexer.kill()  # the bridge's pooled connections die with it; a new one listens on another port
    second_port = free_port()
    stack.indexer(FACEMATCH_INDEXER_METRICS_PORT=str(second_port))
    second_metrics = f"http://127.0.0.1:{second_port}/metrics"
    wait_for(lambda: answers_or_none(direct, vectors) == expected, 120, "the direct bridge answering again")

    def asked_directly() -> bool:
        answers_or_none(direct, vectors)  # Kafka replies of the new owner teach its address
        return counter(second_metrics, "answered") > 0
    wait_for(asked_directly, 60, "the new owner answering directly")
    assert answers(direct, vectors) == expected


def answers_or_none(base: str, vectors: np.ndarray) -> list[list[tuple[str, float]]] | None:
    try:
        return answers(base, vectors)
    except AssertionError:
        return None
