"""What a GPU buys FaceMatch, measured with PyTorch only (no faiss-gpu, no onnxruntime-gpu needed).

Self-contained on purpose: imports nothing from this repo (the GPU machine it is written for has none of
the repo's dependencies), only numpy, opencv-python-headless, onnx, onnxruntime (CPU), torch and
onnx2torch (pure Python; if torchvision is missing, the two onnx2torch converters that use it, NMS and
RoiAlign, are stubbed out: neither model here has those ops). Every GPU number has a CPU baseline
measured in the same run on the same machine; without CUDA the "GPU" side runs on torch's CPU device
and the JSON says device "cpu" (that is how it is tested).

  1. search: exact inner-product top-10 over --faces clustered unit vectors (what FAISS IndexFlatIP
     does), D=512 and D=128, kept on the device in fp32 and fp16: single-query p50/p99 (host query in,
     top-10 ids back on the host, synchronized per query) and queries/s at batch 32 and 256; against
     numpy matmul + argpartition on the same vectors with 1 BLAS thread (threadpoolctl) and all
     threads; recall@10 of fp16 against fp32 exact, and agreement of torch fp32 with numpy.
  2. recognizer: SFace ONNX converted with onnx2torch, batch 1/8/32/128 on 112x112 aligned crops,
     fp32 and fp16 autocast, against onnxruntime CPUExecutionProvider at the same batches; per-row
     cosine of torch against onnxruntime embeddings.
  3. detector: YuNet ONNX (cv2.FaceDetectorYN's model) converted with onnx2torch, 640x640, batch
     1/8/32 on the device, against cv2.dnn and onnxruntime on the CPU at batch 1.

Each section is independent: an exception is recorded under that section's "error" and the others
still run; the JSON is rewritten after every section. Every timed loop stops at its iteration count
or its time cap, whichever comes first, so a full run on one H200 fits in about 3 minutes.

    python3 bench/gpu_torch.py [--faces 1000000] [--queries 300] [--out bench/results/gpu_torch.json]
                               [--model-root .cache/models] [--photos .cache/photos] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

K = 10
NOISE = 0.65  # per-copy noise norm: cos(copy, centre) ~ 0.84, as in bench/datasets.py
MEAN_COPIES = 8  # faces per identity on average
SEARCH_DIMS = (512, 128)
SEARCH_BATCHES = (32, 256)
REC_BATCHES = (1, 8, 32, 128)
DET_BATCHES = (1, 8, 32)
DET_SIZE = 640
CROP = 112


# ----------------------------------------------------------------------------------------------- timing


class Clock:
    """Wall clock since start, and a soft deadline every timed loop respects."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def cap(self, seconds: float) -> float:
        """`seconds`, cut to what is left before the deadline (never below 0.05 s: one iteration still runs)."""
        return max(0.05, min(seconds, self.deadline - time.perf_counter()))


def timed_loop(fn: Callable[[int], Any], max_iters: int, max_seconds: float, min_iters: int = 1) -> list[float]:
    """Seconds per call of fn(i), for up to max_iters calls or until max_seconds have passed (after min_iters)."""
    times: list[float] = []
    stop = time.perf_counter() + max_seconds
    for i in range(max(1, max_iters)):
        t0 = time.perf_counter()
        fn(i)
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if i + 1 >= min_iters and t1 >= stop:
            break
    return times


def summarize(times: list[float], items_per_call: int, unit: str) -> dict[str, Any]:
    """p50/p99 per call in ms and items per second (items over total time)."""
    arr = np.asarray(times, dtype=np.float64)
    total = float(arr.sum())
    return {"calls": len(times), "p50_ms": round(float(np.percentile(arr, 50)) * 1e3, 4),
            "p99_ms": round(float(np.percentile(arr, 99)) * 1e3, 4),
            "per_s": round(items_per_call * len(times) / total, 2) if total > 0 else None, "unit": unit}


