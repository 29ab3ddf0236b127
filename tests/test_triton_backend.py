"""The Triton backend against the float64 reference.

On CPU-only machines the very same kernels run in the Triton interpreter on the model layers at
a 32x32 input image (every channel count and kernel shape, small spatial extents) and on the odd
cases; on a GPU the `gpu` tests run the layers at batch 32, 224x224, in fp16, bf16 and fp32.
Kernel-level checks write into NaN-poisoned outputs, so an unwritten element fails.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastres
from fastres.kernels import compile_ahead
from fastres.kernels import conv_bn_act as gemm_kernel
from fastres.kernels import depthwise as depthwise_kernel
from fastres.numerics import reference_conv_bn_act
from fastres.problem import ACTIVATIONS, ConvProblem
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
    compile_only: bool = False,
) -> None:
    """Launch the kernel for `case` into a NaN-filled output and compare with the float64 reference
    (compile_only: compile what that launch needs, as tuning's compile_ahead does, and stop)."""
    inputs = make_inputs(case, dtype, device, seed)
    x = relayout(inputs.x, layout)
    problem = ConvProblem.from_tensors(
        x, inputs.weight, inputs.scale, inputs.shift, inputs.residual,
        case.stride, case.padding, case.dilation, case.groups, case.act, inputs.projection, case.negative_slope,
    )
    out = torch.full(problem.output_shape, math.nan, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    args = (x, inputs.weight, inputs.scale, inputs.shift, inputs.residual, out)
    if problem.is_depthwise:
        depthwise_kernel.launch(problem, config or depthwise_kernel.heuristic(problem), *args, compile_only=compile_only)
    else:
        gemm_kernel.launch(problem, config or gemm_kernel.heuristic(problem), *args, index_64=index_64,
                           projection=inputs.projection, compile_only=compile_only)
    if compile_only:
        return
    assert_matches(out, reference_for(case, inputs, inputs.residual), case, dtype, inputs.gain)


def run_every_config(case: ConvCase, dtype: torch.dtype, device: torch.device, configs, **kwargs) -> None:
    """run_kernel_case at each config, all of them compiled in parallel first (as tuning does)."""
    compile_ahead(functools.partial(run_kernel_case, case, dtype, device, config=c, compile_only=True, **kwargs)
                  for c in configs)
    for config in configs:
        run_kernel_case(case, dtype, device, config=config, **kwargs)


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
] + [(True, act, torch.float32) for act in ACTIVATIONS if act not in ("relu", "none")]


@needs_interpreter
@pytest.mark.parametrize("residual,act,dtype", EPILOGUES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("case", ODD_CASES, ids=str)
def test_odd_cases_and_epilogues(case, residual, act, dtype):
    run_kernel_case(case.replace(residual=residual, act=act), dtype, CPU, seed=3)


LAYOUT_CASES = [ODD_CASES[1], ODD_CASES[5], ODD_CASES[8]]  # 3x3, 1x1 plain GEMM, depthwise


@needs_interpreter
@pytest.mark.parametrize("residual_layout", ["channels_last", "nchw", "strided", "broadcast"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "strided"])
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=str)
def test_layouts_through_the_op(case, layout, residual_layout):
    """NCHW inputs, non-contiguous views, and residuals in any layout, through the public op;
    a broadcast residual (stride 0) is what fastres.optimize passes for a position embedding."""
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
@pytest.mark.parametrize("act", [a for a in ACTIVATIONS if a != "relu"])
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


def test_split_k_refuses_a_workspace_past_32_bit_offsets():
    case = ConvCase("wide", 1, 8, 2**12, 2**12, 64, 1, 1)  # 2 splits x 2**24 pixels x 64 channels = 2**31
    inputs = make_inputs(case, torch.float16, "meta")
    problem = inputs.problem(case)
    out = torch.empty(problem.output_shape, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="past 2\\*\\*31"):
        gemm_kernel.launch(problem, gemm_kernel.Config(64, 64, 32, 8, 4, 3, SPLIT_K=2), inputs.x, inputs.weight,
                           inputs.scale, inputs.shift, None, out)


def test_split_k_never_takes_a_projection():
    case = model_projection_cases("resnet50", batch=1, image=64)[-1]
    inputs = make_inputs(case, torch.float16)
    problem = inputs.problem(case)
    assert all(c.SPLIT_K == 1 for c in gemm_kernel.candidates(problem, CPU))


def test_tuning_rounds_time_tiles_then_loop_variants_of_the_fastest():
    """First round: plain tiles. Second round, per fast tile: the same tile with TMA loads (1x1
    layers) or split into K slices (few tiles); together they are every candidate."""
    r50 = {c.name.split(":", 1)[1]: c for c in model_cases("resnet50", batch=1, image=224)}
    seen = {"TMA": 0, "SPLIT_K": 0}
    for case in (r50["c2048h7-k512:1x1s1"], r50["c512h7-k512:3x3s1"], ODD_CASES[12]):
        problem = make_inputs(case, torch.float16, "meta").problem(case)
        first = gemm_kernel.tiles(problem, CPU)
        assert first and all(c.SPLIT_K == 1 and not c.TMA for c in first)
        second = {tile: gemm_kernel.variants(tile, problem, CPU) for tile in first}
        for tile, variants in second.items():
            assert all(dataclasses.replace(v, SPLIT_K=1, TMA=False) == tile != v for v in variants)
            seen["TMA"] += sum(v.TMA for v in variants)
            seen["SPLIT_K"] += sum(v.SPLIT_K > 1 for v in variants)
        every = first + [v for variants in second.values() for v in variants]
        assert sorted(map(str, every)) == sorted(map(str, gemm_kernel.candidates(problem, CPU)))
    assert seen["TMA"] and seen["SPLIT_K"]


@pytest.fixture
def launches(monkeypatch) -> list[dict]:
    """The constexpr flags of every GEMM-kernel launch in the test, so a test can tell which loop ran."""
    calls, kernel = [], gemm_kernel.conv_bn_act_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                calls.append(kwargs)
                return kernel[grid](*args, **kwargs)
            return launch

        def warmup(self, *args, **kwargs):  # compiles only: not a launch
            return kernel.warmup(*args, **kwargs)

    monkeypatch.setattr(gemm_kernel, "conv_bn_act_kernel", Spy())
    return calls


def flags(launches: list[dict], name: str) -> list:
    return [kwargs[name] for kwargs in launches]


# --- flat taps: few channels per group (the stem's C = 3, grouped convs) -------------------

@needs_interpreter
@pytest.mark.parametrize("config", gemm_kernel.CONFIGS, ids=lambda c: f"{c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K}")
@pytest.mark.parametrize("case", [ODD_CASES[4], ODD_CASES[7]], ids=str)
def test_flat_taps_every_config(case, config, launches):
    """A filter row's (s, c) taps reduced together, at every tile: taps past S*C masked, padding
    columns zero, groups offset."""
    run_kernel_case(case.replace(residual=True), torch.float16, CPU, config=config, seed=2)
    assert flags(launches, "FLAT_TAPS") == [True]


def test_flat_taps_where_channels_per_group_are_few():
    def flat(case: ConvCase) -> bool:
        problem = make_inputs(case, torch.float16, "meta").problem(case)
        return gemm_kernel.flat_taps(problem, gemm_kernel.heuristic(problem).BLOCK_K)

    r50 = {c.name.split(":", 1)[1]: c for c in model_cases("resnet50", batch=32, image=224)}
    narrow_groups = [c for c in model_cases("resnext50_32x4d", batch=32, image=224) if 1 < c.groups and c.c < 16 * c.groups]
    assert flat(r50["c3h224-k64:7x7s2"])  # 7 steps of 21 taps, not 49 of 3 channels
    assert narrow_groups and all(flat(c) for c in narrow_groups)
    assert not flat(r50["c64h56-k64:3x3s1"]) and not flat(r50["c256h56-k64:1x1s1"])
    stem = make_inputs(r50["c3h224-k64:7x7s2"], torch.float16, "meta").problem(r50["c3h224-k64:7x7s2"])
    assert gemm_kernel.heuristic(stem).BLOCK_K == 32


# --- packed groups: several whole groups per tile (ResNeXt) ---------------------------------

def _packed_configs(case: ConvCase) -> list[tuple[ConvCase, gemm_kernel.Config]]:
    problem = make_inputs(case, torch.float16, "meta").problem(case)
    configs = (dataclasses.replace(c, PACK_GROUPS=True) for c in gemm_kernel.CONFIGS)
    return [(case, c) for c in configs if gemm_kernel.packs_groups(problem, c)]


PACKED = [pair for case in (ODD_CASES[7], ODD_CASES[12], PROJECTION_ODD_CASES[2]) for pair in _packed_configs(case)]


@needs_interpreter
@pytest.mark.parametrize("case,config", PACKED, ids=lambda v: str(v) if isinstance(v, ConvCase) else
                         f"{v.BLOCK_M}x{v.BLOCK_N}x{v.BLOCK_K}")
def test_packed_groups_every_config(case, config, launches):
    """Block-diagonal weight tiles at every tile size that packs these groups: no weight crosses
    into another group's channels, and a tile past the last group is clipped."""
    run_kernel_case(case.replace(residual=True), torch.float16, CPU, config=config, seed=6)
    assert flags(launches, "PACK_GROUPS") == [True]


@needs_interpreter
@pytest.mark.parametrize("split", [2, 3])
def test_packed_groups_split_k(split, launches):
    config = gemm_kernel.Config(32, 32, 16, 8, 4, 3, SPLIT_K=split, PACK_GROUPS=True)
    run_kernel_case(ODD_CASES[12].replace(residual=True), torch.float32, CPU, config=config, layout="nchw")
    assert flags(launches, "PACK_GROUPS") == [True]


def test_packed_groups_are_candidates_for_grouped_convs_only():
    def packed(case: ConvCase) -> list:
        problem = make_inputs(case, torch.float16, "meta").problem(case)
        return [c for c in gemm_kernel.candidates(problem, CPU) if c.PACK_GROUPS]

    grouped = [c for c in model_cases("resnext50_32x4d", batch=32, image=224) if c.groups > 1]
    assert grouped and all(packed(c) for c in grouped)
    assert all(c.BLOCK_N // (case.k // case.groups) <= gemm_kernel.MAX_PACKED_GROUPS
               for case in grouped for c in packed(case))
    assert not packed(model_cases("resnet50", batch=32, image=224)[1])
    assert not packed(ODD_CASES[8])  # depthwise: its own kernel


# --- TMA: tensor-descriptor loads for 1x1 stride-1 convs -------------------------------------

TMA_CASES = [ODD_CASES[13], ODD_CASES[5]] + [c for c in CPU_MODEL_CASES if c.r == 1 and c.stride == (1, 1)][:3]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", TMA_CASES, ids=str)
def test_tma_loads(case, dtype, launches):
    inputs = make_inputs(case, dtype)
    config = dataclasses.replace(gemm_kernel.heuristic(inputs.problem(case)), TMA=True)
    run_kernel_case(case.replace(residual=True), dtype, CPU, config=config, seed=3)
    # fp16 rows of 12 channels are 24 bytes: not a TMA row, the pointer loop runs instead
    assert flags(launches, "USE_TMA") == [gemm_kernel.tma_applies(inputs.problem(case))]
    assert flags(launches, "USE_TMA") == [case.c * inputs.x.element_size() % 16 == 0]


@needs_interpreter
@pytest.mark.parametrize("config", gemm_kernel.CONFIGS, ids=lambda c: f"{c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K}")
def test_tma_every_config(config, launches):
    """Rows, output channels and input channels past the edge arrive as zeros at every tile."""
    run_kernel_case(ODD_CASES[13].replace(residual=True, act="relu6"), torch.float16, CPU,
                    config=dataclasses.replace(config, TMA=True))
    assert flags(launches, "USE_TMA") == [True]


@needs_interpreter
@pytest.mark.parametrize("split", [2, 3])
def test_tma_split_k(split, launches):
    config = gemm_kernel.Config(32, 32, 16, 8, 4, 3, SPLIT_K=split, TMA=True)
    run_kernel_case(ODD_CASES[13].replace(residual=True), torch.float16, CPU, config=config, seed=4)
    assert flags(launches, "USE_TMA") == [True]


def test_host_tile_math_is_tritons():
    """The launchers' own cdiv / next_power_of_2 (triton's are constexpr_functions, slow from Python)."""
    import triton

    from fastres.kernels import cdiv, next_power_of_2

    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(300) for b in (1, 3, 16, 64, 128))
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(1, 5000))


