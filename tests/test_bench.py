"""The benchmark harness end to end on a CPU (`--smoke`: tiny cases through the Triton interpreter):
tables, JSON with the environment, plots, --compare; and the rules behind the numbers."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fastres

from fastres.bench.harness import DeviceLost, Timing, Unit, environment, measure, run_units
from fastres.bench.report import Results, Row, add_speedups
from helpers import HAS_CUDA, INTERPRETER


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


def test_benchmarks_keep_tunings_rejected_candidates_in_their_log(monkeypatch):
    """Contenders run with warnings off (compilers', torch's), but a tuning candidate that failed
    its float64 check on this GPU still reaches the log, and is collected for the results file."""
    from fastres import tuning
    from fastres.bench.harness import quiet

    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    message = "fastres: kernel candidate a for layer differs from float64; not used"
    with pytest.warns(RuntimeWarning) as seen, quiet() as rejected:
        warnings.warn("torch: something deprecated", UserWarning)
        tuning.pick(torch.device("cpu"), "kernel", "layer", lambda: ["a", "b"], encode=str, run=lambda name: name,
                    default=lambda: "b", check=lambda name: "differs from float64" if name == "a" else None)
    assert [str(w.message) for w in seen] == [message]
    assert rejected == [message]


@pytest.mark.skipif(not INTERPRETER, reason="CPU runs of the Triton kernels need TRITON_INTERPRET=1")
def test_a_layer_row_records_the_tuning_candidates_its_first_call_rejected(monkeypatch, tmp_path):
    """A Triton config computing wrongly on this GPU is named in the row's JSON and counted in the
    table's note; the row itself, run with a config that computes right, is correct."""
    from rich.console import Console

    from fastres.bench.harness import Settings
    from fastres.bench.layers import run_case, smoke_cases
    from fastres.bench.report import print_table
    from fastres.kernels import conv_bn_act as gemm_kernel

    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    configs = (gemm_kernel.Config(32, 32, 32, 4, 4, 2), gemm_kernel.Config(16, 32, 32, 4, 4, 2))
    monkeypatch.setattr(gemm_kernel, "CONFIGS", configs)
    monkeypatch.setattr(gemm_kernel, "variants", lambda config, problem, device: [])
    real = gemm_kernel.launch

    def launch(problem, config, x, weight, scale, shift, residual, out, **kwargs):
        real(problem, config, x, weight, scale, shift, residual, out, **kwargs)
        return out.add_(0.25) if config == configs[1] else out

    monkeypatch.setattr(gemm_kernel, "launch", launch)
    case = smoke_cases()[0]
    [row] = run_case(case, Settings(torch.float32, torch.device("cpu"), ["fastres-triton"], None))
    assert row.correct and len(row.rejected) == 1
    assert f"candidate {dataclasses.asdict(configs[1])} for " in row.rejected[0]
    assert "from float64" in row.rejected[0] and row.rejected[0].endswith("; not used")
    results = Results(environment(torch.device("cpu")), None, {}, [row])
    assert Results.load(results.save(tmp_path / "layers.json")).rows[0].rejected == row.rejected
    console = Console(record=True, width=400)
    print_table([row], [], results.env, console)
    assert "1 tuning candidate rejected" in console.export_text()


def test_a_fast_wrong_model_is_reported_as_a_failure(monkeypatch):
    """The models suite judges every contender by fastres.verify's rule against float64: a fused
    model 1% off (a kernel bug) is not correct, eager is."""
    from fastres.backends import reference
    from fastres.bench.harness import Settings
    from fastres.bench.models import named_model, run_setting

    run = reference.run
    monkeypatch.setattr(reference, "run", lambda *args: run(*args) * 1.01)
    model = named_model("resnet18")
    settings = Settings(torch.float32, torch.device("cpu"), ["eager-cl", "fastres-reference"], None)
    rows = {r.contender: r for r in run_setting("resnet18", model, copy.deepcopy(model).double(), 1, 32, settings)}
    assert rows["eager-cl"].correct and rows["eager-cl"].rel_error < 1e-5
    assert not rows["fastres-reference"].correct and rows["fastres-reference"].rel_error > 5e-3


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


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "timm:regnety_002"])
def test_models_by_name_and_their_fused_convs(name):
    """Any torchvision or timm model benchmarks by name: its cases (FLOPs, floors, the layers
    suite) are the calls fastres.optimize makes, read off a meta-tensor run."""
    from fastres.bench.models import named_model
    from fastres.shapes import ConvCallRecorder, model_calls, model_projection_cases

    model = named_model(name)
    assert not model.training
    optimized = fastres.optimize(model)
    with ConvCallRecorder() as recorder, torch.no_grad():
        optimized(torch.randn(2, 3, 64, 64))
    projected = sum(c.projection is not None for c in recorder.cases)
    calls = model_calls(name, 2, 64)
    assert len(calls) == len(recorder.cases) + projected == len(optimized.fastres_report.fused)
    assert [c.replace(name="") for c in model_projection_cases(name, 2, 64)] == list(
        dict.fromkeys(c.replace(name="") for c in recorder.cases if c.projection is not None))
    assert all(c.name.startswith(f"{name}:") for c in calls)


