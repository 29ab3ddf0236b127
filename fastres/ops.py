"""The public fused op: y = act(conv2d(x, weight) * scale[k] + shift[k] + residual).

Registered as `torch.ops.fastres.conv_bn_act` with torch.library.custom_op. custom_op rather
than triton_op on purpose: the op chooses among several backends at run time (Triton, CUTLASS,
cuDNN + a fused epilogue, the reference), per device and per shape, which a traceable triton_op
body cannot express. Opaque to Inductor, it still works under torch.compile(fullgraph=True),
CUDA graphs and torch.export, through the fake kernel below.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from fastres import backends
from fastres.problem import ConvProblem, check_inputs, empty_output, pair

__all__ = ["conv_bn_act"]


@torch.library.custom_op("fastres::conv_bn_act", mutates_args=())
def _conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    act: str,
    backend: str,
) -> torch.Tensor:
    backends.check_name(backend)
    problem = ConvProblem.from_tensors(
        x, weight, scale, shift, residual, tuple(stride), tuple(padding), tuple(dilation), groups, act
    )
    if math.prod(problem.output_shape) == 0:
        return empty_output(x, problem.output_shape)
    return backends.run(backend, problem, x, weight, scale, shift, residual)


@_conv_bn_act.register_fake
def _conv_bn_act_fake(x, weight, scale, shift, residual, stride, padding, dilation, groups, act, backend):
    backends.check_name(backend)
    shape = check_inputs(x, weight, scale, shift, residual, tuple(stride), tuple(padding), tuple(dilation), groups, act)
    return empty_output(x, shape)


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    act: str = "relu",
    backend: str = "auto",
) -> torch.Tensor:
    """y = act(conv2d(x, weight, stride, padding, dilation, groups) * scale[k] + shift[k] + residual).

    x: (N, C, H, W), any memory format (channels_last is the fast one); weight: (K, C/groups, R, S)
    of x's dtype. scale, shift: optional per-output-channel vectors (used in float32). residual:
    optional, the output's shape and dtype, any memory format, may alias x. act: "none", "relu",
    "relu6" or "silu". backend: "auto", "triton", "cuda", "cudnn" or "reference".
    Returns a channels_last tensor of x's dtype.
    """
    return torch.ops.fastres.conv_bn_act(
        x, weight, scale, shift, residual,
        list(pair(stride, "stride")), list(pair(padding, "padding")), list(pair(dilation, "dilation")),
        groups, act, backend,
    )
