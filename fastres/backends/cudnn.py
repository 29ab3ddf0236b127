"""The "cudnn" backend: torch's own conv (cuDNN on a GPU), then one fused Triton epilogue pass.

The baseline every fused kernel must beat. As in eager PyTorch, the conv result is stored in the
input dtype before the epilogue reads it back, so fp16/bf16 round twice (once more than the
fused kernels). On CPU tensors it runs under TRITON_INTERPRET=1 only, which is how CI tests its
epilogue kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastres.backends import triton as triton_backend
from fastres.problem import ConvProblem

NAME = "cudnn"


def unavailable_reason(device: torch.device) -> str | None:
    reason = triton_backend.unavailable_reason(device)
    if reason is not None:
        return f"its epilogue is a Triton kernel, and {reason}"
    return None


def unsupported_reason(problem: ConvProblem, device: torch.device) -> str | None:
    if device.type == "cpu" and problem.dtype == torch.bfloat16:
        return "the Triton interpreter computes bfloat16 wrongly (numpy has no bfloat16); run bfloat16 on a GPU"
    return None


def fuses_projection(problem: ConvProblem) -> bool:
    """No: as in eager PyTorch, the projection is a conv call of its own."""
    return False


def run(
    problem: ConvProblem,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    from fastres.kernels.epilogue import apply_epilogue_

    x = x.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(x, weight, None, problem.stride, problem.padding, problem.dilation, problem.groups)
    y = y.contiguous(memory_format=torch.channels_last)
    return apply_epilogue_(y, scale, shift, residual, problem.act, problem.negative_slope)