def _assert_every_contender_computes(case) -> None:
    """The eager baselines and the fused op, as the layer benchmark runs them on `case`, give its
    float64 reference (a wrong baseline would make a wrong speedup)."""
    from fastres.bench.harness import Rotation
    from fastres.bench.layers import runner
    from fastres.numerics import compare, tolerance
    from fastres.shapes import make_inputs

    inputs = make_inputs(case, torch.float32)
    expected = inputs.reference(case)
    for contender in ("eager-nchw", "eager-cl", "fastres-auto"):
        out = runner(contender, case, inputs, Rotation([inputs.x, inputs.residual], 1))()
        assert compare(out, expected, tolerance(torch.float32, case.accumulated), gain=inputs.gain).ok, contender


def test_layers_without_a_batchnorm_are_timed_against_their_own_eager_chain():
    """A VGG-style layer (conv + bias + ReLU, no BN) is a case of its own ("-nobn"), and its eager
    baselines run conv + bias + ReLU, not a BN the model does not have."""
    from fastres.bench.layers import layer_cases

    cases = layer_cases(["squeezenet1_0"], 1, 64)
    assert cases and all(not c.bn and c.name.endswith("-nobn") for c in cases)
    assert all(c.bn for c in layer_cases(["resnet18"], 1, 64))
    _assert_every_contender_computes(cases[1])


def test_a_projection_without_a_batchnorm_is_timed_against_its_own_eager_chain():
    """A block of a model whose BNs were folded into the biases: the eager baselines' projection
    conv carries the bias that the op takes as the projection's shift."""
    from fastres.shapes import PROJECTION_ODD_CASES

    _assert_every_contender_computes(next(c for c in PROJECTION_ODD_CASES if not c.projection.bn))


def test_leaky_relu_layers_are_timed_with_their_slope():
    """TResNet's LeakyReLU(0.001) layers are cases of their own, and every contender and baseline
    applies that slope (checked against float64), not LeakyReLU's default 0.01."""
    from fastres.bench.layers import layer_cases

    cases = layer_cases(["timm:tresnet_m"], 1, 64)
    assert {c.negative_slope for c in cases if c.act == "leaky_relu"} == {0.01, 0.001}
    _assert_every_contender_computes(
        next(c for c in cases if c.negative_slope == 0.001 and c.name.endswith("-leaky_relu(0.001)")))


@pytest.mark.parametrize("name,why", [("resnet", "not a torchvision classification model"),
                                      ("timm:no_such_net", "timm has no model named 'no_such_net'")])
def test_unknown_model_names_are_refused_before_anything_runs(name, why):
    run = _bench("models", "--smoke", "--model", name)
    assert run.returncode == 2 and why in run.stdout
    verify = subprocess.run([sys.executable, "-m", "fastres", "verify", name], capture_output=True, text=True)
    assert verify.returncode == 2 and why in verify.stderr


@pytest.mark.parametrize("content", [None, "not json", '{"rows": []}'], ids=["missing", "not-json", "not-results"])
def test_a_compare_file_it_cannot_read_is_refused_before_anything_runs(content, tmp_path):
    """--compare is read after the run (an hour on a GPU): a path it cannot read is refused first."""
    path = tmp_path / "old.json"
    if content is not None:
        path.write_text(content)
    run = _bench("models", "--smoke", "--compare", str(path), "--out", str(tmp_path))
    said = " ".join(run.stdout.split())  # (rich wraps long lines)
    assert run.returncode == 2 and f"--compare {path} is not a results JSON of fastres bench" in said
    assert not list(tmp_path.glob("models-*")), "nothing ran"


@pytest.mark.parametrize("suite,baseline", [("models", "eager-cll"), ("layers", "eager-cl+graph")])
def test_unknown_baselines_are_refused_before_anything_runs(suite, baseline):
    """A misspelt baseline was timed under its own name as what it fell back to (eager channels_last)."""
    run = _bench(suite, "--smoke", "--baselines", "eager-cl", baseline)
    assert run.returncode == 2 and f"no baseline named {baseline} in the {suite} suite" in run.stdout


