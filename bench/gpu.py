"""What a GPU buys: embedder on onnxruntime's CUDA provider, detection on GPU, FAISS flat search on GPU.

Runs only where a GPU is usable; elsewhere it says exactly what is missing, writes
bench/results/gpu.json with status "skipped" and the reasons, and exits 0 (so `make bench` on a
CPU machine still passes). On a CUDA machine (`pip install -e '.[gpu]'`: onnxruntime-gpu and
faiss-gpu-cu12, plus the bench extra) it measures, in one run:

  * embedder: bench/embedder_throughput.py at batch 1, 8 and 32 (bare model against the embedder
    stage, same photos; the SFace pack runs on onnxruntime when CUDAExecutionProvider is present),
    written to bench/results/embedder_throughput_gpu.json and summarized here;
  * detection: the buffalo_l pack (InsightFace SCRFD detector + ArcFace, both onnxruntime), bare
    detect_and_embed faces/s at batch 1, 8 and 32 on CUDAExecutionProvider against CPUExecutionProvider
    (needs its .onnx files in <model root>/models/buffalo_l/, which are not fetched for you: InsightFace
    packs are licensed for non-commercial research only; skipped with the reason otherwise);
  * faiss_flat: exact IndexFlatIP over --faces clustered faces (bench/datasets.py) on GPU 0 against
    the CPU (1 OpenMP thread, as the indexer runs): single-query p50/p99 and batched queries/s.

    .venv/bin/python bench/gpu.py [--faces 1000000] [--queries 300] [--skip-embedder]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.report import machine_info  # noqa: E402

BATCHES = (1, 8, 32)
GPU_EXTRA = ".venv/bin/python -m pip install -e '.[gpu,bench]'"


def gpu_name() -> str | None:
    """nvidia-smi's name of GPU 0, or None without a driver."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return None
    return out.splitlines()[0] if out else None


def ort_cuda() -> tuple[bool, str]:
    """Whether onnxruntime offers CUDAExecutionProvider, and what it offers."""
    try:
        import onnxruntime
    except ImportError as exc:
        return False, f"onnxruntime not importable ({exc})"
    providers = onnxruntime.get_available_providers()
    return "CUDAExecutionProvider" in providers, f"onnxruntime {onnxruntime.__version__}: {providers}"


def faiss_gpus() -> tuple[int, str]:
    """GPUs FAISS can use (0 for faiss-cpu), and which FAISS this is."""
    try:
        import faiss
    except ImportError as exc:
        return 0, f"faiss not importable ({exc})"
    count = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    return count, f"faiss {faiss.__version__}, {count} GPU(s)"


