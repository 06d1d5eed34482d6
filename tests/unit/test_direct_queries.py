"""Direct queries without Kafka: the wire format, the route table, the indexer's ownership rule,
and the bridge's client against a real loopback listener."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path

import numpy as np
import pytest

from pipeline.direct import NOT_MINE, FrameError, Routes, frame, frame_length, parse_address
from pipeline.indexer.core import IndexerConfig, IndexerCore
from pipeline.indexer.queries import QueryListener
from pipeline.indexer.stage import IndexerStage
from pipeline.matcher.direct import DirectQueries
from pipeline.metrics import create_metrics
from pipeline.records import Face, MatchReply, MatchRequest, PhotoFaces, faces_key
from pipeline.serde import MATCH_REPLY, MATCH_REQUEST, PHOTO_FACES, SchemaRegistry
from pipeline.settings import IndexerSettings, TopicSettings
from pipeline.stage_api import Incoming
from pipeline.topics import partition_for
from tests.unit.indexer_fakes import CaughtUp, nothing_to_restore

DIM = 16
PARTITIONS = 3
SERDE = SchemaRegistry.load()


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def request_bytes(event: str, seed: int, request_id: str | None = None) -> tuple[str, bytes]:
    rid = request_id or uuid.uuid4().hex
    request = MatchRequest(request_id=rid, event_id=event, embedding=unit(seed), top_k=5, threshold=0.5)
    return rid, SERDE.encode(MATCH_REQUEST, request.to_avro())


# -- wire format and routes --------------------------------------------------------------

def test_frames_round_trip_and_refuse_oversized_lengths() -> None:
    data = frame(b"abc")
    assert frame_length(data[:4]) == 3 and data[4:] == b"abc"
    assert frame(NOT_MINE) == b"\0\0\0\0"
    with pytest.raises(FrameError, match="exceeds"):
        frame_length(b"\xff\xff\xff\xff")


@pytest.mark.parametrize("address,expected", [("127.0.0.1:7001", ("127.0.0.1", 7001)),
                                              ("[::1]:9", ("::1", 9)), ("indexer-0:80", ("indexer-0", 80))])
def test_addresses_parse(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["", "host", "host:", ":80", "host:0", "host:70000", "host:x"])
def test_malformed_addresses_are_refused(address: str) -> None:
    with pytest.raises(FrameError, match="host:port"):
        parse_address(address)


def test_routes_forget_a_refusing_owner_and_skip_a_failed_address_for_the_backoff() -> None:
    routes = Routes(backoff_s=5.0)
    assert routes.lookup(1, now=0) is None
    routes.learn(1, "a:1")
    routes.learn(2, "a:1")
    assert routes.lookup(1, now=0) == "a:1"
    routes.refused(1, "b:2")  # an address we no longer use cannot unlearn the new one
    assert routes.lookup(1, now=0) == "a:1"
    routes.refused(1, "a:1")
    assert routes.lookup(1, now=0) is None and routes.lookup(2, now=0) == "a:1"
    routes.failed("a:1", now=10)
    assert routes.lookup(2, now=14.9) is None
    assert routes.lookup(2, now=15.1) == "a:1"
    routes.learn(2, "c:3")  # a new owner is tried at once
    routes.failed("a:1", now=20)
    assert routes.lookup(2, now=20) == "c:3"
    assert routes.known() == {2: "c:3"}


def test_routes_forget_failures_past_their_backoff() -> None:
    # Each restarted indexer may come back on a new port: old failures must not pile up.
    routes = Routes(backoff_s=5.0)
    for i in range(100):
        routes.failed(f"gone:{i}", now=i * 10.0)
    assert routes.failures() == {"gone:99": 990.0}
    routes.learn(3, "gone:99")
    assert routes.lookup(3, now=992.0) is None and routes.lookup(3, now=996.0) == "gone:99"


# -- the indexer's rule: only an owned, caught-up partition of a polling runner answers --

@pytest.fixture
def stage(tmp_path: Path) -> IndexerStage:
    core = IndexerCore(IndexerConfig(dim=DIM, model_id="m", default_threshold=0.3))
    settings = IndexerSettings(state_dir=tmp_path / "state", snapshot_interval_s=0.0)
    return IndexerStage(core, SERDE, TopicSettings(prefix="u."), PARTITIONS, settings, create_metrics(),
                        nothing_to_restore)


def upload(offset: int, event: str, photo_id: str, seed: int) -> Incoming:
    face = Face(bbox=(0, 0, 1, 1), det_score=1.0, embedding=unit(seed))
    faces = PhotoFaces(event, photo_id, "m", DIM, faces=[face])
    return Incoming("u.faces", partition_for(event, PARTITIONS), offset, faces_key(event, photo_id),
                    SERDE.encode(PHOTO_FACES, faces.to_avro()))


def own_all(stage: IndexerStage) -> None:
    partitions = [(t, p) for p in range(PARTITIONS) for t in ("u.faces", "u.match-requests")]
    stage.on_assign(partitions, CaughtUp(stage))
    stage.after_assign(partitions, CaughtUp(stage))


def answered(stage: IndexerStage, outcome: str) -> float:
    return stage.metrics.registry.get_sample_value("facematch_direct_queries_total", {"outcome": outcome}) or 0.0


def test_an_owned_caught_up_partition_answers_like_the_kafka_path(stage: IndexerStage) -> None:
    own_all(stage)
    stage.handle([upload(0, "EV", "p0", 0), upload(1, "EV", "p1", 1)])
    stage.after_batch(CaughtUp(stage))
    rid, payload = request_bytes("EV", 1)
    reply = MatchReply.from_avro(SERDE.decode(MATCH_REPLY, stage.answer_direct(payload)))
    assert reply.request_id == rid and reply.status == "OK"
    assert [m.photo_id for m in reply.matches] == ["p1"]
    assert answered(stage, "answered") == 1


def test_a_partition_not_owned_replaying_or_of_a_stuck_runner_says_not_mine(stage: IndexerStage) -> None:
    _, payload = request_bytes("EV", 1)
    assert stage.answer_direct(payload) == NOT_MINE  # nothing assigned yet
    own_all(stage)
    assert stage.answer_direct(payload) == NOT_MINE  # assigned, replay not caught up
    stage.after_batch(CaughtUp(stage))
    assert stage.answer_direct(payload) != NOT_MINE
    stage.polling = lambda: False
    assert stage.answer_direct(payload) == NOT_MINE  # a runner that stopped polling may have lost it
    stage.polling = lambda: True
    stage.on_revoke([("u.faces", partition_for("EV", PARTITIONS)), ("u.match-requests", 0)])
    assert stage.answer_direct(payload) == NOT_MINE
    assert stage.answer_direct(b"not avro") == NOT_MINE
    assert answered(stage, "not_mine") == 4


def test_replies_through_kafka_name_the_direct_address(stage: IndexerStage) -> None:
    own_all(stage)
    stage.after_batch(CaughtUp(stage))
    stage.query_address = b"127.0.0.1:7001"
    _, payload = request_bytes("EV", 1)
    item = Incoming("u.match-requests", partition_for("EV", PARTITIONS), 0, b"EV", payload,
                    headers={"kafka_replyTopic": b"u.match-replies", "kafka_correlationId": b"c1"})
    [outputs] = stage.handle([item])
    assert ("facematch_queryAddress", b"127.0.0.1:7001") in outputs[0].headers


# -- the bridge's client against a real listener --------------------------------------------

def echo_answer(payload: bytes) -> bytes:
    """An indexer that owns everything and finds nothing: a reply with the request's id."""
    request = MatchRequest.from_avro(SERDE.decode(MATCH_REQUEST, payload))
    if request.event_id == "NOT-MINE":
        return NOT_MINE
    reply = MatchReply(request_id=request.request_id, event_id=request.event_id, status="NO_FACES")
    return SERDE.encode(MATCH_REPLY, reply.to_avro())


