"""Run the whole pipeline locally: broker, topics, indexer, embedder, bridge.

`facematch stack up` starts everything in the background on loopback and
returns once the bridge's /health says ready; `facematch stack down` stops
them by PID. Every service serves /metrics on a fixed default port
(METRICS_PORTS, the same numbers as docker-compose.kafka.yml and deploy/), and
`up` writes a Prometheus config scraping them to <run-dir>/prometheus.yml.
Tests use the same helpers to spawn real service processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cli import COMMANDS
from pipeline.devbroker import start_broker
from pipeline.logs import setup_logging
from pipeline.settings import BridgeSettings, KafkaSettings, LogSettings, TopicSettings

logger = logging.getLogger(__name__)

RUN_DIR = Path(".run")
# (name, module run with `python -m`), taken from the CLI's table so the two never disagree.
SERVICES = [(name, COMMANDS[name][0].split(":")[0]) for name in ("indexer", "embedder", "bridge")]
# Default /metrics ports (documented in docs/deploy.md; compose and the systemd units use the same).
# The bridge serves /metrics on its HTTP port; the Firestore listener takes --metrics-port 9103.
METRICS_PORTS = {"embedder": ("FACEMATCH_EMBEDDER_METRICS_PORT", 9101),
                 "indexer": ("FACEMATCH_INDEXER_METRICS_PORT", 9102)}
LISTENER_METRICS_PORT = 9103
ALERT_RULES = Path(__file__).resolve().parent.parent / "deploy" / "alerts.yml"


@dataclass
class ServiceProcess:
    """A service started as its own process (own session, so signals stay ours)."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM (graceful: finish batch, flush, commit, snapshot), then SIGKILL."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        return int(self.process.returncode)

    def kill(self) -> None:
        """SIGKILL: no goodbye, as in a crash."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)

    def log_tail(self, lines: int = 40) -> str:
        """The end of its log, for failure messages."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def spawn(name: str, module: str, env: dict[str, str], log_dir: Path,
          args: list[str] | None = None) -> ServiceProcess:
    """Start `python -m module` with env, logging to log_dir/name.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", module, *(args or [])], env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return ServiceProcess(name, proc, log_path)


def get_json(url: str, timeout_s: float = 2.0) -> tuple[int, dict[str, Any]]:
    """GET a JSON document; (status, body), also for 4xx/5xx answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (our services' http URLs)
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def wait_ready(base_url: str, timeout_s: float, watch: list[ServiceProcess] | None = None,
               field: str = "ready") -> dict[str, Any]:
    """Wait until /health says `field` is true; fail early if a watched process dies."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        for proc in watch or []:
            if proc.process.poll() is not None:
                raise RuntimeError(f"{proc.name} exited ({proc.process.returncode}):\n{proc.log_tail()}")
        try:
            status, body = get_json(f"{base_url}/health")
            last = body
            if body.get(field):
                return body
        except OSError as exc:
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"{base_url}/health not ready after {timeout_s}s: {last}")


def prometheus_config(jobs: Mapping[str, Iterable[str]], scrape_interval_s: float = 15.0,
                      rule_files: Iterable[Path] = ()) -> str:
    """A Prometheus config scraping `jobs` ({job name: ["host:port", ...]}) with static targets.

    Written as JSON, which is YAML too: no YAML library needed at run time.
    """
    interval = f"{scrape_interval_s:g}s"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}
                           for job, targets in jobs.items()],
    }
    return "# Generated by `facematch stack up`: prometheus --config.file=<this file>\n" + json.dumps(config, indent=2)


def _metrics_ports(env: dict[str, str]) -> dict[str, int]:
    """Give each consumer its default metrics port unless the environment names one (0 turns it off)."""
    ports = {}
    for name, (variable, default) in METRICS_PORTS.items():
        env.setdefault(variable, str(default))
        ports[name] = int(env[variable])
    return ports


def _check_port_free(port: int, variable: str) -> None:
    """Fail before spawning anything when a metrics port is taken (another stack, an old process)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the metrics server does: TIME_WAIT is fine
        try:
            sock.bind(("0.0.0.0", port))  # noqa: S104 (the services bind all interfaces: check the same)
        except OSError as exc:
            raise RuntimeError(f"metrics port {port} is in use ({exc}): set {variable} to a free port, "
                               "or 0 to turn that /metrics off") from exc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def up(run_dir: Path, port: int, timeout_s: float, kafka: KafkaSettings, topics: TopicSettings,
       durable_dir: Path | None = None) -> int:
    """Start a broker (unless kafka names one), topics, services; wait for /health."""
    from pipeline.topics import create_topics

    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)  # the services' own environment: they build their settings from it
    env["FACEMATCH_HTTP_PORT"] = str(port)
    metrics_ports = _metrics_ports(env)
    for name, metrics_port in metrics_ports.items():
        if metrics_port:
            _check_port_free(metrics_port, METRICS_PORTS[name][0])
    if "bootstrap_servers" not in kafka.model_fields_set:
        broker = start_broker(log_path=run_dir / "broker.log", outlive_parent=True, durable_dir=durable_dir)
        (run_dir / "broker.pid").write_text(str(broker.process.pid))
        if broker.s3_process is not None:
            (run_dir / "s3.pid").write_text(str(broker.s3_process.pid))
        kafka = kafka.model_copy(update={"bootstrap_servers": broker.bootstrap})
        env["KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap
        print(f"embedded broker at {broker.bootstrap} (pid {broker.process.pid})")
    (run_dir / "bootstrap").write_text(kafka.bootstrap_servers)
    create_topics(kafka, topics)
    procs = []
    for name, module in SERVICES:
        proc = spawn(name, module, env, run_dir)
        (run_dir / f"{name}.pid").write_text(str(proc.process.pid))
        procs.append(proc)
        print(f"{name} started (pid {proc.process.pid}, log {proc.log_path})")
    url = f"http://127.0.0.1:{port}"
    health = wait_ready(url, timeout_s, procs)
    print(f"ready: {url} (embedding_dim {health['embedding_dim']}, model {health['models']['model_id']})")
    jobs = {f"facematch-{name}": [f"127.0.0.1:{p}"] for name, p in metrics_ports.items() if p}
    jobs["facematch-bridge"] = [f"127.0.0.1:{port}"]
    for job, targets in jobs.items():
        print(f"metrics: http://{targets[0]}/metrics ({job})")
    config = run_dir / "prometheus.yml"
    rules = [ALERT_RULES] if ALERT_RULES.exists() else []
    config.write_text(prometheus_config(jobs, rule_files=rules))
    print(f"Prometheus: prometheus --config.file={config} --storage.tsdb.path={run_dir / 'prometheus'}")
    return 0


def down(run_dir: Path) -> int:
    """Stop everything `up` started, services first, broker last."""
    names = [name for name, _ in SERVICES] + ["broker", "s3"]
    for name in names:
        pid_file = run_dir / f"{name}.pid"
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text())
        if _pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not _pid_alive(pid):
                    break
                time.sleep(0.2)
            else:
                os.kill(pid, signal.SIGKILL)
        pid_file.unlink()
        print(f"{name} stopped (pid {pid})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`facematch stack up|down`."""
    parser = argparse.ArgumentParser(prog="facematch stack")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR)
    parser.add_argument("--port", type=int, default=None, help="the bridge's port (default: FACEMATCH_HTTP_PORT)")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--durable-dir", type=Path, default=None,
                        help="embedded broker keeps its data in SeaweedFS S3 under this folder")
    args = parser.parse_args(argv)
    setup_logging(LogSettings().log_level)
    if args.action == "up":
        port = args.port or BridgeSettings().http_port
        try:
            return up(args.run_dir, port, args.timeout, KafkaSettings(), TopicSettings(), args.durable_dir)
        except Exception:
            down(args.run_dir)
            raise
    return down(args.run_dir)


if __name__ == "__main__":
    sys.exit(main())
