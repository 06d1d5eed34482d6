"""One large event: exact IndexFlatIP against the promoted IVF-SQ8 index, in one run, same data.

Synthetic clustered faces: identities, 5 noisy copies of each (same-identity
cosine ~0.67, others ~0 +- 0.05), 2 faces a photo, shuffled. Queries are new
noisy copies of indexed identities (a selfie). Per size it measures replay
(upserting every photo), build (promotion), memory a face, single-query
latency (1 OpenMP thread), recall against exact search on the same index,
snapshot save/load, and an nprobe sweep (shares of nlist around the default).

recall@10 counts the exact top-10 faces found; beyond the 5 siblings those are
random faces at cosine ~0.15 that no threshold would return, so the figure that
matters for users is recall@10 of faces above 0.5 (`recall_thr`) and the
agreement of photo results at threshold 0.5 (`photo_recall`).

    .venv/bin/python bench/large_event.py
    FACEMATCH_BENCH_FACES=100000,1000000 FACEMATCH_BENCH_DIM=128 .venv/bin/python bench/large_event.py
    FACEMATCH_BENCH_FACES=1000000 FACEMATCH_BENCH_OUT=bench/results/large_event_1m.json \
        .venv/bin/python bench/large_event.py
    (FACEMATCH_BENCH_EVENT_QUERIES, _NPROBE, _PROBE_FRACTION, _BUILD_THREADS, _OUT: queries, IndexOptions.nprobe and
    .probe_fraction (defaults: the indexer's), build threads, JSON path)

The default (100k x 512) peaks at ~1 GB. 1M x 512 peaks at ~7 GB (2 GB flat
index, a 2 GB copy for the build, 2 GB for the flat snapshot blob): run it
alone on a machine with the room; 1M x 128 peaks at ~2 GB.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.report import machine_info  # noqa: E402
from pipeline.indexer.event_index import EventIndex  # noqa: E402
from pipeline.indexer.promotion import IndexOptions, probes  # noqa: E402
from pipeline.indexer.state import PartitionState, load_snapshot, save_snapshot  # noqa: E402
from pipeline.records import Face  # noqa: E402

COPIES, PER_PHOTO, NOISE, THRESHOLD, K = 5, 2, 0.65, 0.5, 10
SWEEP_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.3)  # of nlist
ENV = ("FACEMATCH_BENCH_FACES", "FACEMATCH_BENCH_DIM", "FACEMATCH_BENCH_EVENT_QUERIES", "FACEMATCH_BENCH_NPROBE",
       "FACEMATCH_BENCH_PROBE_FRACTION", "FACEMATCH_BENCH_BUILD_THREADS", "FACEMATCH_BENCH_OUT")


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_data(n: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(faces n x dim, identity centers): COPIES noisy copies per identity, shuffled."""
    centers = unit_rows(rng.standard_normal((max(1, n // COPIES), dim), dtype=np.float32))
    faces = np.empty((n, dim), dtype=np.float32)
    order = rng.permutation(n) % len(centers)
    for start in range(0, n, 100_000):
        rows = order[start:start + 100_000]
        noise = rng.standard_normal((len(rows), dim), dtype=np.float32) * (NOISE / np.sqrt(dim))
        faces[start:start + len(rows)] = unit_rows(centers[rows] + noise)
    return faces, centers


def latency(index: Any, queries: np.ndarray, n: int) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    samples, all_d, all_i = [], [], []
    for q in queries[:n]:
        start = time.perf_counter()
        d, i = index.search(q.reshape(1, -1), K)
        samples.append(time.perf_counter() - start)
        all_d.append(d[0])
        all_i.append(i[0])
    ms = np.asarray(samples) * 1000
    stats = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
    return stats, np.asarray(all_d), np.asarray(all_i)


def recalls(found: np.ndarray, truth: np.ndarray, truth_d: np.ndarray) -> dict[str, float]:
    hits = sum(len(set(f) & set(t)) for f, t in zip(found, truth))
    above = [set(t[d >= THRESHOLD]) for t, d in zip(truth, truth_d)]
    hits_thr = sum(len(set(f) & a) for f, a in zip(found, above))
    return {"recall10": hits / truth.size, "recall_thr": hits_thr / max(1, sum(len(a) for a in above))}


def photo_results(index: EventIndex, queries: np.ndarray) -> list[set[str]]:
    return [{m.photo_id for m in index.search(q, K, THRESHOLD)} for q in queries]


def snapshot_times(index: EventIndex, dim: int, directory: Path) -> dict[str, float]:
    path = directory / "snap.npz"
    state = PartitionState(0, events={"E": index})
    start = time.perf_counter()
    save_snapshot(state, path)
    saved = time.perf_counter() - start
    start = time.perf_counter()
    loaded = load_snapshot(path, 0, dim, options=index.options)
    load_s = time.perf_counter() - start
    assert loaded is not None and loaded.events["E"].size == index.size
    size = path.stat().st_size
    path.unlink()
    del loaded
    return {"save_s": saved, "load_s": load_s, "file_bytes_per_face": size / index.size}


def run_size(n: int, dim: int, queries_n: int, options: IndexOptions, directory: Path) -> dict[str, Any]:
    rng = np.random.default_rng(n)
    gc.collect()
    rss0 = rss_bytes()
    faces, centers = make_data(n, dim, rng)
    picks = rng.integers(0, len(centers), queries_n)
    queries = unit_rows(centers[picks] + rng.standard_normal((queries_n, dim), dtype=np.float32)
                        * (NOISE / np.sqrt(dim)))
    del centers
    index = EventIndex(dim, "bench", IndexOptions(promote_at=0, nprobe=options.nprobe,
                                                  probe_fraction=options.probe_fraction,
                                                  build_threads=options.build_threads))
    start = time.perf_counter()
    for p in range(0, n, PER_PHOTO):
        index.upsert(f"photo-{p // PER_PHOTO:07d}",
                     [Face(bbox=(j, j, 40, 50), det_score=0.9, embedding=faces[p + j])
                      for j in range(min(PER_PHOTO, n - p))])
    replay_s = time.perf_counter() - start
    del faces
    gc.collect()
    flat: dict[str, Any] = {"replay_s": replay_s, "bytes_per_face": index.memory_bytes() / n,
                            "rss_bytes_per_face": (rss_bytes() - rss0) / n}
    truth_d, truth_i = index.index.search(queries, K)  # batched: exact ground truth
    lat, _, _ = latency(index.index, queries, min(queries_n, 50 if n > 200_000 else 200))
    flat.update(lat)
    flat_photos = photo_results(index, queries[:100])
    flat.update(snapshot_times(index, dim, directory))

    rss_before_build = rss_bytes()
    start = time.perf_counter()
    index.promote_now()
    gc.collect()
    ivf: dict[str, Any] = {"build_s": time.perf_counter() - start, "bytes_per_face": index.memory_bytes() / n,
                           "rss_bytes_per_face": (rss_bytes() - rss0) / n,
                           "build_rss_delta_bytes": rss_bytes() - rss_before_build,
                           "nlist": int(index.index.nlist), "nprobe": int(index.index.nprobe)}
    lat, found_d, found_i = latency(index.index, queries, queries_n)
    ivf.update(lat)
    ivf.update(recalls(found_i, truth_i, truth_d))
    ivf_photos = photo_results(index, queries[:100])
    agree = sum(len(a & b) for a, b in zip(flat_photos, ivf_photos))
    ivf["photo_recall"] = agree / max(1, sum(len(a) for a in flat_photos))
    ivf.update(snapshot_times(index, dim, directory))
    sweep = {}
    nlist = int(index.index.nlist)
    for nprobe in sorted({max(1, round(nlist * f)) for f in SWEEP_FRACTIONS} | {probes(nlist, options)}):
        index.index.nprobe = nprobe
        lat, _, found_i = latency(index.index, queries, queries_n)
        sweep[str(nprobe)] = {**lat, **recalls(found_i, truth_i, truth_d)}
    return {"faces": n, "dim": dim, "flat": flat, "ivf_sq8": ivf, "nprobe_sweep": sweep}


def print_table(results: list[dict[str, Any]]) -> None:
    rows = [("build/replay s", "replay_s", "build_s"), ("bytes/face (index+arrays)", "bytes_per_face", None),
            ("RSS bytes/face", "rss_bytes_per_face", None), ("search p50 ms", "p50_ms", None),
            ("search p99 ms", "p99_ms", None), ("snapshot save s", "save_s", None),
            ("snapshot load s", "load_s", None), ("snapshot bytes/face", "file_bytes_per_face", None)]
    for r in results:
        flat, ivf = r["flat"], r["ivf_sq8"]
        print(f"\n{r['faces']:,} faces x {r['dim']}-d   IVF-SQ8 nlist={ivf['nlist']} nprobe={ivf['nprobe']}")
        print(f"{'metric':28} {'flat':>10} {'ivf-sq8':>10} {'ivf/flat':>9}")
        for label, key, ivf_key in rows:
            a, b = flat[key], ivf[ivf_key or key]
            print(f"{label:28} {a:10.3f} {b:10.3f} {b / a if a else float('nan'):9.3f}")
        print(f"recall@10 {ivf['recall10']:.3f}  recall@10 above {THRESHOLD} {ivf['recall_thr']:.3f}  "
              f"photo results at {THRESHOLD} {ivf['photo_recall']:.3f}")
        for nprobe, s in r["nprobe_sweep"].items():
            print(f"  nprobe {nprobe:>4}: p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms  "
                  f"recall@10 {s['recall10']:.3f}  above {THRESHOLD} {s['recall_thr']:.3f}")


def main() -> None:
    sizes = [int(s) for s in os.environ.get("FACEMATCH_BENCH_FACES", "100000").split(",") if s]
    dim = int(os.environ.get("FACEMATCH_BENCH_DIM", "512"))
    queries_n = int(os.environ.get("FACEMATCH_BENCH_EVENT_QUERIES", "300"))
    defaults = IndexOptions()
    options = IndexOptions(nprobe=int(os.environ.get("FACEMATCH_BENCH_NPROBE", defaults.nprobe)),
                           probe_fraction=float(os.environ.get("FACEMATCH_BENCH_PROBE_FRACTION",
                                                               defaults.probe_fraction)),
                           build_threads=int(os.environ.get("FACEMATCH_BENCH_BUILD_THREADS", "2")))
    faiss.omp_set_num_threads(1)  # single queries, as the indexer runs them
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            results.append(run_size(n, dim, queries_n, options, Path(tmp)))
            gc.collect()
    print_table(results)
    out = REPO / os.environ.get("FACEMATCH_BENCH_OUT", "bench/results/large_event.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join([*(f"{k}={os.environ[k]}" for k in ENV if os.environ.get(k)), ".venv/bin/python",
                        "bench/large_event.py"])
    out.write_text(json.dumps({"command": command, "machine": machine_info(),
                               "finished_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                               "threads_per_query": 1, "threshold": THRESHOLD, "k": K,
                               "options": {"nprobe": options.nprobe, "probe_fraction": options.probe_fraction,
                                           "build_threads": options.build_threads},
                               "results": results}, indent=2))
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
