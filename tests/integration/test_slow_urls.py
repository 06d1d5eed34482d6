"""Slow image URLs never block polling: retries wait on a paused partition, not on the poll thread.

Two embedders share the work. Photos behind URLs that time out are retried
and then dead-lettered, while the good photos behind them are indexed; no
member is evicted (max.poll.interval.ms is set low on purpose) and every photo
event is handled exactly once across both embedders.
"""

from __future__ import annotations

from pathlib import Path

from tests.httpserver import serve, slow
from tests.integration.helpers import http, read_topic, wait_for
from tests.integration.test_faces_pipeline import ingest_urls, metric_samples

SLOW_PHOTOS = 8
EVENTS = [f"RACE{i}" for i in range(6)]


def counter(port: int, name: str, **labels: str) -> float:
    return sum(s.value for s in metric_samples(port, name) if all(s.labels.get(k) == v for k, v in labels.items()))


def test_slow_urls_do_not_evict_or_duplicate(stack, sface_model_root: Path, sample_photos: dict[str, Path]) -> None:
    from pipeline.devbroker import free_port

    # With retries that sleep on the poll thread, 8 slow photos x 3 attempts would hold one poll
    # far past this max.poll.interval.ms and get the member evicted.
    stack.env.update({"FACEMATCH_MODEL": "sface", "FACEMATCH_MODEL_ROOT": str(sface_model_root),
                      "FACEMATCH_EMBEDDING_DIM": "128", "FACEMATCH_FETCH_ALLOW_LIST": "127.0.0.1/32",
                      "FACEMATCH_FETCH_READ_TIMEOUT_S": "1.0", "FACEMATCH_FETCH_TOTAL_TIMEOUT_S": "1.5",
                      "FACEMATCH_RUNNER_MAX_ATTEMPTS": "3", "FACEMATCH_RUNNER_BACKOFF_INITIAL_S": "1.0",
                      "FACEMATCH_RUNNER_MAX_POLL_INTERVAL_MS": "7000"})
    stack.indexer()
    ports = [free_port(), free_port()]
    for i, port in enumerate(ports):
        stack.embedder(f"embedder-{i}", FACEMATCH_EMBEDDER_METRICS_PORT=str(port))
    base = stack.bridge()

    def owned(port: int) -> float:
        return counter(port, "facematch_assigned_partitions")
    wait_for(lambda: all(owned(p) > 0 for p in ports) and sum(owned(p) for p in ports) == stack.topics.partitions,
             90, "the photo-events partitions split between both embedders")
    revoked_before = [counter(p, "facematch_rebalance_events_total", event="revoked") for p in ports]

    routes = {f"/slow{i}.jpg": slow(30.0) for i in range(SLOW_PHOTOS)}
    routes["/obama.jpg"] = sample_photos["obama.jpg"].read_bytes()
    with serve(routes) as site:
        for i in range(SLOW_PHOTOS):  # the slow ones first, so good photos queue behind them
            ingest_urls(base, EVENTS[i % len(EVENTS)], {f"slow{i}": site.url(f"/slow{i}.jpg")})
        for event in EVENTS:
            ingest_urls(base, event, {"good": site.url("/obama.jpg")})

        def good_indexed() -> bool:
            return all(http("POST", f"{base}/api/v2/match", {"event_id": e, "user_embedding": [0.1] * 128})[1]
                       .get("index_size") == 1 for e in EVENTS)
        wait_for(good_indexed, 180, "every event's good photo indexed")

        def letters() -> list | None:
            found = [m for m in read_topic(stack.bootstrap, stack.topics.dlq, stack.topics.dlq_partitions,
                                           expect=SLOW_PHOTOS, timeout_s=5)]
            return found if len(found) >= SLOW_PHOTOS else None
        dead = wait_for(letters, 180, "every slow photo dead-lettered")

    for msg in dead:
        headers = {k: v.decode() for k, v in msg.headers() or []}
        assert headers["dlq.reason"] == "fetch_timeout" and headers["dlq.attempts"] == "3", headers
    handled = sum(counter(p, "facematch_records_total", stage="embedder") for p in ports)
    assert handled == SLOW_PHOTOS + len(EVENTS), f"each photo event handled once, got {handled}"
    assert [counter(p, "facematch_rebalance_events_total", event="lost") for p in ports] == [0, 0]
    assert [counter(p, "facematch_rebalance_events_total", event="revoked") for p in ports] == revoked_before
    assert sum(counter(p, "facematch_retries_total", reason="fetch_timeout") for p in ports) >= SLOW_PHOTOS * 2
