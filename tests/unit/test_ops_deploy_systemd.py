"""deploy/systemd units and `facematch stack up`'s metrics defaults agree with the code.

`systemd-analyze verify` checks the units when it is installed (ExecStart pointed at a
stand-in executable: verify insists the binary exists); without it the units are still
parsed here and checked against the `facematch` subcommands and the settings.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.cli import COMMANDS
from pipeline.stack import LISTENER_METRICS_PORT, METRICS_PORTS, _metrics_ports, prometheus_config
from tests.unit.test_compose import valid_env_names
from tests.unit.test_ops_deploy import ALERTS, require

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "deploy" / "systemd"
SERVICES = {"facematch-embedder.service": "embedder", "facematch-embedder@.service": "embedder",
            "facematch-indexer.service": "indexer", "facematch-bridge.service": "bridge",
            "facematch-firestore-listener.service": "firestore-listener"}
ENV_FILE = "/etc/facematch/facematch.env"
INSTALLED_COMMAND = "/opt/facematch/bin/facematch"

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(path: Path) -> Unit:
    """Sections -> (key, value) in order; systemd allows a key more than once (Environment=)."""
    unit: Unit = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit.setdefault(section, [])
            continue
        assert section, f"{path.name}: {line!r} outside a section"
        assert "=" in line and not line.endswith("\\"), f"{path.name}: {line!r} (no continuation lines)"
        key, value = line.split("=", 1)
        unit[section].append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    """Every value of a key in a section."""
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: Unit, section: str, key: str) -> str:
    """The single value of a key."""
    found = values(unit, section, key)
    assert len(found) == 1, f"{key}= in [{section}]: {found}"
    return found[0]


def environment(unit: Unit) -> dict[str, str]:
    """Environment= assignments of [Service]."""
    env: dict[str, str] = {}
    for value in values(unit, "Service", "Environment"):
        for item in shlex.split(value):
            name, _, setting = item.partition("=")
            env[name] = setting
    return env


@pytest.fixture(scope="module", params=sorted(SERVICES), ids=str)
def service(request: pytest.FixtureRequest) -> tuple[str, Unit]:
    return request.param, parse_unit(SYSTEMD / request.param)


def test_every_service_has_a_unit() -> None:
    assert set(SERVICES) <= {p.name for p in SYSTEMD.glob("*.service")}
    assert not {p.name for p in SYSTEMD.glob("*.service")} - set(SERVICES), "a unit this test does not know"


def test_exec_start_runs_a_real_subcommand(service: tuple[str, Unit]) -> None:
    name, unit = service
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert argv[0] == INSTALLED_COMMAND, f"{name}: the `facematch` console command of the install venv"
    assert argv[1] in COMMANDS, f"{name}: `facematch {argv[1]}` does not exist"
    assert argv[1] == SERVICES[name]


def test_units_run_as_a_dedicated_user_with_hardening(service: tuple[str, Unit]) -> None:
    name, unit = service
    assert one(unit, "Service", "EnvironmentFile") == ENV_FILE, name
    assert one(unit, "Service", "Restart") == "on-failure", name
    assert one(unit, "Service", "User") == "facematch", name
    for key, expected in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                          "ProtectHome": "yes"}.items():
        assert one(unit, "Service", key) == expected, f"{name}: {key}"
    assert one(unit, "Service", "CapabilityBoundingSet") == "", name
    assert one(unit, "Install", "WantedBy") == "facematch.target", name


def test_state_dirs_are_the_only_writable_paths(service: tuple[str, Unit]) -> None:
    name, unit = service
    writable = values(unit, "Service", "ReadWritePaths")
    states = [f"/var/lib/{d}" for d in values(unit, "Service", "StateDirectory")]
    assert writable == states, f"{name}: ReadWritePaths= must be its StateDirectory= ({writable} vs {states})"
    if name == "facematch-indexer.service":
        assert environment(unit)["FACEMATCH_INDEXER_STATE_DIR"] in writable
    if name == "facematch-firestore-listener.service":
        argv = shlex.split(one(unit, "Service", "ExecStart"))
        state_file = Path(argv[argv.index("--state-file") + 1])
        assert str(state_file.parent) in writable


def test_units_use_the_default_metrics_ports(service: tuple[str, Unit]) -> None:
    name, unit = service
    env = environment(unit)
    if SERVICES[name] in METRICS_PORTS:
        variable, port = METRICS_PORTS[SERVICES[name]]
        expected = "%i" if name.endswith("@.service") else str(port)
        assert env[variable] == expected, name
    if name == "facematch-firestore-listener.service":
        argv = shlex.split(one(unit, "Service", "ExecStart"))
        assert argv[argv.index("--metrics-port") + 1] == str(LISTENER_METRICS_PORT)


def test_listener_reads_its_key_from_a_systemd_credential() -> None:
    unit = parse_unit(SYSTEMD / "facematch-firestore-listener.service")
    credential, _, source = one(unit, "Service", "LoadCredential").partition(":")
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert argv[argv.index("--firebase-config") + 1] == f"%d/{credential}"
    assert source.startswith("/etc/facematch/")


def test_unit_and_env_example_variables_are_real_settings() -> None:
    used = {var for path in SYSTEMD.glob("*.service") for var in environment(parse_unit(path))}
    example = (SYSTEMD / "facematch.env.example").read_text().splitlines()
    used |= {line.split("=", 1)[0] for line in example if line and not line.startswith("#")}
    assert used, "no variables found"
    assert not used - valid_env_names(), "not read by any setting"


def test_target_pulls_in_the_core_services() -> None:
    target = parse_unit(SYSTEMD / "facematch.target")
    wanted = set(one(target, "Unit", "Wants").split())
    assert wanted == {"facematch-indexer.service", "facematch-embedder.service", "facematch-bridge.service"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed (`apt-get install systemd`): units only parsed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    stand_in = tmp_path / "bin" / "facematch"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for path in [*SYSTEMD.glob("*.service"), *SYSTEMD.glob("*.target")]:
        (units / path.name).write_text(path.read_text().replace(INSTALLED_COMMAND, str(stand_in)))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *sorted(map(str, units.iterdir()))],
                            capture_output=True, text=True, timeout=120, cwd=units)
    # verify exits 0 on unknown keys and bad values too; it only prints them.
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


# --- `facematch stack up` ----------------------------------------------------------------------

def test_stack_gives_consumers_the_documented_metrics_ports() -> None:
    assert METRICS_PORTS == {"embedder": ("FACEMATCH_EMBEDDER_METRICS_PORT", 9101),
                             "indexer": ("FACEMATCH_INDEXER_METRICS_PORT", 9102)}
    env: dict[str, str] = {}
    assert _metrics_ports(env) == {"embedder": 9101, "indexer": 9102}
    assert env == {"FACEMATCH_EMBEDDER_METRICS_PORT": "9101", "FACEMATCH_INDEXER_METRICS_PORT": "9102"}
    env = {"FACEMATCH_EMBEDDER_METRICS_PORT": "0", "FACEMATCH_INDEXER_METRICS_PORT": "19102"}
    assert _metrics_ports(env) == {"embedder": 0, "indexer": 19102}, "the environment wins; 0 turns it off"
    assert {name for name, _ in METRICS_PORTS.values()} <= valid_env_names()


def test_documented_ports_match_compose_and_prometheus() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.kafka.yml").read_text())["services"]
    for service, (variable, port) in METRICS_PORTS.items():
        assert str(compose[service]["environment"][variable]) == str(port)
    listener = compose["firestore-listener"]["command"]
    assert listener[listener.index("--metrics-port") + 1] == str(LISTENER_METRICS_PORT)
    docs = (REPO / "docs" / "deploy.md").read_text()
    for variable, port in [*METRICS_PORTS.values(), ("--metrics-port", LISTENER_METRICS_PORT)]:
        assert variable in docs and str(port) in docs


def test_stack_writes_a_prometheus_config_promtool_accepts(tmp_path: Path) -> None:
    text = prometheus_config({"facematch-indexer": ["127.0.0.1:9102"], "facematch-bridge": ["127.0.0.1:5000"]},
                             scrape_interval_s=1, rule_files=[ALERTS])
    config = yaml.safe_load(text)
    assert config["global"]["scrape_interval"] == "1s"
    assert [job["static_configs"][0]["targets"] for job in config["scrape_configs"]] == [
        ["127.0.0.1:9102"], ["127.0.0.1:5000"]]
    path = tmp_path / "prometheus.yml"
    path.write_text(text)
    promtool = require("promtool", "prometheus")
    result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
