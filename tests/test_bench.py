"""The benchmark harness end to end on a CPU (`--smoke`: tiny cases through the Triton interpreter):
tables, JSON with the environment, plots, --compare; and the rules behind the numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fastres.bench.harness import DeviceLost, Timing, Unit, environment, measure, run_units
from fastres.bench.report import Results, Row, add_speedups
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


@pytest.mark.skipif(HAS_CUDA, reason="--smoke is the CPU path")
def test_time_limit_keeps_what_it_measured_and_resume_runs_the_rest(tmp_path):
    quick = ("layers", "--smoke", "--backends", "auto", "--baselines", "eager-cl", "--out", str(tmp_path))
    first = _bench(*quick, "--time-limit", "0")  # the first case always runs; none after it fits in 0 s
    assert first.returncode == 3, first.stdout + first.stderr
    assert "--resume" in first.stdout
    path = next(tmp_path.glob("layers-*-smoke.json"))
    cut = json.loads(path.read_text())
    assert len(cut["done"]) == 1 and len(cut["pending"]) == 1
    assert {r["name"] for r in cut["rows"]} == {cut["done"][0].rsplit(" batch ", 1)[0]}
    assert all(r["speedup"] for r in cut["rows"] if r["contender"] == "fastres-auto")

    refused = _bench(*quick[:-2], "--baselines", "eager-nchw", "--out", str(tmp_path), "--resume")
    assert refused.returncode == 2 and "cannot resume" in refused.stdout
    assert json.loads(path.read_text()) == cut

    rest = _bench(*quick, "--resume")
    assert rest.returncode == 0, rest.stdout + rest.stderr
    whole = json.loads(path.read_text())
    assert whole["done"] == cut["done"] + cut["pending"] and whole["pending"] == []
    assert whole["rows"][:len(cut["rows"])] == cut["rows"]  # kept, not measured again
    assert len({r["name"] for r in whole["rows"]}) == 2 and whole["ceilings"] == cut["ceilings"]


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


def test_resume_needs_the_same_code_device_and_options():
    env = environment(torch.device("cpu"))
    assert len(env["source"]) == 12
    config = {"suite": "layers", "dtype": "torch.float16", "cases": ["a", "b"]}
    results = Results(env, None, config)
    assert results.resumable_by(dict(env, date="later"), dict(config)) is None
    assert "source" in results.resumable_by(dict(env, source="0" * 12), config)
    assert "device" in results.resumable_by(dict(env, device="NVIDIA H200"), config)
    assert "cases" in results.resumable_by(env, dict(config, cases=["a"]))


def _unit(key: str, crashes: set[tuple[str, str]], calls: list) -> Unit:
    """A case of three contenders on a (pretend) CUDA device; those in `crashes` raise a CUDA error."""

    def run(faults: dict[str, str]) -> list[Row]:
        calls.append((key, dict(faults)))
        rows = []
        for contender in ("eager-cl", "fastres-x", "fastres-y"):
            def attempt(row: Row) -> Timing:
                if (key, contender) in crashes:
                    raise RuntimeError("CUDA error: an illegal memory access was encountered")
                row.correct = True
                return Timing(1.0, 0.9, 1.1)

            rows.append(measure(Row("layers", key, contender, 8, "float16", floor_ms=0.5), attempt,
                                torch.device("cuda"), 8, 2e9, faults.get(contender)))
        return rows

    return Unit(key, run)


def test_a_crash_that_loses_the_cuda_context_is_recorded_and_the_resumed_run_goes_on_without_it(tmp_path, monkeypatch):
    context = {"lost": False}

    def synchronize(device=None):
        if context["lost"]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    path = tmp_path / "r.json"
    calls = []
    units = [_unit("a", {("a", "fastres-y")}, calls), _unit("b", {("b", "fastres-x")}, calls)]

    results = Results({}, None, {})
    context["lost"] = True  # the crash on case "a" takes the context with it
    with pytest.raises(DeviceLost):
        run_units(units, results, path, log=lambda _: None)
    saved = Results.load(path)
    assert saved.done == [] and saved.rows == []
    assert list(saved.faults) == ["a"] and list(saved.faults["a"]) == ["fastres-y"]
    assert "illegal memory access" in saved.faults["a"]["fastres-y"]

    context["lost"] = False  # a new process; on case "b" the crash leaves the context usable
    run_units(units, saved, path, log=lambda _: None)
    assert calls[-2:] == [("a", saved.faults["a"]), ("b", {})]
    rows = {(r.name, r.contender): r for r in Results.load(path).rows}
    assert rows[("a", "fastres-y")].correct is False and "earlier run" in rows[("a", "fastres-y")].note
    assert rows[("a", "fastres-x")].median_ms == 1.0 and rows[("a", "fastres-x")].pct_of_floor == 50.0
    assert rows[("b", "fastres-x")].correct is False and rows[("b", "fastres-x")].median_ms is None
    assert rows[("b", "fastres-x")].note.startswith("ERROR: RuntimeError: CUDA error")
    assert rows[("b", "fastres-y")].tflops == pytest.approx(2.0)
