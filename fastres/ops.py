"""The public fused op: y = act(conv2d(x, weight) * scale[k] + shift[k] + residual), where the
residual may first go through a 1x1 conv + BN of its own (a ResNet block's downsample branch).

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
from fastres.problem import ConvProblem, Projection, check_inputs, empty_output, pair

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
    residual_weight: Optional[torch.Tensor] = None,
    residual_scale: Optional[torch.Tensor] = None,
    residual_shift: Optional[torch.Tensor] = None,
    residual_stride: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    backends.check_name(backend)
    projection = _projection(residual_weight, residual_scale, residual_shift, residual_stride)
    problem = ConvProblem.from_tensors(
        x, weight, scale, shift, residual, tuple(stride), tuple(padding), tuple(dilation), groups, act, projection
    )
    if math.prod(problem.output_shape) == 0:
        return empty_output(x, problem.output_shape)
    return backends.run(backend, problem, x, weight, scale, shift, residual, projection)


@_conv_bn_act.register_fake
def _conv_bn_act_fake(x, weight, scale, shift, residual, stride, padding, dilation, groups, act, backend,
                      residual_weight=None, residual_scale=None, residual_shift=None, residual_stride=None):
    backends.check_name(backend)
    projection = _projection(residual_weight, residual_scale, residual_shift, residual_stride)
    shape = check_inputs(x, weight, scale, shift, residual, tuple(stride), tuple(padding), tuple(dilation), groups, act,
                         projection)
    return empty_output(x, shape)


def _projection(
    weight: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None, stride: Sequence[int] | None
) -> Projection | None:
    if weight is None:
        named = [n for n, v in (("residual_scale", scale), ("residual_shift", shift), ("residual_stride", stride)) if v is not None]
        if named:
            raise RuntimeError(f"{' and '.join(named)} given without residual_weight (they describe the residual's 1x1 conv)")
        return None
    return Projection(weight, scale, shift, pair(1 if stride is None else stride, "residual_stride"))


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
    residual_weight: torch.Tensor | None = None,
    residual_scale: torch.Tensor | None = None,
    residual_shift: torch.Tensor | None = None,
    residual_stride: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """y = act(conv2d(x, weight, stride, padding, dilation, groups) * scale[k] + shift[k] + residual).

    x: (N, C, H, W), any memory format (channels_last is the fast one); weight: (K, C/groups, R, S)
    of x's dtype. scale, shift: optional per-output-channel vectors (used in float32). residual:
    optional, the output's shape and dtype, any memory format, may alias x. act: "none", "relu",
    "relu6", "silu", "hardswish", "sigmoid" or "hardsigmoid". backend: "auto", "triton", "cuda", "cudnn" or "reference".
    residual_weight: optional (K, C_res, 1, 1) weight that projects the residual first (a ResNet
    downsample branch), with its own BN as residual_scale / residual_shift and residual_stride:
    residual is then (N, C_res, H_res, W_res) and the added term conv1x1(residual) * residual_scale[k]
    + residual_shift[k], kept in fp32 inside the kernel. Backends without a fused form run it as two calls.
    Returns a channels_last tensor of x's dtype.
    """
    return torch.ops.fastres.conv_bn_act(
        x, weight, scale, shift, residual,
        list(pair(stride, "stride")), list(pair(padding, "padding")), list(pair(dilation, "dilation")),
        groups, act, backend, residual_weight, residual_scale, residual_shift,
        None if residual_stride is None else list(pair(residual_stride, "residual_stride")),
    )