def bench_embedder(copies: int) -> dict[str, Any]:
    """bench/embedder_throughput.py at batch 1/8/32; the SFace pack picks onnxruntime+CUDA when offered."""
    out = REPO / "bench" / "results" / "embedder_throughput_gpu.json"
    cmd = [sys.executable, str(REPO / "bench" / "embedder_throughput.py"), "--copies", str(copies),
           "--batches", ",".join(map(str, BATCHES)), "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, check=False)
    if done.returncode != 0 or not out.exists():
        return {"status": "failed", "reason": f"bench/embedder_throughput.py exited {done.returncode}"}
    data = json.loads(out.read_text())
    rows = {b: {"bare_faces_per_s": r["bare_model"]["faces_per_s"], "stage_faces_per_s": r["embedder_stage"]
                ["faces_per_s"], "ratio_stage_vs_bare": r["ratio_stage_vs_bare"],
                "provider": r["bare_model"].get("provider")} for b, r in data["by_batch"].items()}
    on_gpu = all(r["provider"] == "CUDAExecutionProvider" for r in rows.values())
    return {"status": "ok" if on_gpu else "not_on_gpu", "by_batch": rows, "json": str(out.relative_to(REPO))}


def bench_detection(copies: int) -> dict[str, Any]:
    """buffalo_l (SCRFD + ArcFace on onnxruntime) bare detect_and_embed on CUDA against CPU."""
    from pipeline.assets import fetch_sample_photos
    from pipeline.facelib.images import DecodePolicy, decode_image
    from pipeline.facelib.model import ModelUnavailable
    from pipeline.facelib.packs import load_model
    from pipeline.settings import ModelSettings

    root = Path(ModelSettings().model_root).resolve()
    photos = fetch_sample_photos(Path(os.environ.get("FACEMATCH_CACHE_DIR", REPO / ".cache")) / "photos")
    policy = DecodePolicy()
    images = [decode_image(p.read_bytes(), policy).bgr for _, p in sorted(photos.items())] * copies
    result: dict[str, Any] = {"status": "ok", "photos": len(images), "by_provider": {}}
    for provider in ("CUDAExecutionProvider", "CPUExecutionProvider"):
        try:
            model = load_model("buffalo_l", root, providers=[provider])
            assert model is not None
            model.load()
        except ModelUnavailable as exc:
            return {"status": "skipped", "reason": str(exc)}
        model.detect_and_embed(images[:1])  # warm-up: CUDA kernels, cuDNN autotuning
        rows = {}
        for batch in BATCHES:
            started, faces = time.perf_counter(), 0
            for i in range(0, len(images), batch):
                faces += sum(len(f) for f in model.detect_and_embed(images[i:i + batch]))
            elapsed = time.perf_counter() - started
            rows[str(batch)] = {"faces": faces, "seconds": elapsed, "faces_per_s": faces / elapsed,
                                "photos_per_s": len(images) / elapsed}
        result["by_provider"][provider] = {"provider_used": model.provider, "by_batch": rows}
    return result


def bench_faiss_flat(n: int, queries_n: int) -> dict[str, Any]:
    """Exact inner-product search of n clustered faces: GPU 0 against the CPU."""
    import faiss

    from bench.datasets import clustered_faces, selfie_queries

    faces = clustered_faces(n, dim=512, seed=0)
    queries = selfie_queries(faces, queries_n, seed=1).vectors
    faiss.omp_set_num_threads(1)
    cpu = faiss.IndexFlatIP(faces.dim)
    cpu.add(faces.vectors)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    out: dict[str, Any] = {"status": "ok", "faces": n, "dim": faces.dim, "queries": queries_n}
    truth = None
    for name, index in (("cpu_1_thread", cpu), ("gpu", gpu)):
        index.search(queries[:10], 10)  # warm-up
        samples = []
        for q in queries:
            start = time.perf_counter()
            index.search(q.reshape(1, -1), 10)
            samples.append(time.perf_counter() - start)
        start = time.perf_counter()
        _, ids = index.search(queries, 10)
        batched = time.perf_counter() - start
        ms = np.asarray(samples) * 1000
        same = 1.0 if truth is None else float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]))
        truth = ids if truth is None else truth
        out[name] = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                     "batched_queries_per_s": queries_n / batched, "agreement_with_cpu": same}
    out["ratio_p50_cpu_vs_gpu"] = out["cpu_1_thread"]["p50_ms"] / out["gpu"]["p50_ms"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--faces", type=int, default=int(os.environ.get("FACEMATCH_BENCH_GPU_FACES", 1_000_000)))
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--copies", type=int, default=int(os.environ.get("FACEMATCH_BENCH_EMBED_COPIES", 6)))
    parser.add_argument("--skip-embedder", action="store_true", help="no Kafka broker here: skip the stage run")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    args = parser.parse_args()
    has_ort, ort_info = ort_cuda()
    n_gpus, faiss_info = faiss_gpus()
    name = gpu_name()
    result: dict[str, Any] = {
        "command": " ".join([".venv/bin/python", "bench/gpu.py", *sys.argv[1:]]), "machine": machine_info(),
        "finished_at": "", "gpu": name, "onnxruntime": ort_info, "faiss": faiss_info}
    if name is None or not (has_ort or n_gpus):
        missing = [m for m, ok in (("an NVIDIA driver (nvidia-smi)", name is not None),
                                   ("onnxruntime-gpu with CUDAExecutionProvider", has_ort),
                                   ("faiss with GPU support (faiss-gpu-cu12)", n_gpus > 0)) if not ok]
        result.update(status="skipped", reason="no usable GPU here: missing " + "; ".join(missing)
                      + f". On a CUDA machine: {GPU_EXTRA}, then .venv/bin/python bench/gpu.py")
        print(result["reason"])
    else:
        result["status"] = "ok"
        sections = {
            "embedder": (lambda: bench_embedder(args.copies)) if has_ort and not args.skip_embedder else None,
            "detection": (lambda: bench_detection(args.copies)) if has_ort else None,
            "faiss_flat": (lambda: bench_faiss_flat(args.faces, args.queries)) if n_gpus else None}
        for key, run in sections.items():
            if run is None:
                result[key] = {"status": "skipped", "reason": ort_info if key != "faiss_flat" else faiss_info}
                continue
            print(f"--- {key}", flush=True)
            try:
                result[key] = run()
            except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others
                result[key] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(result[key], indent=2), flush=True)
    result["finished_at"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
