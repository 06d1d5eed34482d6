"""BENCHMARKS.md (tables) and docs/bench/*.png (plots) from whatever bench/results/*.json exist.

Known results get their own tables (engines, match_latency, embedder_throughput); any other JSON
(large_event, ingest_rate, ...) is shown flattened, and every file feeds the generic plots:
latency against event size (any object with a size key such as `faces` and a `p50_ms`), and
throughput (any key ending in `per_s`). Each section names the command that made its numbers and
the machine it ran on (from the JSON, else from bench/results/run_all.json, else this machine).

    .venv/bin/python bench/report.py [--results bench/results] [--out BENCHMARKS.md] [--plots docs/bench]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
INSTALL_HINT = ".venv/bin/python -m pip install -e '.[bench]'"
SIZE_KEYS = ("faces", "event_faces", "index_size", "n_faces", "size")
# The variables `make bench` passes down (Makefile), documented in the report's header.
VARIABLES = {
    "FACEMATCH_BENCH_MATCH_FACES": ("10000", "faces in the event for bench/match_latency.py (--faces)"),
    "FACEMATCH_BENCH_QUERIES": ("500", "match queries for bench/match_latency.py (--queries)"),
    "FACEMATCH_BENCH_EMBED_COPIES": ("6", "times each sample photo is ingested by bench/embedder_throughput.py"),
    "FACEMATCH_BENCH_ENGINE_FACES": ("100000", "faces per engine in bench/engines.py (--faces)"),
    "FACEMATCH_BENCH_ENGINE_QUERIES": ("300", "queries per engine setting in bench/engines.py (--queries)"),
    "FACEMATCH_BENCH_TIMEOUT_S": ("600", "per-script timeout in bench/run_all.py (twice that for engines); a "
                                         "script over it is recorded as timed out and the rest still run"),
    "FACEMATCH_BENCH_ONLY": ("(all)", "comma-separated script names to run, e.g. `engines,match_latency`"),
}
RUNTIME_GOAL_S = 20 * 60  # `make bench` at default sizes on a fresh 2-core machine
LARGE_EVENT_GOAL = {"recall_thr": 0.95, "p99_ms": 20.0, "bytes_per_face": 1024.0}


def machine_info() -> dict[str, Any]:
    """Cores, CPU model and memory of this machine, for the record."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "mem_gb": mem_gb,
            "python": platform.python_version(), "platform": platform.platform()}


def describe_machine(m: dict[str, Any]) -> str:
    """One line: '2 cores, Intel(R) Xeon(R) ..., 24 GB, Python 3.11'."""
    mem = f", {m['mem_gb']} GB RAM" if m.get("mem_gb") else ""
    return f"{m.get('cpu_count')} cores ({m.get('cpu_model')}){mem}, Python {m.get('python')}"


def fmt(v: Any) -> str:
    """Numbers to 4 significant digits, the rest as text."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return out + [""]


def flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted.path, leaf) pairs of a JSON value."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key != "machine":
                yield from flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, list) and obj and all(isinstance(v, (dict, list)) for v in obj):
        for i, value in enumerate(obj):
            yield from flatten(value, f"{prefix}[{i}]")
    else:
        yield prefix, obj


class Context:
    """Where each result came from: command and machine, from the JSON or the runner's record."""

    def __init__(self, results: dict[str, Any]) -> None:
        self.run_all = results.get("run_all") or {}
        self.here = machine_info()

    def provenance(self, name: str, data: dict[str, Any]) -> list[str]:
        """'Command: ... Machine: ...' lines for one result file."""
        script = (self.run_all.get("scripts") or {}).get(name) or {}
        command = data.get("command") or script.get("command") or f".venv/bin/python bench/{name}.py"
        machine = data.get("machine") or self.run_all.get("machine")
        where = describe_machine(machine) if machine else f"{describe_machine(self.here)} (where this report was made)"
        when = script.get("finished_at") or data.get("finished_at")
        lines = [f"Command: `{command}`  ", f"Machine: {where}" + ("  " if when else "")]
        if when:
            lines.append(f"Finished: {when}")
        if script and (script.get("status") != "ok" or not script.get("json_updated", True)):
            lines += ["", f"**Stale:** the last `run_all` of this script ended `{script.get('status')}` and did not "
                          "rewrite this file; these numbers are from an earlier run."]
        return lines + [""]


