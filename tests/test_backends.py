"""The cudnn and cuda backends, and "auto", against the same float64 reference and case list.

CPU: the cudnn backend's Triton epilogue runs in the interpreter. GPU (`gpu` marker): every
backend on the ResNet-50 / ResNeXt-50 layers at full size and on the odd cases, fp16 and bf16;
a case a backend does not cover must raise NotImplementedError naming why, and "auto" must run it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastres
from fastres import tuning
from fastres.problem import ACTIVATIONS
from fastres.shapes import ODD_CASES, PROJECTION_ODD_CASES, make_inputs, model_cases, model_projection_cases
from helpers import INTERPRETER, assert_matches, call_op, poison_cuda_allocator, reference_for, run_op_case

CPU = torch.device("cpu")
GPU = torch.device("cuda")
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="CPU runs of the Triton kernels need TRITON_INTERPRET=1")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", list(ODD_CASES) + list(model_cases("resnet50", 2, 32)[:6]), ids=str)
def test_cudnn_backend_epilogue(case, dtype):
    # fp16 with a broadcast (stride-0) residual, the others with an NCHW one
    layout = "broadcast" if dtype == torch.float16 else "nchw"
    run_op_case(case.replace(residual=True), dtype, "cudnn", CPU, residual_layout=layout)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)  # float64: each constant exact
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_cudnn_backend_activations(act, dtype):
    run_op_case(ODD_CASES[1].replace(act=act, residual=True), dtype, "cudnn", CPU)


@needs_interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's -inf * 0
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # and its 1e30 squared
@pytest.mark.parametrize("backend", ["triton", "cudnn", "reference"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_nan_and_inf_through_every_activation_as_in_eager(act, backend):
    """Each epilogue's activation lets NaN through and maps +-Inf, and finite values whose cube
    overflows float32 (GELU's tanh form takes one), where eager's does."""
    x = torch.randn(1, 4, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    w = torch.randn(8, 4, 1, 1).abs()
    residual = torch.randn(1, 8, 5, 5)
    residual[0, 3, 4, 4], residual[0, 5, 0, 0] = float("-inf"), float("inf")
    residual[0, 2, 1, 1], residual[0, 6, 3, 3] = 1e30, -1e30
    out = fastres.ops.conv_bn_act(x, w, residual=residual, act=act, backend=backend)
    # The reference backend is eager float32 on the CPU, whose GELU maps +Inf to NaN (float64's: +Inf).
    compute = torch.float32 if backend == "reference" else torch.float64
    ref = torch.nn.functional.conv2d(x.to(compute), w.to(compute)) + residual.to(compute)
    ref = fastres.numerics.activate(ref, act)
    assert torch.isnan(out).any()
    torch.testing.assert_close(out, ref.float(), equal_nan=True)  # float32 tolerances


# --- projected residuals: fused where a backend can, two calls where it cannot ---------------

PROJECTION_CASES = list(model_projection_cases("resnet50", 2, 32)[:2]) + list(PROJECTION_ODD_CASES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", PROJECTION_CASES, ids=str)
def test_reference_backend_projected_residual(case, dtype):
    run_op_case(case, dtype, "reference", CPU)


@needs_interpreter
@pytest.mark.parametrize("case", PROJECTION_CASES, ids=str)
def test_cudnn_backend_runs_a_projection_as_two_calls(case, monkeypatch):
    from fastres.backends import cudnn

    calls = []
    real = cudnn.run
    monkeypatch.setattr(cudnn, "run", lambda problem, *args: calls.append(problem) or real(problem, *args))
    run_op_case(case, torch.float32, "cudnn", CPU)
    assert [c.projection for c in calls] == [None, None] and [c.has_residual for c in calls] == [False, True]
    assert (calls[0].c, calls[0].k, calls[0].r, calls[0].act) == (case.projection.c, case.k, 1, "none")


@needs_interpreter
@pytest.mark.parametrize("candidates", [["split", "triton"], ["triton", "split"]])
def test_auto_times_the_fused_kernel_against_two_calls(candidates, monkeypatch):
    """A projected call's "auto" candidates are the two calls (each by "auto") and every backend that
    fuses it; the faster is remembered under the projected problem's key, and then reused."""
    from fastres import backends, tuning

    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    monkeypatch.setattr(backends, "_auto_candidates", lambda device, problem: list(candidates)
                        if problem.projection is not None else ["reference"])
    case = PROJECTION_ODD_CASES[0]
    run_op_case(case, torch.float32, "auto", CPU)
    inputs = make_inputs(case, torch.float32)
    problem = inputs.problem(case)
    chosen = tuning.lookup(CPU, "auto", problem.key)
    assert chosen in candidates
    other = next(c for c in candidates if c != chosen)
    monkeypatch.setattr(backends, "_auto_candidates", lambda device, problem: [other])
    assert backends.choose(problem, CPU, ()) == chosen


@needs_interpreter
def test_auto_never_picks_a_backend_whose_answers_are_wrong(monkeypatch):
    """auto checks each backend against float64 before timing it: the fastest, if wrong, is
    skipped with a warning (a CPU stand-in: triton and cudnn in the interpreter)."""
    from fastres import backends
    from fastres.backends import cudnn

    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    monkeypatch.setattr(backends, "_auto_candidates", lambda device, problem: ["triton", "cudnn"])
    real, wrong_runs = cudnn.run, []
    monkeypatch.setattr(cudnn, "run", lambda *args: (wrong_runs.append(1), real(*args).mul_(1.05))[1])

    def time_ms(fn, device):  # cudnn would be the fastest
        before = len(wrong_runs)
        fn()
        return 1.0 if len(wrong_runs) > before else 2.0

    monkeypatch.setattr(tuning, "time_ms", time_ms)
    case = ODD_CASES[1].replace(residual=True)
    with pytest.warns(RuntimeWarning, match="auto candidate cudnn for .* differ from float64 by up to"):
        run_op_case(case, torch.float32, "auto", CPU)
    assert tuning.lookup(CPU, "auto", make_inputs(case, torch.float32).problem(case).key) == "triton"


def test_auto_on_cpu_fuses_the_projection_in_the_reference():
    from fastres import backends

    case = PROJECTION_ODD_CASES[0]
    inputs = make_inputs(case, torch.float32)
    problem = inputs.problem(case)
    assert backends._auto_candidates(CPU, problem) == ["reference"]
    assert "-proj[" in problem.key and problem.projection.key in problem.key and problem.main.projection is None


def test_tuned_by_names_what_a_first_call_will_tune(monkeypatch):
    """What fastres.precompile compiles ahead for a backend: the problems that backend will tune
    when a call first runs, following run() and choose() ("auto" splitting a projected call into
    two calls, each by "auto", and trying the fused kernel; nothing for a remembered other choice;
    only the first candidate without timing)."""
    from fastres import backends

    gpu = CPU  # standing in for a GPU (backends' availability patched below); nothing runs
    monkeypatch.setenv("FASTRES_AUTOTUNE", "1")
    monkeypatch.setattr(backends, "_runs", lambda name, problem, device: name == "split" and problem.projection
                        is not None or name in ("cudnn", "cuda", "triton"))
    monkeypatch.setattr(backends, "_auto_candidates", lambda device, problem: (["split", "triton"] if problem.projection
                        is not None else ["cudnn", "cuda", "triton"]))
    plain = make_inputs(ODD_CASES[1], torch.float16, "meta").problem(ODD_CASES[1])
    projected = make_inputs(PROJECTION_ODD_CASES[0], torch.float16, "meta").problem(PROJECTION_ODD_CASES[0])

    assert backends.tuned_by("triton", "auto", plain, gpu) == [plain]
    assert backends.tuned_by("triton", "auto", projected, gpu) == [projected.projection, projected.main, projected]
    assert backends.tuned_by("cuda", "auto", projected, gpu) == [projected.projection, projected.main]
    assert backends.tuned_by("triton", "triton", projected, gpu) == [projected]
    assert backends.tuned_by("triton", "cudnn", plain, gpu) == []
    tuning.remember(gpu, "auto", plain.key, "cudnn")
    assert backends.tuned_by("triton", "auto", plain, gpu) == []
    monkeypatch.setenv("FASTRES_AUTOTUNE", "0")
    assert backends.tuned_by("cudnn", "auto", projected.main, gpu) == [projected.main]
    assert backends.tuned_by("triton", "auto", projected.main, gpu) == []


# --- GPU matrix ----------------------------------------------------------------------------

GPU_CASES = list(model_cases("resnet50", 32, 224)) + list(model_cases("resnext50_32x4d", 32, 224)) + [
    c.replace(residual=True) for c in ODD_CASES
] + list(model_projection_cases("resnet50", 32, 224)) + list(PROJECTION_ODD_CASES)


def _run_gpu(case, dtype, backend):
    inputs = make_inputs(case, dtype, GPU)
    p, q = case.output_hw
    poison_cuda_allocator(case.n * case.k * p * q * inputs.x.element_size(), GPU)
    out = call_op(case, inputs, backend=backend)
    assert_matches(out, reference_for(case, inputs, inputs.residual), case, dtype, inputs.gain)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "cudnn", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_backend_matrix(case, dtype, backend):
    from fastres.backends import _BACKENDS

    problem_reason = None
    if backend != "auto":
        inputs = make_inputs(case, dtype, GPU)
        problem = inputs.problem(case)
        # A backend that does not fuse a projection runs it as two calls: either may be unsupported.
        halves = [problem] if problem.projection is None else [problem.projection, problem.main]
        problem_reason = next((r for h in halves if (r := _BACKENDS[backend].unsupported_reason(h, GPU))), None)
    if problem_reason is not None:
        with pytest.raises(NotImplementedError, match="does not support"):
            _run_gpu(case, dtype, backend)
    else:
        _run_gpu(case, dtype, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cudnn"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gpu_every_activation_compiled(act, backend, dtype):
    """The CPU tests run each epilogue activation in the Triton interpreter; here each runs compiled
    (erf, exp, the constexpr slope) in both Triton epilogues, the GEMM's and cudnn's."""
    _run_gpu(ODD_CASES[1].replace(act=act, residual=True), dtype, backend)


# Tuning runs one kernel per shape, so the matrix above may leave some CUTLASS kernels unrun;
# here every kernel that runs on the device meets the cases it accepts, with and without a
# residual, every epilogue clamp, and no scale/shift (the kernels' defaults of 1 and 0).
CUTLASS_KERNEL_CASES = [
    *model_cases("resnet50", 8, 224)[1:6],
    *model_cases("resnet50", 3, 224)[-4:],
    *(c.replace(residual=True, act=act) for c, act in zip(ODD_CASES, ["relu6", "none", "relu", "relu6"] * 3)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", range(8))
def test_gpu_every_cutlass_kernel(config, dtype):
    from fastres.backends import cuda

    arch = cuda._arch(GPU)
    names = cuda.configs(dtype, arch)
    if config >= len(names):
        pytest.skip(f"sm_{arch} has {len(names)} CUTLASS kernels for {dtype}")
    ran = 0
    for case in CUTLASS_KERNEL_CASES:
        inputs = make_inputs(case, dtype, GPU)
        problem = inputs.problem(case)
        if config not in cuda.usable_configs(problem, arch):
            continue
        p, q = case.output_hw
        poison_cuda_allocator(case.n * case.k * p * q * inputs.x.element_size(), GPU)
        no_bn = ran % 4 == 3
        out = torch.ops.fastres.cutlass_conv_bn_act(
            inputs.x, inputs.weight, None if no_bn else inputs.scale, None if no_bn else inputs.shift,
            inputs.residual, list(case.stride), list(case.padding), list(case.dilation), case.groups, case.act, config,
        )
        ref = reference_for(case, dataclasses.replace(inputs, bn=None) if no_bn else inputs, inputs.residual)
        assert_matches(out, ref, case, dtype, torch.ones_like(inputs.scale) if no_bn else inputs.scale)
        ran += 1
    assert ran >= len(CUTLASS_KERNEL_CASES) // 2, f"{names[config]} accepted only {ran} cases"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_cutlass_out_form_writes_every_element_of_the_output_given(dtype):
    """Tuning's float64 check runs each CUTLASS kernel into one output it has poisoned with NaN
    (the op's `out` form): every kernel fills all of it with the right values, and an output of
    another size is refused."""
    from fastres.backends import cuda

    case = CUTLASS_KERNEL_CASES[0]
    inputs = make_inputs(case, dtype, GPU)
    args = (inputs.x, inputs.weight, inputs.scale, inputs.shift, inputs.residual, list(case.stride),
            list(case.padding), list(case.dilation), case.groups, case.act)
    p, q = case.output_hw
    configs = cuda.usable_configs(inputs.problem(case), cuda._arch(GPU))
    assert configs
    for config in configs:
        out = torch.full((case.n, case.k, p, q), float("nan"), dtype=dtype, device=GPU)
        out = out.contiguous(memory_format=torch.channels_last)
        returned = torch.ops.fastres.cutlass_conv_bn_act.out(*args, config, out=out)
        assert returned.data_ptr() == out.data_ptr()
        assert_matches(out, reference_for(case, inputs, inputs.residual), case, dtype, inputs.scale)
    too_tall = torch.empty((case.n, case.k, p + 1, q), dtype=dtype, device=GPU, memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="Expected out of size"):
        torch.ops.fastres.cutlass_conv_bn_act.out(*args, configs[0], out=too_tall)


@pytest.mark.gpu
@pytest.mark.parametrize("residual_layout", ["nchw", "broadcast"])
@pytest.mark.parametrize("backend", ["cuda", "triton", "cudnn"])
def test_gpu_non_default_stream_and_layouts(backend, residual_layout):
    case = model_cases("resnet50", 8, 224)[4]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run_op_case(case, torch.float16, backend, GPU, layout="nchw", residual_layout=residual_layout)
    stream.synchronize()


def _at_odd_offset(t: torch.Tensor) -> torch.Tensor:
    """The same values, dense in t's layout, but starting one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:]
    if t.dim() == 1:
        return flat.copy_(t)
    view = flat.view(t.shape[0], t.shape[2], t.shape[3], t.shape[1]).permute(0, 3, 1, 2)
    return view.copy_(t)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "cudnn"])
def test_gpu_operands_at_odd_storage_offsets(backend):
    """Views that start off a 16-byte boundary (vector and TMA loads need one) still give the
    right answer: the cuda backend copies them to aligned memory first."""
    case = model_cases("resnet50", 4, 224)[4]
    inputs = make_inputs(case, torch.float16, GPU)
    x, weight, residual = (_at_odd_offset(t) for t in (inputs.x, inputs.weight, inputs.residual))
    scale, shift = _at_odd_offset(inputs.scale), _at_odd_offset(inputs.shift)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16 == 2
    out = fastres.ops.conv_bn_act(x, weight, scale, shift, residual, stride=case.stride, padding=case.padding,
                                  **case.act_kwargs, backend=backend)
    assert_matches(out, reference_for(case, inputs, inputs.residual), case, torch.float16, inputs.scale)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
@pytest.mark.parametrize("current", [1, 0], ids=["current", "not current"])
@pytest.mark.parametrize("backend", ["cuda", "triton", "cudnn"])
def test_gpu_second_device(backend, current):
    """Tensors on cuda:1, whichever device is current (a serving thread's is the default 0)."""
    with torch.cuda.device(current):
        run_op_case(model_cases("resnet50", 8, 224)[4], torch.float16, backend, torch.device("cuda", 1))


def test_a_call_makes_its_tensors_cuda_device_current(monkeypatch):
    """Triton launches and tuning times on the thread's current CUDA device, not the tensors': a
    call on another device runs with its own device current (checked here with stand-ins; on two
    GPUs by test_gpu_second_device)."""
    from fastres import backends

    class OnCuda:  # a CUDA tensor's stand-in
        is_cuda = True

        def __init__(self, index: int) -> None:
            self.index = index

        def get_device(self) -> int:
            return self.index

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert backends.other_cuda_device(OnCuda(1)) == 1
    assert backends.other_cuda_device(OnCuda(0)) is None
    assert backends.other_cuda_device(torch.zeros(1)) is None

    current = []

    class Device:  # torch.cuda.device's stand-in
        def __init__(self, index: int) -> None:
            self.index = index

        def __enter__(self) -> None:
            current.append(self.index)

        def __exit__(self, *exc) -> None:
            current.pop()

    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(backends, "other_cuda_device", lambda x: 1)
    during = []
    reference_run = backends.reference.run
    monkeypatch.setattr(backends.reference, "run", lambda *args: during.append(list(current)) or reference_run(*args))
    case = PROJECTION_ODD_CASES[0]
    inputs = make_inputs(case, torch.float32)
    with torch.no_grad():
        out = call_op(case, inputs, backend="reference")
    assert during == [[1]] and current == []
    torch.testing.assert_close(out, call_op(case, inputs, backend="reference"))


@pytest.mark.gpu
def test_gpu_auto_inside_cuda_graph_capture_does_not_tune():
    """Capture never times candidates (illegal while capturing); replay gives the right answer."""
    case = model_cases("resnet50", 4, 224)[4]
    inputs = make_inputs(case, torch.float16, GPU)
    kwargs = dict(stride=case.stride, padding=case.padding, **case.act_kwargs)
    fastres.ops.conv_bn_act(*inputs.op_args(), **kwargs)  # warm-up, outside capture: may tune
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        assert not tuning.may_time(GPU)
        out = fastres.ops.conv_bn_act(*inputs.op_args(), **kwargs)
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(out, reference_for(case, inputs, inputs.residual), case, torch.float16, inputs.scale)
