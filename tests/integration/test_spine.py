"""The spine end to end on the real broker: HTTP -> Kafka -> embedder -> indexer -> HTTP."""

from __future__ import annotations

import json
from http.client import HTTPConnection

import numpy as np

from pipeline.matcher.auth import hash_key
from tests.integration.helpers import http, match, unit_vectors, wait_for, wait_index_size

DIM = 512
EVENTS = [f"EVT{i}" for i in range(5)]
PHOTOS_PER_EVENT = 40


def ingest_all(base: str, vectors: np.ndarray) -> dict[str, int]:
    """200 photos across 5 events; photo k of every event shares face vector k (isolation bait)."""
    faces_per_event: dict[str, int] = {}
    for e, event in enumerate(EVENTS):
        for k in range(PHOTOS_PER_EVENT):
            own = vectors[100 + e * PHOTOS_PER_EVENT + k]
            faces = [own.tolist()] + ([vectors[k].tolist()] if k % 2 == 0 else [])
            status, body = http("POST", f"{base}/api/v2/ingest",
                                {"event_id": event, "photo_id": f"{event}-p{k}", "faces": faces})
            assert status == 202, body
            faces_per_event[event] = faces_per_event.get(event, 0) + len(faces)
    return faces_per_event


def test_ingest_match_isolation_reingest_and_deletes(stack) -> None:
    stack.indexer()
    stack.embedder()
    base = stack.bridge()
    vectors = unit_vectors(100 + len(EVENTS) * PHOTOS_PER_EVENT, DIM, seed=11)
    expected = ingest_all(base, vectors)
    for event in EVENTS:
        wait_index_size(base, event, vectors[0], expected[event])

    # Every photo's own embedding finds that photo first, and only photos of its event.
    for e, event in enumerate(EVENTS):
        for k in range(PHOTOS_PER_EVENT):
            status, body = match(base, event, vectors[100 + e * PHOTOS_PER_EVENT + k], threshold=-1)
            assert status == 200, body
            assert body["matches"][0]["photo_id"] == f"{event}-p{k}"
            assert body["matches"][0]["score"] > 0.99
            assert all(m["photo_id"].startswith(f"{event}-") for m in body["matches"])
        status, body = match(base, event, vectors[0], threshold=0.5)  # the shared vector
        assert [m["photo_id"] for m in body["matches"]] == [f"{event}-p0"]

    # Re-ingesting the same photos changes nothing.
    before = {event: match(base, event, vectors[2], threshold=-1)[1] for event in EVENTS}
    ingest_all(base, vectors)
    marker = {"event_id": EVENTS[0], "photo_id": "marker", "embedding": vectors[99].tolist()}
    assert http("POST", f"{base}/api/v2/ingest", marker)[0] == 202
    wait_index_size(base, EVENTS[0], vectors[0], expected[EVENTS[0]] + 1)  # everything before is applied
    for event in EVENTS[1:]:
        after = match(base, event, vectors[2], threshold=-1)[1]
        assert after["index_size"] == before[event]["index_size"]
        assert after["matches"] == before[event]["matches"]

    # Delete a photo, then a whole event.
    status, _ = http("DELETE", f"{base}/api/v2/events/{EVENTS[1]}/photos/{EVENTS[1]}-p0")
    assert status == 202
    wait_index_size(base, EVENTS[1], vectors[0], expected[EVENTS[1]] - 2)
    assert match(base, EVENTS[1], vectors[0])[1]["matches"] == []
    assert http("DELETE", f"{base}/api/v2/events/{EVENTS[2]}")[0] == 202

    def event_gone() -> bool:
        body = match(base, EVENTS[2], vectors[0])[1]
        return body["event_has_faces"] is False and body["index_size"] == 0
    wait_for(event_gone, 30, "event deletion")
    assert match(base, EVENTS[3], vectors[0])[1]["matches"][0]["photo_id"] == f"{EVENTS[3]}-p0"


def test_a_batch_ingest_makes_every_photo_searchable_in_its_own_event(stack) -> None:
    stack.indexer()
    stack.embedder()
    base = stack.bridge()
    vectors = unit_vectors(90, DIM, seed=12)
    photos = [{"event_id": f"BATCH{i % 3}", "photo_id": f"b{i}", "embedding": v.tolist()}
              for i, v in enumerate(vectors)]
    status, body = http("POST", f"{base}/api/v2/ingest/batch", {"photos": photos})
    assert status == 202, body
    assert body["count"] == 90 and [p["photo_id"] for p in body["photos"]] == [f"b{i}" for i in range(90)]
    for event in ("BATCH0", "BATCH1", "BATCH2"):  # one event, one partition, offsets in the body's order
        offsets = [p["offset"] for p in body["photos"] if p["event_id"] == event]
        assert offsets == sorted(offsets) and len(set(offsets)) == 30
        wait_index_size(base, event, vectors[0], 30)
    for i, vector in enumerate(vectors):
        status, answer = match(base, f"BATCH{i % 3}", vector, threshold=0.5)
        assert status == 200 and [m["photo_id"] for m in answer["matches"]] == [f"b{i}"], answer