def section_engines(data: dict[str, Any], plots: dict[str, str]) -> list[str]:
    """Per-engine headline table, the full sweep, and the recall/latency plot."""
    k = data.get("k", 10)
    rk, thr = f"recall_at_{k}", data.get("threshold", 0.5)
    metric = data.get("headline_recall", rk)
    metric_name = f"recall@{k} of faces >= {thr}" if metric == "recall_above_threshold" else f"recall@{k}"
    out = [f"{data['faces']:,} faces x {data['dim']} dims ({data.get('identities', '?'):,} synthetic guests, "
           f"clustered: bench/datasets.py), {data['queries']} single queries in sequence, 1 thread, against exact "
           f"search (faiss-flat). Two recalls: recall@{k} of the whole exact top-{k}, and recall@{k} of the exact "
           f"top-{k} faces scoring >= {thr} (what a match at the default threshold returns; "
           f"{data.get('faces_above_threshold_per_query', float('nan')):.1f} a query here). Beyond a guest's own "
           "photos the top-k is filled with strangers at cosine ~0 that no threshold returns: an IVF index rarely "
           "scans their lists, a graph index stumbles on them, so recall@k of the whole top-k favours HNSW "
           f"without changing any match. Headline setting of each engine: the fastest reaching {metric_name} >= "
           f"{data.get('target_recall')}, else the most accurate; ratios are the other engine's number over "
           "FaceMatch's (default options) in the same run: >1 means FaceMatch is faster.", ""]
    rows = []
    for name, e in data["engines"].items():
        if e.get("status") != "ok":
            rows.append([name, f"**{e.get('status')}**: {e.get('reason')}", *[""] * 11])
            continue
        h, vs = e.get("headline") or {}, e.get("vs_facematch") or {}
        rows.append([name, e.get("index"), h.get("param"), e.get("insert_s"), e.get("index_s"), h.get("p50_ms"),
                     h.get("p99_ms"), h.get(rk), h.get("recall_above_threshold"), _x(vs.get("p50")),
                     _x(vs.get("p99")), _x(vs.get("build"))])
    out += table(["engine", "index", "setting", "insert s", "index build s", "p50 ms", "p99 ms", f"recall@{k}",
                  f"recall@{k} >= {thr}", "p50 / FaceMatch", "p99 / FaceMatch", "build / FaceMatch"], rows)
    out += _engines_verdict(data, metric)
    out += _equal_recall(data, rk, thr)
    sweep = [[name, r["param"], r["p50_ms"], r["p99_ms"], r[rk], r.get("recall_above_threshold")]
             for name, e in data["engines"].items() if e.get("status") == "ok" for r in e.get("settings", [])]
    out += ["Every setting measured:", ""] + table(["engine", "setting", "p50 ms", "p99 ms", f"recall@{k}",
                                                    f"recall@{k} >= {thr}"], sweep)
    versions = [f"{name}: {e['version']}" for name, e in data["engines"].items() if e.get("version")]
    if versions:
        out += ["Versions: " + "; ".join(versions) + ".", ""]
    fm = data["engines"].get("facematch", {})
    if fm.get("status") == "ok":
        out += [f"FaceMatch's insert time is {data['faces']:,} `EventIndex.upsert` calls (one photo, one face each); "
                f"its index build column is the wait for the background IVF-SQ8 build that crossing "
                f"`promote_at` starts, plus the first search ({fm.get('index_s', 0):.3g} s). `facematch` is the "
                "indexer's default options (an event of 100k faces or more is promoted to IVF-SQ8, nprobe swept "
                "around the default as ef is swept for HNSW); `facematch-exact` is the same index with promotion "
                "off (exact IndexFlatIP). HNSW parameters are pgvector's defaults (m=16, ef_construction=64) for "
                "both databases.", ""]
    for name, e in data["engines"].items():
        rows_ = e.get("settings") or []
        if e.get("status") == "ok" and len(rows_) > 2 and rows_[0]["p50_ms"] > 2 * rows_[1]["p50_ms"]:
            out += [f"Note: {name}'s first setting ({rows_[0]['param']}) was slower than the next one although it "
                    "does less work: the server was still busy after the build (Milvus Lite keeps building and "
                    "loading segments after describe_index reports Finished). Read its curve from the second point.",
                    ""]
    pg = data["engines"].get("pgvector", {})
    if pg.get("status") == "ok" and not pg.get("uses_index", True):
        out += ["Note: PostgreSQL's planner chose not to use the HNSW index at this size (sequential scan).", ""]
    if "engines" in plots:
        out += [f"![recall against latency per engine]({plots['engines']})", ""]
    return out


