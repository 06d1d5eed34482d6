"""The bridge's HTTP contract without a broker: URL checks, API keys, 503s, /health status codes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pipeline.facelib.spec import ModelSpec
from pipeline.matcher.api import BridgeServices, create_app
from pipeline.matcher.auth import Authorizer, hash_key, parse_api_keys
from pipeline.matcher.replies import PublishFailed, ReplyTimeout
from pipeline.metrics import create_metrics
from pipeline.records import MatchReply
from pipeline.serde import SchemaRegistry
from pipeline.settings import BridgeSettings, TopicSettings

DIM = 4
SPEC = ModelSpec(name="fake", model_id="fake", dim=DIM, default_threshold=0.3, license="test")


class FakeRequester:
    """Stands in for KafkaRequester: records what was published, or fails like a dead broker."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.fail, self.published = fail, []  # type: list[tuple[str, bytes]]

    async def publish(self, topic: str, key: bytes, value: bytes | None,
                      partition: int | None = None) -> tuple[int, int]:
        if self.fail is not None:
            raise self.fail
        self.published.append((topic, key))
        return 3, len(self.published) - 1

    async def match(self, event_id: str, embedding: np.ndarray, top_k: int, threshold: float | None,
                    timeout_s: float, guest_id: str | None = None, model_id: str | None = None) -> MatchReply:
        if self.fail is not None:
            raise self.fail
        raise AssertionError("not used")


def make_client(requester: Any = None, api_keys: str = "", health: dict[str, Any] | None = None) -> TestClient:
    async def health_() -> dict[str, Any]:
        return health or {"status": "ok", "ready": True}

    services = BridgeServices(requester=requester or FakeRequester(), serde=SchemaRegistry.load(),
                              topics=TopicSettings(), settings=BridgeSettings(), spec=SPEC,
                              metrics=create_metrics(), auth=Authorizer(parse_api_keys(api_keys)),
                              health=health_)
    return TestClient(create_app(services), raise_server_exceptions=False)


def ingest(client: TestClient, url: str, **headers: Any) -> Any:
    return client.post("/api/v2/ingest", json={"event_id": "E", "photo_id": "p", "image_url": url},
                       headers=headers)


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO", "ftp://example.com/a.jpg", "dict://x:11211/",
    "javascript:alert(1)", "//example.com/a.jpg", "example.com/a.jpg",
    "http://user:pass@example.com/a.jpg", "https://token@example.com/a.jpg",
    "http:///a.jpg", "https://:443/a.jpg", "http://example.com:99999/a.jpg",
    "http://example.com/a b.jpg", "http://example.com/\r\nX-Evil: 1",
    "https://example.com/" + "a" * 2100,
])
def test_ingest_refuses_urls_the_embedder_would_refuse_later(url: str) -> None:
    requester = FakeRequester()
    response = ingest(make_client(requester), url)
    assert response.status_code == 422, response.text
    assert "image_url" in response.json()["error"]
    assert requester.published == []


def test_ingest_accepts_plain_http_and_https_urls() -> None:
    requester = FakeRequester()
    client = make_client(requester)
    for url in ("https://res.cloudinary.com/demo/image/upload/sample.jpg", "HTTP://Example.COM:8080/x.jpg?a=b",
                "http://[2001:db8::1]/x.jpg", "https://example.com/" + "a" * 2000):
        response = ingest(client, url)
        assert response.status_code == 202, (url, response.text)
    assert len(requester.published) == 4


def test_ingest_answers_503_with_retry_after_when_the_broker_does_not_ack() -> None:
    client = make_client(FakeRequester(fail=PublishFailed("broker did not acknowledge within 5.0s")))
    response = ingest(client, "https://example.com/a.jpg")
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0
    assert "Kafka is unavailable" in response.json()["error"]
    assert client.delete("/api/v2/events/E/photos/p").status_code == 503


def test_match_is_503_when_the_request_was_not_produced_and_504_when_nobody_answered() -> None:
    query = {"event_id": "E", "user_embedding": [1.0, 0.0, 0.0, 0.0]}
    response = make_client(FakeRequester(fail=PublishFailed("x"))).post("/api/v2/match", json=query)
    assert response.status_code == 503 and "Retry-After" in response.headers
    assert "error" in response.json()
    response = make_client(FakeRequester(fail=ReplyTimeout("no reply"))).post("/api/v2/match", json=query)
    assert response.status_code == 504 and "no reply" in response.json()["error"]


def test_non_ascii_or_garbage_api_keys_get_a_json_401() -> None:
    client = make_client(api_keys=f"{hash_key('good-key')}:ingest:E;legacy-key:ingest:*")
    good = ingest(client, "https://example.com/a.jpg", **{"X-API-Key": "good-key"})
    assert good.status_code == 202, good.text
    assert ingest(client, "https://example.com/a.jpg", **{"X-API-Key": "legacy-key"}).status_code == 202
    for raw in ("clé".encode(), "ключ".encode(), b"\xff\xfe\x80", "good-key\u00e9".encode("latin-1"),
                b"Bearer x" * 500):
        for headers in ({"X-API-Key": raw}, {"Authorization": b"Bearer " + raw}):
            response = ingest(client, "https://example.com/a.jpg", **headers)
            assert response.status_code == 401, (raw, response.text)
            assert response.json()["error"] == "unknown API key"