def test_bad_bodies_get_clear_4xx(stack) -> None:
    stack.indexer()
    base = stack.bridge()
    status, body = http("POST", f"{base}/api/v2/match", {"event_id": "E", "user_embedding": [0.1] * 3})
    assert status == 422 and "user_embedding" in body["error"] and "512" in body["error"]
    status, body = http("POST", f"{base}/api/v2/match", {"event_id": "E", "user_embedding": [0.1] * DIM,
                                                         "top_k": 5000})
    assert status == 422 and "top_k" in body["error"]
    status, body = http("POST", f"{base}/api/v2/ingest", {"photo_id": "p", "embedding": [0.1] * DIM})
    assert status == 422 and "event_id" in body["error"]
    status, body = http("POST", f"{base}/api/v2/ingest", {"event_id": "a/b", "photo_id": "p", "image_url": "x"})
    assert status == 422 and "event_id" in body["error"]
    for url in ("file:///etc/passwd", "gopher://127.0.0.1:6379/_", "http://user:pw@example.com/a.jpg"):
        status, body = http("POST", f"{base}/api/v2/ingest", {"event_id": "E", "photo_id": "p", "image_url": url})
        assert status == 422 and "image_url" in body["error"], (url, body)
    # An unknown event is not an error: no matches, and a flag saying it has no faces.
    status, body = http("POST", f"{base}/api/v2/match", {"event_id": "nobody", "user_embedding": [0.1] * DIM})
    assert status == 200 and body["matches"] == [] and body["event_has_faces"] is False
    status, health = http("GET", f"{base}/health")
    assert status == 200 and health["embedding_dim"] == DIM and health["broker"]["reachable"] is True
    assert health["partitions_owned"] == health["partitions"] == stack.topics.partitions
    assert health["ready"] is True and health["status"] == "ok" and health["model_ready"] is True
    status, openapi = http("GET", f"{base}/openapi.json")
    assert status == 200 and {"/api/v2/ingest", "/api/v2/match", "/api/v2/match/image", "/api/face/analyze",
                              "/health"} <= set(openapi["paths"])


def test_match_times_out_with_504_when_no_indexer(stack) -> None:
    base = stack.bridge(wait_for="insightface_ready", FACEMATCH_BRIDGE_TIMEOUT_S="1.0")
    status, body = http("POST", f"{base}/api/v2/match", {"event_id": "E", "user_embedding": [0.1] * DIM})
    assert status == 504 and "no reply" in body["error"]
    # No partition has an owner: not ready, and /health says so with its status code too.
    status, health = http("GET", f"{base}/health")
    assert status == 503 and health["ready"] is False and health["status"] == "starting"
    assert health["insightface_ready"] is True and health["model_ready"] is True


def test_api_keys_are_scoped_by_role_and_event(stack) -> None:
    stack.indexer()
    # Hashed (the documented form) and plain (still accepted, with a warning at startup).
    base = stack.bridge(FACEMATCH_API_KEYS=f"{hash_key('ing-key')}:ingest:E1;match-key:match:*")
    body = {"event_id": "E1", "photo_id": "p", "embedding": [0.1] * DIM}
    assert http("POST", f"{base}/api/v2/ingest", body)[0] == 401
    assert http("POST", f"{base}/api/v2/ingest", body, headers={"X-API-Key": "match-key"})[0] == 403
    assert http("POST", f"{base}/api/v2/ingest", {**body, "event_id": "E2"},
                headers={"X-API-Key": "ing-key"})[0] == 403
    assert http("POST", f"{base}/api/v2/ingest", body, headers={"Authorization": "Bearer ing-key"})[0] == 202
    query = {"event_id": "E1", "user_embedding": [0.1] * DIM}
    assert http("POST", f"{base}/api/v2/match", query, headers={"X-API-Key": "ing-key"})[0] == 403
    assert http("POST", f"{base}/api/v2/match", query, headers={"X-API-Key": "match-key"})[0] == 200
    assert http("GET", f"{base}/health")[0] in (200, 503)  # open for probes: never 401
    assert "plain-text key" in next(p for p in stack.procs if p.name == "bridge").log_path.read_text()
    # Non-ASCII or binary keys are unknown keys: a JSON 401, never a 500.
    host, port = base.removeprefix("http://").split(":")
    for raw in ("ключ".encode(), "clé".encode(), b"\xff\xfe"):
        conn = HTTPConnection(host, int(port), timeout=15)
        try:
            conn.request("POST", "/api/v2/ingest", body=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json", "X-API-Key": raw})
            response = conn.getresponse()
            assert response.status == 401 and json.loads(response.read())["error"] == "unknown API key"
        finally:
            conn.close()