def _engines_verdict(data: dict[str, Any], metric: str) -> list[str]:
    """One sentence per database: is FaceMatch (promoted or exact) faster at equal or better recall?"""
    engines, out = data["engines"], []
    ours = [(n, engines[n]["headline"]) for n in ("facematch", "facematch-exact")
            if engines.get(n, {}).get("status") == "ok" and engines[n].get("headline")]
    default = [r for r in engines.get("facematch", {}).get("settings") or [] if "(default)" in r["param"]]
    if default and ours and ours[0][0] == "facematch" and default[0] is not ours[0][1] \
            and default[0]["param"] != ours[0][1]["param"]:
        ours.insert(1, ("facematch", default[0]))
    for name in ("pgvector", "milvus-lite"):
        other = engines.get(name, {})
        theirs = other.get("headline") if other.get("status") == "ok" else None
        if not theirs or not ours:
            continue
        parts = []
        for our_name, mine in ours:
            at_least = mine[metric] >= theirs[metric] - 1e-9
            parts.append(f"`{our_name}` ({mine['param']}) p50 {mine['p50_ms']:.3g} ms / p99 {mine['p99_ms']:.3g} ms "
                         f"at recall {mine[metric]:.3f}: {_faster(mine['p50_ms'], theirs['p50_ms'])} at p50, "
                         f"{_faster(mine['p99_ms'], theirs['p99_ms'])} at p99, recall "
                         f"{'equal or better' if at_least else '**lower**'}")
        out.append(f"- Against {name} ({theirs['param']}: p50 {theirs['p50_ms']:.3g} ms, p99 "
                   f"{theirs['p99_ms']:.3g} ms, recall {theirs[metric]:.3f}): " + "; ".join(parts) + ".")
    return out + [""] if out else []


def _equal_recall(data: dict[str, Any], rk: str, thr: float) -> list[str]:
    """Per recall measure: each engine's fastest setting reaching the best recall every approximate engine reaches."""
    engines = {n: e for n, e in data["engines"].items() if e.get("status") == "ok" and e.get("settings")}
    approximate = [e for e in engines.values() if not any(r["param"] == "exact" for r in e["settings"])]
    if len(approximate) < 2 or "facematch" not in engines:
        return []
    rows = []
    for key, label in ((rk, rk.replace("recall_at_", "recall@")), ("recall_above_threshold", f"recall@10 >= {thr}")):
        if not all(key in r for e in engines.values() for r in e["settings"]):
            continue
        level = min(max(r[key] for r in e["settings"]) for e in approximate)
        base = min((r for r in engines["facematch"]["settings"] if r[key] >= level), key=lambda r: r["p50_ms"])
        for name, e in engines.items():
            best = min((r for r in e["settings"] if r[key] >= level), key=lambda r: r["p50_ms"])
            rows.append([f"{label}: {level:.3f}", name, best["param"], best["p50_ms"], best["p99_ms"], best[key],
                         _x(best["p50_ms"] / base["p50_ms"]), _x(best["p99_ms"] / base["p99_ms"])])
    return ["At equal recall: for each recall measure, the highest level every approximate engine reaches, and each "
            "engine's fastest setting reaching it (ratios over FaceMatch's setting at that level):", "",
            *table(["recall level", "engine", "setting", "p50 ms", "p99 ms", "recall", "p50 / FaceMatch",
                    "p99 / FaceMatch"], rows)]


