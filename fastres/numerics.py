"""Numerics shared by the tests, fastres.verify and the benchmarks.

- `fold_bn`: BatchNorm (eval) as the epilogue's per-channel scale/shift, computed in float32.
- `reference_conv_bn_act`: ground truth, the unfused eager chain (Conv2d, BatchNorm2d.eval(),
  add, activation) in float64 on the CPU.
- `tolerance` / `compare`: per-dtype tolerances written down once, and the comparison every
  check uses (torch.testing.assert_close on gain-normalised values, plus a norm-wise bound).

Why gain-normalised: a BN channel with a tiny running_var multiplies the conv's accumulation
error by its scale (up to ~100 here). Dividing both sides by max(1, |scale[k]|) keeps rtol
meaning what it says while atol is applied in pre-gain units, where it is a property of the
accumulation, not of the BN statistics.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from fastres.problem import DEFAULT_NEGATIVE_SLOPE

_ACT_FUNCTIONS = {
    "none": lambda t: t,
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "hardswish": F.hardswish,
    "sigmoid": torch.sigmoid,
    "hardsigmoid": F.hardsigmoid,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}

# The gradient through each activation, given the output's gradient g and the pre-activation z:
# eager autograd's own backward kernels, so a fused model's gradients are eager's.
_ACT_BACKWARDS = {
    "none": lambda g, z: g,
    "relu": lambda g, z: torch.ops.aten.threshold_backward(g, z, 0),
    "relu6": lambda g, z: torch.ops.aten.hardtanh_backward(g, z, 0.0, 6.0),
    "silu": torch.ops.aten.silu_backward,
    "hardswish": torch.ops.aten.hardswish_backward,
    "sigmoid": lambda g, z: torch.ops.aten.sigmoid_backward(g, torch.sigmoid(z)),
    "hardsigmoid": torch.ops.aten.hardsigmoid_backward,
    "gelu": torch.ops.aten.gelu_backward,
    "gelu_tanh": lambda g, z: torch.ops.aten.gelu_backward(g, z, approximate="tanh"),
}


def activate(t: torch.Tensor, act: str, negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> torch.Tensor:
    """act(t) with eager PyTorch's own function; negative_slope is LeakyReLU's."""
    return F.leaky_relu(t, negative_slope) if act == "leaky_relu" else _ACT_FUNCTIONS[act](t)


def activate_backward(
    g: torch.Tensor, z: torch.Tensor, act: str, negative_slope: float = DEFAULT_NEGATIVE_SLOPE
) -> torch.Tensor:
    """The gradient of activate(z, act, negative_slope), given its output's gradient g."""
    if act == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(g, z, negative_slope, False)
    return _ACT_BACKWARDS[act](g, z)


def conv_tf32_enabled() -> bool:
    """Whether torch's own convolutions may use TF32 for float32 right now (our fp32 kernels follow it)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    precision = getattr(conv, "fp32_precision", None)
    if precision == "tf32":
        return True
    if precision == "ieee":
        return False
    return bool(torch.backends.cudnn.allow_tf32)


def tf32_in_use(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a conv of `dtype` on `device` computes in TF32 right now (torch's and our kernels):
    its results are then held to the TF32 tolerance."""
    return dtype == torch.float32 and device.type == "cuda" and conv_tf32_enabled()


@contextlib.contextmanager
def conv_tf32(enabled: bool) -> Iterator[None]:
    """Set torch's conv TF32 flag (the new fp32_precision API where it exists) and restore it after."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        old = conv.fp32_precision
        conv.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = old
    else:
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = enabled
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = old


def fold_bn(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    conv_bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm in eval mode as y = conv * scale + shift, in float32 (float64 for float64 models).

    scale = gamma / sqrt(var + eps); shift = beta - mean * scale (+ conv_bias * scale).
    Differentiable: with autograd on, gradients reach gamma, beta and conv_bias.
    """
    var = running_var.to(dtype)
    mean = running_mean.to(dtype)
    gamma = weight.to(dtype) if weight is not None else torch.ones_like(var)
    beta = bias.to(dtype) if bias is not None else torch.zeros_like(var)
    scale = gamma * torch.rsqrt(var + eps)
    shift = beta - mean * scale
    if conv_bias is not None:
        shift = shift + conv_bias.to(dtype) * scale
    return scale.contiguous(), shift.contiguous()


