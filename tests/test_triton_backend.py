"""The Triton backend against the float64 reference.

On CPU-only machines the very same kernels run in the Triton interpreter on the model layers at
a 32x32 input image (every channel count and kernel shape, small spatial extents) and on the odd
cases; on a GPU the `gpu` tests run the layers at batch 32, 224x224, in fp16, bf16 and fp32.
Kernel-level checks write into NaN-poisoned outputs, so an unwritten element fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastres
from fastres.kernels import conv_bn_act as gemm_kernel
from fastres.kernels import depthwise as depthwise_kernel
from fastres.numerics import reference_conv_bn_act
from fastres.problem import ConvProblem
from fastres.shapes import (MODEL_ARCHS, ODD_CASES, PROJECTION_ODD_CASES, ConvCase, make_inputs, model_cases,
                            model_projection_cases)
from fastres.numerics import conv_tf32
from helpers import INTERPRETER, assert_matches, reference_for, relayout, run_op_case


def _distinct(cases) -> list[ConvCase]:
    seen, out = set(), []
    for case in cases:
        key = case.replace(name="")
        if key not in seen:
            seen.add(key)
            out.append(case)
    return out


CPU_MODEL_CASES = _distinct(c for arch in MODEL_ARCHS for c in model_cases(arch, batch=2, image=32))
GPU_MODEL_CASES = _distinct(c for arch in MODEL_ARCHS for c in model_cases(arch, batch=32, image=224))
CPU_PROJECTION_CASES = _distinct(c for arch in MODEL_ARCHS for c in model_projection_cases(arch, batch=2, image=32))
GPU_PROJECTION_CASES = _distinct(c for arch in MODEL_ARCHS for c in model_projection_cases(arch, batch=32, image=224))
CPU = torch.device("cpu")
needs_interpreter = pytest.mark.skipif(not INTERPRETER, reason="CPU runs of the Triton kernels need TRITON_INTERPRET=1")


def run_kernel_case(
    case: ConvCase,
    dtype: torch.dtype,
    device: torch.device,
    config=None,
    index_64: bool | None = None,
    layout: str = "channels_last",
    seed: int = 0,
) -> None:
    """Launch the kernel for `case` into a NaN-filled output and compare with the float64 reference."""
    inputs = make_inputs(case, dtype, device, seed)
    x = relayout(inputs.x, layout)
    problem = ConvProblem.from_tensors(
        x, inputs.weight, inputs.scale, inputs.shift, inputs.residual,
        case.stride, case.padding, case.dilation, case.groups, case.act, inputs.projection,
    )
    out = torch.full(problem.output_shape, math.nan, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    args = (x, inputs.weight, inputs.scale, inputs.shift, inputs.residual, out)
    if problem.is_depthwise:
        depthwise_kernel.launch(problem, config or depthwise_kernel.heuristic(problem), *args)
    else:
        gemm_kernel.launch(problem, config or gemm_kernel.heuristic(problem), *args, index_64=index_64,
                           projection=inputs.projection)
    assert_matches(out, reference_for(case, inputs, inputs.residual), case, dtype, inputs.gain)


# --- CPU, Triton interpreter -------------------------------------------------------------

@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CPU_MODEL_CASES, ids=str)
def test_model_layers(case, dtype):
    run_kernel_case(case, dtype, CPU)


# Residual on/off x relu/none in both dtypes, plus the other activations once each.
EPILOGUES = [
    (residual, act, dtype)
    for residual in (True, False) for act in ("relu", "none") for dtype in (torch.float32, torch.float16)
] + [(True, "relu6", torch.float32), (True, "silu", torch.float32)]


@needs_interpreter
@pytest.mark.parametrize("residual,act,dtype", EPILOGUES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("case", ODD_CASES, ids=str)
def test_odd_cases_and_epilogues(case, residual, act, dtype):
    run_kernel_case(case.replace(residual=residual, act=act), dtype, CPU, seed=3)


LAYOUT_CASES = [ODD_CASES[1], ODD_CASES[5], ODD_CASES[8]]  # 3x3, 1x1 plain GEMM, depthwise


@needs_interpreter
@pytest.mark.parametrize("residual_layout", ["channels_last", "nchw", "strided"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "strided"])
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_layouts_through_the_op(case, layout, residual_layout):
    """NCHW inputs, non-contiguous views, and residuals in any layout, through the public op."""
    run_op_case(case.replace(residual=True), torch.float16, "triton", CPU, layout=layout, residual_layout=residual_layout)


@needs_interpreter
@pytest.mark.parametrize("case", [c for c in CPU_MODEL_CASES if c.residual and c.c == c.k and c.stride == (1, 1)], ids=str)
def test_residual_aliasing_x(case):
    run_op_case(case, torch.float16, "triton", CPU, residual_alias=True)


@needs_interpreter
@pytest.mark.parametrize("config", gemm_kernel.CONFIGS, ids=lambda c: f"{c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K}")
@pytest.mark.parametrize("case", [ODD_CASES[2], ODD_CASES[5]], ids=str)
def test_every_gemm_config(case, config):
    """Every tile config handles residues at every edge (M, N and the channel reduction)."""
    run_kernel_case(case.replace(residual=True), torch.float16, CPU, config=config)


@needs_interpreter
@pytest.mark.parametrize("config", depthwise_kernel.CONFIGS, ids=lambda c: f"{c.BLOCK_M}x{c.BLOCK_N}")
def test_every_depthwise_config(config):
    run_kernel_case(ODD_CASES[9].replace(residual=True), torch.float32, CPU, config=config)


@needs_interpreter
@pytest.mark.parametrize("case", [ODD_CASES[1], ODD_CASES[5], CPU_MODEL_CASES[0]], ids=str)
def test_int64_indexing_path(case):
    run_kernel_case(case.replace(residual=True), torch.float16, CPU, index_64=True)


def test_int64_indexing_is_chosen_past_2_31_elements():
    small = torch.empty(2, 8, 4, 4)
    assert not gemm_kernel.needs_int64(small, None)
    big = torch.empty(1, 8, 2**14, 2**14 + 1, device="meta")  # > 2**31 elements, no memory
    assert gemm_kernel.needs_int64(small, big)
    strided = torch.empty(1, 1, 1, 1, device="meta").as_strided((1, 2, 1, 1), (1, 2**31, 1, 1))
    assert gemm_kernel.needs_int64(strided)


@needs_interpreter
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_problems(data):
    groups = data.draw(st.sampled_from([1, 1, 2, 4]), label="groups")
    cg = data.draw(st.integers(1, 20), label="C per group")
    kg = data.draw(st.integers(1, 24), label="K per group")
    r = data.draw(st.integers(1, 5), label="R")
    s = data.draw(st.integers(1, 5), label="S")
    stride = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    dilation = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)))
    padding = (data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2)))
    h = data.draw(st.integers(max(1, dilation[0] * (r - 1) + 1 - 2 * padding[0]), 12), label="H")
    w = data.draw(st.integers(max(1, dilation[1] * (s - 1) + 1 - 2 * padding[1]), 12), label="W")
    case = ConvCase(
        "random", data.draw(st.integers(1, 3), label="N"), cg * groups, h, w, kg * groups, r, s,
        stride, padding, dilation, groups, data.draw(st.booleans(), label="residual"),
        data.draw(st.sampled_from(["none", "relu"]), label="act"),
    )
    run_kernel_case(case, data.draw(st.sampled_from([torch.float32, torch.float16])), CPU,
                    seed=data.draw(st.integers(0, 2**16)))


# --- split-K (few output tiles: batch 1, late layers) ----------------------------------------

SPLIT_CASES = [ODD_CASES[1], ODD_CASES[5], ODD_CASES[6], ODD_CASES[7], CPU_MODEL_CASES[-1]]


@needs_interpreter
@pytest.mark.parametrize("split", [2, 3, 16])  # 3: uneven shares; 16: more splits than steps (empty ones)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=str)
def test_split_k(case, split):
    config = gemm_kernel.Config(64, 64, 32, 8, 4, 3, SPLIT_K=split)
    run_kernel_case(case.replace(residual=True), torch.float16, CPU, config=config, seed=7)


@needs_interpreter
@pytest.mark.parametrize("act", ["none", "relu6", "silu"])
def test_split_k_epilogues_and_layouts(act):
    config = gemm_kernel.Config(64, 64, 32, 8, 4, 3, SPLIT_K=4)
    run_kernel_case(ODD_CASES[3].replace(residual=True, act=act), torch.float32, CPU, config=config, layout="nchw")
    run_kernel_case(ODD_CASES[3].replace(residual=False, act=act), torch.float32, CPU, config=config)


def test_split_k_is_a_candidate_only_where_tiles_are_few():
    late = next(c for c in model_cases("resnet50", batch=1, image=224) if c.name.endswith("c512h7-k512:3x3s1"))
    early = next(c for c in model_cases("resnet50", batch=32, image=224) if c.name.endswith("c64h56-k64:3x3s1"))
    splits = {}
    for case in (late, early):
        inputs = make_inputs(case, torch.float16, "meta")
        problem = inputs.problem(case)
        splits[case.name] = [c.SPLIT_K for c in gemm_kernel.candidates(problem, CPU) if c.SPLIT_K > 1]
    assert splits[late.name] and max(splits[late.name]) >= 8
    assert splits[early.name] == []


def test_split_k_never_takes_a_projection():
    case = model_projection_cases("resnet50", batch=1, image=64)[-1]
    inputs = make_inputs(case, torch.float16)
    problem = inputs.problem(case)
    assert all(c.SPLIT_K == 1 for c in gemm_kernel.candidates(problem, CPU))


# --- projected residuals (a downsample branch in the same kernel) ---------------------------

@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CPU_PROJECTION_CASES + list(PROJECTION_ODD_CASES), ids=str)
def test_projected_residual(case, dtype):
    run_kernel_case(case, dtype, CPU, seed=5)


@needs_interpreter
@pytest.mark.parametrize("config", gemm_kernel.CONFIGS, ids=lambda c: f"{c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K}")
def test_projected_residual_every_config(config):
    """Also the configs tuning skips for projections (too many registers on a GPU): the
    arithmetic is the same at every tile, edges in M, N and both reductions included."""
    run_kernel_case(PROJECTION_ODD_CASES[0], torch.float16, CPU, config=config)


def test_projection_tuning_keeps_both_accumulators_in_registers():
    case = model_projection_cases("resnet50", batch=2, image=64)[1]  # 128 -> 512 channels, + 256 projected
    inputs = make_inputs(case, torch.float16)
    args = (inputs.x, inputs.weight, inputs.scale, inputs.shift, inputs.residual, (1, 1), (0, 0), (1, 1), 1, "relu")
    projected = ConvProblem.from_tensors(*args, inputs.projection)
    plain = ConvProblem.from_tensors(*args[:4], None, *args[5:])
    fits = lambda c: c.BLOCK_M * c.BLOCK_N <= 64 * 32 * c.num_warps  # noqa: E731 - 64 fp32 values per thread
    kept = gemm_kernel.candidates(projected, CPU)
    assert kept and all(fits(c) for c in kept)
    assert len(kept) < len(gemm_kernel.candidates(plain, CPU))
    assert fits(gemm_kernel.heuristic(projected))


@needs_interpreter
def test_triton_backend_fuses_the_projection_into_one_launch(monkeypatch):
    launches = []
    real = gemm_kernel.launch
    monkeypatch.setattr(gemm_kernel, "launch", lambda *a, **kw: launches.append(kw.get("projection")) or real(*a, **kw))
    run_op_case(PROJECTION_ODD_CASES[0], torch.float32, "triton", CPU)
    assert len(launches) == 1 and launches[0] is not None


@needs_interpreter
@pytest.mark.parametrize("layout", ["nchw", "strided"])
def test_projected_residual_layouts(layout):
    run_op_case(PROJECTION_ODD_CASES[1], torch.float16, "triton", CPU, layout=layout, residual_layout=layout)


@needs_interpreter
@pytest.mark.parametrize("case", [PROJECTION_ODD_CASES[0], CPU_PROJECTION_CASES[1]], ids=str)
def test_projected_residual_int64_indexing(case):
    run_kernel_case(case, torch.float16, CPU, index_64=True)


@needs_interpreter
def test_bfloat16_in_the_interpreter_is_refused_not_wrong():
    inputs = make_inputs(ODD_CASES[0], torch.bfloat16)
    with pytest.raises(NotImplementedError, match="bfloat16"):
        fastres.ops.conv_bn_act(*inputs.op_args(), padding=1, backend="triton")


# --- GPU ---------------------------------------------------------------------------------

GPU = torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", GPU_MODEL_CASES, ids=str)
def test_gpu_model_layers_full_size(case, dtype):
    run_kernel_case(case, dtype, GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_PROJECTION_CASES + list(PROJECTION_ODD_CASES), ids=str)
def test_gpu_projected_residual(case, dtype):
    with conv_tf32(False):
        run_kernel_case(case, dtype, GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [GPU_PROJECTION_CASES[1], PROJECTION_ODD_CASES[0]], ids=str)
def test_gpu_projected_residual_every_candidate(case):
    """Each config tuning may pick for a projection compiles and runs (registers, shared memory)."""
    inputs = make_inputs(case, torch.float16, GPU)
    problem = inputs.problem(case)
    for config in gemm_kernel.candidates(problem, GPU):
        run_kernel_case(case, torch.float16, GPU, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [c.replace(residual=True) for c in model_cases("resnet50", batch=1, image=224)[-4:]], ids=str)
def test_gpu_split_k_candidates_at_batch_1(case, dtype):
    """Every split-K config tuning may time on a batch-1 late layer gives the right answer."""
    inputs = make_inputs(case, dtype, GPU)
    problem = inputs.problem(case)
    splits = [c for c in gemm_kernel.candidates(problem, GPU) if c.SPLIT_K > 1]
    assert splits
    for config in splits:
        run_kernel_case(case, dtype, GPU, config=config)


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
@pytest.mark.parametrize("case", GPU_MODEL_CASES[::4], ids=str)
def test_gpu_float32(case, tf32):
    with conv_tf32(tf32):
        inputs = make_inputs(case, torch.float32, GPU)
        out = fastres.ops.conv_bn_act(*inputs.op_args(), stride=case.stride, padding=case.padding,
                                      groups=case.groups, act=case.act, backend="triton")
        assert_matches(out, reference_for(case, inputs, inputs.residual), case, torch.float32, inputs.scale, tf32=tf32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", ODD_CASES, ids=str)
def test_gpu_odd_cases(case, dtype):
    with conv_tf32(False):
        run_kernel_case(case.replace(residual=True), dtype, GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "strided"])
def test_gpu_layouts_and_alias(layout):
    case = GPU_MODEL_CASES[2].replace(residual=True)
    run_op_case(case, torch.float16, "triton", GPU, layout=layout, residual_layout=layout)
    square = next(c for c in GPU_MODEL_CASES if c.residual and c.c == c.k and c.stride == (1, 1))
    run_op_case(square, torch.float16, "triton", GPU, residual_alias=True)


@pytest.mark.gpu
def test_gpu_non_default_stream():
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run_op_case(GPU_MODEL_CASES[3], torch.float16, "triton", GPU)
    stream.synchronize()


@pytest.mark.gpu
def test_gpu_past_2_31_elements():
    """A 1x1 conv over an input of more than 2**31 elements (4.3 GB of fp16) needs int64 offsets.
    A 1x1 conv's output pixel depends on its input pixel alone, so the last rows (past 2**31)
    are checked against the reference computed on those rows only."""
    n, c, h, w, k = 1, 8, 2**14, 2**14 + 64, 8
    x = torch.randn(n, c, h, w, device=GPU, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(k, c, 1, 1, device=GPU, dtype=torch.float16) * 0.3
    scale, shift = torch.rand(k, device=GPU) + 0.5, torch.randn(k, device=GPU)
    problem = ConvProblem.from_tensors(x, weight, scale, shift, None, (1, 1), (0, 0), (1, 1), 1, "relu")
    assert gemm_kernel.needs_int64(x)
    out = torch.full(problem.output_shape, math.nan, dtype=torch.float16, device=GPU)
    out = out.contiguous(memory_format=torch.channels_last)
    gemm_kernel.launch(problem, gemm_kernel.heuristic(problem), x, weight, scale, shift, None, out)
    assert not torch.isnan(out).any()
    tail = slice(h - 2, h)
    ref = reference_conv_bn_act(x[:, :, tail], weight, scale=scale, shift=shift, act="relu")
    case = ConvCase("huge", n, c, 2, w, k, 1, 1)
    assert_matches(out[:, :, tail], ref, case, torch.float16, scale)
