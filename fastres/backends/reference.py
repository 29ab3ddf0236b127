"""The reference backend: F.conv2d, then the epilogue with plain torch ops. Runs on any device.

Computes in float32 on the CPU (float64 for float64 inputs) and in float64 on other devices,
where float32 convolutions may silently use TF32: a reference must not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastres.numerics import ACT_FUNCTIONS
from fastres.problem import ConvProblem

NAME = "reference"


def unavailable_reason(device: torch.device) -> str | None:
    return None


def unsupported_reason(problem: ConvProblem, device: torch.device) -> str | None:
    return None


def run(
    problem: ConvProblem,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    compute = torch.float32 if x.device.type == "cpu" and x.dtype != torch.float64 else torch.float64
    y = F.conv2d(x.to(compute), weight.to(compute), None, problem.stride, problem.padding, problem.dilation, problem.groups)
    if scale is not None:
        y = y * scale.to(compute).view(1, -1, 1, 1)
    if shift is not None:
        y = y + shift.to(compute).view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.to(compute)
    y = ACT_FUNCTIONS[problem.act](y)
    return y.to(x.dtype).contiguous(memory_format=torch.channels_last)
