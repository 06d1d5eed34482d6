"""Guests end to end on the real broker with real faces: subscriptions, several selfies, "forget me", tokens.

Embeddings are SFace's on the labelled real photos (the Obama photos share a
person; every other face is someone else), sent as precomputed faces so the
services need no model. Subscriptions are read through the bridge's SSE stream.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from pipeline.facelib.model import DetectedFace
from pipeline.guest_records import MatchNotification
from pipeline.records import PhotoFaces
from pipeline.restore import read_to_end
from pipeline.serde import MATCH_NOTIFICATION, PHOTO_FACES, SchemaRegistry
from pipeline.topics import partition_for
from tests.conftest import Stack
from tests.integration.helpers import http, wait_for

OBAMA = ("obama.jpg", "obama2.jpg", "obama3.jpg")
OTHERS = ("biden.jpg", "t1.jpg", "sample1.jpg", "sample2.jpg", "sample3.jpg", "sample4.jpg", "sample5.jpg",
          "sample6.jpg")
SERDE = SchemaRegistry.load()
SFACE_ENV = {"FACEMATCH_EMBEDDING_DIM": "128"}
LIVE_COPIES = int(os.environ.get("FACEMATCH_GUEST_LIVE_PHOTOS", "10"))  # photos timed ingest -> notification


@pytest.fixture
def guest_stack(stack: Stack) -> Stack:
    stack.env.update(SFACE_ENV)
    return stack


def ingest(base: str, event_id: str, photo_id: str, faces: list[DetectedFace], **headers: str) -> float:
    body = {"event_id": event_id, "photo_id": photo_id,
            "faces": [[float(x) for x in f.embedding] for f in faces]}
    status, answer = http("POST", f"{base}/api/v2/ingest", body, headers=headers)
    assert status == 202, answer
    return time.monotonic()


def enrol(base: str, event_id: str, guest_id: str, selfies: list[np.ndarray], **headers: str) -> dict[str, Any]:
    body = {"embeddings": [[float(x) for x in s] for s in selfies]}
    status, answer = http("PUT", f"{base}/api/v2/events/{event_id}/guests/{guest_id}", body, headers=headers)
    assert status == 202, answer
    return answer


def guest_match(base: str, event_id: str, guest_id: str, **headers: str) -> tuple[int, dict[str, Any]]:
    return http("POST", f"{base}/api/v2/events/{event_id}/guests/{guest_id}/match", {"top_k": 50},
                headers=headers)


def wait_enrolled(base: str, event_id: str, guest_id: str) -> None:
    wait_for(lambda: guest_match(base, event_id, guest_id)[0] == 200, 60, f"guest {guest_id} enrolled")


def notifications(base: str, event_id: str, guest_id: str) -> list[str]:
    status, body = http("GET", f"{base}/api/v2/events/{event_id}/guests/{guest_id}/notifications?stream=false")
    assert status == 200, body
    return [n["photo_id"] for n in body["notifications"]]


class SseListener:
    """Reads a guest's SSE stream in a thread: every event with its arrival time."""

    def __init__(self, url: str) -> None:
        self.events: list[tuple[str, dict[str, Any], float]] = []
        self._response = urllib.request.urlopen(url, timeout=120)  # noqa: S310  (a test URL)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        kind, data = "message", ""
        try:
            for raw in self._response:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = line[6:]
                elif not line and data:
                    self.events.append((kind, json.loads(data), time.monotonic()))
                    kind, data = "message", ""
        except (OSError, ValueError, AttributeError):
            return  # closed by close() (http.client drops its file object under the reader)

    def photos(self, kind: str = "match") -> list[str]:
        return [d["photo_id"] for k, d, _ in list(self.events) if k == kind]

    def close(self) -> None:
        self._response.close()


@pytest.fixture
def listeners() -> Iterator[list[SseListener]]:
    opened: list[SseListener] = []
    yield opened
    for listener in opened:
        listener.close()


def topic_values(bootstrap: str, topic: str, partition: int) -> list[tuple[bytes | None, bytes | None]]:
    return read_to_end({"bootstrap.servers": bootstrap}, [(topic, partition)])[(topic, partition)].records


