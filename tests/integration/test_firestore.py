"""Firestore -> Kafka producers against the official emulator and the real broker, as real processes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from google.api_core.exceptions import Cancelled

from pipeline.devbroker import free_port
from pipeline.records import PhotoEvent
from pipeline.serde import DEAD_LETTER, PHOTO_EVENT, SchemaRegistry
from pipeline.settings import TopicSettings
from pipeline.stack import ServiceProcess, spawn
from tests.conftest import stack_env
from tests.firestore_fixtures import *  # noqa: F401,F403 - until tests/conftest.py imports them
from tests.firestore_fixtures import require_emulator_jar, start_emulator, stop_emulator
from tests.integration.helpers import match, unit_vectors, wait_for, wait_index_size

pytestmark = [pytest.mark.integration, pytest.mark.firestore]

DIM = 512
SERDE = SchemaRegistry.load()


class TopicReader:
    """Every record of a topic from the beginning, accumulated across calls."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                                  "enable.auto.commit": False})
        self.consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        self.records: list[Any] = []

    def poll(self, duration_s: float) -> list[Any]:
        """Read for `duration_s`; returns everything read so far."""
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            msg = self.consumer.poll(0.05)
            if msg is not None and not msg.error():
                self.records.append(msg)
        return self.records

    def wait_count(self, count: int, timeout_s: float = 20.0, settle_s: float = 1.0) -> list[Any]:
        """Wait for at least `count` records, then read `settle_s` more to catch extras."""
        wait_for(lambda: len(self.poll(0.2)) >= count, timeout_s, f"{count} records (have {len(self.records)})",
                 interval_s=0)
        return self.poll(settle_s)

    def events(self) -> list[PhotoEvent]:
        """The records as PhotoEvents."""
        return [PhotoEvent.from_avro(SERDE.decode(PHOTO_EVENT, m.value())) for m in self.records]

    def close(self) -> None:
        """Leave."""
        self.consumer.close()


@pytest.fixture
def env(kafka_bootstrap: str, topics: TopicSettings, firestore_emulator: str) -> dict[str, str]:
    """Environment of the producer processes: test broker, topics and emulator."""
    return stack_env(kafka_bootstrap, topics, FIRESTORE_EMULATOR_HOST=firestore_emulator)


@pytest.fixture
def photos(kafka_bootstrap: str, topics: TopicSettings):
    reader = TopicReader(kafka_bootstrap, topics.photo_events, topics.partitions)
    yield reader
    reader.close()


@pytest.fixture
def procs(request: pytest.FixtureRequest):
    """Listener processes of one test: logs printed on failure, stopped at teardown."""
    started: list[ServiceProcess] = []
    yield started
    report = getattr(request.node, "rep_call", None)
    for proc in started:
        if report is not None and report.failed:
            print(f"--- {proc.name} ---\n{proc.log_tail(60)}")
        proc.stop()


def start_listener(procs: list[ServiceProcess], env: dict[str, str], project: str, workdir: Path,
                   *args: str) -> ServiceProcess:
    """`python -m pipeline.producers.listener` on the test's project, ready once it has listened."""
    ready = workdir / f"listener-{uuid.uuid4().hex[:8]}.ready"  # one per start: a killed one leaves its file
    proc = spawn("listener", "pipeline.producers.listener", env, workdir / "logs",
                 args=["--project", project, "--state-file", str(workdir / "listener.ledger"),
                       "--ready-file", str(ready), *args])
    wait_for(lambda: ready.exists() or proc.process.poll() is not None, 30, "the listener's initial snapshot")
    procs.append(proc)
    assert proc.process.poll() is None, proc.log_tail()
    return proc


def run_tool(env: dict[str, str], module: str, *args: str) -> str:
    """Run a producer command to completion; its stdout (the summary)."""
    done = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, f"{module} failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


def photo_ref(db: Any, event_id: str, photo_id: str) -> Any:
    return db.collection("events").document(event_id).collection("photos").document(photo_id)


def keys(events: list[PhotoEvent], op: str = "UPSERT") -> Counter:
    return Counter((e.event_id, e.photo_id) for e in events if e.op == op)


