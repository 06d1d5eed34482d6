"""docker-compose.kafka.yml (production: Apache Kafka in KRaft mode) agrees with the code.

No Docker engine is needed: the file is parsed with PyYAML and checked against the
settings classes and the `facematch` subcommands; `docker-compose config -q` (Debian's
docker-compose 1.29, `apt-get install docker-compose`) validates it when installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

import pipeline.settings as settings_module
from pipeline.cli import COMMANDS
from pipeline.producers.firestore_source import FirestoreSettings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.kafka.yml"
DOCKERFILE = REPO / "Dockerfile"
PROMETHEUS = REPO / "deploy" / "prometheus.yml"
ALERTS = REPO / "deploy" / "alerts.yml"
REQUIRED_SERVICES = {"kafka", "topics", "indexer", "embedder", "bridge"}
# Variables read with os.environ outside the settings classes, e.g. os.environ.get("FACEMATCH_LOG_LEVEL").
_ENVIRON_READ = re.compile(r"""(?:environ\.get\(|environ\[|getenv\()\s*["'](FACEMATCH_[A-Z0-9_]+)["']""")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...]
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _settings_classes() -> list[type[BaseSettings]]:
    classes = [obj for obj in vars(settings_module).values()
               if isinstance(obj, type) and issubclass(obj, BaseSettings) and obj is not BaseSettings]
    return [*classes, FirestoreSettings]


def valid_env_names() -> set[str]:
    """Every variable the code reads: settings fields (env_prefix + name, or their aliases), plus os.environ reads."""
    names: set[str] = set()
    for cls in _settings_classes():
        prefix = cls.model_config.get("env_prefix", "")
        for field_name, field in cls.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                names |= {c for c in alias.choices if isinstance(c, str)}
            elif isinstance(alias, str):
                names.add(alias)
            else:
                names.add(prefix + field_name)
    for source in (REPO / "pipeline").rglob("*.py"):
        names |= set(_ENVIRON_READ.findall(source.read_text()))
    return {n.upper() for n in names}


def test_valid_names_are_derived_from_the_code() -> None:
    names = valid_env_names()
    assert {"FACEMATCH_KAFKA_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP_SERVERS", "FACEMATCH_INDEXER_STATE_DIR",
            "FACEMATCH_EMBEDDER_METRICS_PORT", "FACEMATCH_API_KEYS", "FACEMATCH_FIRESTORE_PROJECT",
            "FACEMATCH_LOG_LEVEL"} <= names


def test_every_pipeline_service_exists(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= REQUIRED_SERVICES


def test_every_facematch_variable_is_a_real_setting(compose: dict[str, Any]) -> None:
    valid = valid_env_names()
    used = {(name, var) for name, svc in compose["services"].items() for var in _env(svc)
            if var.startswith("FACEMATCH_")}
    used |= {("x-facematch-env", var) for var in compose["x-facematch-env"]}
    unknown = sorted((name, var) for name, var in used if var.upper() not in valid)
    assert not unknown, f"not read by any settings class or os.environ in pipeline/: {unknown}"


def test_dockerfile_variables_are_real_settings() -> None:
    used = set(re.findall(r"\b(FACEMATCH_[A-Z0-9_]+)=", DOCKERFILE.read_text()))
    assert used, "the Dockerfile sets no FACEMATCH_* variable"
    assert not used - valid_env_names()


def test_services_run_real_subcommands(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if svc.get("image", "").startswith(("apache/kafka", "prom/", "grafana/")):
            continue
        command = svc["command"]
        assert command[0] in COMMANDS, f"{name}: `facematch {command[0]}` does not exist"
    assert compose["services"]["topics"]["command"] == ["topics", "create"]


def test_kafka_is_kraft_without_zookeeper(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text().lower()
    assert "zookeeper" not in text
    kafka = compose["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@")
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert "kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])
    # The services' bootstrap address is an advertised listener of the broker.
    bootstrap = compose["x-facematch-env"]["FACEMATCH_KAFKA_BOOTSTRAP_SERVERS"]
    assert f"//{bootstrap}" in env["KAFKA_ADVERTISED_LISTENERS"]


def test_services_wait_for_the_broker_and_restart(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("indexer", "embedder", "bridge", "firestore-listener"):
        assert services[name]["depends_on"]["topics"]["condition"] == "service_completed_successfully", name
        assert services[name]["restart"] == "unless-stopped", name
    assert services["kafka"]["restart"] == "unless-stopped"


def test_bridge_publishes_5000_and_listens_on_all_interfaces(compose: dict[str, Any]) -> None:
    bridge = compose["services"]["bridge"]
    assert "5000:5000" in [str(p) for p in bridge["ports"]]
    env = _env(bridge)
    assert env["FACEMATCH_HTTP_HOST"] == "0.0.0.0"
    assert env.get("FACEMATCH_HTTP_PORT", "5000") == "5000"
    assert "/health" in " ".join(bridge["healthcheck"]["test"])


def test_indexer_state_is_on_a_named_volume(compose: dict[str, Any]) -> None:
    indexer = compose["services"]["indexer"]
    state_dir = _env(indexer)["FACEMATCH_INDEXER_STATE_DIR"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in indexer["volumes"]}
    assert mounts[state_dir] in compose["volumes"]


def test_embedder_can_be_scaled(compose: dict[str, Any]) -> None:
    embedder = compose["services"]["embedder"]
    assert "container_name" not in embedder and "ports" not in embedder


def test_prometheus_scrapes_the_metrics_ports(compose: dict[str, Any]) -> None:
    scrape = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    targets = {(sd["names"][0], sd["port"]) for job in scrape for sd in job.get("dns_sd_configs", [])}
    assert ("embedder", int(_env(compose["services"]["embedder"])["FACEMATCH_EMBEDDER_METRICS_PORT"])) in targets
    assert ("indexer", int(_env(compose["services"]["indexer"])["FACEMATCH_INDEXER_METRICS_PORT"])) in targets
    assert ("bridge", 5000) in targets
    listener = compose["services"]["firestore-listener"]["command"]
    assert ("firestore-listener", int(listener[listener.index("--metrics-port") + 1])) in targets


def test_consumers_expose_their_metrics_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, variable in (("embedder", "FACEMATCH_EMBEDDER_METRICS_PORT"),
                           ("indexer", "FACEMATCH_INDEXER_METRICS_PORT")):
        port = _env(services[name])[variable]
        assert int(port) > 0, f"{name}: /metrics is off"
        assert port in [str(p) for p in services[name]["expose"]], name
    listener = services["firestore-listener"]["command"]
    assert listener[listener.index("--metrics-port") + 1] in [str(p) for p in services["firestore-listener"]["expose"]]


def test_prometheus_mounts_its_alert_rules(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = config_flag.split("=", 1)[1]
    assert (REPO / mounts[config_path]).resolve() == PROMETHEUS.resolve()
    rule_files = yaml.safe_load(PROMETHEUS.read_text())["rule_files"]
    for rule_file in rule_files:  # relative to the config file, inside the container
        in_container = str(Path(config_path).parent / rule_file)
        assert (REPO / mounts[in_container]).resolve() == ALERTS.resolve(), in_container


def test_monitoring_is_behind_a_profile_on_loopback(compose: dict[str, Any]) -> None:
    for name, port in (("prometheus", 9090), ("grafana", 3000)):
        service = compose["services"][name]
        assert service["profiles"] == ["monitoring"], name
        assert [str(p) for p in service["ports"]] == [f"127.0.0.1:{port}:{port}"], name
        assert ":" in service["image"] and not service["image"].endswith(":latest"), name
    assert "prometheus" in compose["services"]["grafana"]["depends_on"]
    assert "grafana-data" in compose["volumes"]


def test_firestore_listener_is_behind_a_profile_with_its_secret(compose: dict[str, Any]) -> None:
    listener = compose["services"]["firestore-listener"]
    assert listener["profiles"] == ["firestore"]
    command = listener["command"]
    secret = listener["secrets"][0]
    assert command[command.index("--firebase-config") + 1] == f"/run/secrets/{secret}"
    assert secret in compose["secrets"]


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose not installed: `apt-get install -y docker-compose` (1.29 validates "
                           "offline, no Docker engine needed)")
@pytest.mark.parametrize("profiles", [[], ["firestore", "monitoring"]], ids=["default", "all-profiles"])
def test_docker_compose_config_validates(profiles: list[str]) -> None:
    flags = [arg for p in profiles for arg in ("--profile", p)]
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), *flags, "config", "-q"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