def test_a_subscription_gets_each_matching_photo_once_across_an_indexer_kill(
        guest_stack: Stack, sample_faces: dict[str, list[DetectedFace]], listeners: list[SseListener]) -> None:
    stack, event = guest_stack, "wedding"
    indexer = stack.indexer()
    stack.embedder()
    base = stack.bridge()
    enrol(base, event, "ann", [sample_faces["obama.jpg"][0].embedding])
    wait_enrolled(base, event, "ann")
    sse = SseListener(f"{base}/api/v2/events/{event}/guests/ann/notifications")
    listeners.append(sse)
    sent: dict[str, float] = {}
    for name in OTHERS[:4]:  # the pipeline warms up on photos of other people
        sent[name] = ingest(base, event, name, sample_faces[name])
    wait_for(lambda: guest_match(base, event, "ann")[1].get("photos_indexed") == 4, 60, "warm-up photos indexed")
    for i in range(LIVE_COPIES):  # new photos of her, one at a time: ingest -> pushed
        name = f"live-{i}"
        sent[name] = ingest(base, event, name, sample_faces["obama2.jpg"])
        wait_for(lambda name=name: name in sse.photos(), 60, f"{name} pushed", interval_s=0.01)
    live = sorted(arrived - sent[data["photo_id"]] for kind, data, arrived in sse.events if kind == "match")
    print(f"\nnotification latency (ingest answered -> SSE event received), {len(live)} photos: "
          f"p50 {statistics.median(live) * 1000:.0f} ms, p99 {live[int(0.99 * (len(live) - 1))] * 1000:.0f} ms, "
          f"max {live[-1] * 1000:.0f} ms")

    indexer.kill()  # SIGKILL: no last snapshot
    stack.indexer(name="indexer-2", state_dir=stack.workdir / "state-indexer")
    for name in ("obama2.jpg", "obama3.jpg", *OTHERS[4:]):
        sent[name] = ingest(base, event, name, sample_faces[name])
    wait_for(lambda: {"obama2.jpg", "obama3.jpg"} <= set(sse.photos()), 90, "photos after the restart pushed")
    # Every photo, including the last one, is applied before we look for strays.
    wait_for(lambda: guest_match(base, event, "ann")[1].get("photos_indexed") == len(sent), 60, "all indexed")

    pushed = sse.photos()
    expected = sorted(["obama2.jpg", "obama3.jpg", *(f"live-{i}" for i in range(LIVE_COPIES))])
    assert sorted(pushed) == expected, pushed  # once each, and nobody else's photo
    assert sorted(notifications(base, event, "ann")) == expected
    records = topic_values(stack.bootstrap, stack.topics.notifications, partition_for(event, stack.topics.partitions))
    keys = [k for k, v in records if v is not None]
    assert len(keys) == len(set(keys)) == len(expected), keys  # not even the topic holds a repeat
    note = MatchNotification.from_avro(SERDE.decode(MATCH_NOTIFICATION, records[-1][1]))
    assert note.guest_id == "ann" and note.score >= 0.363


def test_two_selfies_find_at_least_what_each_finds_alone(
        guest_stack: Stack, sample_faces: dict[str, list[DetectedFace]]) -> None:
    stack, event = guest_stack, "race"
    stack.indexer()
    stack.embedder()
    base = stack.bridge()
    for name in (*OBAMA, *OTHERS):
        ingest(base, event, name, sample_faces[name])
    selfie_a, selfie_b = sample_faces["obama.jpg"][0].embedding, sample_faces["obama3.jpg"][0].embedding
    enrol(base, event, "one", [selfie_a])
    enrol(base, event, "two", [selfie_b])
    enrol(base, event, "both", [selfie_a, selfie_b])
    for guest in ("one", "two", "both"):
        wait_enrolled(base, event, guest)
    wait_for(lambda: guest_match(base, event, "both")[1].get("photos_indexed") == len(OBAMA) + len(OTHERS), 60,
             "all photos indexed")
    found = {g: {m["photo_id"] for m in guest_match(base, event, g)[1]["matches"]} for g in ("one", "two", "both")}
    assert found["both"] >= found["one"] | found["two"]
    assert found["both"] == set(OBAMA), found  # every photo of him, nobody else's