def test_a_non_ascii_key_works_when_configured() -> None:
    client = make_client(api_keys=f"{hash_key('clé-ü')}:ingest:*")
    response = ingest(client, "https://example.com/a.jpg", **{"X-API-Key": "clé-ü".encode()})
    assert response.status_code == 202, response.text


def test_health_is_503_until_ready_and_keeps_its_body() -> None:
    starting = {"status": "starting", "ready": False, "insightface_ready": True, "model_ready": True}
    response = make_client(health=starting).get("/health")
    assert response.status_code == 503 and response.json() == starting
    response = make_client(health={"status": "ok", "ready": True}).get("/health")
    assert response.status_code == 200 and response.json()["ready"] is True


class FlakyRequester(FakeRequester):
    """Acknowledges every publish but the `fail_at`-th (0-based), like a broker that lost one batch."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at, self.calls = fail_at, 0

    async def publish(self, topic: str, key: bytes, value: bytes | None,
                      partition: int | None = None) -> tuple[int, int]:
        self.calls += 1
        if self.calls - 1 == self.fail_at:
            raise PublishFailed("broker did not acknowledge within 5.0s")
        return await super().publish(topic, key, value, partition)


def batch(*photos: dict[str, Any]) -> dict[str, Any]:
    return {"photos": list(photos)}


def test_a_batch_is_published_in_order_and_each_photo_gets_its_offset() -> None:
    requester = FakeRequester()
    body = batch({"event_id": "E1", "photo_id": "a", "embedding": [1.0, 0.0, 0.0, 0.0]},
                 {"event_id": "E2", "photo_id": "b", "faces": [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]},
                 {"event_id": "E1", "photo_id": "c", "image_url": "https://example.com/c.jpg"})
    response = make_client(requester).post("/api/v2/ingest/batch", json=body)
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["count"] == 3
    assert [(p["event_id"], p["photo_id"], p["offset"]) for p in answer["photos"]] == \
        [("E1", "a", 0), ("E2", "b", 1), ("E1", "c", 2)]
    assert [key for _, key in requester.published] == [b"E1", b"E2", b"E1"]


@pytest.mark.parametrize(("photos", "named"), [
    ([{"event_id": "E", "photo_id": "a", "embedding": [1.0, 0.0, 0.0, 0.0]},
      {"event_id": "E", "photo_id": "b", "embedding": [1.0, 0.0]}], "photos[1].embedding"),
    ([{"event_id": "E", "photo_id": "a", "faces": [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]}],
     "photos[0].faces[1]"),
    ([{"event_id": "E", "photo_id": "a"}], "photos[0].give image_url"),
    ([{"event_id": "E", "photo_id": "a", "image_url": "file:///etc/passwd"}], "photos.0.image_url"),
    ([{"event_id": "E", "photo_id": "a/b", "image_url": "https://example.com/a.jpg"}], "photos.0.photo_id"),
    ([], "photos"),
    ([{"event_id": "E", "photo_id": f"p{i}", "embedding": [1.0, 0.0, 0.0, 0.0]} for i in range(501)], "photos"),
])
def test_a_batch_with_one_bad_photo_is_refused_whole_naming_it(photos: list[dict[str, Any]], named: str) -> None:
    requester = FakeRequester()
    response = make_client(requester).post("/api/v2/ingest/batch", json=batch(*photos))
    assert response.status_code == 422, response.text
    assert named in response.json()["error"]
    assert requester.published == []


def test_a_batch_needs_the_ingest_role_for_every_event_in_it() -> None:
    requester = FakeRequester()
    client = make_client(requester, api_keys=f"{hash_key('e1-key')}:ingest:E1")
    body = batch({"event_id": "E1", "photo_id": "a", "embedding": [1.0, 0.0, 0.0, 0.0]},
                 {"event_id": "E2", "photo_id": "b", "embedding": [1.0, 0.0, 0.0, 0.0]})
    response = client.post("/api/v2/ingest/batch", json=body, headers={"X-API-Key": "e1-key"})
    assert response.status_code == 403 and "E2" in response.json()["error"], response.text
    assert requester.published == []
    assert client.post("/api/v2/ingest/batch", json=body).status_code == 401


def test_a_batch_the_broker_partly_refused_is_503_saying_how_many_were_acknowledged() -> None:
    requester = FlakyRequester(fail_at=1)
    body = batch(*({"event_id": "E", "photo_id": f"p{i}", "embedding": [1.0, 0.0, 0.0, 0.0]} for i in range(4)))
    response = make_client(requester).post("/api/v2/ingest/batch", json=body)
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) > 0
    assert response.json()["accepted"] == 3 and response.json()["failed"] == 1
    assert "3 of 4 photos acknowledged" in response.json()["error"]