@needs_interpreter
def test_a_repeat_call_launches_the_remembered_config_without_listing_tiles(monkeypatch, launches):
    """Every op call asks tuning for its config: after a shape's first call the backend lists no
    tiles or variants and computes no heuristic (they cost more than the rest of a call), and each
    call launches the remembered config (here a TMA variant, found among the variants once)."""
    from fastres import tuning

    case = TMA_CASES[0].replace(residual=True)
    inputs = make_inputs(case, torch.float32)
    problem = inputs.problem(case)
    chosen = gemm_kernel.variants(gemm_kernel.tiles(problem, CPU)[-1], problem, CPU)[0]
    assert chosen.TMA and chosen != gemm_kernel.heuristic(problem)
    tuning.remember(CPU, gemm_kernel.TUNING_KIND, problem.key, dataclasses.asdict(chosen))
    listed = []
    for name in ("tiles", "variants", "heuristic"):
        original = getattr(gemm_kernel, name)
        monkeypatch.setattr(gemm_kernel, name, lambda *args, _name=name, _original=original: (
            listed.append(_name), _original(*args))[1])
    for _ in range(3):
        run_op_case(case, torch.float32, "triton", CPU)
    assert flags(launches, "BLOCK_M") == [chosen.BLOCK_M] * 3 and flags(launches, "USE_TMA") == [True] * 3
    assert listed.count("tiles") == 1 and "heuristic" not in listed