GPU_SESSION_STAGES = ["test-first", "test", "test-triton", "test-others", "sanitize", "test-onnx", "layers",
                      "layers-others", "models-256", "models-1", "models-bf16", "models-autotune", "models-timm",
                      "host", "profile"]

# Counts, for each -k expression given, the collected tests it selects, as pytest's -k would.
SELECTED_BY = """
import json, sys
import pytest
from _pytest.mark import KeywordMatcher
from _pytest.mark.expression import Expression

class Items:
    def pytest_collection_finish(self, session):
        self.items = session.items

items = Items()
pytest.main(["--collect-only", "-qq", "-p", "no:cacheprovider", *sys.argv[2:]], plugins=[items])
matchers = [KeywordMatcher.from_item(item) for item in items.items]
print(json.dumps([sum(Expression.compile(e).evaluate(m) for m in matchers) for e in json.loads(sys.argv[1])]))
"""


def _alternatives_and_names(selection: str) -> list[str]:
    """The top-level `or` terms of a -k expression, then each name in it (each must select tests)."""
    terms, depth, start = [], 0, 0
    words = selection.split()
    for i, word in enumerate(words):
        depth += word.count("(") - word.count(")")
        if word == "or" and depth == 0:
            terms.append(" ".join(words[start:i]))
            start = i + 1
    names = {w for w in selection.replace("(", " ").replace(")", " ").split() if w not in ("and", "or", "not")}
    return terms + [" ".join(words[start:])] + sorted(names)


@dataclasses.dataclass
class StandInCall:
    pythonpath: str
    build_cuda: str  # FASTRES_BUILD_CUDA as the call saw it
    argv: list[str]


def _gpu_session(tmp_path: Path, stages: list[str], root: Path,
                 **env: str) -> tuple[subprocess.CompletedProcess, list[StandInCall]]:
    """`gpu_session.sh STAGES` (the copy under `root`) with stand-ins for the GPU image's tools: a
    Python that records each call in order (failing `pip install -e .` when BUILD_FAILS is set),
    nvidia-smi, nvcc, and a compute-sanitizer that runs what follows its own options."""
    calls, fake_bin = tmp_path / "calls", tmp_path / "bin"
    calls.mkdir()
    fake_bin.mkdir()
    tools = {
        "python": f'''#!/bin/bash
printf "%s\\0" "${{PYTHONPATH:-}}" "${{FASTRES_BUILD_CUDA:-}}" "$@" > {calls}/$(printf %04d $(ls {calls} | wc -l))
if [ -n "${{BUILD_FAILS:-}}" ] && [[ " $* " == *" -e . "* ]]; then echo "error: command nvcc failed"; exit 1; fi
''',
        "nvidia-smi": '#!/bin/bash\necho "name, driver_version"\necho "NVIDIA H100 80GB HBM3, 580.159.04"\n',
        "nvcc": '#!/bin/bash\necho "Build cuda_13.0.r13.0/compiler.36424714_0"\n',
        "compute-sanitizer": '#!/bin/bash\nwhile [ $# -gt 0 ] && [ "$1" != "$PY" ]; do shift; done\nexec "$@"\n',
    }
    for name, text in tools.items():
        (fake_bin / name).write_text(text)
        (fake_bin / name).chmod(0o755)
    env = {**os.environ, "PY": str(fake_bin / "python"), "OUT": str(tmp_path / "out"), "CALL_LIMIT": "100000",
           "PATH": f"{fake_bin}:{os.environ['PATH']}", **env}
    env.pop("PYTHONPATH", None)
    run = subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh"), *stages], env=env,
                         capture_output=True, text=True, timeout=120)
    recorded = [path.read_text().split("\0")[:-1] for path in sorted(calls.iterdir())]
    return run, [StandInCall(r[0], r[1], r[2:]) for r in recorded]