def test_listener_publishes_each_write_once_updates_and_deletes_end_to_end(
        stack, env, firestore_db, firestore_project, photos, procs, tmp_path) -> None:
    start_listener(procs, env, firestore_project, tmp_path)
    stack.indexer()
    stack.embedder()
    base = stack.bridge()
    vectors = unit_vectors(50, DIM, seed=21)
    written: dict[tuple[str, str], int] = {}
    for i in range(50):
        event_id, photo_id = f"FE{i % 3}", f"p{i}"
        result = photo_ref(firestore_db, event_id, photo_id).set(
            {"embedding": vectors[i].tolist(), "caption": f"photo {i}"})
        written[(event_id, photo_id)] = int(result.update_time.timestamp() * 1000)

    records = photos.wait_count(50, timeout_s=15)
    events = photos.events()
    assert keys(events) == Counter(written.keys())  # all 50, each exactly once
    assert all(e.source == "firestore-listener" and len(e.faces) == 1 for e in events)
    latencies = sorted(m.timestamp()[1] - written[(e.event_id, e.photo_id)] for m, e in zip(records, events))
    print(f"\nFirestore write -> Kafka record: p50 {latencies[25]} ms, max {latencies[-1]} ms")

    # A caption edit is not republished; a new image_url is; a delete reaches the index.
    photo_ref(firestore_db, "FE0", "p0").update({"caption": "edited"})
    photo_ref(firestore_db, "FE1", "p1").update({"image_url": "https://cdn.example/p1-v2.jpg"})
    photos.wait_count(51, settle_s=1.5)
    assert len(photos.records) == 51
    assert photos.events()[-1].photo_id == "p1" and photos.events()[-1].image_url.endswith("p1-v2.jpg")

    sizes = Counter(event_id for event_id, _ in written)
    wait_index_size(base, "FE2", vectors[2], sizes["FE2"])
    assert match(base, "FE2", vectors[2])[1]["matches"][0]["photo_id"] == "p2"
    photo_ref(firestore_db, "FE2", "p2").delete()
    wait_index_size(base, "FE2", vectors[2], sizes["FE2"] - 1)
    assert all(m["photo_id"] != "p2" for m in match(base, "FE2", vectors[2], threshold=-1)[1]["matches"])
    photos.wait_count(52, settle_s=0.5)
    assert keys(photos.events(), "DELETE") == Counter({("FE2", "p2"): 1})


def test_listener_sigkill_mid_stream_loses_nothing_and_duplicates_stay_in_the_window(
        env, firestore_db, firestore_project, photos, procs, tmp_path) -> None:
    window = 10  # --max-batch: changes acked but maybe not checkpointed when killed
    total, before_kill = 150, 80
    listener = start_listener(procs, env, firestore_project, tmp_path, "--max-batch", str(window))
    vector = unit_vectors(1, DIM, seed=4)[0].tolist()
    killed = threading.Event()
    progress = {"written": 0}

    def writer() -> None:
        # Batches of 5: the emulator answers each commit by re-sending every
        # document of the listen target, so single writes would cost O(N) each.
        for start in range(0, total, 5):
            if start == before_kill:
                killed.wait(60)  # the rest is written while the listener is down and restarting
            for attempt in range(5):
                batch = firestore_db.batch()
                for i in range(start, start + 5):
                    batch.set(photo_ref(firestore_db, f"K{i % 4}", f"p{i}"), {"embedding": vector})
                try:
                    batch.commit()
                    break
                except Cancelled:  # the emulator now and then cancels a commit under load (seen in CI)
                    if attempt == 4:
                        raise
            progress["written"] = start + 5

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for(lambda: len(photos.poll(0.05)) >= 40, 20, "40 photos published before the kill", interval_s=0)
        listener.kill()
        killed.set()
        published_at_kill = len(keys(photos.events()))
        photo_ref(firestore_db, "K0", "p0").delete()  # deleted while no listener runs
        start_listener(procs, env, firestore_project, tmp_path, "--max-batch", str(window))
    finally:
        killed.set()
        thread.join()
    assert published_at_kill < total and progress["written"] == total, "the kill must land mid-stream"
    wait_for(lambda: photos.poll(0.2) and len(keys(photos.events())) >= total, 30, "every photo published")
    photos.poll(1.0)
    upserts = keys(photos.events())
    assert set(upserts) == {(f"K{i % 4}", f"p{i}") for i in range(total)}  # none missing
    duplicates = sum(upserts.values()) - total
    print(f"\nkilled after {published_at_kill} photos were published: {duplicates} duplicates (window {window})")
    assert duplicates <= window
    assert keys(photos.events(), "DELETE") == Counter({("K0", "p0"): 1})  # found on the restart's snapshot