@needs_interpreter
@pytest.mark.parametrize("case", [c for c in CPU_PROJECTION_CASES + list(PROJECTION_ODD_CASES) if c.r == 1], ids=str)
def test_tma_with_a_projected_residual(case, launches):
    config = dataclasses.replace(gemm_kernel.heuristic(make_inputs(case, torch.float32).problem(case)), TMA=True)
    run_kernel_case(case, torch.float32, CPU, config=config, seed=5)
    assert flags(launches, "USE_TMA") == [True]


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values one element past a 16-byte boundary: no TMA descriptor may start there."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype)
    view = flat[1:].view(t.shape[0], t.shape[2], t.shape[3], t.shape[1]).permute(0, 3, 1, 2)
    view.copy_(t)
    return view


@needs_interpreter
@pytest.mark.parametrize("layout", ["nchw", "strided", "misaligned"])
def test_tma_config_runs_the_pointer_loop_where_descriptors_cannot_be_made(layout, launches):
    case = ODD_CASES[13].replace(residual=True)
    inputs = make_inputs(case, torch.float16)
    x = _misaligned(inputs.x) if layout == "misaligned" else relayout(inputs.x, layout)
    assert x.data_ptr() % 16 != 0 or not x.is_contiguous(memory_format=torch.channels_last)
    problem = inputs.problem(case)
    out = torch.full(problem.output_shape, math.nan, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    config = dataclasses.replace(gemm_kernel.heuristic(problem), TMA=True)
    gemm_kernel.launch(problem, config, x, inputs.weight, inputs.scale, inputs.shift, inputs.residual, out)
    assert flags(launches, "USE_TMA") == [False]
    assert_matches(out, reference_for(case, inputs, inputs.residual), case, torch.float16, inputs.gain)


def test_tma_is_a_candidate_for_1x1_stride_1_convs_only():
    def tma_candidates(case: ConvCase, dtype: torch.dtype = torch.float16) -> int:
        problem = make_inputs(case, dtype, "meta").problem(case)
        return sum(c.TMA for c in gemm_kernel.candidates(problem, CPU))

    r50 = {c.name.split(":", 1)[1]: c for c in model_cases("resnet50", batch=32, image=224)}
    assert tma_candidates(r50["c256h56-k64:1x1s1"]) > 0
    assert tma_candidates(r50["c64h56-k64:3x3s1"]) == 0
    assert tma_candidates(r50["c256h56-k512:1x1s2-none"]) == 0
    assert tma_candidates(ODD_CASES[5]) == 0  # 12 fp16 channels: 24-byte rows
    assert tma_candidates(ODD_CASES[5], torch.float32) > 0  # 48-byte rows


def test_tma_is_never_the_untuned_default():
    problem = make_inputs(ODD_CASES[13], torch.float16, "meta").problem(ODD_CASES[13])
    assert not gemm_kernel.heuristic(problem).TMA


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
    run_every_config(case, torch.float16, GPU, gemm_kernel.candidates(problem, GPU))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [c.replace(residual=True) for c in model_cases("resnet50", batch=1, image=224)[-4:]], ids=str)
