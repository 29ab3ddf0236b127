"""The reference backend: F.conv2d, then the epilogue with plain torch ops. Runs on any device.
A projected residual is computed in the same precision and never rounded before the add.

Computes in float32 on the CPU (float64 for float64 inputs) and in float64 on other devices,
where float32 convolutions may silently use TF32: a reference must not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastres.numerics import activate
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
