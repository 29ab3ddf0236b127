"""The Triton kernels compile for real GPUs on this GPU-less machine (Triton's AOT path, ptxas
included), for the exact arguments the launchers pass at full ResNet sizes; and on Hopper every
fp16 / bf16 / TF32 GEMM variant uses wgmma, on Ampere mma.sync; a projected residual's two
accumulators stay in registers at the tiles it is run with; TMA configs load through the TMA
engine (see fastres/kernels/aot.py). Tuning's compile_ahead compiles through Triton's JIT on
worker threads and leaves every kernel ready for its launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

H100_MAX_SHARED_BYTES = 232448  # per block, opt-in


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "fastres.kernels.aot", "--arch", "90", "80", "--json"],
                         capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode in (0, 1), run.stderr[-3000:]
    return json.loads(run.stdout)


def test_every_variant_compiles(compiled):
    failed = {r["name"]: r["error"] for r in compiled if not r["ok"]}
    assert not failed


def test_hopper_gemms_use_wgmma(compiled):
    for row in compiled:
        if row["arch"] == 90 and row["ok"]:
            assert (row["wgmma"] > 0) == row["expect_tensor_cores"], row


def test_ampere_gemms_use_mma_sync(compiled):
    for row in compiled:
        if row["arch"] == 80 and row["ok"]:
            assert (row["mma_sync"] > 0) == row["expect_tensor_cores"], row


def test_every_config_fits_hopper_shared_memory(compiled):
    configs = [r for r in compiled if r["arch"] == 90 and "config" in r["name"]]
    assert len(configs) == 24  # 8 plain, 8 TMA, 8 with a projected residual
    assert all(r["shared_bytes"] <= H100_MAX_SHARED_BYTES for r in configs)


def test_projection_keeps_its_two_accumulators_in_registers(compiled):
    """The heuristic tile for a projected residual does not spill (on sm_80 from triton 3.9 on:
    3.6, the GPU image's, keeps 32 B of stack there); the tiles tuning skips for it (over 64 fp32
    values per accumulator per thread) do, on Hopper."""
    import triton
    from packaging.version import Version

    from fastres.kernels.conv_bn_act import CONFIGS

    by_name = {(r["arch"], r["name"]): r for r in compiled}
    for arch in (90, 80) if Version(triton.__version__) >= Version("3.9") else (90,):
        for dtype in ("fp16", "bf16"):
            assert by_name[(arch, f"gemm {dtype} 1x1 +projection")]["stack_bytes"] == 0
    for c in CONFIGS:
        row = by_name[(90, f"gemm fp16 +projection config {c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K}w{c.num_warps}s{c.num_stages}")]
        if c.BLOCK_M * c.BLOCK_N > 64 * 32 * c.num_warps:
            assert row["stack_bytes"] > 0, row


def test_tma_configs_load_through_the_tma_engine_on_hopper(compiled):
    """TMA configs compile to bulk tensor copies (cp.async.bulk.tensor) feeding wgmma; the pointer
    configs have none; TMA variants are not built for Ampere, where they are never candidates."""
    tma = [r for r in compiled if "TMA" in r["name"]]
    assert tma and all(r["arch"] == 90 and r["tma_loads"] > 0 and r["wgmma"] > 0 for r in tma)
    assert all(r["tma_loads"] == 0 for r in compiled if r["ok"] and "TMA" not in r["name"])


def test_packed_groups_tile_does_not_spill(compiled):
    """Several ResNeXt groups per 64x64 tile keep the block-diagonal weight mask in registers."""
    rows = [r for r in compiled if "packed" in r["name"]]
    assert rows and all(r["ok"] and r["stack_bytes"] == 0 for r in rows)


STAND_IN_DRIVER = """  # Triton's JIT compiling for sm_90 with no GPU, each compile counted

import functools, json, threading, torch, triton
import triton.compiler
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

class CompileOnlyDriver:  # enough of a CUDA driver for Triton's JIT to specialise and compile
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_current_device(self): return 0
    def get_current_stream(self, device): return 0
    def get_active_torch_device(self): return torch.device("cpu")
    def map_python_to_cpp_type(self, ty): return ty

driver.set_active(CompileOnlyDriver())
on_main_thread, real_compile = [], triton.compiler.compile
triton.compiler.compile = lambda *a, **kw: (on_main_thread.append(threading.current_thread() is threading.main_thread()),
                                real_compile(*a, **kw))[1]
compiled = []
triton.knobs.runtime.jit_post_compile_hook = lambda *a, **kw: compiled.append(1)