def test_gpu_split_k_candidates_at_batch_1(case, dtype):
    """Every split-K config tuning may time on a batch-1 late layer gives the right answer."""
    inputs = make_inputs(case, dtype, GPU)
    problem = inputs.problem(case)
    splits = [c for c in gemm_kernel.candidates(problem, GPU) if c.SPLIT_K > 1]
    assert splits
    run_every_config(case, dtype, GPU, splits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [c.replace(residual=True) for c in GPU_MODEL_CASES if c.r == 1 and c.stride == (1, 1)][:4]
                         + [ODD_CASES[13]], ids=str)
def test_gpu_tma_candidates(case, dtype, launches):
    """Every TMA config tuning may time on a Hopper GPU: descriptors built, and the right answer."""
    problem = make_inputs(case, dtype, GPU).problem(case)
    tma = [c for c in gemm_kernel.candidates(problem, GPU) if c.TMA]
    if torch.cuda.get_device_capability()[0] < 9:
        assert not tma
        return
    assert tma
    with conv_tf32(False):
        run_every_config(case, dtype, GPU, tma)
    assert flags(launches, "USE_TMA") == [True] * len(tma)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [c.replace(residual=True) for c in GPU_MODEL_CASES if 1 < c.groups < c.c]
                         + [ODD_CASES[12]], ids=str)
