"""Producer settings: main() builds them from the environment, the flags go on top, nothing else reads env."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.producers.bulk import parse_args
from pipeline.producers.common import producer_settings
from pipeline.producers.firestore_source import FirestoreSettings
from pipeline.settings import KafkaSettings, LogSettings, ModelSettings, TopicSettings


def test_flags_override_the_settings_main_built() -> None:
    args = parse_args(["--all-events", "--project", "p1", "--photos-collection", "pics", "--page-size", "7",
                       "--bootstrap-servers", "k:1", "--embedding-dim", "64", "--max-batch", "9"])
    env = FirestoreSettings(project="from-env", events_collection="evs")
    settings = producer_settings(args, env, KafkaSettings(bootstrap_servers="env:9092"), TopicSettings(prefix="x."),
                                 ModelSettings(model="sface"))
    assert settings.firestore.project == "p1" and settings.firestore.photos_collection == "pics"
    assert settings.firestore.events_collection == "evs"  # no flag: the environment's value stays
    assert (settings.firestore.page_size, settings.firestore.max_batch) == (7, 9)
    assert settings.kafka.bootstrap_servers == "k:1"
    assert settings.topics.photo_events == "x.photo-events"
    assert settings.embedding_dim == 64


def test_without_flags_the_dimension_comes_from_the_model_passed_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEMATCH_EMBEDDING_DIM", "999")  # not read: the settings object is what counts
    args = parse_args(["--event-id", "E"])
    settings = producer_settings(args, FirestoreSettings(), KafkaSettings(bootstrap_servers="env:9092"),
                                 TopicSettings(), ModelSettings(model="none", embedding_dim=128))
    assert settings.embedding_dim == 128
    assert settings.kafka.bootstrap_servers == "env:9092"
    assert args.state_file == Path(".state/bulk-ingest.ledger")


def test_log_level_comes_from_the_environment_only_through_log_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEMATCH_LOG_LEVEL", "warning")
    assert LogSettings().log_level == "warning"