def ratio(gpu: float | None, cpu: float | None) -> float | None:
    """How many times faster the GPU side is (>1: GPU faster)."""
    if not gpu or not cpu:
        return None
    return round(gpu / cpu, 2)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------- environment


def import_torch() -> Any:
    import torch

    return torch


def import_onnx2torch() -> tuple[Any, str | None]:
    """onnx2torch's convert, and a note when torchvision had to be stubbed for it to import."""
    note = None
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # missing, or built for another torch
        note = f"torchvision not importable ({error_text(exc)}): onnx2torch's NMS/RoiAlign converters stubbed"
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        stub = types.ModuleType("torchvision")
        ops = types.ModuleType("torchvision.ops")

        def _missing(*_args: Any, **_kwargs: Any) -> Any:
            raise RuntimeError("torchvision is not installed (stub)")

        ops.nms = ops.roi_align = ops.box_convert = _missing  # type: ignore[attr-defined]
        stub.ops = ops  # type: ignore[attr-defined]
        stub.__version__ = "0+stub"  # type: ignore[attr-defined]
        sys.modules["torchvision"] = stub
        sys.modules["torchvision.ops"] = ops
    from onnx2torch import convert

    return convert, note


def environment(torch: Any, device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"device": device, "python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "numpy": np.__version__, "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name(0)
        try:
            info["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            info["cuda"] = torch.version.cuda
            info["cudnn"] = torch.backends.cudnn.version()
            info["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        except Exception as exc:
            info["cuda_info_error"] = error_text(exc)
    else:
        info["device_name"] = "cpu (no CUDA: the 'gpu' rows are torch on the CPU)"
    for mod in ("onnxruntime", "onnx", "cv2", "onnx2torch", "threadpoolctl"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", None) or importlib.metadata.version(mod)
        except Exception as exc:
            info[mod] = f"unavailable ({error_text(exc)})"
    try:
        from threadpoolctl import threadpool_info

        info["blas_pools"] = [{k: p.get(k) for k in ("user_api", "internal_api", "num_threads", "prefix")}
                              for p in threadpool_info()]
    except Exception as exc:
        info["blas_pools"] = f"unavailable ({error_text(exc)})"
    return info


def blas_seen() -> Any:
    """BLAS thread counts threadpoolctl sees right now."""
    try:
        from threadpoolctl import threadpool_info

        return [p.get("num_threads") for p in threadpool_info() if p.get("user_api") == "blas"]
    except Exception as exc:
        return f"unavailable ({error_text(exc)})"


def blas_threads(n: int | None) -> Any:
    """Context that limits numpy's BLAS to n threads (None: leave as is); raises without threadpoolctl."""
    import contextlib

    if n is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n, user_api="blas")


# ------------------------------------------------------------------------------------------------ search


def unit_centres(torch: Any, n_ids: int, dim: int, gen: Any, device: str) -> Any:
    centres = torch.randn(n_ids, dim, generator=gen, device=device)
    return centres / centres.norm(dim=1, keepdim=True)


def noisy_copies(torch: Any, centres: Any, n: int, gen: Any, chunk: int = 262_144) -> Any:
    """n unit vectors, each a noisy copy of a random centre (identity); noise norm NOISE before renormalizing."""
    dim = centres.shape[1]
    out = torch.empty(n, dim, device=centres.device)
    scale = NOISE / dim**0.5
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        ids = torch.randint(0, len(centres), (m,), generator=gen, device=centres.device)
        block = centres[ids] + scale * torch.randn(m, dim, generator=gen, device=centres.device)
        out[start:start + m] = block / block.norm(dim=1, keepdim=True)
    return out


def numpy_top_k(db: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Top-K ids (best first) per row of q (b x d) over db (n x d), by inner product."""
    scores = q @ db.T
    part = np.argpartition(-scores, K, axis=1)[:, :K]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return round(hits / truth.size, 5)


def bench_search(torch: Any, device: str, args: argparse.Namespace, clock: Clock, res: dict[str, Any]) -> None:
    res.update({"faces": args.faces, "k": K, "noise": NOISE, "mean_copies": MEAN_COPIES,
                "note": "gpu single query = host query -> device, mm, topk, ids -> host, synchronize; "
                        "cpu = numpy float32 matmul + argpartition on the same vectors (full set, fewer queries)",
                "dims": {}})
    for dim in SEARCH_DIMS:
        out: dict[str, Any] = {"rows": [], "ratios": {}}
        res["dims"][str(dim)] = out
        try:
            search_dim(torch, device, args, clock, dim, out)
        except Exception as exc:
            out["error"] = error_text(exc)
            out["traceback"] = traceback.format_exc()[-2000:]
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()


def search_dim(torch: Any, device: str, args: argparse.Namespace, clock: Clock, dim: int,
               out: dict[str, Any]) -> None:
    """One dimension: generate on the device, time torch fp32/fp16, then numpy on the same vectors."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n, cap = args.faces, args.cap_s
    gen = torch.Generator(device=device)
    gen.manual_seed(dim)
    t0 = time.perf_counter()
    centres = unit_centres(torch, max(1, n // MEAN_COPIES), dim, gen, device)
    db32 = noisy_copies(torch, centres, n, gen)  # about MEAN_COPIES faces per identity
    n_q = max(args.queries, max(SEARCH_BATCHES))
    queries = noisy_copies(torch, centres, n_q, gen)  # selfies: new copies of indexed identities
    del centres
    q_host = queries.cpu().numpy()
    db16 = db32.half()
    sync()
    out["generate_s"] = round(time.perf_counter() - t0, 2)
    out["db_bytes"] = {"fp32": n * dim * 4, "fp16": n * dim * 2}

    # ---- device: fp32 and fp16
    stores = {"fp32": (db32, torch.float32), "fp16": (db16, torch.float16)}
    dev_ids: dict[str, np.ndarray] = {}
    for name, (db, dtype) in stores.items():
        def one(i: int, db: Any = db, dtype: Any = dtype) -> None:
            q = torch.from_numpy(q_host[i % n_q:i % n_q + 1]).to(device, dtype)
            torch.topk(q @ db.T, K, dim=1).indices.cpu()
            sync()

        with torch.inference_mode():
            timed_loop(one, 5, 1.0)  # warm-up (cuBLAS handles, kernels)
            times = timed_loop(one, args.queries, clock.cap(cap), min_iters=3)
            out["rows"].append({"side": "gpu", "variant": name, "batch": 1, **summarize(times, 1, "queries/s")})
            for b in SEARCH_BATCHES:
                def many(i: int, db: Any = db, dtype: Any = dtype, b: int = b) -> None:
                    s = (i * b) % (n_q - b + 1)
                    q = torch.from_numpy(q_host[s:s + b]).to(device, dtype)
                    torch.topk(q @ db.T, K, dim=1).indices.cpu()
                    sync()

                timed_loop(many, 2, 1.0)
                times = timed_loop(many, max(3, args.queries // b * 4), clock.cap(cap), min_iters=2)
                out["rows"].append({"side": "gpu", "variant": name, "batch": b,
                                    **summarize(times, b, "queries/s")})
            # ids for recall, in batches to bound the score matrix
            found = []
            for s in range(0, n_q, 256):
                q = torch.from_numpy(q_host[s:s + 256]).to(device, dtype)
                found.append(torch.topk((q @ db.T).float(), K, dim=1).indices.cpu().numpy())
            dev_ids[name] = np.concatenate(found)
    out["recall_at_10_fp16_vs_fp32"] = recall(dev_ids["fp16"], dev_ids["fp32"])
    out["recall_queries"] = n_q

    # ---- CPU: numpy on the same vectors
    db_host = db32.cpu().numpy()
    del db16, db32, queries, stores
    if device == "cuda":
        torch.cuda.empty_cache()
    n_check = min(n_q, 64)
    with blas_threads(None):
        cpu_ids = numpy_top_k(db_host, q_host[:n_check])
    out["recall_at_10_torch_fp32_vs_numpy"] = recall(dev_ids["fp32"][:n_check], cpu_ids)
    out["recall_at_10_torch_fp16_vs_numpy"] = recall(dev_ids["fp16"][:n_check], cpu_ids)
    thread_modes: list[tuple[str, int | None]] = [("cpu_1thread", 1), ("cpu_all_threads", None)]
    for label, threads in thread_modes:
        try:
            with blas_threads(threads):
                out.setdefault("blas_threads_seen", {})[label] = blas_seen()

                def cpu_one(i: int) -> None:
                    numpy_top_k(db_host, q_host[i % n_q:i % n_q + 1])

                times = timed_loop(cpu_one, args.queries, clock.cap(cap), min_iters=3)
                out["rows"].append({"side": "cpu", "variant": label, "batch": 1,
                                    "threads": threads or os.cpu_count(), **summarize(times, 1, "queries/s")})
                for b in SEARCH_BATCHES:
                    def cpu_many(i: int, b: int = b) -> None:
                        s = (i * b) % (n_q - b + 1)
                        numpy_top_k(db_host, q_host[s:s + b])

                    times = timed_loop(cpu_many, max(2, args.queries // b * 4), clock.cap(cap), min_iters=1)
                    out["rows"].append({"side": "cpu", "variant": label, "batch": b,
                                        "threads": threads or os.cpu_count(),
                                        **summarize(times, b, "queries/s")})
        except Exception as exc:
            out.setdefault("errors", {})[label] = error_text(exc)
    out["ratios"] = search_ratios(out["rows"])


def search_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """GPU over CPU: p50 latency ratio at batch 1, queries/s ratio at every batch."""
    by = {(r["side"], r["variant"], r["batch"]): r for r in rows}
    out: dict[str, Any] = {}
    for gv in ("fp32", "fp16"):
        for cv in ("cpu_1thread", "cpu_all_threads"):
            for b in (1, *SEARCH_BATCHES):
                g, c = by.get(("gpu", gv, b)), by.get(("cpu", cv, b))
                if not g or not c:
                    continue
                key = f"gpu_{gv}_vs_{cv}_b{b}"
                out[key] = ratio(g["per_s"], c["per_s"])
                if b == 1:
                    out[f"{key}_p50_latency"] = ratio(c["p50_ms"], g["p50_ms"])
    return out


# ------------------------------------------------------------------------------------------------ models


def find_model(root: Path, prefix: str) -> Path:
    hits = sorted(root.rglob(f"{prefix}*.onnx"))
    if not hits:
        raise FileNotFoundError(f"no {prefix}*.onnx under {root}")
    return hits[0]


def batch_dynamic(model: Any, fix_reshape_batch: bool = False) -> Any:
    """A copy of the ONNX model whose real input/outputs have a free batch dim ("N"), weights not inputs.

    fix_reshape_batch: Reshape targets that hard-code batch 1 as their first entry get 0 ("copy the
    input's dim") instead, so a batch of B keeps its own leading axis instead of being merged.
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: i for i in m.graph.initializer}
    # weights listed as graph inputs (old exporters) stop onnxruntime from constant-folding them
    real_inputs = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(real_inputs)
    for vi in [*[i for i in m.graph.input if i.name not in inits], *m.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = "N"
    del m.graph.value_info[:]  # recorded intermediate shapes say batch 1
    if fix_reshape_batch:
        done: set[str] = set()
        for node in m.graph.node:
            if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] in done:
                continue
            init = inits.get(node.input[1])
            if init is None:
                continue
            shape = numpy_helper.to_array(init).copy()
            if shape.ndim == 1 and len(shape) > 1 and shape[0] == 1:
                shape[0] = 0
                init.CopyFrom(numpy_helper.from_array(shape.astype(np.int64), init.name))
                done.add(node.input[1])
    onnx.checker.check_model(m)
    return m


def ort_session(model: Any) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def load_images(photos: Path, limit: int = 16) -> list[np.ndarray]:
    import cv2

    images = []
    for p in sorted(photos.glob("*.jpg"))[:limit] if photos.is_dir() else []:
        img = cv2.imread(str(p))
        if img is not None:
            images.append(img)
    return images


def aligned_crops(det_path: Path, rec_path: Path, images: list[np.ndarray]) -> list[np.ndarray]:
    """112x112 crops exactly as the pipeline makes them: YuNet boxes, FaceRecognizerSF.alignCrop."""
    import cv2

    crops: list[np.ndarray] = []
    detector = cv2.FaceDetectorYN.create(str(det_path), "", (320, 320), 0.8, 0.3, 5000)
    aligner = cv2.FaceRecognizerSF.create(str(rec_path), "")
    for img in images:
        scale = 640 / max(img.shape[:2])
        if scale < 1:
            img = cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        detector.setInputSize((img.shape[1], img.shape[0]))
        _, faces = detector.detect(img)
        for row in faces if faces is not None else []:
            crops.append(aligner.alignCrop(img, row))
    return crops


def run_torch(torch: Any, module: Any, x: np.ndarray, device: str, fp16: bool) -> list[np.ndarray]:
    """Host batch in, host outputs back (synchronized); fp16 by autocast."""
    t = torch.from_numpy(x).to(device)
    with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.float16, enabled=fp16):
        y = module(t)
    ys = y if isinstance(y, (list, tuple)) else [y]
    out = [v.float().cpu().numpy() for v in ys]
    if device == "cuda":
        torch.cuda.synchronize()
    return out


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def bench_recognizer(torch: Any, device: str, args: argparse.Namespace, clock: Clock, res: dict[str, Any]) -> None:
    import cv2
    import onnx

    root = Path(args.model_root)
    rec_path = find_model(root, "face_recognition_sface")
    res.update({"model": str(rec_path), "rows": [], "ratios": {}})
    model = onnx.load(str(rec_path))
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    res["input"] = {"name": inp.name, "shape": [d.dim_value or d.dim_param for d in inp.type.tensor_type.shape.dim]}
    dyn = batch_dynamic(model)

    crops: list[np.ndarray] = []
    try:
        crops = aligned_crops(find_model(root, "face_detection_yunet"), rec_path, load_images(Path(args.photos)))
    except Exception as exc:
        res["crops_error"] = error_text(exc)
    res["crops"] = f"{len(crops)} aligned faces from {args.photos}" if crops else "synthetic (no photos/faces)"
    if not crops:
        rng = np.random.default_rng(0)
        crops = [rng.integers(0, 256, (CROP, CROP, 3), dtype=np.uint8) for _ in range(16)]
    batches = args.rec_batches
    pool = [crops[i % len(crops)] for i in range(max(batches))]
    blob = np.ascontiguousarray(cv2.dnn.blobFromImages(pool, 1.0, (CROP, CROP), (0, 0, 0), swapRB=True,
                                                       crop=False), dtype=np.float32)

    sess = ort_session(dyn)
    out_name = sess.get_outputs()[0].name
    t0 = time.perf_counter()
    convert, note = import_onnx2torch()
    if note:
        res["onnx2torch_note"] = note
    net = convert(dyn).eval().to(device)
    res["convert_s"] = round(time.perf_counter() - t0, 2)

    # agreement with onnxruntime, on up to 32 crops
    n_check = min(32, len(blob))
    ref = sess.run([out_name], {inp.name: blob[:n_check]})[0]
    fp32 = run_torch(torch, net, blob[:n_check], device, False)[0]
    cos = cosine_rows(fp32, ref)
    res["check_fp32_vs_onnxruntime"] = {"rows": n_check, "min_cosine": round(float(cos.min()), 6),
                                        "max_abs_dev": float(np.abs(fp32 - ref).max()),
                                        "all_rows_cosine_gt_0.99": bool((cos > 0.99).all())}
    variants = ["fp32"]
    if device == "cuda":
        try:
            h = run_torch(torch, net, blob[:n_check], device, True)[0]
            cos16 = cosine_rows(h, ref)
            res["check_fp16_vs_onnxruntime"] = {"rows": n_check, "min_cosine": round(float(cos16.min()), 6),
                                                "max_abs_dev": float(np.abs(h - ref).max()),
                                                "all_rows_cosine_gt_0.99": bool((cos16 > 0.99).all())}
            variants.append("fp16_autocast")
        except Exception as exc:
            res["fp16_error"] = error_text(exc)
    else:
        res["fp16_error"] = "not measured: fp16 autocast needs CUDA (torch on CPU autocasts to bfloat16 only)"

    cap = args.cap_s / 2
    for b in batches:
        x = blob[:b]
        times = timed_loop(lambda _i, x=x: sess.run([out_name], {inp.name: x}), 1, 1.0)  # warm-up
        times = timed_loop(lambda _i, x=x: sess.run([out_name], {inp.name: x}), 1000, clock.cap(cap), min_iters=2)
        res["rows"].append({"side": "cpu", "variant": "onnxruntime_cpu", "batch": b, **summarize(times, b, "faces/s")})
        for v in variants:
            fp16 = v != "fp32"
            timed_loop(lambda _i, x=x, fp16=fp16: run_torch(torch, net, x, device, fp16), 3, 1.0)
            times = timed_loop(lambda _i, x=x, fp16=fp16: run_torch(torch, net, x, device, fp16), 1000,
                               clock.cap(cap), min_iters=3)
            res["rows"].append({"side": "gpu", "variant": v, "batch": b, **summarize(times, b, "faces/s")})
    by = {(r["variant"], r["batch"]): r for r in res["rows"]}
    for v in variants:
        for b in batches:
            cpu = by[("onnxruntime_cpu", b)]["per_s"]
            res["ratios"][f"{v}_vs_onnxruntime_cpu_b{b}"] = ratio(by[(v, b)]["per_s"], cpu)
        res["ratios"][f"{v}_best_vs_onnxruntime_cpu_best"] = ratio(
            max(by[(v, b)]["per_s"] for b in batches), max(by[("onnxruntime_cpu", b)]["per_s"] for b in batches))


def bench_detector(torch: Any, device: str, args: argparse.Namespace, clock: Clock, res: dict[str, Any]) -> None:
    import cv2
    import onnx

    det_path = find_model(Path(args.model_root), "face_detection_yunet")
    res.update({"model": str(det_path), "size": DET_SIZE, "rows": [], "ratios": {}})
    images = load_images(Path(args.photos))
    res["images"] = f"{len(images)} photos from {args.photos}" if images else "synthetic (no photos)"
    if not images:
        images = [np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)]
    batches = args.det_batches
    pool = [images[i % len(images)] for i in range(max(batches))]
    # YuNet 2023mar takes BGR 0..255 floats, no mean/scale (as cv2.FaceDetectorYN feeds it)
    blob = np.ascontiguousarray(cv2.dnn.blobFromImages(pool, 1.0, (DET_SIZE, DET_SIZE), (0, 0, 0), swapRB=False,
                                                       crop=False), dtype=np.float32)
    model = onnx.load(str(det_path))
    inp = model.graph.input[0].name
    dyn = batch_dynamic(model, fix_reshape_batch=True)
    cap = args.cap_s / 2

    # CPU baselines at batch 1
    sess = ort_session(dyn)
    names = [o.name for o in sess.get_outputs()]
    x1 = blob[:1]
    ref = sess.run(names, {inp: x1})
    timed_loop(lambda _i: sess.run(names, {inp: x1}), 2, 1.0)
    times = timed_loop(lambda _i: sess.run(names, {inp: x1}), 1000, clock.cap(cap), min_iters=3)
    res["rows"].append({"side": "cpu", "variant": "onnxruntime_cpu", "batch": 1, **summarize(times, 1, "images/s")})
    try:
        cvnet = cv2.dnn.readNetFromONNX(str(det_path))
        cv_out = cvnet.getUnconnectedOutLayersNames()

        def cv_fwd(_i: int) -> None:
            cvnet.setInput(x1)
            cvnet.forward(cv_out)

        timed_loop(cv_fwd, 2, 1.0)
        times = timed_loop(cv_fwd, 1000, clock.cap(cap), min_iters=3)
        res["rows"].append({"side": "cpu", "variant": "cv2_dnn", "batch": 1, "threads": cv2.getNumThreads(),
                            **summarize(times, 1, "images/s")})
    except Exception as exc:
        res["cv2_dnn_error"] = error_text(exc)

    # onnx2torch: record the exact error and stop here if it cannot convert
    t0 = time.perf_counter()
    try:
        convert, note = import_onnx2torch()
        if note:
            res["onnx2torch_note"] = note
        net = convert(dyn).eval().to(device)
    except Exception as exc:
        res["convert_error"] = error_text(exc)
        res["convert_traceback"] = traceback.format_exc()[-3000:]
        return
    res["convert_s"] = round(time.perf_counter() - t0, 2)

    got = run_torch(torch, net, x1, device, False)
    res["check_fp32_vs_onnxruntime"] = {
        "max_abs_dev": max(float(np.abs(g.reshape(r.shape) - r).max()) for g, r in zip(got, ref)),
        "shapes_match": all(g.shape == r.shape for g, r in zip(got, ref))}
    b2 = min(2, len(blob))
    got2 = run_torch(torch, net, blob[:b2], device, False)
    res["check_batch_keeps_leading_axis"] = [list(g.shape) for g in got2[:1]]
    variants = ["fp32"]
    if device == "cuda":
        try:
            h = run_torch(torch, net, x1, device, True)
            res["check_fp16_vs_onnxruntime"] = {
                "max_abs_dev": max(float(np.abs(g.reshape(r.shape) - r).max()) for g, r in zip(h, ref))}
            variants.append("fp16_autocast")
        except Exception as exc:
            res["fp16_error"] = error_text(exc)
    else:
        res["fp16_error"] = "not measured: fp16 autocast needs CUDA"
    for v in variants:
        fp16 = v != "fp32"
        for b in batches:
            x = blob[:b]
            timed_loop(lambda _i, x=x, fp16=fp16: run_torch(torch, net, x, device, fp16), 3, 1.0)
            times = timed_loop(lambda _i, x=x, fp16=fp16: run_torch(torch, net, x, device, fp16), 1000,
                               clock.cap(cap), min_iters=2)
            res["rows"].append({"side": "gpu", "variant": v, "batch": b, **summarize(times, b, "images/s")})
    by = {(r["variant"], r["batch"]): r for r in res["rows"]}
    for v in variants:
        for b in batches:
            for cv in ("onnxruntime_cpu", "cv2_dnn"):
                if (cv, 1) in by:
                    res["ratios"][f"{v}_b{b}_vs_{cv}_b1"] = ratio(by[(v, b)]["per_s"], by[(cv, 1)]["per_s"])


# ------------------------------------------------------------------------------------------------- main


def table(result: dict[str, Any]) -> str:
    lines = [f"device={result['env'].get('device')} name={result['env'].get('device_name')} "
             f"torch={result['env'].get('torch')} onnxruntime={result['env'].get('onnxruntime')} "
             f"cpus={result['env'].get('cpu_count')} total={result.get('total_s')}s",
             f"{'section':<22}{'side':<5}{'variant':<17}{'batch':>6}{'p50 ms':>11}{'p99 ms':>11}{'per s':>14}"]

    def rows(section: str, rs: list[dict[str, Any]]) -> None:
        for r in rs:
            lines.append(f"{section:<22}{r['side']:<5}{r['variant']:<17}{r['batch']:>6}{r['p50_ms']:>11.3f}"
                         f"{r['p99_ms']:>11.3f}{r['per_s']:>14,.1f}")

    search = result.get("search", {})
    for dim, d in search.get("dims", {}).items():
        rows(f"search D={dim}", d.get("rows", []))
        extra = {k: d[k] for k in ("recall_at_10_fp16_vs_fp32", "recall_at_10_torch_fp32_vs_numpy") if k in d}
        if extra:
            lines.append(f"  {extra}")
        if d.get("error"):
            lines.append(f"  ERROR {d['error']}")
    for name in ("recognizer", "detector"):
        sec = result.get(name, {})
        rows(name, sec.get("rows", []))
        for key in ("check_fp32_vs_onnxruntime", "check_fp16_vs_onnxruntime"):
            if key in sec:
                lines.append(f"  {key}: {sec[key]}")
        for key in ("error", "convert_error", "fp16_error", "cv2_dnn_error"):
            if sec.get(key):
                lines.append(f"  {key}: {sec[key]}")
    lines.append("ratios (>1: GPU faster):")
    for dim, d in search.get("dims", {}).items():
        for k, v in d.get("ratios", {}).items():
            lines.append(f"  search D={dim} {k}: {v}")
    for name in ("recognizer", "detector"):
        for k, v in result.get(name, {}).get("ratios", {}).items():
            lines.append(f"  {name} {k}: {v}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faces", type=int, default=None, help="indexed faces (default 1,000,000 on GPU, 200,000 on CPU)")
    p.add_argument("--queries", type=int, default=300, help="single queries per measurement (time-capped)")
    p.add_argument("--out", default="bench/results/gpu_torch.json")
    p.add_argument("--model-root", default=".cache/models")
    p.add_argument("--photos", default=".cache/photos", help="*.jpg for real crops/images; synthetic if absent")
    p.add_argument("--cap-s", type=float, default=4.0, help="time cap of one timed measurement, seconds")
    p.add_argument("--budget-s", type=float, default=180.0, help="soft deadline for the whole run, seconds")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for tests")
    p.add_argument("--sections", default="search,recognizer,detector")
    args = p.parse_args(argv)
    args.rec_batches, args.det_batches = REC_BATCHES, DET_BATCHES
    if args.quick:
        args.faces = args.faces or 5000
        args.queries = min(args.queries, 20)
        args.cap_s = min(args.cap_s, 0.3)
        args.rec_batches, args.det_batches = (1, 8), (1, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = Clock(args.budget_s)
    torch = import_torch()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.faces is None:
        args.faces = 1_000_000 if device == "cuda" else 200_000
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    result: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "args": {k: v for k, v in vars(args).items()}, "env": environment(torch, device)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        result["total_s"] = round(clock.elapsed(), 1)
        out.write_text(json.dumps(result, indent=2, default=str))

    sections = {"search": bench_search, "recognizer": bench_recognizer, "detector": bench_detector}
    for name in args.sections.split(","):
        res: dict[str, Any] = {}
        result[name] = res
        t0 = time.perf_counter()
        try:
            sections[name](torch, device, args, clock, res)
        except Exception as exc:
            res["error"] = error_text(exc)
            res["traceback"] = traceback.format_exc()[-3000:]
        res["section_s"] = round(time.perf_counter() - t0, 1)
        print(f"[{clock.elapsed():6.1f}s] {name} done in {res['section_s']}s" + (f" ERROR {res['error']}"
              if "error" in res else ""), flush=True)
        save()
    save()
    print(table(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
