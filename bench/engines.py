"""The same selfie queries against FaceMatch's index and two vector databases, in one run.

Engines, all on the same clustered faces (bench/datasets.py) and queries:
  * faiss-flat: faiss.IndexFlatIP, exact; the ground truth for recall@k;
  * facematch: pipeline.indexer.event_index.EventIndex with its default options (upsert one photo at a
    time, search), a black box: whatever index it chooses at this size is what is measured. At or above
    IndexOptions.promote_at (100k) that is the IVF-SQ8 index built in the background: the benchmark waits
    for the build (counted as index build time) and sweeps nprobe around the default, as it sweeps ef for HNSW;
  * facematch-exact: the same EventIndex with promotion off (promote_at=0): exact IndexFlatIP at any size;
  * pgvector: PostgreSQL + pgvector HNSW (vector_cosine_ops), the way Immich stores faces, from `pgserver`
    (PostgreSQL with pgvector bundled in a PyPI wheel), queried through psycopg; hnsw.ef_search swept;
  * milvus-lite: Milvus Lite on a local .db file through pymilvus' MilvusClient, HNSW; ef swept.
Per engine: insert and index build time, single-query sequential p50/p99 latency, recall@k against
faiss-flat, recall of the exact top-k faces scoring >= --threshold (the ones a match returns; the rest of
the top-k are strangers at cosine ~0), and ratios against FaceMatch (default options) in the same run.
The headline setting of each engine is the fastest reaching --target-recall on --headline-recall.
An engine that cannot be imported or run is recorded as skipped/failed with the reason; the others still run.

    .venv/bin/python -m pip install -e '.[bench]'     # pgserver, psycopg, pymilvus, milvus-lite, matplotlib
    .venv/bin/python bench/engines.py [--faces 100000] [--queries 300] [--engines facematch,pgvector,milvus-lite]
        [--headline-recall above_threshold|at_k] [--threshold 0.5] [--target-recall 0.95]

FACEMATCH_BENCH_ENGINE_FACES and FACEMATCH_BENCH_ENGINE_QUERIES set the defaults of --faces and --queries.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.datasets import Faces, clustered_faces, exact_search, recall_above, recall_at_k, selfie_queries  # noqa: E402
from bench.report import machine_info  # noqa: E402

INSTALL_HINT = "install the benchmark extra: .venv/bin/python -m pip install -e '.[bench]'"
EF_SWEEP = (16, 40, 100, 200)
WARMUP = 20
HNSW_M, HNSW_EF_CONSTRUCTION = 16, 64  # pgvector's defaults; Milvus gets the same


@dataclass(frozen=True)
class Truth:
    """Exact answers (faiss-flat) to the queries: row ids and scores, k and the match threshold."""

    ids: np.ndarray
    scores: np.ndarray
    k: int
    threshold: float


class Skip(Exception):
    """The engine cannot run here (not installed, no binary); the reason is recorded."""


def version(dist: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def latency(samples_s: list[float]) -> dict[str, float]:
    """p50/p99/mean in ms."""
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "n": len(ms)}


def run_queries(search: Callable[[Any], list[int]], queries: Faces | list[Any], truth: Truth) -> dict[str, float]:
    """Sequential single queries (after a warm-up); latency and recalls against the exact answer.

    `queries` are the vectors, or each query already in the engine's wire form (made before timing).
    """
    inputs = list(queries.vectors) if isinstance(queries, Faces) else queries
    for q in inputs[:WARMUP]:
        search(q)
    found, samples = [], []
    for q in inputs:
        start = time.perf_counter()
        ids = search(q)
        samples.append(time.perf_counter() - start)
        found.append(ids)
    k = truth.k
    return {**latency(samples), f"recall_at_{k}": recall_at_k(found, truth.ids, k),
            "recall_above_threshold": recall_above(found, truth.ids, truth.scores, k, truth.threshold)}


def bench_faiss_flat(faces: Faces, queries: Faces, truth: Truth, workdir: Path) -> dict[str, Any]:
    """Exact inner product, 1 OpenMP thread (as the indexer runs it)."""
    import faiss

    start = time.perf_counter()
    index = faiss.IndexFlatIP(faces.dim)
    index.add(faces.vectors)
    build_s = time.perf_counter() - start
    k = truth.k
    row = run_queries(lambda q: index.search(q.reshape(1, -1), k)[1][0].tolist(), queries, truth)
    return {"version": version("faiss-cpu"), "index": "IndexFlatIP", "insert_s": build_s, "index_s": 0.0,
            "build_s": build_s, "settings": [{"param": "exact", **row}]}


def bench_facematch(faces: Faces, queries: Faces, truth: Truth, workdir: Path) -> dict[str, Any]:
    """EventIndex with its default options, as the indexer runs it: whatever index it picks at this size."""
    return _bench_event_index(faces, queries, truth, None)


def bench_facematch_exact(faces: Faces, queries: Faces, truth: Truth, workdir: Path) -> dict[str, Any]:
    """EventIndex with promotion off: exact IndexFlatIP at any size."""
    from pipeline.indexer.promotion import IndexOptions

    return _bench_event_index(faces, queries, truth, IndexOptions(promote_at=0))


def _bench_event_index(faces: Faces, queries: Faces, truth: Truth, options: Any) -> dict[str, Any]:
    """One upsert per photo (one face each here); waits for a background promotion; nprobe swept if IVF."""
    from pipeline.indexer.event_index import EventIndex
    from pipeline.indexer.promotion import probes
    from pipeline.records import Face

    k = truth.k
    index = EventIndex(faces.dim, "bench", options)
    start = time.perf_counter()
    for i, vector in enumerate(faces.vectors):
        index.upsert(f"p{i}", [Face(bbox=(0.0, 0.0, 1.0, 1.0), det_score=1.0, embedding=vector)])
    insert_s = time.perf_counter() - start
    start = time.perf_counter()
    if index.promotion is not None:  # crossing promote_at started a background build: it is the index build
        index.promotion.wait()
    index.search(queries.vectors[0], top_k=k, threshold=-1.0)  # swaps in a finished build; pays any lazy work
    index_s = time.perf_counter() - start

    def search(q: np.ndarray) -> list[int]:
        return [int(m.photo_id[1:]) for m in index.search(q, top_k=k, threshold=-1.0)]

    settings = []
    if index.kind == "flat":
        settings.append({"param": "exact", **run_queries(search, queries, truth)})
    else:
        default = probes(int(index.index.nlist), index.options)
        for nprobe in sorted({default // 2, default, default * 3 // 2, default * 2}):
            index.index.nprobe = nprobe
            label = f"nprobe={nprobe}" + (" (default)" if nprobe == default else "")
            settings.append({"param": label, **run_queries(search, queries, truth)})
        index.index.nprobe = default
    return {"version": version("facematch"), "index": describe_faiss(index.index), "kind": index.kind,
            "nlist": int(getattr(index.index, "nlist", 0)) or None, "insert_s": insert_s, "index_s": index_s,
            "build_s": insert_s + index_s, "first_search_s": index_s, "size": index.size,
            "bytes_per_face": index.memory_bytes() / max(1, index.size), "settings": settings}


def describe_faiss(index: Any) -> str:
    """Class names down the wrapper chain, e.g. IndexIDMap2(IndexFlatIP)."""
    import faiss

    names, inner = [], index
    for _ in range(4):
        try:
            inner = faiss.downcast_index(inner)
        except Exception:  # noqa: BLE001 - not a FAISS index (FaceMatch may wrap it): name what it is
            names.append(type(inner).__name__)
            break
        names.append(type(inner).__name__)
        if not hasattr(inner, "index"):
            break
        inner = inner.index
    return "(".join(names) + ")" * (len(names) - 1)


def bench_pgvector(faces: Faces, queries: Faces, truth: Truth, workdir: Path) -> dict[str, Any]:
    """PostgreSQL + pgvector HNSW, cosine distance, binary COPY in, one prepared query at a time."""
    k = truth.k
    try:
        import pgserver
        import psycopg
    except ImportError as exc:
        raise Skip(f"{exc}; {INSTALL_HINT}") from exc
    server = pgserver.get_server(workdir / "pgdata", cleanup_mode="delete")
    try:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            pg_versions = {"postgres": conn.execute("SHOW server_version").fetchone()[0],
                           "pgvector": conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
                           .fetchone()[0]}
            conn.execute(f"CREATE TABLE faces (id int4 PRIMARY KEY, embedding vector({faces.dim}) NOT NULL)")
            start = time.perf_counter()
            with conn.cursor() as cur, cur.copy("COPY faces (id, embedding) FROM STDIN WITH (FORMAT BINARY)") as cp:
                for chunk in _pg_binary_copy(faces.vectors):
                    cp.write(chunk)
            insert_s = time.perf_counter() - start
            # The graph must fit in maintenance_work_mem or the build crawls; one parallel worker on 2 cores.
            conn.execute("SET maintenance_work_mem = '2GB'")
            conn.execute(f"SET max_parallel_maintenance_workers = {max(0, min(7, (os.cpu_count() or 2) - 1))}")
            start = time.perf_counter()
            conn.execute(f"CREATE INDEX faces_hnsw ON faces USING hnsw (embedding vector_cosine_ops) "
                         f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})")
            index_s = time.perf_counter() - start
            conn.execute("ANALYZE faces")
            sql = "SELECT id FROM faces ORDER BY embedding <=> %s::vector LIMIT %s"
            plan = conn.execute("EXPLAIN " + sql, (_pg_vector(queries.vectors[0]), k)).fetchall()
            uses_index = any("faces_hnsw" in row[0] for row in plan)
            texts = [_pg_vector(q) for q in queries.vectors]  # formatted before timing
            settings = []
            for ef in EF_SWEEP:
                conn.execute(f"SET hnsw.ef_search = {int(ef)}")

                def search(text: str) -> list[int]:
                    return [r[0] for r in conn.execute(sql, (text, k), prepare=True).fetchall()]

                settings.append({"param": f"ef_search={ef}", **run_queries(search, texts, truth)})
    finally:
        server.cleanup()
    return {"version": f"pgserver {version('pgserver')}, PostgreSQL {pg_versions['postgres']}, "
                       f"pgvector {pg_versions['pgvector']}, psycopg {version('psycopg')}",
            "index": f"hnsw(m={HNSW_M}, ef_construction={HNSW_EF_CONSTRUCTION}, vector_cosine_ops)",
            "uses_index": uses_index, "insert_s": insert_s, "index_s": index_s, "build_s": insert_s + index_s,
            "settings": settings}


def _pg_vector(q: np.ndarray) -> str:
    return "[" + ",".join(f"{v:.7g}" for v in q.tolist()) + "]"


def _pg_binary_copy(vectors: np.ndarray, chunk: int = 8192) -> Any:
    """COPY BINARY stream: (int4 id, vector) tuples; vector_recv wants int16 dim, int16 0, float4s, big-endian."""
    n, dim = vectors.shape
    row = np.dtype([("nfields", ">i2"), ("id_len", ">i4"), ("id", ">i4"), ("vec_len", ">i4"),
                    ("dim", ">i2"), ("unused", ">i2"), ("vec", ">f4", (dim,))])
    yield b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
    for start in range(0, n, chunk):
        part = vectors[start:start + chunk]
        rows = np.zeros(len(part), dtype=row)
        rows["nfields"], rows["id_len"], rows["vec_len"] = 2, 4, 4 + 4 * dim
        rows["id"] = np.arange(start, start + len(part))
        rows["dim"] = dim
        rows["vec"] = part
        yield rows.tobytes()
    yield (-1).to_bytes(2, "big", signed=True)


def bench_milvus_lite(faces: Faces, queries: Faces, truth: Truth, workdir: Path) -> dict[str, Any]:
    """Milvus Lite (local .db file), HNSW with COSINE, batched inserts, one search call per query."""
    k = truth.k
    try:
        from pymilvus import DataType, MilvusClient
    except ImportError as exc:
        raise Skip(f"{exc}; {INSTALL_HINT}") from exc
    if version("milvus-lite") is None:
        raise Skip(f"milvus-lite is not installed; {INSTALL_HINT}")
    client = MilvusClient(str(workdir / "milvus.db"))
    try:
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=faces.dim)
        params = client.prepare_index_params()
        params.add_index(field_name="vector", index_type="HNSW", metric_type="COSINE",
                         params={"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION})
        client.create_collection("faces", schema=schema, index_params=params)
        start = time.perf_counter()
        for s in range(0, len(faces), 5000):
            block = faces.vectors[s:s + 5000]
            client.insert("faces", [{"id": s + i, "vector": v} for i, v in enumerate(block)])
        insert_s = time.perf_counter() - start
        start = time.perf_counter()
        client.flush("faces")
        info = _wait_indexed(client, len(faces))
        # describe_index says Finished while the server still builds and loads segments (searches then take
        # hundreds of ms for a minute or more): the index counts as built once search latency is steady.
        info["steady_after_s"] = _wait_steady(lambda q: client.search("faces", data=[q], limit=k, output_fields=["id"]),
                                              queries.vectors[:WARMUP])
        index_s = time.perf_counter() - start
        settings = []
        for ef in EF_SWEEP:
            search_params = {"metric_type": "COSINE", "params": {"ef": max(ef, k)}}

            def search(q: np.ndarray, sp: dict[str, Any] = search_params) -> list[int]:
                hits = client.search("faces", data=[q], limit=k, output_fields=["id"], search_params=sp)
                return [int(h["id"]) for h in hits[0]]

            settings.append({"param": f"ef={max(ef, k)}", **run_queries(search, queries, truth)})
    finally:
        client.close()
    return {"version": f"milvus-lite {version('milvus-lite')}, pymilvus {version('pymilvus')}",
            "index": f"HNSW(M={HNSW_M}, efConstruction={HNSW_EF_CONSTRUCTION}, COSINE)", "index_state": info,
            "insert_s": insert_s, "index_s": index_s, "build_s": insert_s + index_s, "settings": settings}


def _wait_indexed(client: Any, rows: int, timeout_s: float = 900) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        info = dict(client.describe_index("faces", "vector"))
        if info.get("indexed_rows", rows) >= rows and info.get("pending_index_rows", 0) == 0:
            return {key: info.get(key) for key in ("index_type", "total_rows", "indexed_rows", "state")}
        if time.monotonic() > deadline:
            raise TimeoutError(f"Milvus Lite indexed {info.get('indexed_rows')} of {rows} rows")
        time.sleep(0.2)


def _wait_steady(search: Callable[[np.ndarray], Any], probes: np.ndarray, timeout_s: float = 600) -> float:
    """Repeat the probe queries until two rounds in a row have medians within 25%; seconds it took."""
    start, previous = time.perf_counter(), None
    while time.perf_counter() - start < timeout_s:
        samples = []
        for q in probes:
            t0 = time.perf_counter()
            search(q)
            samples.append(time.perf_counter() - t0)
        median = float(np.median(samples))
        if previous is not None and previous / 1.25 <= median <= previous * 1.25:
            break
        previous = median
    return time.perf_counter() - start


ENGINES: dict[str, Callable[..., dict[str, Any]]] = {
    "faiss-flat": bench_faiss_flat, "facematch": bench_facematch, "facematch-exact": bench_facematch_exact,
    "pgvector": bench_pgvector, "milvus-lite": bench_milvus_lite}
RECALLS = {"above_threshold": "recall_above_threshold", "at_k": "recall_at_{k}"}


def headline(engine: dict[str, Any], metric: str, target: float) -> dict[str, Any] | None:
    """The fastest setting reaching the target recall (`metric` key of a setting), else the most accurate one."""
    rows = engine.get("settings") or []
    if not rows:
        return None
    good = [r for r in rows if r[metric] >= target]
    return min(good, key=lambda r: r["p50_ms"]) if good else max(rows, key=lambda r: r[metric])


def add_ratios(results: dict[str, Any], metric: str, target: float) -> None:
    """Each engine's headline against FaceMatch's (same run): >1 means slower / longer than FaceMatch."""
    base = results["engines"].get("facematch", {})
    base_row = headline(base, metric, target) if base.get("status") == "ok" else None
    for engine in results["engines"].values():
        row = headline(engine, metric, target) if engine.get("status") == "ok" else None
        engine["headline"] = row
        if row is None or base_row is None:
            continue
        engine["vs_facematch"] = {"p50": row["p50_ms"] / base_row["p50_ms"], "p99": row["p99_ms"] / base_row["p99_ms"],
                                  "build": engine["build_s"] / base["build_s"] if base["build_s"] else None}


def print_table(results: dict[str, Any], k: int) -> None:
    """One line per engine (headline setting), then each sweep."""
    print(f"{results['faces']} faces x {results['dim']} dims, {results['identities']} guests, "
          f"{results['queries']} queries, recall@{k} vs faiss-flat")
    print(f"{'engine':<16} {'setting':<20} {'build s':>8} {'p50 ms':>8} {'p99 ms':>8} {'r@k':>6} {'r>=thr':>6} "
          f"{'p50 x':>7} {'p99 x':>7} {'build x':>8}")
    for name, engine in results["engines"].items():
        if engine["status"] != "ok":
            print(f"{name:<16} {engine['status'].upper()}: {engine['reason']}")
            continue
        row, vs = engine["headline"], engine.get("vs_facematch") or {}

        def x(key: str, v: dict[str, Any] = vs) -> str:
            return f"x{v[key]:.2f}" if v.get(key) is not None else "-"

        print(f"{name:<16} {row['param']:<20} {engine['build_s']:8.2f} {row['p50_ms']:8.3f} {row['p99_ms']:8.3f} "
              f"{row[f'recall_at_{k}']:6.3f} {row['recall_above_threshold']:6.3f} "
              f"{x('p50'):>7} {x('p99'):>7} {x('build'):>8}")
        for r in engine["settings"] if len(engine["settings"]) > 1 else []:
            print(f"{'':<16} {r['param']:<20} {'':>8} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} "
                  f"{r[f'recall_at_{k}']:6.3f} {r['recall_above_threshold']:6.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faces", type=int, default=int(os.environ.get("FACEMATCH_BENCH_ENGINE_FACES", 100_000)))
    parser.add_argument("--queries", type=int, default=int(os.environ.get("FACEMATCH_BENCH_ENGINE_QUERIES", 300)))
    parser.add_argument("--dim", type=int, default=512, help="512 = ArcFace (buffalo_l), 128 = SFace")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--target-recall", type=float, default=0.95, help="headline: fastest setting reaching it")
    parser.add_argument("--headline-recall", choices=sorted(RECALLS), default="above_threshold",
                        help="which recall the target applies to: of the top-k faces scoring >= --threshold "
                             "(what a match returns), or of the whole top-k")
    parser.add_argument("--threshold", type=float, default=0.5, help="match threshold for recall_above_threshold")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {list(ENGINES)}")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "engines.json")
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(1)  # as the indexer runs (pipeline/indexer/main.py): single queries, one thread
    start = time.perf_counter()
    faces = clustered_faces(args.faces, dim=args.dim, seed=0)
    queries = selfie_queries(faces, args.queries + WARMUP, seed=1)
    truth_scores, truth_ids = exact_search(faces, queries, args.k)
    truth = Truth(truth_ids, truth_scores, args.k, args.threshold)
    metric = RECALLS[args.headline_recall].format(k=args.k)
    print(f"data: {args.faces} faces in {time.perf_counter() - start:.1f}s (clustered, bench/datasets.py)")
    results: dict[str, Any] = {
        "faces": args.faces, "dim": args.dim, "queries": args.queries, "k": args.k,
        "identities": int(len(np.unique(faces.identity))), "noise": faces.noise, "target_recall": args.target_recall,
        "headline_recall": metric, "threshold": args.threshold,
        "faces_above_threshold_per_query": float((truth_scores >= args.threshold).sum(axis=1).mean()),
        "command": " ".join([".venv/bin/python", "bench/engines.py", *sys.argv[1:]]),
        "machine": machine_info(), "engines": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    if "faiss-flat" not in names:
        names.insert(0, "faiss-flat")
    for name in names:
        if name not in ENGINES:
            results["engines"][name] = {"status": "skipped", "reason": f"unknown engine; known: {list(ENGINES)}"}
            continue
        print(f"--- {name}", flush=True)
        started = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
                os.chmod(tmp, 0o755)  # noqa: S103 - pgserver runs postgres as an unprivileged user when we are root
                engine = {"status": "ok", **ENGINES[name](faces, queries, truth, Path(tmp))}
        except Skip as exc:
            engine = {"status": "skipped", "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 - one engine failing must not lose the others' numbers
            traceback.print_exc()
            engine = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        engine["wall_s"] = time.perf_counter() - started
        if engine["status"] != "ok":
            print(f"{name}: {engine['status']}: {engine['reason']}", flush=True)
        results["engines"][name] = engine
        add_ratios(results, metric, args.target_recall)
        args.out.write_text(json.dumps(results, indent=2))  # after every engine: a later crash keeps these
        gc.collect()
    print_table(results, args.k)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
