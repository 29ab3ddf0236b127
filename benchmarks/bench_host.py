"""Host time of one fused call at each layer of its dispatch (pytest-benchmark): what a fused op
costs the CPU, which small batches without CUDA graphs wait on.

    pytest benchmarks/bench_host.py --benchmark-enable

One ResNet-style layer (1x1 conv, 64 -> 64 channels, a 1x64x8x8 channels_last input, no_grad),
"auto" remembering the triton backend and the triton backend remembering a config: its first tile,
or its last candidate (a TMA or split-K variant, found among the variants of every tile). On a GPU
the kernel launches; at this size the GPU outpaces the host, so the time is the host's, Triton's
launcher included. On a CPU the launch is a no-op (the interpreter would run the kernel), so
Triton's launcher is not in the figures. benchmarks/NOTES.md (sixteenth session) has this
project's CPU figures.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import torch.nn as nn

import fastres
from fastres import backends, tuning
from fastres.backends import triton as triton_backend
from fastres.kernels import conv_bn_act as gemm_kernel
from fastres.nn import ConvBNAct, conv_bn_fold
from fastres.problem import ConvProblem

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.float16 if GPU else torch.float32
LEVELS = ["module", "fastres.ops", "torch.ops", "backends.run", "triton backend", "kernel launch"]


@pytest.fixture(params=["first tile", "last candidate"])
def calls(request, tmp_path, monkeypatch) -> dict:
    """The same call entered at each level, its tuning decisions remembered in a fresh cache."""
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path))
    tuning.forget_in_memory()
    if not GPU:
        monkeypatch.setattr(backends, "_auto_candidates", lambda device, problem: ["triton", "cudnn"])  # a GPU's
        monkeypatch.setattr(gemm_kernel, "start", lambda kernel, grid, compile_only=False: lambda *a, **k: None)
    module = ConvBNAct(nn.Conv2d(64, 64, 1, bias=False), nn.BatchNorm2d(64)).eval().to(DEVICE, DTYPE)
    x = torch.randn(1, 64, 8, 8, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
    w = module.conv.weight
    scale, shift = conv_bn_fold(module.conv, module.bn)  # float32, as launch() takes them
    problem = ConvProblem.from_tensors(x, w, scale, shift, None, (1, 1), (0, 0), (1, 1), 1, "relu")
    config = (gemm_kernel.tiles(problem, DEVICE)[0] if request.param == "first tile"
              else gemm_kernel.candidates(problem, DEVICE)[-1])
    tuning.remember(DEVICE, gemm_kernel.TUNING_KIND, problem.key, asdict(config))
    tuning.remember(DEVICE, "auto", problem.key, "triton")
    out = torch.empty_like(x)
    yield {
        "module": lambda: module(x),
        "fastres.ops": lambda: fastres.ops.conv_bn_act(x, w, scale, shift),
        "torch.ops": lambda: torch.ops.fastres.conv_bn_act(x, w, scale, shift, None, [1, 1], [0, 0], [1, 1], 1,
                                                           "relu", "auto"),
        "backends.run": lambda: backends.run("auto", problem, x, w, scale, shift, None),
        "triton backend": lambda: triton_backend.run(problem, x, w, scale, shift, None),
        "kernel launch": lambda: gemm_kernel.launch(problem, config, x, w, scale, shift, None, out),
    }
    tuning.forget_in_memory()


@pytest.mark.parametrize("level", LEVELS)
def test_host_time(benchmark, calls, level):
    fn = calls[level]
    with torch.no_grad():
        fn()
        benchmark.group = f"host time per call: {level}"
        benchmark(fn)