def test_listener_survives_an_emulator_restart(
        kafka_bootstrap, topics, photos, procs, tmp_path, monkeypatch) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import firestore

    jar, port = require_emulator_jar(), free_port()
    emulator = start_emulator(jar, port, tmp_path / "emulator.log")
    try:
        monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{port}")
        env = stack_env(kafka_bootstrap, topics, FIRESTORE_EMULATOR_HOST=f"127.0.0.1:{port}")
        # Now and then the stream stalls after a restart; --stall-timeout leaves the window room to recover.
        listener = start_listener(procs, env, "restart", tmp_path, "--stall-timeout", "10")
        db = firestore.Client(project="restart", credentials=AnonymousCredentials())
        for i in range(3):
            photo_ref(db, "R", f"before{i}").set({"image_url": f"https://cdn.example/b{i}.jpg"})
        photos.wait_count(3, settle_s=0)
        stop_emulator(emulator)
        emulator = start_emulator(jar, port, tmp_path / "emulator.log")
        restarted = time.monotonic()
        for i in range(2):
            photo_ref(db, "R", f"after{i}").set({"image_url": f"https://cdn.example/a{i}.jpg"})
        photos.wait_count(8, timeout_s=60)
        print(f"\nfirst photos after the emulator restart published within {time.monotonic() - restarted:.1f}s")
    finally:
        stop_emulator(emulator)
    assert listener.process.poll() is None
    assert set(keys(photos.events())) == {("R", f"before{i}") for i in range(3)} | {("R", "after0"), ("R", "after1")}
    # The emulator keeps data in memory: after its restart the SDK reports the
    # old photos removed, and the listener mirrors that.
    assert set(keys(photos.events(), "DELETE")) == {("R", f"before{i}") for i in range(3)}


def test_listener_exits_with_status_3_when_it_cannot_listen_for_too_long(
        kafka_bootstrap, topics, procs, tmp_path) -> None:
    jar, port = require_emulator_jar(), free_port()
    emulator = start_emulator(jar, port, tmp_path / "emulator.log")
    try:
        env = stack_env(kafka_bootstrap, topics, FIRESTORE_EMULATOR_HOST=f"127.0.0.1:{port}")
        listener = start_listener(procs, env, "gone", tmp_path, "--give-up-after", "4")
    finally:
        stop_emulator(emulator)  # for good
    assert listener.process.wait(timeout=180) == 3, listener.log_tail()  # the status a supervisor acts on


def test_bulk_ingest_one_event_then_all_idempotent_and_incremental(
        env, firestore_db, firestore_project, photos, tmp_path) -> None:
    vectors = unit_vectors(50, DIM, seed=8)
    batch = firestore_db.batch()
    for i in range(50):
        batch.set(photo_ref(firestore_db, "BA" if i < 30 else "BB", f"p{i}"), {"embedding": vectors[i].tolist()})
    batch.set(firestore_db.collection("users").document("u").collection("photos").document("x"), {"a": 1})
    batch.commit()
    common = ["--state-file", str(tmp_path / "bulk.ledger"), "--page-size", "7", "--no-progress"]
    bulk = "pipeline.producers.bulk"

    # The service-account path, against the emulator: the project comes from the key file.
    key_file = fake_service_account(tmp_path, firestore_project)
    out = run_tool(env, bulk, "--event-id", "BA", "--firebase-config", str(key_file), *common)
    assert "published 30," in out, out
    photos.wait_count(30)
    assert keys(photos.events()) == Counter({("BA", f"p{i}"): 1 for i in range(30)})

    out = run_tool(env, bulk, "--all-events", "--project", firestore_project, *common)
    assert "published 20, deleted 0, skipped 30 unchanged" in out and "ignored 1" in out, out
    assert len(photos.wait_count(50)) == 50

    out = run_tool(env, bulk, "--all-events", "--project", firestore_project, *common)
    assert "published 0, deleted 0, skipped 50 unchanged" in out, out

    photo_ref(firestore_db, "BB", "p40").update({"image_url": "https://cdn.example/p40.jpg"})
    out = run_tool(env, bulk, "--all-events", "--project", firestore_project, *common)
    assert "published 1, deleted 0, skipped 49 unchanged" in out, out
    assert len(photos.wait_count(51)) == 51 and photos.events()[-1].photo_id == "p40"

    out = run_tool(env, bulk, "--event-id", "BB", "--project", firestore_project, "--force", *common)
    assert "published 20," in out, out


