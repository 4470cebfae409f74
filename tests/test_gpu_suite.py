"""``benchmarks/gpu_suite.py --smoke``: the GPU suite's code, run on CPU at tiny sizes, so the
suite cannot rot while no GPU machine is lent (the full run is the same plan with GPU sizes)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_full_plan_is_the_smoke_plan_at_gpu_sizes(tmp_path):
    suite = _suite()
    smoke = suite.plan(True, "cpu", tmp_path)
    full = suite.plan(False, "cuda", tmp_path)
    assert [n for n, _ in smoke] == [n for n, _ in full]  # same benchmarks, same order
    for (_, a), (_, b) in zip(smoke, full):
        assert a[1] == b[1]  # same script / CLI entry
        assert b[b.index("--device") + 1] == "cuda"
    llm = dict(full)["llm"]
    assert "qwen2-0.5b-config" in llm and "sd14-config" in dict(full)["t2i"]


# 3.6 CPU-minutes (12.6 min wall on the shared 2-core box): slow, which CI still runs
@pytest.mark.slow
def test_smoke_runs_every_benchmark_and_writes_one_report(tmp_path):
    rows = _suite().run_suite(tmp_path, smoke=True, device="cpu", timeout=600)
    report = (tmp_path / "REPORT.md").read_text()
    assert [r["benchmark"] for r in rows] == ["llm", "t2i", "loading", "lol-build", "lol"]
    assert all(r["rc"] == 0 for r in rows), report[-4000:]
    assert "| benchmark | exit | wall s | command |" in report
    assert "engine" in report and "baseline" in report  # the benchmarks' own tables