def test_gpu_packed_groups_candidates(case, dtype, launches):
    """Every several-groups-per-tile config tuning may time on a grouped conv gives the right answer."""
    problem = make_inputs(case, dtype, GPU).problem(case)
    packed = [c for c in gemm_kernel.candidates(problem, GPU) if c.PACK_GROUPS]
    assert packed
    run_every_config(case, dtype, GPU, packed)
    assert flags(launches, "PACK_GROUPS") == [True] * len(packed)


@pytest.mark.gpu
def test_gpu_compile_ahead_leaves_nothing_to_compile_at_launch(monkeypatch):
    """Tuning compiles each round's configs on a thread pool first: the launches then find every
    kernel compiled (Triton's post-compile hook never fires) and give the right answer."""
    import triton

    case = ODD_CASES[13].replace(residual=True)  # 1x1: tiles, TMA and split-K variants
    configs = gemm_kernel.candidates(make_inputs(case, torch.float16, "meta").problem(case), GPU)
    for kernel in (gemm_kernel.conv_bn_act_kernel, gemm_kernel.splitk_reduce_kernel):
        kernel.device_caches.clear()  # in-memory compiled kernels of earlier tests
    compiled = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook", lambda *a, **kw: compiled.append(kw))
    compile_ahead(functools.partial(run_kernel_case, case, torch.float16, GPU, config=c, compile_only=True)
                  for c in configs)
    assert len(compiled) >= len(configs)  # each config its own specialisation, plus split-K reduces
    compiled.clear()
    for config in configs:
        run_kernel_case(case, torch.float16, GPU, config=config)
    assert compiled == []


@pytest.mark.gpu
def test_gpu_precompile_leaves_the_first_call_nothing_to_compile(monkeypatch, tmp_path):
    """fastres.precompile compiles a whole model's Triton configs in one pool; its first call, which
    tunes every layer (an empty tuning cache), compiles nothing more and is right."""
    import torchvision
    import triton

    from fastres.shapes import randomize_batchnorm_

    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path))
    for kernel in (gemm_kernel.conv_bn_act_kernel, gemm_kernel.splitk_reduce_kernel):
        kernel.device_caches.clear()
    model = randomize_batchnorm_(torchvision.models.resnet18()).eval().to(GPU, torch.float16)
    optimized = fastres.optimize(model, backend="triton")
    x = torch.randn(4, 3, 64, 64, device=GPU, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    compiled = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook", lambda *a, **kw: compiled.append(kw))
    assert fastres.precompile(optimized, x) > 20
    assert compiled
    compiled.clear()
    with torch.no_grad():
        out = optimized(x)
    assert compiled == []
    assert fastres.verify(model, optimized, x).ok and out.shape == (4, 1000)


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
@pytest.mark.parametrize("case", GPU_MODEL_CASES[::4], ids=str)
def test_gpu_float32(case, tf32):
    with conv_tf32(tf32):
        inputs = make_inputs(case, torch.float32, GPU)
        out = fastres.ops.conv_bn_act(*inputs.op_args(), stride=case.stride, padding=case.padding,
                                      groups=case.groups, **case.act_kwargs, backend="triton")
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
