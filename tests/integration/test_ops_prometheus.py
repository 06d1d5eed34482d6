"""A real Prometheus scrapes a running pipeline: lag per consumer group is queryable out of the box.

The Prometheus server is Debian's `prometheus` package (`apt-get install -y prometheus`);
without it this test skips, or fails under FACEMATCH_REQUIRE_ASSETS=1 (CI).
"""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.devbroker import free_port
from pipeline.stack import prometheus_config
from tests.integration.helpers import http, unit_vectors, wait_for, wait_index_size
from tests.unit.test_ops_deploy import ALERTS, alert_rules, require

DIM = 512
PHOTOS = 6
LAG_QUERY = "kafka_consumergroup_lag_sum"


class PrometheusServer:
    """`prometheus` on a free loopback port with its own TSDB; stopped by the test."""

    def __init__(self, binary: str, config: Path, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT)

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the `data` of a success, else None (not up yet, or an error)."""
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited ({self.process.returncode}):\n{self.log_tail()}")
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.loads(response.read())
        except OSError:
            return None
        return body["data"] if body.get("status") == "success" else None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def log_tail(self, lines: int = 30) -> str:
        """The end of its log, for failure messages."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def test_prometheus_scrapes_lag_of_the_indexer_group_and_evaluates_the_alerts(stack, tmp_path: Path) -> None:
    binary = require("prometheus", "prometheus")
    indexer_port, embedder_port = free_port(), free_port()
    fast_stats = {"FACEMATCH_RUNNER_STATS_INTERVAL_MS": "1000"}
    stack.indexer(FACEMATCH_INDEXER_METRICS_PORT=str(indexer_port), **fast_stats)
    stack.embedder(FACEMATCH_EMBEDDER_METRICS_PORT=str(embedder_port), **fast_stats)
    base = stack.bridge()
    bridge_target = base.removeprefix("http://")

    vectors = unit_vectors(PHOTOS, DIM, seed=5)
    for k in range(PHOTOS):
        status, body = http("POST", f"{base}/api/v2/ingest",
                            {"event_id": "EVT-OPS", "photo_id": f"p{k}", "faces": [vectors[k].tolist()]})
        assert status == 202, body
    wait_index_size(base, "EVT-OPS", vectors[0], PHOTOS)

    # The same job names as deploy/prometheus.yml, so the rules' job selectors mean the same here.
    jobs = {"facematch-indexer": [f"127.0.0.1:{indexer_port}"],
            "facematch-embedder": [f"127.0.0.1:{embedder_port}"],
            "facematch-bridge": [bridge_target]}
    config = tmp_path / "prometheus.yml"
    config.write_text(prometheus_config(jobs, scrape_interval_s=1, rule_files=[ALERTS]))
    server = PrometheusServer(binary, config, tmp_path)
    try:
        group = stack.env["FACEMATCH_INDEXER_GROUP"]

        def indexer_lag() -> list[dict[str, Any]]:
            data = server.api("query", query=LAG_QUERY)
            series = data["result"] if data else []
            return [s for s in series if s["metric"].get("consumergroup") == group]
        found = wait_for(indexer_lag, 60, f"{LAG_QUERY} with consumergroup={group}", interval_s=0.5)
        assert all(s["metric"].get("topic", "").startswith(stack.topics.prefix) for s in found), found
        assert stack.topics.faces in {s["metric"]["topic"] for s in found}, found

        def targets_up() -> dict[str, str]:
            data = server.api("targets")
            health = {t["labels"]["job"]: t["health"] for t in (data or {}).get("activeTargets", [])}
            return health if set(health) == set(jobs) and set(health.values()) == {"up"} else {}
        wait_for(targets_up, 30, "every scrape target up", interval_s=0.5)

        # Every rule of deploy/alerts.yml loaded and evaluated against real series without an error.
        expected = {rule["alert"] for rule in alert_rules()}

        def rules_evaluated() -> dict[str, str]:
            data = server.api("rules")
            health = {r["name"]: r["health"] for g in (data or {}).get("groups", []) for r in g["rules"]}
            return health if set(health) == expected and "unknown" not in health.values() else {}
        health = wait_for(rules_evaluated, 30, "every alert rule evaluated", interval_s=0.5)
        assert set(health.values()) == {"ok"}, health
    except AssertionError:
        print(f"--- prometheus ---\n{server.log_tail()}")
        raise
    finally:
        server.stop()