def reference_conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    conv_bias: torch.Tensor | None = None,
    bn: torch.nn.BatchNorm2d | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    act: str = "relu",
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> torch.Tensor:
    """Ground truth in float64 on the CPU: conv2d, then BN (a module, or scale/shift), + residual, act."""
    f64 = torch.float64
    y = F.conv2d(
        x.detach().cpu().to(f64), weight.detach().cpu().to(f64),
        None if conv_bias is None else conv_bias.detach().cpu().to(f64),
        stride, padding, dilation, groups,
    )
    if bn is not None:
        y = F.batch_norm(
            y,
            bn.running_mean.detach().cpu().to(f64), bn.running_var.detach().cpu().to(f64),
            None if bn.weight is None else bn.weight.detach().cpu().to(f64),
            None if bn.bias is None else bn.bias.detach().cpu().to(f64),
            training=False, eps=bn.eps,
        )
    if scale is not None:
        y = y * scale.detach().cpu().to(f64).view(1, -1, 1, 1)
    if shift is not None:
        y = y + shift.detach().cpu().to(f64).view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.detach().cpu().to(f64)
    return activate(y, act, negative_slope)


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    rel_norm: float  # bound on ||out - ref|| / ||ref||


def tolerance(dtype: torch.dtype, reduction: int = 1, tf32: bool = False) -> Tolerance:
    """Per-dtype tolerances against the float64 reference; `reduction` = C/groups * R * S.

    float32 without TF32: rtol 1.3e-6 (torch's), atol 1e-5 growing with sqrt(reduction / 64),
    since fp32 accumulation error grows like sqrt(length). TF32: 10-bit mantissa inputs, so 5e-3
    (torch's conv tests use the same). fp16 / bf16: output rounding dominates (fp32 accumulation).
    """
    growth = max(1.0, math.sqrt(reduction / 64))
    if dtype == torch.float64:
        return Tolerance(1e-10, 1e-10 * growth, 1e-11)
    if dtype == torch.float32:
        if tf32:
            return Tolerance(5e-3, 5e-3 * growth, 2e-3)
        return Tolerance(1.3e-6, 1e-5 * growth, 2e-6)
    if dtype == torch.float16:
        return Tolerance(1e-3, 1e-3 * growth, 1e-3)
    if dtype == torch.bfloat16:
        return Tolerance(1.6e-2, 1e-2 * growth, 8e-3)
    raise ValueError(f"no tolerance for {dtype}")


@dataclass(frozen=True)
class Comparison:
    max_abs: float
    max_rel: float
    rel_norm: float
    ok: bool
    message: str


def branch_gain(*scales: torch.Tensor | None) -> torch.Tensor | None:
    """The per-channel gain `compare` takes for a sum of branches with these BN scales: the largest
    |scale|. A branch without one (None) is added unscaled, which compare's max(1, gain) covers."""
    given = [s.abs() for s in scales if s is not None]
    return functools.reduce(torch.maximum, given) if given else None


def compare(
    out: torch.Tensor,
    ref: torch.Tensor,
    tol: Tolerance,
    gain: torch.Tensor | None = None,
) -> Comparison:
    """Compare out with the float64 reference; NaN/Inf must sit exactly where the reference has them.

    gain: optional per-channel (dim 1) |scale|; both sides are divided by max(1, gain) first.
    """
    got = out.detach().cpu().to(torch.float64)
    ref = ref.detach().cpu().to(torch.float64)
    if got.shape != ref.shape:
        return Comparison(math.inf, math.inf, math.inf, False, f"shape {list(got.shape)} != reference {list(ref.shape)}")
    if gain is not None and got.dim() >= 2:
        g = gain.detach().cpu().to(torch.float64).abs().clamp(min=1.0).view(1, -1, *([1] * (got.dim() - 2)))
        got, ref = got / g, ref / g
    finite = torch.isfinite(ref) & torch.isfinite(got)
    diff = (got - ref).abs()[finite]
    max_abs = float(diff.max()) if diff.numel() else 0.0
    max_rel = float((diff / ref.abs()[finite].clamp(min=1e-30)).max()) if diff.numel() else 0.0
    ref_norm = float(torch.linalg.vector_norm(ref[finite])) if diff.numel() else 0.0
    rel_norm = float(torch.linalg.vector_norm(diff)) / ref_norm if ref_norm > 0 else float(torch.linalg.vector_norm(diff))
    try:
        torch.testing.assert_close(got, ref, rtol=tol.rtol, atol=tol.atol, equal_nan=True)
    except AssertionError as exc:
        return Comparison(max_abs, max_rel, rel_norm, False, str(exc))
    if rel_norm > tol.rel_norm:
        return Comparison(max_abs, max_rel, rel_norm, False, f"||out - ref|| / ||ref|| = {rel_norm:.3g} > {tol.rel_norm:.3g}")
    return Comparison(max_abs, max_rel, rel_norm, True, "")
