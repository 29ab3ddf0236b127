"""The fused epilogue, y = act(acc * scale[k] + shift[k] + residual), shared by every kernel,
and a stand-alone in-place pass of it over an NHWC tensor (the "cudnn" backend's second kernel).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastres.kernels import cdiv
from fastres.problem import DEFAULT_NEGATIVE_SLOPE

ACT_CODES = {"none": 0, "relu": 1, "relu6": 2, "silu": 3, "hardswish": 4, "sigmoid": 5, "hardsigmoid": 6,
             "leaky_relu": 7, "gelu": 8, "gelu_tanh": 9}


@triton.jit
def activation(v, ACT: tl.constexpr, NEG_SLOPE: tl.constexpr):
    # Comparisons written so NaN propagates, as torch.relu / relu6 do: NaN < 0 is False.
    if ACT == 1:
        v = tl.where(v < 0, 0.0, v)
    elif ACT == 2:
        v = tl.where(v < 0, 0.0, tl.where(v > 6.0, 6.0, v))
    elif ACT == 3 or ACT == 5 or ACT == 9:
        # sigmoid(z) from exp(-|z|) so exp never overflows. silu = v * sigmoid(v). GELU's tanh form,
        # 0.5 v (1 + tanh(u)) with u = sqrt(2/pi) (v + 0.044715 v^3), is v * sigmoid(2u): no cancellation
        # in 1 + tanh(u) for u << 0, and a v^3 overflowing to +-inf still gives v * 1 or v * 0, as torch.
        z = v * (1.5957691216057308 + 0.07135481627260025 * v * v) if ACT == 9 else v
        e = tl.exp(-tl.abs(z))
        sigmoid = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        v = sigmoid if ACT == 5 else v * sigmoid
    elif ACT == 4 or ACT == 6:
        # hardsigmoid = relu6(v + 3) / 6, clamped the same NaN-propagating way; hardswish = v * that.
        t = v + 3.0
        hardsigmoid = tl.where(t < 0, 0.0, tl.where(t > 6.0, 6.0, t)) / 6.0
        v = v * hardsigmoid if ACT == 4 else hardsigmoid
    elif ACT == 7:
        # LeakyReLU's slope is a constexpr: a model has one or two, and a constant multiplies for free
        # (a Python float constant, kept as a double in the float64 epilogue).
        v = tl.where(v < 0, v * NEG_SLOPE, v)
    elif ACT == 8:
        # GELU, torch's exact (erf) form: x * Phi(x). As in torch, -inf gives NaN (-inf * 0).
        v = 0.5 * v * (1.0 + tl.math.erf(v * 0.7071067811865476))
    return v


@triton.jit
def scale_shift(acc, ch, ch_mask, scale_ptr, shift_ptr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """acc * scale[ch] + shift[ch]; `ch` indexes acc's last axis (output channels)."""
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + ch, mask=ch_mask, other=1.0)
    if HAS_SHIFT:
        acc = acc + tl.load(shift_ptr + ch, mask=ch_mask, other=0.0)
    return acc


@triton.jit
def epilogue_kernel(
    y_ptr, scale_ptr, shift_ptr, res_ptr, numel, K,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
    NEG_SLOPE: tl.constexpr, UPCAST: tl.constexpr, BLOCK: tl.constexpr,
):
    # y and residual are NHWC-dense, so the channel of flat element i is i % K.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    v = tl.load(y_ptr + offs, mask=mask, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    ch = offs % K
    v = scale_shift(v, ch, mask, scale_ptr, shift_ptr, HAS_SCALE, HAS_SHIFT)
    if HAS_RESIDUAL:
        v = v + tl.load(res_ptr + offs, mask=mask, other=0.0).to(v.dtype)
    v = activation(v, ACT, NEG_SLOPE)
    tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=mask)


def apply_epilogue_(
    y: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    act: str,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> torch.Tensor:
    """In place on a channels_last y: y = act(y * scale + shift + residual), negative_slope being
    LeakyReLU's. Returns y."""
    if scale is None and shift is None and residual is None and act == "none":
        return y
    assert y.is_contiguous(memory_format=torch.channels_last)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    # float64 outputs keep float64 scale/shift (the reference dtype); all others use float32.
    vec_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    scale = None if scale is None else scale.to(vec_dtype).contiguous()
    shift = None if shift is None else shift.to(vec_dtype).contiguous()
    numel = y.numel()
    block = 1024
    epilogue_kernel[(cdiv(numel, block),)](
        y, scale, shift, residual, numel, y.shape[1],
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_RESIDUAL=residual is not None,
        ACT=ACT_CODES[act], NEG_SLOPE=negative_slope, UPCAST=y.dtype != torch.float64, BLOCK=block,
    )
    return y
