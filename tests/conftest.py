"""Shared fixtures: one real broker per test run, uuid topics per test, real service processes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.devbroker import EmbeddedBroker, free_port, start_broker
from pipeline.settings import KafkaSettings, TopicSettings
from pipeline.stack import ServiceProcess, spawn, wait_ready
from pipeline.topics import create_topics

REPO = Path(__file__).resolve().parent.parent
TEST_PARTITIONS = 6

from tests.faces_fixtures import *  # noqa: E402,F401,F403  (sample_photos, sface_model_root)
from tests.firestore_fixtures import *  # noqa: E402,F401,F403  (firestore emulator)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """KAFKA_BOOTSTRAP_SERVERS if set (e.g. Apache Kafka), else an embedded Tansu broker."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    broker = start_broker(log_path=log)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker of the test's own, to stop or restart; the session's broker stays up."""
    broker = start_broker(log_path=tmp_path / "private-tansu.log")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def topics(kafka_bootstrap: str) -> TopicSettings:
    """A fresh set of uuid-named topics for one test."""
    settings = TopicSettings(prefix=f"t{uuid.uuid4().hex[:10]}.", partitions=TEST_PARTITIONS,
                             reply_partitions=2, dlq_partitions=1)
    create_topics(KafkaSettings(bootstrap_servers=kafka_bootstrap), settings)
    return settings


@dataclass
class Stack:
    """Real service processes for one test, stopped at teardown."""

    bootstrap: str
    topics: TopicSettings
    workdir: Path
    env: dict[str, str]
    procs: list[ServiceProcess] = field(default_factory=list)

    def start(self, name: str, module: str, **extra_env: str) -> ServiceProcess:
        """Spawn a service with this stack's env plus overrides."""
        proc = spawn(name, module, {**self.env, **extra_env}, self.workdir / "logs")
        self.procs.append(proc)
        return proc

    def indexer(self, name: str = "indexer", state_dir: Path | None = None, **extra: str) -> ServiceProcess:
        """An indexer with its own state directory."""
        state = state_dir or self.workdir / f"state-{name}"
        return self.start(name, "pipeline.indexer", FACEMATCH_INDEXER_STATE_DIR=str(state), **extra)

    def embedder(self, name: str = "embedder", **extra: str) -> ServiceProcess:
        """An embedder in the shared group."""
        return self.start(name, "pipeline.embedder", **extra)

    def bridge(self, name: str = "bridge", reply_partition: int = 0, wait_for: str = "ready",
               **extra: str) -> str:
        """A bridge on a free port; returns its base URL once /health says `wait_for`."""
        port = free_port()
        proc = self.start(name, "pipeline.matcher", FACEMATCH_HTTP_PORT=str(port),
                          FACEMATCH_BRIDGE_REPLY_PARTITION=str(reply_partition), **extra)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 90, [proc], field=wait_for)
        return url

    def stop_all(self) -> None:
        """Graceful stop of everything still running."""
        for proc in reversed(self.procs):
            proc.stop()

    def logs(self) -> str:
        """Tails of every service log (printed when a test fails)."""
        return "\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in self.procs)


def stack_env(bootstrap: str, topics: TopicSettings, **extra: str) -> dict[str, str]:
    """Environment for service processes on the test broker and topics."""
    env = dict(os.environ)
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "FACEMATCH_TOPIC_PREFIX": topics.prefix,
        "FACEMATCH_TOPIC_PARTITIONS": str(topics.partitions),
        # Tansu takes about half the session timeout per join; short timeouts keep rebalances quick.
        "FACEMATCH_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "FACEMATCH_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
        "FACEMATCH_INDEXER_GROUP": f"{topics.prefix}indexer",
        "FACEMATCH_EMBEDDER_GROUP": f"{topics.prefix}embedder",
        "FACEMATCH_INDEXER_SNAPSHOT_INTERVAL_S": "2",
        "FACEMATCH_RUNNER_BACKOFF_INITIAL_S": "0.05",
        "FACEMATCH_MODEL": "none",
        "FACEMATCH_EMBEDDING_DIM": "512",
        "PYTHONPATH": str(REPO),
    })
    env.update(extra)
    return env


@pytest.fixture
def stack(kafka_bootstrap: str, topics: TopicSettings, tmp_path: Path,
          request: pytest.FixtureRequest) -> Iterator[Stack]:
    """Per-test service processes (model 'none': precomputed 512-d embeddings)."""
    stack = Stack(kafka_bootstrap, topics, tmp_path, stack_env(kafka_bootstrap, topics))
    yield stack
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        print(stack.logs())
    stack.stop_all()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Remember each phase's report so fixtures can print logs on failure."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