"""

COMPILE_AHEAD = STAND_IN_DRIVER + """
from fastres.kernels import compile_ahead, conv_bn_act, depthwise
from fastres.shapes import ODD_CASES, ConvCase, make_inputs
CPU = torch.device("cpu")
late = ConvCase("late", 1, 512, 7, 7, 512, 3, 3, padding=(1, 1), residual=True)  # few tiles: split-K
launches = []
for case, pick in ((ODD_CASES[13].replace(residual=True), lambda cs: cs),  # 1x1: tiles and TMA
                   (ODD_CASES[12], lambda cs: [c for c in cs if c.PACK_GROUPS]),
                   (late, lambda cs: [c for c in cs if c.SPLIT_K > 1][:2]),
                   (ConvCase("dw", 2, 32, 9, 9, 32, 3, 3, padding=(1, 1), groups=32), lambda cs: cs)):
    inputs = make_inputs(case, torch.float16)
    problem = inputs.problem(case)
    kernel = depthwise if problem.is_depthwise else conv_bn_act
    configs = pick(kernel.tiles(problem, CPU) + [v for t in kernel.tiles(problem, CPU) for v in kernel.variants(t, problem, CPU)])
    out = torch.empty(problem.output_shape, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    args = (inputs.x, inputs.weight, inputs.scale.float(), inputs.shift.float(), inputs.residual, out)
    launches += [functools.partial(kernel.launch, problem, c, *args, compile_only=True) for c in configs]
compile_ahead(launches)
first = len(compiled)
for launch in launches:  # what tuning's timed launches do next: every kernel is found compiled
    launch()
print(json.dumps({"configs": len(launches), "compiled": first, "compiled_again": len(compiled) - first,
                  "on_main_thread": sum(on_main_thread), "compiles": len(on_main_thread)}))
"""


@pytest.mark.parametrize("threads", [None, "1"], ids=["default", "threads=1"])
def test_compile_ahead_compiles_every_config_on_worker_threads(threads):
    """Through Triton's JIT (a compile-only stand-in for the CUDA driver): TMA, packed-group,
    split-K and depthwise configs all compile inside compile_ahead, none on the calling thread,
    and compile-only launches afterwards find every kernel ready. FASTRES_COMPILE_THREADS=1 leaves
    each compile to its launch."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTRES_COMPILE_THREADS")}
    if threads is not None:
        env["FASTRES_COMPILE_THREADS"] = threads
    run = subprocess.run([sys.executable, "-c", COMPILE_AHEAD], capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["configs"] >= 10
    if threads is None:
        assert result["compiled"] >= result["configs"] and result["compiled_again"] == 0
        assert result["compiles"] == result["compiled"] and result["on_main_thread"] == 0
    else:
        assert result["compiled"] == 0 and result["compiled_again"] >= result["configs"]
        assert result["on_main_thread"] == result["compiles"] == result["compiled_again"]


PRECOMPILE = STAND_IN_DRIVER + """
import torch.nn as nn
import torchvision
import fastres
from fastres.backends import triton as triton_backend
from fastres.compilation import compile_launches, recorded_calls
from fastres.kernels import compile_ahead
from fastres.shapes import randomize_batchnorm_
triton_backend.unavailable_reason = lambda device: None  # the stand-in driver compiles for CPU tensors

block = torchvision.models.resnet.BasicBlock(16, 32, stride=2, downsample=nn.Sequential(
    nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32)))
model = fastres.optimize(randomize_batchnorm_(block).eval(), backend="triton", dtype=torch.float16)
x = torch.randn(2, 16, 9, 9, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
calls = recorded_calls(model, (x,))
launches = list(compile_launches(calls, torch.device("cpu")))
compile_ahead(launches)
ahead = len(compiled)
# What tuning does at the real first call: each call's own compile-only launches, round by round.
from fastres.problem import ConvProblem, Projection
for call in calls:
    real = {k: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype) if isinstance(v, torch.Tensor) else v
            for k, v in call.items()}
    projection = None if real["residual_weight"] is None else Projection(
        real["residual_weight"], real["residual_scale"], real["residual_shift"], tuple(real["residual_stride"]))
    problem = ConvProblem.from_tensors(real["x"], real["weight"], real["scale"], real["shift"], real["residual"],
                                       tuple(real["stride"]), tuple(real["padding"]), tuple(real["dilation"]),
                                       real["groups"], real["act"], projection)
    for launch in triton_backend.compiles(problem, real["x"], real["weight"], real["scale"], real["shift"],
                                          real["residual"], projection):
        launch()
print(json.dumps({"calls": len(calls), "launches": len(launches), "compiled": ahead,
                  "compiled_again": len(compiled) - ahead, "on_main_thread": sum(on_main_thread)}))
"""


def test_precompile_compiles_every_layers_configs_in_one_pool(tmp_path):
    """A model's fastres ops, read off a meta-tensor run, compile all their tuning configs in one
    compile_ahead (a BasicBlock with a downsample: its two calls, the second with the projection
    fused); the launches tuning then makes find every kernel compiled. (FASTRES_AUTOTUNE=1: tuning
    would time here; an empty tuning cache: nothing remembered.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTRES_COMPILE_THREADS")}
    env.update(FASTRES_AUTOTUNE="1", FASTRES_CACHE_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", PRECOMPILE], capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["calls"] == 2 and result["launches"] >= 4, result
    assert result["compiled"] >= result["launches"] and result["compiled_again"] == 0
    assert result["on_main_thread"] == 0


def test_compile_threads_setting_must_be_a_count(monkeypatch):
    from fastres.kernels import compile_ahead

    monkeypatch.setenv("FASTRES_COMPILE_THREADS", "many")
    with pytest.raises(ValueError, match="FASTRES_COMPILE_THREADS must be a whole number of threads, but got 'many'"):
        compile_ahead([])