def test_every_gpu_session_stage_asks_for_things_that_exist(tmp_path):
    """benchmarks/gpu_session.sh, each stage but setup run with a Python that only records its
    arguments: every `fastres bench` command parses and names known models and baselines, every
    test path exists, and each alternative and each name of every -k selection picks some tests
    (a `not`'s too: misspelt, it would deselect nothing). A typo there costs minutes of a lent
    GPU, and is found only on it."""
    from fastres.cli import _parser, bench_refusal

    repo = Path(__file__).resolve().parent.parent
    run, calls = _gpu_session(tmp_path, GPU_SESSION_STAGES, repo)
    assert run.returncode == 0, run.stdout + run.stderr
    argvs = [call.argv for call in calls]
    benches = [argv[2:] for argv in argvs if argv[:3] == ["-m", "fastres", "bench"]]
    tests = [argv[2:] for argv in argvs if argv[:2] == ["-m", "pytest"]]
    assert len(benches) == 8 and len(tests) == 7
    for argv in benches:
        assert bench_refusal(_parser().parse_args(argv)) is None, argv
    for argv in tests:
        paths = [a for a in argv if a.startswith(("tests/", "benchmarks/"))]
        assert all((repo / path).exists() for path in paths), argv
        if "-k" in argv:
            terms = _alternatives_and_names(argv[argv.index("-k") + 1])
            counted = subprocess.run([sys.executable, "-c", SELECTED_BY, json.dumps(terms), *paths], cwd=repo,
                                     capture_output=True, text=True, timeout=300)
            assert counted.returncode == 0, counted.stdout[-2000:] + counted.stderr[-2000:]
            counts = dict(zip(terms, json.loads(counted.stdout.splitlines()[-1])))
            assert len(counts) > 1 and all(counts.values()), counts


@pytest.mark.parametrize("build_fails", [False, True], ids=["built", "build-fails"])
def test_the_gpu_session_setup_builds_with_the_carried_wheels_and_stops_the_call_if_it_fails(tmp_path, build_fails):
    """`setup` starts every device call: the carried wheels (CUTLASS's headers, setuptools) are
    installed apart and are on PYTHONPATH for the build and every later command, the build makes
    the CUDA extension or fails, and env.txt names the machine, nvcc and the commit. A failed build
    shows its log's end and ends the call: no stage after it spends the GPU's minutes."""
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_session.sh", root / "benchmarks")
    (root / ".whl").mkdir()
    wheels = ["nvidia_cutlass-4.2.0.0-py3-none-any.whl", "setuptools-84.2.1-py3-none-any.whl"]
    for wheel in wheels:
        (root / ".whl" / wheel).touch()
    env = {"FASTRES_COMMIT": "0123abc"} | ({"BUILD_FAILS": "1"} if build_fails else {})
    run, calls = _gpu_session(tmp_path, ["setup", "host"], root, **env)
    install, versions, build, *after = calls
    assert install.argv[:3] == ["-m", "pip", "install"] and "--no-index" in install.argv
    assert versions.argv[0] == "-c" and "setuptools.__version__" in versions.argv[1]
    site = install.argv[install.argv.index("--target") + 1]
    assert sorted(Path(a).name for a in install.argv if a.endswith(".whl")) == wheels
    assert build.argv[:3] == ["-m", "pip", "install"] and build.argv[-2:] == ["-e", "."]
    assert "--no-build-isolation" in build.argv and build.build_cuda == "1"
    assert all(site in call.pythonpath.split(":") for call in (versions, build, *after))
    machine = (tmp_path / "out" / "env.txt").read_text()
    assert "NVIDIA H100" in machine and "cuda_13.0" in machine and "commit 0123abc" in machine
    if build_fails:
        assert run.returncode == 1 and not after
        assert "error: command nvcc failed" in run.stdout and "stage setup failed" in run.stdout
    else:
        assert run.returncode == 0, run.stdout + run.stderr
        check, host = after
        assert check.argv[0] == "-c" and "backend_status" in check.argv[1]
        assert host.argv[:3] == ["-m", "pytest", "-q"] and "benchmarks/bench_host.py" in host.argv


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


def test_a_rebuild_of_the_same_extension_sources_resumes(monkeypatch):
    """Each device call of a GPU session rebuilds the extension, and no two builds are byte-equal
    (nvcc names its temporary files after process ids): the code is named by what it was built
    from, so the next call's --resume goes on; other sources do not."""
    from fastres.backends import cuda

    sources = []
    for build in ("0123456789ab", "0123456789ab", "ba9876543210"):
        monkeypatch.setattr(cuda, "build_digest", lambda: build)
        sources.append(environment(torch.device("cpu"))["source"])
    assert sources[0] == sources[1] != sources[2]


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


NCU_COLUMNS = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
               "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit", "Metric Value"]
GEMM_METRICS = {"Duration": ("ns", "12,500"), "Compute (SM) Throughput": ("%", "81.5"), "DRAM Throughput": ("%", "40.25"),
                "Registers Per Thread": ("register/thread", "168"), "Achieved Occupancy": ("%", "12.3")}