def test_poll_worker_once_picks_up_exactly_the_new_photos(
        env, firestore_db, firestore_project, photos, tmp_path) -> None:
    from google.cloud import firestore

    vectors = unit_vectors(20, DIM, seed=9)
    for i in range(10):
        photo_ref(firestore_db, "PW", f"p{i}").set({"embedding": vectors[i].tolist(),
                                                     "uploaded_at": firestore.SERVER_TIMESTAMP})
    worker = ["pipeline.producers.poll_worker", "--once", "--project", firestore_project,
              "--state-file", str(tmp_path / "worker.ledger")]
    assert "published 10," in run_tool(env, *worker)
    photos.wait_count(10)

    for i in range(10, 13):
        photo_ref(firestore_db, "PW", f"p{i}").set({"embedding": vectors[i].tolist(),
                                                     "uploaded_at": firestore.SERVER_TIMESTAMP})
    photo_ref(firestore_db, "PW", "p0").update({"caption": "not a new image"})
    photo_ref(firestore_db, "PW", "p1").delete()
    out = run_tool(env, *worker)
    assert "published 3, deleted 1, skipped 9 unchanged" in out, out
    photos.wait_count(14, settle_s=1.0)
    assert len(photos.records) == 14
    assert keys(photos.events()[10:]) == Counter({("PW", f"p{i}"): 1 for i in range(10, 13)})
    assert keys(photos.events(), "DELETE") == Counter({("PW", "p1"): 1})
    assert "published 0, deleted 0" in run_tool(env, *worker)

    # By a timestamp field: only documents at or after the watermark (minus the overlap) are read.
    by_field = [*worker[:-1], str(tmp_path / "field.ledger"), "--updated-field", "uploaded_at", "--overlap", "0"]
    assert "read 12 documents: published 12," in run_tool(env, *by_field)
    photo_ref(firestore_db, "PW", "p19").set({"embedding": vectors[19].tolist(),
                                              "uploaded_at": firestore.SERVER_TIMESTAMP})
    assert "read 2 documents: published 1, deleted 0, skipped 1 unchanged" in run_tool(env, *by_field)


def test_malformed_documents_go_to_the_dlq_with_reasons(
        env, kafka_bootstrap, topics, firestore_db, firestore_project, photos, procs, tmp_path) -> None:
    listener = start_listener(procs, env, firestore_project, tmp_path)
    good = unit_vectors(1, DIM, seed=2)[0].tolist()
    bad = {
        "empty": ({"caption": "no image, no embedding"}, "missing_image_url"),
        "typed": ({"image_url": 12345}, "wrong_type"),
        "strvec": ({"embedding": "0.1,0.2"}, "wrong_type"),
        "short": ({"embedding": good[:128]}, "invalid_embedding"),
    }
    for photo_id, (data, _) in bad.items():
        photo_ref(firestore_db, "DL", photo_id).set(data)
    photo_ref(firestore_db, "DL", "good").set({"embedding": good})
    dlq = TopicReader(kafka_bootstrap, topics.dlq, 1)
    try:
        letters = dlq.wait_count(len(bad), settle_s=1.0)
    finally:
        dlq.close()
    photos.wait_count(1, settle_s=0)
    assert [e.photo_id for e in photos.events()] == ["good"]
    assert listener.process.poll() is None  # still running
    by_photo = {}
    for msg in letters:
        headers = {k: v.decode() for k, v in msg.headers()}
        envelope = SERDE.decode(DEAD_LETTER, msg.value())
        photo_id = headers["dlq.source_topic"].rsplit("/", 1)[1]
        assert headers["dlq.source_topic"] == f"firestore:events/DL/photos/{photo_id}"
        assert envelope["stage"] == headers["dlq.stage"] == "firestore-listener"
        assert json.loads(envelope["value"])["data"] == bad[photo_id][0]  # the document itself
        by_photo[photo_id] = headers["dlq.reason"]
    assert by_photo == {photo_id: reason for photo_id, (_, reason) in bad.items()}


def fake_service_account(folder: Path, project: str) -> Path:
    """A syntactically valid service-account key; the emulator never checks it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    path = folder / "service-account.json"
    path.write_text(json.dumps({"type": "service_account", "project_id": project, "private_key_id": "test",
                                "private_key": pem, "client_email": f"facematch@{project}.iam.gserviceaccount.com",
                                "client_id": "1", "token_uri": "https://oauth2.googleapis.com/token"}))
    return path
