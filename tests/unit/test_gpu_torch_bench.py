"""bench/gpu_torch.py: imports without torch; its helpers; a tiny end-to-end run where torch is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_torch.py"


def _load():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gpu_torch_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_script_imports_without_torch_and_parses_quick_args() -> None:
    mod = _load()
    args = mod.parse_args(["--quick"])
    assert args.faces == 5000 and args.queries <= 20 and args.cap_s <= 0.3
    assert mod.ratio(20.0, 10.0) == 2.0 and mod.ratio(None, 1.0) is None


def test_numpy_top_k_is_exact_and_best_first() -> None:
    mod = _load()
    rng = np.random.default_rng(0)
    db = rng.standard_normal((500, 16)).astype(np.float32)
    q = rng.standard_normal((3, 16)).astype(np.float32)
    got = mod.numpy_top_k(db, q)
    want = np.argsort(-(q @ db.T), axis=1)[:, : mod.K]
    assert (got == want).all()
    assert mod.recall(got, want) == 1.0


def test_timed_loop_stops_at_its_iteration_count() -> None:
    mod = _load()
    calls: list[int] = []
    times = mod.timed_loop(calls.append, 4, 60.0)
    assert calls == [0, 1, 2, 3] and len(times) == 4
    summary = mod.summarize(times, 8, "faces/s")
    assert summary["calls"] == 4 and summary["p50_ms"] <= summary["p99_ms"]


def test_quick_search_run_writes_sane_json(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="torch is not installed in this venv (the GPU bench needs it; see docstring)")
    pytest.importorskip("threadpoolctl", reason="threadpoolctl is not installed in this venv")
    mod = _load()
    out = tmp_path / "gpu_torch.json"
    assert mod.main(["--quick", "--faces", "2000", "--sections", "search", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["env"]["device"] in ("cpu", "cuda")
    for dim in ("512", "128"):
        d = result["search"]["dims"][dim]
        assert "error" not in d, d.get("error")
        assert d["recall_at_10_torch_fp32_vs_numpy"] == 1.0
        assert {(r["side"], r["batch"]) for r in d["rows"]} >= {("gpu", 1), ("cpu", 256)}
