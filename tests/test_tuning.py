"""Tuning and its disk cache: measured once, remembered across processes, robust to corrupt,
stale or unwritable cache files, safe under concurrent processes and threads; "auto" choosing."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import fastres
from fastres import tuning
from fastres.backends import cuda, reference
from fastres.kernels import conv_bn_act as gemm_kernel
from fastres.problem import ConvProblem
from fastres.shapes import ConvCase, make_inputs
from helpers import INTERPRETER

CPU = torch.device("cpu")
CASE = ConvCase("tune", 2, 64, 6, 6, 64, 3, 3, padding=(1, 1), residual=True)
TINY = (gemm_kernel.Config(64, 64, 64, 8, 4, 3), gemm_kernel.Config(32, 32, 32, 4, 4, 2))
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="CPU runs of the Triton kernels need TRITON_INTERPRET=1")


def test_remember_lookup_roundtrip_through_disk(isolated_tuning_cache):
    tuning.remember(CPU, "kind", "key", {"a": 1})
    tuning.forget_in_memory()
    assert tuning.lookup(CPU, "kind", "key") == {"a": 1}
    data = json.loads(tuning.cache_file(CPU).read_text())
    assert data["identity"]["device"] == "cpu-triton-interpreter"
    assert set(data["identity"]) == {"device", "fastres", "torch", "triton", "cuda", "kernels"}
    assert tuning.cache_file(CPU).parent == isolated_tuning_cache


def test_choices_measured_on_other_kernel_code_are_not_used(monkeypatch, tmp_path, request):
    """One fastres version spans many commits: a change to the kernels' code (or a rebuilt
    extension) starts a new cache file, so no choice measured and checked on other code is used."""
    kernel = tmp_path / "conv_bn_act.py"
    kernel.write_text("BLOCK_M = 64\n")
    monkeypatch.setattr(tuning, "kernel_files", lambda: [kernel])
    request.addfinalizer(tuning.kernels_digest.cache_clear)
    tuning.kernels_digest.cache_clear()
    tuning.remember(CPU, "kind", "key", "64x64")
    tuning.forget_in_memory()
    assert tuning.lookup(CPU, "kind", "key") == "64x64"  # a new process, the same code
    kernel.write_text("BLOCK_M = 128\n")
    tuning.kernels_digest.cache_clear()  # a new process after the update
    tuning.forget_in_memory()
    assert tuning.lookup(CPU, "kind", "key") is None


def test_the_kernels_code_is_the_triton_kernels_and_what_the_extension_was_built_from(monkeypatch, request):
    """A rebuild of the same sources keeps the tuning file (each device call of a GPU session
    rebuilds), other sources start a new one."""
    assert {"conv_bn_act.py", "depthwise.py", "epilogue.py"} <= {path.name for path in tuning.kernel_files()}
    request.addfinalizer(tuning.kernels_digest.cache_clear)
    digests = []
    for build in ("0123456789ab", "0123456789ab", "ba9876543210"):
        monkeypatch.setattr(cuda, "build_digest", lambda: build)
        tuning.kernels_digest.cache_clear()
        tuning.forget_in_memory()
        digests.append(tuning.stack_identity(CPU)["kernels"])
    assert digests[0] == digests[1] != digests[2]


def _spy_launches(monkeypatch) -> list:
    calls = []
    real = gemm_kernel.launch

    def spy(problem, config, *args, **kwargs):
        calls.append(config)
        return real(problem, config, *args, **kwargs)

    monkeypatch.setattr(gemm_kernel, "launch", spy)
    return calls


def _run_op(dtype=torch.float16):
    inputs = make_inputs(CASE, dtype)
    return fastres.ops.conv_bn_act(*inputs.op_args(), padding=1, backend="triton"), inputs


@needs_interpreter
def test_triton_autotune_times_each_candidate_once_then_reads_the_cache(monkeypatch):
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    monkeypatch.setattr(gemm_kernel, "CONFIGS", TINY)
    calls = _spy_launches(monkeypatch)
    first, inputs = _run_op()
    problem = ConvProblem.from_tensors(*inputs.op_args(), (1, 1), (1, 1), (1, 1), 1, "relu")
    timed = gemm_kernel.candidates(problem, CPU)  # TINY, plus split-K versions (this problem has few tiles)
    assert set(TINY) < set(timed) and set(calls[:-1]) == set(timed) and len(calls) > len(timed)
    stored = json.loads(tuning.cache_file(CPU).read_text())["entries"][f"triton.conv_bn_act/{problem.key}"]
    assert stored == asdict(calls[-1])

    calls.clear()
    tuning.forget_in_memory()  # what a new process sees: only the disk
    second, _ = _run_op()
    assert calls == [gemm_kernel.Config(**stored)]
    assert torch.equal(first, second)


@needs_interpreter
@pytest.mark.parametrize("damage", ["wrong-values", "last-image-unwritten"])
def test_a_triton_config_with_wrong_answers_is_not_chosen_though_fastest(monkeypatch, damage):
    """Tuning checks each config against float64 before timing it (its first and last images, the
    output poisoned first): a miscompiled config on some GPU is skipped, with a warning."""
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    monkeypatch.setattr(gemm_kernel, "CONFIGS", TINY)
    monkeypatch.setattr(gemm_kernel, "variants", lambda config, problem, device: [])
    real, launched = gemm_kernel.launch, []

    def launch(problem, config, x, weight, scale, shift, residual, out, **kwargs):
        launched.append(config)
        before = out[-1].clone()
        real(problem, config, x, weight, scale, shift, residual, out, **kwargs)
        if config == TINY[1]:  # checked after TINY[0], which leaves right answers in the shared output
            out[-1].add_(0.25) if damage == "wrong-values" else out[-1].copy_(before)
        return out

    monkeypatch.setattr(gemm_kernel, "launch", launch)
    monkeypatch.setattr(tuning, "time_ms", lambda fn, device: (fn(), 1.0 if launched[-1] == TINY[1] else 2.0)[1])
    with pytest.warns(RuntimeWarning, match=r"candidate .* differs? from float64 by up to .*; not used"):
        out, inputs = _run_op()
    problem = ConvProblem.from_tensors(*inputs.op_args(), (1, 1), (1, 1), (1, 1), 1, "relu")
    assert tuning.lookup(CPU, gemm_kernel.TUNING_KIND, problem.key) == asdict(TINY[0])
    torch.testing.assert_close(out.double(), inputs.reference(CASE), rtol=1e-3, atol=1e-2)


@pytest.mark.skipif(cuda.load_error() is not None, reason="needs the CUDA extension's op schemas (built, not run)")
def test_a_cutlass_kernel_leaving_an_image_unwritten_is_not_chosen_though_fastest(monkeypatch):
    """The CUTLASS tile tuning checks each kernel writing into one output it poisoned first (the
    op's `out` form). A fresh output may hold what the allocator's block held, e.g. the right
    values the kernel before it left, which would hide an unwritten tile. The kernels are stood in
    on the CPU here: the CUDA backend's Python side, tuning included, runs as on a GPU."""
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    names = ("sm90_f16_128x128x64", "sm90_f16_64x64x64")  # the second leaves the last image unwritten
    monkeypatch.setattr(cuda, "_arch", lambda device: 90)
    monkeypatch.setattr(cuda, "configs", lambda dtype, arch: names)
    monkeypatch.setattr(cuda, "usable_configs", lambda problem, arch: (0, 1))
    inputs = make_inputs(CASE, torch.float32)
    problem = inputs.problem(CASE)
    right = reference.run(problem, *inputs.op_args()).contiguous(memory_format=torch.channels_last)

    launched = []

    def kernel(*args, out):
        launched.append(args[-1])
        written = out[:-1] if args[-1] == 1 else out
        written.copy_(right[: written.shape[0]])
        return out

    stand_in = torch.library.Library("fastres", "IMPL")
    try:
        stand_in.impl("cutlass_conv_bn_act", lambda *args: kernel(*args, out=right.clone()), "CPU")
        stand_in.impl("cutlass_conv_bn_act.out", kernel, "CPU")
        monkeypatch.setattr(tuning, "time_ms", lambda fn, device: (fn(), 1.0 if launched[-1] == 1 else 2.0)[1])
        with pytest.warns(RuntimeWarning, match=f"candidate {names[1]} for .* differs? from float64 .*; not used"):
            out = cuda.run(problem, *inputs.op_args())
    finally:
        stand_in._destroy()
    assert tuning.lookup(CPU, "cuda.conv_bn_act", problem.key) == names[0]
    torch.testing.assert_close(out, right)


@needs_interpreter
def test_without_timing_the_heuristic_config_runs(monkeypatch):
    monkeypatch.setenv("FASTRES_AUTOTUNE", "0")
    calls = _spy_launches(monkeypatch)
    _, inputs = _run_op()
    problem = ConvProblem.from_tensors(*inputs.op_args(), (1, 1), (1, 1), (1, 1), 1, "relu")
    assert calls == [gemm_kernel.heuristic(problem)]
    assert not tuning.cache_file(CPU).exists()


SECOND_PROCESS = """
import os, sys
from fastres.kernels import conv_bn_act as k
k.CONFIGS = (k.Config(64, 64, 64, 8, 4, 3), k.Config(32, 32, 32, 4, 4, 2))
real, calls = k.launch, []
k.launch = lambda *a, **kw: (calls.append(1), real(*a, **kw))[1]
import torch, fastres
from fastres.shapes import ConvCase, make_inputs
inputs = make_inputs(ConvCase("tune", 2, 64, 6, 6, 64, 3, 3, padding=(1, 1), residual=True), torch.float16)
fastres.ops.conv_bn_act(*inputs.op_args(), padding=1, backend="triton")
print("launches", len(calls))
"""


@needs_interpreter
def test_a_second_process_skips_tuning(isolated_tuning_cache):
    env = {**os.environ, "FASTRES_AUTOTUNE": "1", "TRITON_INTERPRET": "1", "FASTRES_CACHE_DIR": str(isolated_tuning_cache)}
    runs = [subprocess.run([sys.executable, "-c", SECOND_PROCESS], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, second = (int(r.stdout.split()[-1]) for r in runs)
    assert first > 2 and second == 1


@needs_interpreter
@pytest.mark.parametrize("damage", ["garbage", "stale", "wrong-shape"])
def test_a_corrupt_or_stale_cache_is_ignored_with_one_warning_and_rebuilt(monkeypatch, damage):
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    monkeypatch.setattr(gemm_kernel, "CONFIGS", TINY)
    path = tuning.cache_file(CPU)
    path.parent.mkdir(parents=True, exist_ok=True)
    identity = tuning.stack_identity(CPU)
    path.write_text({
        "garbage": "{ this is not json",
        "stale": json.dumps({"format": tuning.FORMAT_VERSION, "identity": {**identity, "triton": "0.0"}, "entries": {}}),
        "wrong-shape": json.dumps({"format": tuning.FORMAT_VERSION, "identity": identity, "entries": [1, 2]}),
    }[damage])
    tuning.forget_in_memory()
    with pytest.warns(RuntimeWarning, match="ignoring unusable tuning cache") as record:
        out, inputs = _run_op()
    assert sum("tuning cache" in str(w.message) for w in record) == 1
    data = json.loads(path.read_text())
    assert data["identity"] == identity and len(data["entries"]) == 1


@needs_interpreter
def test_an_unwritable_cache_directory_degrades_to_memory(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    monkeypatch.setattr(gemm_kernel, "CONFIGS", TINY)
    calls = _spy_launches(monkeypatch)
    with pytest.warns(RuntimeWarning, match="not writable"):
        _run_op()
    calls.clear()
    _run_op()
    assert len(calls) == 1  # remembered in memory


def _writer(directory: str, worker: int) -> None:
    os.environ["FASTRES_CACHE_DIR"] = directory
    tuning.forget_in_memory()
    for j in range(15):
        tuning.remember(CPU, "concurrent", f"w{worker}-k{j}", j)


def test_concurrent_processes_never_corrupt_the_file(isolated_tuning_cache):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(isolated_tuning_cache), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    tuning.forget_in_memory()
    entries = json.loads(tuning.cache_file(CPU).read_text())["entries"]
    assert {k for k in entries if k.startswith("concurrent/")} == {f"concurrent/w{w}-k{j}" for w in range(4) for j in range(15)}
    assert not list(Path(isolated_tuning_cache).glob("*.tmp"))


def test_threads_tune_a_key_once_and_agree(monkeypatch):
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    timed = []
    delays = {"slow": 0.004, "fast": 0.0}

    def run(name):
        timed.append(name)
        time.sleep(delays[name])

    answers = []
    threads = [threading.Thread(target=lambda: answers.append(
        tuning.pick(CPU, "threads", "key", lambda: ["slow", "fast"], encode=str, run=run, default=lambda: "slow")))
        for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == ["fast"] * 8
    assert sorted(set(timed)) == ["fast", "slow"] and len(timed) == 8  # one warm-up + 3 runs each, once


def test_refinements_are_timed_for_the_fastest_candidates_only(monkeypatch):
    """Two rounds: every candidate, then the variants of the REFINE_TOP fastest (never one already
    timed); each round is prepared (compiled) before any of it runs; the winner may be a variant,
    and a new process finds it on disk."""
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    monkeypatch.setattr(tuning, "REFINE_TOP", 2)
    delay_ms = {"slow": 24, "mid": 12, "fast": 6, "fast/v": 0, "mid/v": 18, "slow/v": 0}
    events = []

    def run(name):
        events.append(("run", name))
        time.sleep(delay_ms[name] / 1e3)

    def pick():
        return tuning.pick(CPU, "rounds", "key", lambda: ["slow", "mid", "fast"], encode=str, run=run,
                           default=lambda: "slow",
                           refine=lambda c: [f"{c}/v", "slow"], prepare=lambda cs: events.append(("prepare", list(cs))))

    assert pick() == "fast/v"
    prepares = [(i, cs) for i, (what, cs) in enumerate(events) if what == "prepare"]
    assert [cs for _, cs in prepares] == [["slow", "mid", "fast"], ["fast/v", "mid/v"]]
    first_run_of = {name: events.index(("run", name)) for name in delay_ms if ("run", name) in events}
    assert set(first_run_of) == {"slow", "mid", "fast", "fast/v", "mid/v"}  # slow/v: slow was not a leader
    assert prepares[0][0] < min(first_run_of.values()) and prepares[1][0] < first_run_of["fast/v"]
    assert all(events.count(("run", name)) == 4 for name in first_run_of)  # warm-up + 3, once each

    tuning.forget_in_memory()
    monkeypatch.setenv("FASTRES_AUTOTUNE", "0")
    events.clear()
    assert pick() == "fast/v" and events == []


@needs_interpreter
def test_auto_measures_and_picks_the_fastest_backend(monkeypatch):
    """Given two candidates, auto times both and remembers the faster one (the interpreter is slow)."""
    from fastres import backends

    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    monkeypatch.setattr(backends, "_auto_candidates", lambda device, problem: ["triton", "reference"])
    inputs = make_inputs(CASE, torch.float32)
    out = fastres.ops.conv_bn_act(*inputs.op_args(), padding=1)
    problem = ConvProblem.from_tensors(*inputs.op_args(), (1, 1), (1, 1), (1, 1), 1, "relu")
    assert tuning.lookup(CPU, "auto", problem.key) == "reference"
    assert torch.equal(out, fastres.ops.conv_bn_act(*inputs.op_args(), padding=1, backend="reference"))


def test_a_remembered_auto_choice_that_cannot_run_here_is_not_used():
    """A cache written where the CUDA extension loaded must not make auto fail where it doesn't."""
    inputs = make_inputs(CASE, torch.float32)
    problem = ConvProblem.from_tensors(*inputs.op_args(), (1, 1), (1, 1), (1, 1), 1, "relu")
    tuning.remember(CPU, "auto", problem.key, "cuda")
    out = fastres.ops.conv_bn_act(*inputs.op_args(), padding=1)
    assert torch.equal(out, fastres.ops.conv_bn_act(*inputs.op_args(), padding=1, backend="reference"))


def test_a_repeat_call_gets_its_answer_without_listing_candidates(monkeypatch):
    """pick runs on every op call: once answered, (kind, key) costs a lookup, not a walk over the
    candidates. The answer follows the remembered choice when it changes, and an untimed default
    lasts only while timing is off."""
    calls = []

    def pick(options=("slow", "fast")):
        def candidates():
            calls.append("candidates")
            return list(options)

        def default():
            calls.append("default")
            return options[0]

        return tuning.pick(CPU, "repeat", "-".join(options), candidates, encode=str,
                           run=lambda name: (calls.append(f"run {name}"), time.sleep(0.004 if name == "slow" else 0)),
                           default=default)

    monkeypatch.setenv("FASTRES_AUTOTUNE", "0")
    assert pick() == "slow" and calls == ["candidates", "default"]
    assert pick() == "slow" and calls == ["candidates", "default"]
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")  # the untimed default no longer holds
    calls.clear()
    assert pick() == "fast" and calls[0] == "candidates" and "run fast" in calls
    calls.clear()
    assert pick() == "fast" and calls == []
    tuning.remember(CPU, "repeat", "slow-fast", "slow")  # e.g. tuned again elsewhere in the process
    assert pick() == "slow" and calls == ["candidates"]
    calls.clear()
    assert pick() == "slow" and calls == []
    assert pick(("only",)) == "only" and calls == ["candidates", "default"]  # nothing to time
    assert pick(("only",)) == "only" and calls == ["candidates", "default"]


def test_a_candidate_with_wrong_answers_is_never_chosen_however_fast(monkeypatch):
    """check() runs before timing: the fastest candidate, if wrong, is skipped with a warning and
    the fastest right one is remembered."""
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    monkeypatch.setattr(tuning, "time_ms", lambda fn, device: {"fast": 1.0, "slow": 2.0, "slower": 3.0}[fn()])
    checked = []

    def check(name):
        checked.append(name)
        return "differs from float64 by up to 0.5" if name == "fast" else None

    with pytest.warns(RuntimeWarning, match="checking candidate fast for key differs from float64 by up to 0.5; "
                                            "not used"):
        choice = tuning.pick(CPU, "checking", "key", lambda: ["slower", "fast", "slow"], encode=str, run=lambda n: n,
                             default=lambda: "slower", check=check)
    assert choice == "slow" and checked == ["slower", "fast", "slow"]
    assert tuning.lookup(CPU, "checking", "key") == "slow"


def test_when_no_candidate_computes_right_tuning_raises_instead_of_running_the_default(monkeypatch):
    """The default is one of the wrong ones (or untried): an error, not a silent wrong answer. auto,
    timing a backend whose own tuning raises so, skips that backend."""
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    monkeypatch.setattr(tuning, "time_ms", lambda fn, device: fn())

    def run(name):
        if name == "raises":
            raise RuntimeError("out of shared memory")
        return 1.0

    with pytest.warns(RuntimeWarning, match="not used"), pytest.raises(
            RuntimeError, match="no checking candidate for key computes right on this device; e.g. wrong off by 1"):
        tuning.pick(CPU, "checking", "key", lambda: ["raises", "wrong"], encode=str, run=run,
                    default=lambda: "wrong", check=lambda name: "off by 1" if name == "wrong" else None)
    assert tuning.lookup(CPU, "checking", "key") is None


def test_when_every_candidate_fails_the_default_is_kept_for_the_process(monkeypatch):
    """Failing candidates are timed once, not on every call; the next process tries them again."""
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    attempts = []

    def run(name):
        attempts.append(name)
        raise RuntimeError(f"{name}: out of shared memory")

    def pick():
        return tuning.pick(CPU, "failing", "key", lambda: ["a", "b"], encode=str, run=run, default=lambda: "a")

    with pytest.warns(RuntimeWarning) as failures:
        assert pick() == "a"
    assert attempts == ["a", "b"] and [str(w.message) for w in failures] == [
        "fastres: failing candidate a for key failed: a: out of shared memory; not used",
        "fastres: failing candidate b for key failed: b: out of shared memory; not used"]
    assert pick() == "a" and attempts == ["a", "b"]
    assert tuning.lookup(CPU, "failing", "key") is None
    tuning.forget_in_memory()
    with pytest.warns(RuntimeWarning, match="candidate . for key failed"):
        assert pick() == "a"
    assert attempts == ["a", "b"] * 2
