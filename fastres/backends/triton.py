"""The "triton" backend: fastres.kernels on CUDA devices, or on CPU tensors in the Triton interpreter.

The interpreter (TRITON_INTERPRET=1, set before the kernels are first imported) runs the very
same kernels on the CPU: that is how CI and users without a GPU check this path.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import asdict
from typing import Any, Callable

import torch

from fastres import tuning
from fastres.backends import reference
from fastres.problem import ConvProblem, Projection, empty_output

NAME = "triton"


def _kernels_interpreted() -> bool:
    from fastres.kernels import interpreted

    return interpreted()


@functools.cache
def _triton_missing() -> bool:
    return importlib.util.find_spec("triton") is None


def unavailable_reason(device: torch.device) -> str | None:
    if _triton_missing():
        return "triton is not installed"
    if device.type == "cuda":
        if _kernels_interpreted():
            return "the kernels were loaded under TRITON_INTERPRET=1, which runs CPU tensors only"
        return None
    if device.type == "cpu":
        if _kernels_interpreted():
            return None
        return "CPU tensors run the Triton kernels only in the Triton interpreter: set TRITON_INTERPRET=1 before importing fastres"
    return f"Triton kernels need a CUDA device (or CPU tensors in the interpreter), got {device.type}"


def unsupported_reason(problem: ConvProblem, device: torch.device) -> str | None:
    if problem.dtype == torch.float64:
        return "float64 is not supported by the Triton kernels"
    if device.type == "cpu" and problem.dtype == torch.bfloat16:
        return "the Triton interpreter computes bfloat16 wrongly (numpy has no bfloat16); run bfloat16 on a GPU"
    return None


def fuses_projection(problem: ConvProblem) -> bool:
    """The implicit-GEMM kernel computes a projected residual as its second GEMM phase."""
    return not problem.is_depthwise


def _float32(v: torch.Tensor | None) -> torch.Tensor | None:
    return None if v is None else v.float().contiguous()


def _launch_args(problem: ConvProblem, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                 shift: torch.Tensor | None, residual: torch.Tensor | None, projection: Projection | None):
    """The kernel module for this call and kernel.launch's arguments after (problem, config)."""
    from fastres.kernels import conv_bn_act, depthwise

    kernel = depthwise if problem.is_depthwise else conv_bn_act
    extra = {}
    if projection is not None:
        extra["projection"] = Projection(projection.weight, _float32(projection.scale), _float32(projection.shift),
                                         projection.stride)
    return kernel, (x, weight, _float32(scale), _float32(shift), residual, empty_output(x, problem.output_shape)), extra


def compiles(problem: ConvProblem, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
             shift: torch.Tensor | None, residual: torch.Tensor | None,
             projection: Projection | None = None) -> list[Callable[[], Any]]:
    """Compile-only launches of the configs this call's first run will launch (for
    fastres.kernels.compile_ahead, e.g. a whole model's at once): the remembered choice if there is
    one, the heuristic if tuning is off, else every tile and each one's variants."""
    kernel, args, extra = _launch_args(problem, x, weight, scale, shift, residual, projection)
    tiles = kernel.tiles(problem, x.device)
    configs = {json.dumps(asdict(c), sort_keys=True): c
               for c in tiles + [v for t in tiles for v in kernel.variants(t, problem, x.device)]}
    remembered = tuning.lookup(x.device, kernel.TUNING_KIND, problem.key)
    if remembered is not None and json.dumps(remembered, sort_keys=True) in configs:
        configs = {"": configs[json.dumps(remembered, sort_keys=True)]}
    elif not tuning.may_time(x.device):
        configs = {"": kernel.heuristic(problem)}
    return [functools.partial(kernel.launch, problem, c, *args, **extra, compile_only=True) for c in configs.values()]


def run(
    problem: ConvProblem,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    projection: Projection | None = None,
) -> torch.Tensor:
    """Depthwise convs (groups == C) take the direct kernel, every other conv the implicit GEMM; each
    kernel module names its tuning rounds (tiles, then variants of the fastest), its heuristic
    config and its launcher. Each round's configs compile in parallel, then each is checked
    against float64 and timed."""
    from fastres.kernels import compile_ahead

    kernel, args, extra = _launch_args(problem, x, weight, scale, shift, residual, projection)
    config = tuning.pick(
        x.device, kernel.TUNING_KIND, problem.key, functools.partial(kernel.tiles, problem, x.device),
        encode=asdict, run=lambda cfg: kernel.launch(problem, cfg, *args, **extra),
        default=functools.partial(kernel.heuristic, problem),
        refine=lambda cfg: kernel.variants(cfg, problem, x.device),
        prepare=lambda configs: compile_ahead(
            functools.partial(kernel.launch, problem, cfg, *args, **extra, compile_only=True) for cfg in configs),
        check=lambda cfg: reference.wrong_answer(problem, lambda: kernel.launch(problem, cfg, *args, **extra),
                                                 x, weight, scale, shift, residual, projection),
    )
    return kernel.launch(problem, config, *args, **extra)
