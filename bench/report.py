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
    "FACEMATCH_BENCH_TIMEOUT_S": ("600", "per-script timeout in bench/run_all.py; a script over it is recorded "
                                         "as timed out and the rest still run"),
    "FACEMATCH_BENCH_ONLY": ("(all)", "comma-separated script names to run, e.g. `engines,match_latency`"),
}


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
    rk = f"recall_at_{k}"
    out = [f"{data['faces']:,} faces x {data['dim']} dims ({data.get('identities', '?'):,} synthetic guests, "
           f"clustered: bench/datasets.py), {data['queries']} single queries in sequence, recall@{k} against "
           f"exact search (faiss-flat). Headline setting: the fastest reaching recall {data.get('target_recall')}, "
           "else the most accurate. Ratios are against FaceMatch in the same run (>1: slower or longer).", ""]
    rows = []
    for name, e in data["engines"].items():
        if e.get("status") != "ok":
            rows.append([name, f"**{e.get('status')}**: {e.get('reason')}", "", "", "", "", "", "", "", ""])
            continue
        h, vs = e.get("headline") or {}, e.get("vs_facematch") or {}
        rows.append([name, e.get("index"), h.get("param"), e.get("insert_s"), e.get("index_s"), h.get("p50_ms"),
                     h.get("p99_ms"), h.get(rk), _x(vs.get("p50")), _x(vs.get("build"))])
    out += table(["engine", "index", "setting", "insert s", "index build s", "p50 ms", "p99 ms", f"recall@{k}",
                  "p50 vs FaceMatch", "build vs FaceMatch"], rows)
    sweep = [[name, r["param"], r["p50_ms"], r["p99_ms"], r[rk]] for name, e in data["engines"].items()
             if e.get("status") == "ok" for r in e.get("settings", [])]
    out += ["Every setting measured:", ""] + table(["engine", "setting", "p50 ms", "p99 ms", f"recall@{k}"], sweep)
    versions = [f"{name}: {e['version']}" for name, e in data["engines"].items() if e.get("version")]
    if versions:
        out += ["Versions: " + "; ".join(versions) + ".", ""]
    fm = data["engines"].get("facematch", {})
    if fm.get("status") == "ok":
        out += [f"FaceMatch's insert time is {data['faces']:,} `EventIndex.upsert` calls (one photo, one face each); "
                f"its index column is the first search after them ({fm.get('first_search_s', 0):.3g} s), which pays "
                "for any index it builds lazily.", ""]
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


def _x(v: float | None) -> str:
    return f"x{v:.2f}" if v is not None else "-"


def section_match_latency(data: dict[str, Any]) -> list[str]:
    """Bare FAISS, bare broker round trip and the full HTTP path."""
    names = [n for n in ("faiss_search", "broker_round_trip", "http_match") if isinstance(data.get(n), dict)]
    out = [f"{data.get('faces', '?'):,} faces x {data.get('dim', '?')} dims, {data.get('queries', '?')} queries.", ""]
    out += table(["path", "p50 ms", "p99 ms", "n"], [[n, data[n].get("p50_ms"), data[n].get("p99_ms"),
                                                    data[n].get("n")] for n in names])
    if "ratio_p50_http_vs_round_trip" in data:
        out += [f"HTTP match / broker round trip: p50 x{data['ratio_p50_http_vs_round_trip']:.2f} "
                f"(target <= {data.get('target_p50_ratio', 1.5)}), p99 x{data['ratio_p99_http_vs_round_trip']:.2f}.",
                ""]
    return out + _rest(data, {"faces", "dim", "queries", *names, "ratio_p50_http_vs_round_trip",
                              "ratio_p99_http_vs_round_trip", "target_p50_ratio"})


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
        if name in ("engines", "run_all"):
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
          "match_latency": "Match latency (HTTP -> Kafka -> indexer -> HTTP)",
          "embedder_throughput": "Embedder throughput", "large_event": "Large events", "ingest_rate": "Ingest rate"}


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
        out += ["## Runs", "", f"`bench/run_all.py` took {run_all.get('total_s', 0):.0f} s.", ""]
        out += table(["script", "status", "seconds", "command"],
                     [[n, s.get("status"), s.get("seconds"), f"`{s.get('command')}`"]
                      for n, s in run_all["scripts"].items()])
        failed = [(n, s) for n, s in run_all["scripts"].items() if s.get("status") != "ok"]
        for name, s in failed:
            out += [f"`{name}` {s.get('status')}: last output:", "", "```", *(s.get("tail") or "").splitlines()[-15:],
                    "```", ""]
    if plot_note:
        out += [f"_{plot_note}_", ""]
    order = ["engines", "match_latency", "large_event", "ingest_rate", "embedder_throughput"]
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
