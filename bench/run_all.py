"""Run every benchmark script, each in its own process with a timeout; one failing never stops the rest.

Scripts run in this order when they exist: engines, match_latency, large_event, ingest_rate,
embedder_throughput, then any other bench/*.py with a __main__ block. Sizes come from environment
variables (the Makefile sets them; see bench/report.py VARIABLES). Each script's output goes to the
console and to bench/results/logs/<name>.log; bench/results/run_all.json records, per script, the
exact command, status (ok, failed, timed_out), seconds and the tail of its output.

    .venv/bin/python bench/run_all.py [--only engines,match_latency] [--timeout 600]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.report import VARIABLES, machine_info  # noqa: E402

ORDER = ["engines", "match_latency", "large_event", "ingest_rate", "embedder_throughput"]
# gpu_torch needs torch and a GPU machine: run it there by hand (BENCHMARKS.md, section GPU, says how).
NOT_SCRIPTS = {"run_all", "report", "datasets", "__init__", "gpu_torch"}
# engines builds HNSW in PostgreSQL and Milvus Lite at 100k faces: ~10 min on 2 busy cores, the rest ~4 min together.
TIMEOUT_SCALE = {"engines": 2.0}


def env(name: str, default: str) -> str:
    """A size variable, falling back to the documented default."""
    return os.environ.get(name) or default


def arguments(name: str) -> list[str]:
    """Command-line flags for the scripts whose flags we know; others read their own environment."""
    if name == "engines":
        return ["--faces", env("FACEMATCH_BENCH_ENGINE_FACES", "100000"),
                "--queries", env("FACEMATCH_BENCH_ENGINE_QUERIES", "300")]
    if name == "match_latency":
        return ["--faces", env("FACEMATCH_BENCH_MATCH_FACES", "10000"),
                "--queries", env("FACEMATCH_BENCH_QUERIES", "500")]
    if name == "embedder_throughput":
        return ["--copies", env("FACEMATCH_BENCH_EMBED_COPIES", "6")]
    return []


def discover() -> list[str]:
    """Benchmark scripts in bench/, known ones first."""
    found = {p.stem for p in (REPO / "bench").glob("*.py")
             if p.stem not in NOT_SCRIPTS and "__main__" in p.read_text(errors="replace")}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def run_one(name: str, timeout_s: float, logs: Path) -> dict[str, Any]:
    """Run bench/<name>.py, teeing its output; kill its whole process group at the timeout."""
    rel = [".venv/bin/python", f"bench/{name}.py", *arguments(name)]
    cmd = [sys.executable, str(REPO / "bench" / f"{name}.py"), *arguments(name)]
    result_file = REPO / "bench" / "results" / f"{name}.json"
    before = result_file.stat().st_mtime if result_file.exists() else None
    started, tail = time.monotonic(), []
    print(f"\n=== {' '.join(rel)} (timeout {timeout_s:.0f}s)", flush=True)
    # Own session: the timeout also ends the brokers and services a script started.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            time.sleep(5)

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    try:
        with (logs / f"{name}.log").open("w") as log:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
                tail.append(line)
                del tail[:-60]
        rc = proc.wait()
    finally:
        timer.cancel()
    after = result_file.stat().st_mtime if result_file.exists() else None
    status = "timed_out" if timed_out.is_set() else ("ok" if rc == 0 else "failed")
    return {"command": " ".join(rel), "status": status, "rc": rc, "seconds": round(time.monotonic() - started, 1),
            "timeout_s": timeout_s, "json_updated": after is not None and after != before,
            "finished_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "log": f"bench/results/logs/{name}.log", "tail": "".join(tail)[-4000:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=os.environ.get("FACEMATCH_BENCH_ONLY", ""),
                        help="comma-separated script names (default: all)")
    parser.add_argument("--timeout", type=float, default=float(env("FACEMATCH_BENCH_TIMEOUT_S", "600")),
                        help="seconds per script")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "run_all.json")
    args = parser.parse_args()
    names = discover()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        names = [n for n in wanted if n in names]
        missing = [n for n in wanted if n not in names]
        if missing:
            print(f"not found in bench/: {missing}", flush=True)
    logs = args.out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    sizes = {key: os.environ[key] for key in VARIABLES if key != "FACEMATCH_BENCH_ONLY" and os.environ.get(key)}
    record: dict[str, Any] = {"machine": machine_info(), "scripts": {}, "total_s": 0.0, "sizes": sizes,
                              "only": args.only, "timeout_s": args.timeout}
    if args.only and args.out.exists():  # a partial run keeps the other scripts' records (their JSON is kept too)
        with contextlib.suppress(ValueError):
            record["scripts"] = json.loads(args.out.read_text()).get("scripts", {})
    started = time.monotonic()
    for name in names:
        try:
            record["scripts"][name] = run_one(name, args.timeout * TIMEOUT_SCALE.get(name, 1.0), logs)
        except OSError as exc:
            record["scripts"][name] = {"command": f"bench/{name}.py", "status": "failed", "reason": str(exc)}
        record["total_s"] = round(time.monotonic() - started, 1)
        record["scripts_total_s"] = round(sum(float(r.get("seconds", 0)) for r in record["scripts"].values()), 1)
        args.out.write_text(json.dumps(record, indent=2))
    print(f"\n=== {len(names)} scripts in {record['total_s']:.0f}s")
    for name, r in ((n, record["scripts"][n]) for n in names):
        print(f"{name:<22} {r['status']:<10} {r.get('seconds', 0):7.1f}s  {r['command']}")
    return 0 if all(record["scripts"][n]["status"] == "ok" for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
