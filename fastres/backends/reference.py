"""The reference backend: F.conv2d, then the epilogue with plain torch ops. Runs on any device.
A projected residual is computed in the same precision and never rounded before the add.

Computes in float32 on the CPU (float64 for float64 inputs) and in float64 on other devices,
where float32 convolutions may silently use TF32: a reference must not.

Its other job, `wrong_answer`: tuning checks each candidate (a Triton config, a backend for
"auto") against this chain in float64 before timing it, so a config that computes wrongly on
some GPU or compiler version is never chosen for being fast.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fastres.numerics import activate, branch_gain, compare, tf32_in_use, tolerance
from fastres.problem import DEFAULT_NEGATIVE_SLOPE, ConvProblem, Projection

NAME = "reference"


def unavailable_reason(device: torch.device) -> str | None:
    return None


def unsupported_reason(problem: ConvProblem, device: torch.device) -> str | None:
    return None


def fuses_projection(problem: ConvProblem) -> bool:
    return True


def _conv_bn(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
             compute: torch.dtype, conv_dtype: torch.dtype, **conv_args) -> torch.Tensor:
    y = F.conv2d(x.to(conv_dtype), weight.to(conv_dtype), None, **conv_args).to(compute)
    if scale is not None:
        y = y * scale.to(compute).view(1, -1, 1, 1)
    if shift is not None:
        y = y + shift.to(compute).view(1, -1, 1, 1)
    return y


def chain(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    projection: Projection | None,
    act: str,
    compute: torch.dtype,
    conv_dtype: torch.dtype | None = None,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    **conv_args,
) -> torch.Tensor:
    """The op's arithmetic in standard torch ops, in `compute`'s precision (the convs in
    conv_dtype's, default compute's): the reference, and what an ONNX export of the op records
    (fastres.ops.conv_bn_act)."""
    conv_dtype = conv_dtype or compute
    y = _conv_bn(x, weight, scale, shift, compute, conv_dtype, **conv_args)
    if projection is not None:
        residual = _conv_bn(residual, projection.weight, projection.scale, projection.shift, compute, conv_dtype,
                            stride=projection.stride)
    if residual is not None:
        y = y + residual.to(compute)
    return activate(y, act, negative_slope)


def run(
    problem: ConvProblem,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    projection: Projection | None = None,
) -> torch.Tensor:
    compute = torch.float32 if x.device.type == "cpu" and x.dtype != torch.float64 else torch.float64
    y = chain(x, weight, scale, shift, residual, projection, problem.act, compute,
              negative_slope=problem.negative_slope, stride=problem.stride, padding=problem.padding,
              dilation=problem.dilation, groups=problem.groups)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)


def wrong_answer(
    problem: ConvProblem,
    launch: Callable[[], torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    projection: Projection | None = None,
) -> str | None:
    """Why the output of `launch()` (one tuning candidate's run of this call) is wrong, or None.

    Its first and last images are compared with this chain in float64 within the layer's
    tolerance (fastres.numerics, as the kernel tests compare). The output of a first run is
    poisoned with NaN before the checked run, so a kernel that writes into one output buffer
    every run (the Triton launches, the CUTLASS op's `out` form) and leaves part of it unwritten
    fails. Whole backends, as auto times them, allocate a fresh output each run: their kernels
    were checked so when they tuned. Where the float64 value overflows the output dtype, Inf is
    the expected value."""
    launch().fill_(float("nan"))
    out = launch()
    images = sorted({0, x.shape[0] - 1})

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or t.shape[0] != x.shape[0] else t[images]

    exact = chain(take(x), weight, scale, shift, take(residual), projection, problem.act, torch.float64,
                  negative_slope=problem.negative_slope, stride=problem.stride, padding=problem.padding,
                  dilation=problem.dilation, groups=problem.groups)
    rounded = exact.to(problem.dtype)
    expected = torch.where(torch.isinf(rounded) & torch.isfinite(exact), rounded.to(exact.dtype), exact)
    gain = branch_gain(scale, None if projection is None else projection.scale)
    got = out[images]
    result = compare(got, expected, tolerance(problem.dtype, problem.accumulated, tf32_in_use(problem.dtype, x.device)),
                     gain)
    if result.ok:
        return None
    misplaced = int((torch.isfinite(got).cpu() != torch.isfinite(expected).cpu()).sum())
    return (f"images {images} differ from float64 by up to {result.max_abs:.3g} (relative norm {result.rel_norm:.3g})"
            + (f", {misplaced} values Inf / NaN where float64's are not, or the other way" if misplaced else ""))
