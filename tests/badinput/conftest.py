"""One real stack for the whole bad-input corpus: broker, indexer, SFace embedder, bridge, image server.

The image server listens on 127.0.0.2, the only address allow-listed, so
URLs on 127.0.0.1 still exercise the loopback block.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.settings import KafkaSettings, TopicSettings
from pipeline.topics import create_topics
from tests.conftest import TEST_PARTITIONS, Stack, stack_env
from tests.httpserver import Site, serve

IMAGE_HOST = "127.0.0.2"


@dataclass
class Corpus:
    """The running stack, its bridge URL and the image server the cases put files on."""

    stack: Stack
    base: str
    site: Site


@pytest.fixture(scope="module")
def corpus(kafka_bootstrap: str, sface_model_root: Path, tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[Corpus]:
    """Started once per module; service logs are printed if any case of the module failed."""
    topics = TopicSettings(prefix=f"t{uuid.uuid4().hex[:10]}.", partitions=TEST_PARTITIONS,
                           reply_partitions=2, dlq_partitions=1)
    create_topics(KafkaSettings(bootstrap_servers=kafka_bootstrap), topics)
    env = stack_env(kafka_bootstrap, topics, FACEMATCH_MODEL="sface",
                    FACEMATCH_MODEL_ROOT=str(sface_model_root),
                    FACEMATCH_EMBEDDING_DIM="128",
                    FACEMATCH_FETCH_ALLOW_LIST=f"{IMAGE_HOST}/32",
                    FACEMATCH_FETCH_READ_TIMEOUT_S="1.0", FACEMATCH_FETCH_TOTAL_TIMEOUT_S="2.0",
                    FACEMATCH_RUNNER_MAX_ATTEMPTS="2")
    stack = Stack(kafka_bootstrap, topics, tmp_path_factory.mktemp("corpus"), env)
    failures_before = request.session.testsfailed
    with serve({}, host=IMAGE_HOST) as site:
        try:
            stack.indexer()
            stack.embedder()
            yield Corpus(stack, stack.bridge(), site)
        finally:
            if request.session.testsfailed > failures_before:
                print(stack.logs())
            stack.stop_all()