def _faster(mine: float, theirs: float) -> str:
    return f"{theirs / mine:.2f}x faster" if mine <= theirs else f"**{mine / theirs:.2f}x slower**"


def section_large_event(data: dict[str, Any]) -> list[str]:
    """Exact against promoted IVF-SQ8 per event size, against the goal, then the nprobe sweep."""
    thr, k = data.get("threshold", 0.5), data.get("k", 10)
    goal = LARGE_EVENT_GOAL
    opts = data.get("options") or {}
    out = [f"One event, synthetic clustered faces (5 photos a guest, 2 faces a photo), single queries on 1 thread. "
           f"Goal for the promoted index: recall@{k} of faces >= {thr} at least {goal['recall_thr']}, p99 at most "
           f"{goal['p99_ms']:.0f} ms, at most {goal['bytes_per_face']:.0f} B a face. Options: "
           + (", ".join(f"{key}={v}" for key, v in opts.items()) or "the defaults of the day") + ".", ""]
    rows, sweeps = [], []
    for r in data.get("results", []):
        flat, ivf = r["flat"], r["ivf_sq8"]
        size = f"{r['faces']:,} x {r['dim']}"
        rows.append([size, "exact (flat)", flat.get("replay_s"), flat.get("bytes_per_face"), flat.get("p50_ms"),
                     flat.get("p99_ms"), 1.0, 1.0, "", ""])
        ok = (ivf.get("recall_thr", 0) >= goal["recall_thr"] and ivf.get("p99_ms", 1e9) <= goal["p99_ms"]
              and ivf.get("bytes_per_face", 1e9) <= goal["bytes_per_face"])
        rows.append([size, f"IVF-SQ8 nlist={ivf.get('nlist')} nprobe={ivf.get('nprobe')}", ivf.get("build_s"),
                     ivf.get("bytes_per_face"), ivf.get("p50_ms"), ivf.get("p99_ms"), ivf.get("recall10"),
                     ivf.get("recall_thr"), ivf.get("photo_recall"), "met" if ok else "**missed**"])
        sweeps += [[size, nprobe, f"{int(nprobe) / max(1, ivf.get('nlist', 1)):.0%}", s["p50_ms"], s["p99_ms"],
                    s["recall10"], s["recall_thr"]] for nprobe, s in r.get("nprobe_sweep", {}).items()]
    out += table(["faces x dim", "index", "replay (flat) / build (IVF) s", "bytes/face", "p50 ms", "p99 ms",
                  f"recall@{k}", f"recall@{k} >= {thr}", f"photo results at {thr}", "goal"], rows)
    if sweeps:
        out += ["nprobe sweep on the same promoted index:", ""]
        out += table(["faces x dim", "nprobe", "of nlist", "p50 ms", "p99 ms", f"recall@{k}", f"recall@{k} >= {thr}"],
                     sweeps)
    return out + _rest(data, {"results", "options", "threshold", "k", "finished_at"})


