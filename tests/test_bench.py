"""The benchmark harness end to end on a CPU (`--smoke`: tiny cases through the Triton interpreter):
tables, JSON with the environment, plots, --compare; and the rules behind the numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fastres.bench.report import Row, add_speedups
from helpers import HAS_CUDA


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastres", "bench", *args], capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(HAS_CUDA, reason="--smoke is the CPU path")
def test_layers_smoke_writes_table_json_and_plot(tmp_path):
    run = _bench("layers", "--smoke", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(next(tmp_path.glob("layers-*-smoke.json")).read_text())
    assert {"device", "driver", "torch", "triton", "cuda", "commit", "date"} <= set(data["environment"])
    rows = data["rows"]
    assert {r["contender"] for r in rows} == {"eager-nchw", "eager-cl", "conv-only", "compile",
                                             "fastres-triton", "fastres-cudnn", "fastres-auto"}
    assert all(r["correct"] for r in rows) and all(r["median_ms"] > 0 for r in rows)
    assert all(r["first_call_s"] > 0 for r in rows)
    assert all(set(r["speedup"]) >= {"eager-cl"} for r in rows if r["contender"].startswith("fastres"))
    assert len({r["name"] for r in rows if "+proj(" in r["name"]}) == 1  # a block tail with its downsample
    assert next(tmp_path.glob("layers-*-smoke.png")).stat().st_size > 10_000
    assert "fastres-triton" in run.stdout and "median ms" in run.stdout

    again = _bench("layers", "--smoke", "--backends", "auto", "--baselines", "eager-cl", "--out", str(tmp_path / "2"),
                   "--compare", str(next(tmp_path.glob("layers-*-smoke.json"))))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "change against" in again.stdout and "new/old" in again.stdout


@pytest.mark.skipif(HAS_CUDA, reason="--smoke is the CPU path")
def test_models_smoke(tmp_path):
    run = _bench("models", "--smoke", "--backends", "auto", "triton", "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads(next(tmp_path.glob("models-*-smoke.json")).read_text())["rows"]
    assert {r["contender"] for r in rows} == {"eager-nchw", "eager-cl", "compile", "fastres-auto", "fastres-triton"}
    assert all(r["correct"] for r in rows) and all(r["first_call_s"] > 0 for r in rows)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU refusal")
def test_full_runs_need_a_gpu():
    run = _bench("layers")
    assert run.returncode == 2 and "no CUDA device" in run.stdout


def test_a_wrong_answer_gets_no_speedup():
    rows = [Row("layers", "c", "conv-only", 1, "float16", median_ms=2.0, correct=True),
            Row("layers", "c", "fastres-a", 1, "float16", median_ms=1.0, correct=True),
            Row("layers", "c", "fastres-b", 1, "float16", median_ms=0.5, correct=False)]
    add_speedups(rows, ["conv-only"])
    assert rows[1].speedup == {"conv-only": 2.0}
    assert rows[2].speedup == {}