def test_forget_me_erases_and_keeps_the_guest_out_of_new_photos(
        guest_stack: Stack, sample_faces: dict[str, list[DetectedFace]], listeners: list[SseListener]) -> None:
    stack, event = guest_stack, "gala"
    stack.indexer()
    stack.embedder()
    base = stack.bridge()
    selfie = sample_faces["obama.jpg"][0].embedding
    for name in ("obama2.jpg", "t1.jpg", "biden.jpg"):
        ingest(base, event, name, sample_faces[name])
    group = list(sample_faces["t1.jpg"])
    ingest(base, event, "group-with-obama", [*group[:2], sample_faces["obama2.jpg"][0]])
    enrol(base, event, "obama", [selfie])
    enrol(base, event, "fan", [sample_faces["obama3.jpg"][0].embedding])  # someone else watching for him
    for guest in ("obama", "fan"):
        wait_enrolled(base, event, guest)
    wait_for(lambda: len(notifications(base, event, "obama")) == 2, 60, "obama's photos pushed")
    fan = SseListener(f"{base}/api/v2/events/{event}/guests/fan/notifications")
    listeners.append(fan)
    wait_for(lambda: len(fan.photos()) == 2, 60, "fan's first pushes")

    status, body = http("POST", f"{base}/api/v2/events/{event}/guests/obama/forget", {"erase_faces": True})
    assert status == 202, body
    wait_for(lambda: guest_match(base, event, "obama")[0] == 404, 60, "obama's enrolment gone")
    assert notifications(base, event, "obama") == []

    def by_selfie() -> dict[str, Any]:
        status, body = http("POST", f"{base}/api/v2/match", {"event_id": event, "top_k": 50,
                                                             "user_embedding": [float(x) for x in selfie]})
        assert status == 200, body
        return body
    assert by_selfie()["matches"] == []
    # His faces left the index; the group photo stays with its other two faces.
    faces_before = 1 + 6 + 1 + 3  # obama2, t1, biden, the group photo
    assert by_selfie()["index_size"] == faces_before - 2  # his face in obama2 and in the group photo
    probe = [float(x) for x in group[0].embedding]
    status, body = http("POST", f"{base}/api/v2/match", {"event_id": event, "user_embedding": probe, "top_k": 50})
    assert status == 200 and "group-with-obama" in {m["photo_id"] for m in body["matches"]}, body

    ingest(base, event, "new-obama", [sample_faces["obama3.jpg"][0], group[3]])
    ingest(base, event, "after", sample_faces["biden.jpg"])
    wait_for(lambda: guest_match(base, event, "fan")[1].get("photos_indexed") == 6, 60, "new photos indexed")
    assert by_selfie()["matches"] == []
    assert "new-obama" not in fan.photos()
    status, body = guest_match(base, event, "fan")
    assert status == 200 and "new-obama" not in {m["photo_id"] for m in body["matches"]}, body
    # The compacted faces topic's latest record of each photo holds none of his faces.
    latest: dict[bytes, bytes | None] = {}
    for key, value in topic_values(stack.bootstrap, stack.topics.faces, partition_for(event, stack.topics.partitions)):
        if key is not None:
            latest[key] = value
    for key, value in latest.items():
        if value is None or not key.startswith(f"{event}/".encode()):
            continue
        faces = PhotoFaces.from_avro(SERDE.decode(PHOTO_FACES, value)).faces
        assert all(float(np.dot(f.embedding, selfie)) < 0.363 for f in faces), key


def test_a_guest_token_manages_only_its_own_guest(
        guest_stack: Stack, sample_faces: dict[str, list[DetectedFace]]) -> None:
    from pipeline.matcher.auth import hash_key

    stack, event = guest_stack, "conf"
    stack.indexer()
    stack.embedder()
    keys = f"{hash_key('platform-key')}:match:{event};{hash_key('ingest-key')}:ingest:*"
    base = stack.bridge(FACEMATCH_API_KEYS=keys, FACEMATCH_GUEST_TOKEN_SECRET="s" * 32)
    answer = enrol(base, event, "zoe", [sample_faces["biden.jpg"][0].embedding], **{"X-API-Key": "platform-key"})
    token = answer["guest_token"]
    assert token
    as_zoe = {"Authorization": f"Bearer {token}"}
    wait_for(lambda: guest_match(base, event, "zoe", **as_zoe)[0] == 200, 60, "zoe enrolled")
    status, _ = http("GET", f"{base}/api/v2/events/{event}/guests/zoe/notifications?stream=false", headers=as_zoe)
    assert status == 200
    status, body = guest_match(base, event, "yan", **as_zoe)
    assert status == 403 and "another guest" in body["error"]
    status, body = http("GET", f"{base}/api/v2/events/other/guests/zoe/notifications?stream=false", headers=as_zoe)
    assert status == 403
    status, body = http("POST", f"{base}/api/v2/ingest", {"event_id": event, "photo_id": "p", "embedding": [0.1] * 128},
                        headers=as_zoe)
    assert status == 401, body
    status, body = guest_match(base, event, "zoe", Authorization=f"Bearer {token[:-2]}xx")
    assert status == 401 and "guest token" in body["error"]
    status, body = http("POST", f"{base}/api/v2/events/{event}/guests/zoe/forget", {}, headers=as_zoe)
    assert status == 202, body
    wait_for(lambda: guest_match(base, event, "zoe", **as_zoe)[0] == 404, 60, "zoe forgotten")