def section_gpu(data: dict[str, Any]) -> list[str]:
    """What bench/gpu.py measures, and what it measured (or why it could not)."""
    out = ["What a GPU run measures (`bench/gpu.py`, on a machine with an NVIDIA driver, after "
           "`.venv/bin/python -m pip install -e '.[gpu,bench]'`: onnxruntime-gpu and faiss-gpu-cu12):", "",
           "1. **Embedder stage against the bare model on onnxruntime's CUDAExecutionProvider**, at batch 1, 8 and 32 "
           "(`bench/embedder_throughput.py --batches 1,8,32`, same photos; the SFace pack switches its recognizer to "
           "onnxruntime when CUDA is offered, YuNet detection stays on OpenCV's CPU path): faces/s of each and "
           "stage / bare (target >= 0.9), and that the provider in use really is CUDA.",
           "2. **Detection on GPU**: the buffalo_l pack (SCRFD detector + ArcFace, both onnxruntime), bare "
           "`detect_and_embed` faces/s and photos/s at batch 1, 8 and 32 on CUDAExecutionProvider against "
           "CPUExecutionProvider (its .onnx files must be put in place by hand: non-commercial licence).",
           "3. **FAISS flat search on GPU**: exact IndexFlatIP over 1,000,000 x 512 clustered faces on GPU 0 "
           "against the CPU index on 1 thread: single-query p50/p99, batched queries/s, and that both return the "
           "same top-10.", "",
           "Command: `.venv/bin/python bench/gpu.py [--faces 1000000] [--queries 300] [--skip-embedder]`; it writes "
           "bench/results/gpu.json (and embedder_throughput_gpu.json), and this report shows them here.",
           "On a GPU machine with PyTorch but without onnxruntime-gpu or faiss-gpu, `python3 bench/gpu_torch.py` "
           "(self-contained; `make bench` skips it) measures exact search in fp32/fp16 and SFace/YuNet converted "
           "with onnx2torch against numpy and onnxruntime on the CPU of the same machine.", ""]
    if data.get("status") != "ok":
        return out + [f"**Not measured** on the machine of this report: {data.get('reason')}", "",
                      f"(onnxruntime here: {data.get('onnxruntime')}; FAISS here: {data.get('faiss')}.)", ""]
    out += [f"GPU: {data.get('gpu')}; {data.get('onnxruntime')}; {data.get('faiss')}.", ""]
    return out + section_generic({k: v for k, v in data.items()
                                  if k in ("embedder", "detection", "faiss_flat")})


def _x(v: float | None) -> str:
    return f"x{v:.2f}" if v is not None else "-"


def section_match_latency(data: dict[str, Any]) -> list[str]:
    """Per embedding size and concurrency: the broker floor, the direct path and the Kafka path."""
    runs = data.get("runs") or [data]
    out = [f"{data.get('faces', '?'):,} faces in one event, {data.get('queries', '?')} queries per level "
           "(times clients/4 above 4 clients). `http_match` is the default path: the bridge asks the indexer "
           "that owns the event directly (pipeline/direct.py); `http_match_via_kafka` is a second bridge with "
           "`FACEMATCH_BRIDGE_DIRECT_QUERIES=false` (request/reply topics). Ratios are over the bare broker "
           "round trip at the same concurrency, in the same run (goal: p50 <= "
           f"{data.get('target_p50_ratio', 1.5)}x at 1 client).", ""]
    rows, verdicts = [], []
    for run in runs:
        for clients, level in (run.get("concurrency") or {}).items():
            floor = level.get("broker_round_trip") or {}
            for name in ("broker_round_trip", "http_match", "http_match_via_kafka"):
                m = level.get(name)
                if not isinstance(m, dict) or not floor:
                    continue
                rows.append([run.get("dim"), clients, name, m.get("p50_ms"), m.get("p99_ms"), m.get("req_per_s"),
                             _x(m["p50_ms"] / floor["p50_ms"]), _x(m["p99_ms"] / floor["p99_ms"]),
                             m.get("indexer_search_p50_ms", ""), m.get("failed", "")])
            direct = level.get("http_match")
            if clients == "1" and isinstance(direct, dict) and floor:
                ratio = direct["p50_ms"] / floor["p50_ms"]
                verdict = "met" if ratio <= data.get("target_p50_ratio", 1.5) else "not met"
                faiss = (run.get("faiss_search") or {}).get("p50_ms")
                verdicts.append(f"{run.get('dim')}-d, 1 client: p50 {direct['p50_ms']:.2f} ms = x{ratio:.2f} the "
                                f"round trip ({floor['p50_ms']:.2f} ms): {verdict}; bare FAISS search p50 "
                                f"{faiss if faiss is None else round(faiss, 2)} ms.")
    out += table(["dim", "clients", "path", "p50 ms", "p99 ms", "req/s", "p50 / round trip",
                  "p99 / round trip", "indexer search p50 ms", "failed (non-200)"], rows)
    return out + [f"- {v}" for v in verdicts] + ([""] if verdicts else [])