def free_closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_client_answers_falls_back_and_survives_a_listener_restart() -> None:
    async def scenario() -> None:
        routes = Routes(backoff_s=60)
        client = DirectQueries(SERDE, routes, timeout_s=5, metrics=create_metrics())
        listener = QueryListener("127.0.0.1", 0, echo_answer)
        listener.start()
        port = int(listener.address.rsplit(":", 1)[1])
        try:
            rid, payload = request_bytes("EV", 0)
            assert await client.ask(0, rid, payload, 5) is None  # no route yet: Kafka
            routes.learn(0, listener.address)
            for _ in range(3):  # one pooled connection serves them all
                rid, payload = request_bytes("EV", 0)
                reply = await client.ask(0, rid, payload, 5)
                assert reply is not None and reply.request_id == rid
            listener.close()
            restarted = QueryListener("127.0.0.1", port, echo_answer)  # same address, pooled socket now dead
            restarted.start()
            try:
                routes.learn(0, restarted.address)
                rid, payload = request_bytes("EV", 0)
                reply = await client.ask(0, rid, payload, 5)
                assert reply is not None and reply.request_id == rid
                rid, payload = request_bytes("NOT-MINE", 0)
                assert await client.ask(0, rid, payload, 5) is None
                assert routes.lookup(0) is None  # refused: the next query goes through Kafka
                routes.learn(0, restarted.address)
                _, payload = request_bytes("EV", 0)
                assert await client.ask(0, "another-request", payload, 5) is None  # never someone else's answer
                assert routes.lookup(0) is None
            finally:
                restarted.close()
            routes.learn(1, f"127.0.0.1:{free_closed_port()}")
            rid, payload = request_bytes("EV", 0)
            assert await client.ask(1, rid, payload, 5) is None  # connection refused
            assert routes.lookup(1) is None  # skipped for the backoff
        finally:
            client.close()
    asyncio.run(scenario())