NCU_LAUNCHES = [  # kernel, grid, metrics: what `ncu --csv --page details --print-units base` writes
    ("fastres_profile_marker", "(1, 1, 1)", {"Duration": ("ns", "900")}),
    ("conv_bn_act_kernel", "(392, 1, 1)", GEMM_METRICS),
    ("fastres_profile_marker", "(2, 1, 1)", {"Duration": ("ns", "800")}),
    ("sm90_xmma_fprop", "(98, 2, 1)", {"Duration": ("us", "20.5")}),
    ("elementwise_kernel", "(50, 1, 1)", {"Duration": ("ms", "0.004"), "DRAM Throughput": ("%", "n/a")}),
]


def _ncu_csv(grid_column: bool = True) -> str:
    """NCU_LAUNCHES as ncu's CSV; without the Grid Size column (older ncu), LaunchStats' block count."""
    columns = [c for c in NCU_COLUMNS if grid_column or c != "Grid Size"]
    lines = ["==PROF== Connected to process 7", ",".join(f'"{c}"' for c in columns)]
    for launch, (kernel, grid, metrics) in enumerate(NCU_LAUNCHES):
        if not grid_column:
            metrics = {**metrics, "Grid Size": ("", str(math.prod(int(d) for d in grid.strip("()").split(","))))}
        for name, (unit, value) in metrics.items():
            cells = dict(zip(NCU_COLUMNS, [str(launch), "1", "python3", "h", kernel, "1", "7", "(128, 1, 1)", grid, "0",
                                           "9.0", "S", name, unit, value]))
            lines.append(",".join(f'"{cells[c]}"' for c in columns))
    return "\n".join(lines + ["==PROF== Disconnected from process 7"])


def test_profile_reads_ncu_csv_and_gives_each_region_the_kernels_after_its_marker(tmp_path):
    from fastres.bench.profile import Region, assign, parse_ncu_csv, summarize

    kernels = parse_ncu_csv(_ncu_csv())
    assert [k.name for k in kernels] == [name for name, _, _ in NCU_LAUNCHES]
    assert kernels[1].duration_us == pytest.approx(12.5) and kernels[1].sm_pct == 81.5
    assert kernels[1].registers == 168 and kernels[1].occupancy_pct == 12.3 and kernels[4].dram_pct is None

    fused, unfused = assign(kernels, [Region("c", "fastres-triton", floor_ms=0.01), Region("c", "cudnn", None)])
    assert [k.name for k in fused.kernels] == ["conv_bn_act_kernel"]
    assert fused.duration_us == pytest.approx(12.5) and fused.pct_of_floor == pytest.approx(80.0)
    assert [k.grid for k in unfused.kernels] == ["(98, 2, 1)", "(50, 1, 1)"]
    assert unfused.duration_us == pytest.approx(24.5) and unfused.pct_of_floor is None
    older = assign(parse_ncu_csv(_ncu_csv(grid_column=False)), [Region("c", "a"), Region("c", "b")])
    assert [len(r.kernels) for r in older] == [1, 2]

    (tmp_path / "ncu.csv").write_text(_ncu_csv())  # the files a profiled run leaves, one region's record lost
    (tmp_path / "regions.json").write_text(json.dumps({
        "environment": environment(torch.device("cpu")), "ceilings": None,
        "regions": [{"case": "c", "contender": "fastres-triton", "floor_ms": 0.01}]}))
    summarize(tmp_path)
    saved = json.loads((tmp_path / "profile.json").read_text())["regions"]
    assert [k["name"] for k in saved[0]["kernels"]] == ["conv_bn_act_kernel"] and saved[0]["pct_of_floor"] == 80.0


@pytest.mark.skipif(HAS_CUDA, reason="the CPU path of the profiled run (Triton interpreter, no ncu)")
def test_profile_inner_run_records_a_region_per_contender_that_runs(tmp_path):
    manifest = tmp_path / "regions.json"
    run = subprocess.run([sys.executable, "-m", "fastres.bench.profile", "--manifest", str(manifest), "--smoke",
                          "--cases", "+res", "--contenders", "conv-only", "fastres-triton", "fastres-cuda"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    regions = json.loads(manifest.read_text())["regions"]
    assert [(r["case"], r["contender"]) for r in regions] == [("smoke:c24h7-k40:3x3s1+res", "conv-only"),
                                                              ("smoke:c24h7-k40:3x3s1+res", "fastres-triton")]
    assert "fastres-cuda: not profiled: skipped" in run.stdout
    if shutil.which("ncu") is None:
        assert "(ncu) is not on PATH" in _bench("profile", "--smoke").stdout