def section_embedder(data: dict[str, Any]) -> list[str]:
    """Bare model against the embedder stage."""
    names = [n for n in ("bare_model", "embedder_stage") if isinstance(data.get(n), dict)]
    out = table(["path", "faces", "photos", "seconds", "faces/s"],
                [[n, data[n].get("faces"), data[n].get("photos"), data[n].get("seconds"), data[n].get("faces_per_s")]
                 for n in names])
    if "ratio_stage_vs_bare" in data:
        out += [f"Stage / bare model: x{data['ratio_stage_vs_bare']:.2f} (target >= {data.get('target_ratio', 0.9)}).",
                ""]
    return out + _rest(data, {*names, "ratio_stage_vs_bare", "target_ratio"})


def _rest(data: dict[str, Any], shown: set[str]) -> list[str]:
    rows = [[p, v] for key, value in data.items() if key not in shown and key not in ("machine", "command")
            for p, v in flatten(value, key)]
    if len(rows) > 40:
        return table(["other field", "value"], rows[:40]) + [f"({len(rows) - 40} more fields in the JSON.)", ""]
    return table(["other field", "value"], rows) if rows else []


def section_generic(data: Any) -> list[str]:
    """Any other result, flattened."""
    rows = [[p, v] for p, v in flatten(data) if not p.startswith("command")]
    out = table(["field", "value"], rows[:120])
    if len(rows) > 120:
        out += [f"({len(rows) - 120} more fields in the JSON.)", ""]
    return out


def size_latency_points(name: str, obj: Any, size: int | None = None,
                        path: str = "") -> Iterator[tuple[str, int, float, float | None]]:
    """(series, event size, p50 ms, p99 ms) wherever a p50_ms sits under a known size."""
    if isinstance(obj, dict):
        for key in SIZE_KEYS:
            if isinstance(obj.get(key), int) and not isinstance(obj.get(key), bool):
                size = obj[key]
                break
        if "p50_ms" in obj and size is not None:
            yield f"{name}:{path}" if path else name, size, float(obj["p50_ms"]), obj.get("p99_ms")
        for key, value in obj.items():
            if key != "machine":
                yield from size_latency_points(name, value, size, f"{path}.{key}" if path else str(key))
    elif isinstance(obj, list):
        for value in obj:
            yield from size_latency_points(name, value, size, path)


def throughput_points(name: str, obj: Any) -> list[tuple[str, float]]:
    """(label, value) of every key ending in per_s."""
    return [(f"{name}:{p}", float(v)) for p, v in flatten(obj)
            if p.endswith("per_s") and isinstance(v, (int, float)) and not isinstance(v, bool)]


def make_plots(results: dict[str, Any], plot_dir: Path, rel: str) -> tuple[dict[str, str], str | None]:
    """PNGs under plot_dir; returns {plot: relative path} and why plotting was skipped, if it was."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return {}, f"no plots: {exc} ({INSTALL_HINT})"
    plot_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}

    engines = results.get("engines")
    if engines and any(e.get("status") == "ok" for e in engines["engines"].values()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        rk = f"recall_at_{engines.get('k', 10)}"
        for name, e in engines["engines"].items():
            rows = e.get("settings") or []
            if e.get("status") == "ok" and rows:
                ax.plot([r["p50_ms"] for r in rows], [r[rk] for r in rows], marker="o", label=name)
                for r in rows if len(rows) > 1 else []:
                    ax.annotate(r["param"].split("=")[-1], (r["p50_ms"], r[rk]), fontsize=7,
                                textcoords="offset points", xytext=(3, -9))
        ax.set_xscale("log")
        ax.set_xlabel("single-query p50 latency (ms, log)")
        ax.set_ylabel(f"recall@{engines.get('k', 10)} vs exact")
        ax.set_title(f"Recall against latency, {engines['faces']:,} faces x {engines['dim']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        made["engines"] = _save(fig, plot_dir / "engines_recall_latency.png", rel, plt)

    series: dict[str, list[tuple[int, float, float | None]]] = {}
    for name, data in results.items():
        if name in ("engines", "run_all", "gpu"):
            continue
        for label, size, p50, p99 in size_latency_points(name, data):
            series.setdefault(label, []).append((size, p50, p99))
    if series:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        multi = {k: v for k, v in series.items() if len({s for s, _, _ in v}) > 1}
        for label, points in (multi or series).items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{label} p50")
            if all(p[2] is not None for p in points) and multi:
                ax.plot([p[0] for p in points], [p[2] for p in points], marker="x", linestyle="--",
                        label=f"{label} p99")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("faces in the event (log)")
        ax.set_ylabel("latency (ms, log)")
        ax.set_title("Match latency against event size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        made["size"] = _save(fig, plot_dir / "latency_vs_event_size.png", rel, plt)

    rates = [pt for name in ("ingest_rate", "embedder_throughput", "large_event") if name in results
             for pt in throughput_points(name, results[name])]
    if rates:
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(rates) + 1.5))
        ax.barh([r[0] for r in rates], [r[1] for r in rates])
        ax.set_xlabel("per second")
        ax.set_title("Ingest and embedding rates")
        for i, (_, v) in enumerate(rates):
            ax.annotate(f"{v:,.0f}" if v >= 100 else f"{v:.1f}", (v, i), fontsize=7, xytext=(3, -3),
                        textcoords="offset points")
        made["rates"] = _save(fig, plot_dir / "ingest_rates.png", rel, plt)
    return made, None


def _save(fig: Any, path: Path, rel: str, plt: Any) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"{rel}/{path.name}"


def load_results(results_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """{stem: parsed JSON} and the files that could not be read."""
    results, bad = {}, []
    for path in sorted(results_dir.glob("*.json")):
        try:
            results[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            bad.append(f"{path.name}: {exc}")
    return results, bad


TITLES = {"engines": "Vector engines: FaceMatch against pgvector and Milvus Lite",
          "match_latency": "Match latency (HTTP -> owning indexer -> HTTP, directly or through Kafka)",
          "embedder_throughput": "Embedder throughput", "large_event": "Large events (default size)",
          "large_event_1m": "Large events: 1M faces x 512 (ArcFace, buffalo_l)",
          "large_event_1m_128d": "Large events: 1M faces x 128 (SFace, the default model)",
          "ingest_rate": "Ingest rate", "gpu": "GPU"}


def render(results: dict[str, Any], bad: list[str], plots: dict[str, str], plot_note: str | None) -> str:
    """The whole BENCHMARKS.md."""
    ctx = Context(results)
    run_all = results.get("run_all") or {}
    out = ["# FaceMatch benchmarks", "",
           f"Generated by `bench/report.py` from `bench/results/*.json` on "
           f"{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. "
           "Regenerate everything with `make bench` (installs the `bench` extra, runs every script in `bench/` "
           "through `bench/run_all.py`, then this report); the report alone: `.venv/bin/python bench/report.py`.", "",
           f"Machine: {describe_machine(run_all.get('machine') or ctx.here)}.", "",
           "Sizes are set by these variables (`make bench FACEMATCH_BENCH_ENGINE_FACES=20000 ...`):", ""]
    out += table(["variable", "default", "meaning"], [[f"`{k}`", v[0], v[1]] for k, v in VARIABLES.items()])
    if run_all.get("scripts"):
        scripts = run_all["scripts"]
        total = float(run_all.get("scripts_total_s") or sum(float(r.get("seconds", 0)) for r in scripts.values()))
        sizes = run_all.get("sizes") or {}
        defaults = "sizes" in run_all and all(sizes.get(key, v[0]) == v[0] for key, v in VARIABLES.items()
                                              if key != "FACEMATCH_BENCH_ONLY")
        all_ok = all(r.get("status") == "ok" for r in scripts.values())
        verdict = "met" if total <= RUNTIME_GOAL_S and all_ok else ("**missed**" if all_ok else "not known: a script "
                                                                   "did not finish")
        out += ["## Runs", "", f"Benchmark scripts, each at its last run{' at the default sizes' if defaults else ''}: "
                f"{total:.0f} s together ({total / 60:.1f} min). Goal for `make bench` at the default sizes: under "
                f"{RUNTIME_GOAL_S // 60} min on a fresh machine: {verdict}. `make bench` adds installing the bench "
                "extra and fetching the models and photos once (about a minute with a warm pip cache). The last "
                f"`bench/run_all.py` call ran {run_all.get('only') or 'every script'} in "
                f"{float(run_all.get('total_s', 0)):.0f} s.", ""]
        out += table(["script", "status", "seconds", "command"],
                     [[n, s.get("status"), s.get("seconds"), f"`{s.get('command')}`"]
                      for n, s in run_all["scripts"].items()])
        failed = [(n, s) for n, s in run_all["scripts"].items() if s.get("status") != "ok"]
        for name, s in failed:
            out += [f"`{name}` {s.get('status')}: last output:", "", "```", *(s.get("tail") or "").splitlines()[-15:],
                    "```", ""]
    if plot_note:
        out += [f"_{plot_note}_", ""]
    order = ["engines", "large_event", "large_event_1m", "large_event_1m_128d", "match_latency", "ingest_rate",
             "embedder_throughput", "gpu"]
    names = [n for n in order if n in results] + sorted(n for n in results if n not in order and n != "run_all")
    for name in names:
        data = results[name]
        out += [f"## {TITLES.get(name, name)}", "", f"`bench/results/{name}.json`  "]
        out += ctx.provenance(name, data if isinstance(data, dict) else {})
        try:
            if name == "engines":
                out += section_engines(data, plots)
            elif name == "match_latency":
                out += section_match_latency(data)
            elif name == "embedder_throughput":
                out += section_embedder(data)
            elif name.startswith("large_event") and isinstance(data, dict) and "results" in data:
                out += section_large_event(data)
            elif name == "gpu":
                out += section_gpu(data)
            else:
                out += section_generic(data)
        except (KeyError, TypeError, ValueError) as exc:  # a script changed its format: show it raw
            out += [f"_(format not understood: {exc!r}; raw fields below)_", ""] + section_generic(data)
    if "size" in plots:
        out += ["## Latency against event size", "", f"![latency against event size]({plots['size']})", ""]
    if "rates" in plots:
        out += ["## Rates", "", f"![ingest and embedding rates]({plots['rates']})", ""]
    if bad:
        out += ["## Unreadable results", ""] + [f"- {b}" for b in bad] + [""]
    if not names:
        out += ["No results yet: run `make bench`.", ""]
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--plots", type=Path, default=REPO / "docs" / "bench")
    args = parser.parse_args()
    results, bad = load_results(args.results)
    try:
        rel = os.path.relpath(args.plots.resolve(), args.out.resolve().parent)
    except ValueError:
        rel = str(args.plots.resolve())
    plots, note = make_plots(results, args.plots, rel)
    args.out.write_text(render(results, bad, plots, note))
    print(f"wrote {args.out} ({len(results)} result files, {len(plots)} plots in {args.plots})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
