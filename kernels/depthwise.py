"""Depthwise conv2d (groups == C, any channel multiplier) + BN + residual + activation.

A depthwise conv has a reduction of only R*S per output, far too short for tensor cores, so
this is a direct conv on CUDA cores: each program owns BLOCK_M output pixels x BLOCK_N
channels and accumulates R*S fp32 multiply-adds, channels innermost so loads of a
channels_last x are contiguous. Output channel k reads input channel k // multiplier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastres.kernels import cdiv, next_power_of_2, start
from fastres.kernels.conv_bn_act import needs_int64
from fastres.kernels.epilogue import ACT_CODES, activation, scale_shift
from fastres.problem import ConvProblem


@triton.jit
def depthwise_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr,
    BATCH, H, W, P, Q, K, MULT,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    sw_k, sw_r, sw_s,
    sr_n, sr_c, sr_h, sr_w,
    so_n, so_c, so_h, so_w,
    R: tl.constexpr, S: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
    NEG_SLOPE: tl.constexpr,
    INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
    k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < BATCH * P * Q
    mask_n = k < K
    n = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    p = pq // Q
    q = pq % Q
    c = k // MULT
    ih0 = p * stride_h - pad_h
    iw0 = q * stride_w - pad_w
    x_imgs = x_ptr + n * sx_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for rs in range(R * S):
        r = rs // S
        s = rs % S
        ih = ih0 + r * dil_h
        iw = iw0 + s * dil_w
        valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load((x_imgs + ih * sx_h + iw * sx_w)[:, None] + c[None, :] * sx_c,
                    mask=valid[:, None] & mask_n[None, :], other=0.0)
        b = tl.load(w_ptr + k * sw_k + r * sw_r + s * sw_s, mask=mask_n, other=0.0)
        acc += a.to(tl.float32) * b.to(tl.float32)[None, :]

    acc = scale_shift(acc, k[None, :], mask_n[None, :], scale_ptr, shift_ptr, HAS_SCALE, HAS_SHIFT)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + (n * sr_n + p * sr_h + q * sr_w)[:, None] + k[None, :] * sr_c, mask=mask, other=0.0)
        acc = acc + res.to(tl.float32)
    acc = activation(acc, ACT, NEG_SLOPE)
    tl.store(out_ptr + (n * so_n + p * so_h + q * so_w)[:, None] + k[None, :] * so_c,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Config:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int


CONFIGS: tuple[Config, ...] = (
    Config(64, 64, 4),
    Config(128, 32, 4),
    Config(32, 128, 4),
    Config(128, 64, 8),
)


TUNING_KIND = "triton.depthwise"


def tiles(problem: ConvProblem, device: torch.device) -> list[Config]:
    """Tuning's candidates: every tile (one round; a direct conv has no loop variants)."""
    return list(CONFIGS)


def variants(cfg: Config, problem: ConvProblem, device: torch.device) -> list[Config]:
    """Tuning's second round: none (the direct kernel has no TMA or split-K versions)."""
    return []


def heuristic(problem: ConvProblem) -> Config:
    block_n = max(16, min(64, next_power_of_2(problem.k)))
    return Config(64, block_n, 4)


def launch(
    problem: ConvProblem,
    config: Config,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    out: torch.Tensor,
    compile_only: bool = False,
) -> torch.Tensor:
    """Run the kernel with one config into `out`. Scale/shift must be float32. compile_only:
    compile the kernel for this call (see fastres.kernels.start), launch nothing."""
    grid = (cdiv(problem.n * problem.p * problem.q, config.BLOCK_M), cdiv(problem.k, config.BLOCK_N))
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    start(depthwise_kernel, grid, compile_only)(
        x, weight, scale, shift, residual, out,
        problem.n, problem.h, problem.w, problem.p, problem.q, problem.k, problem.k_per_group,
        *problem.stride, *problem.padding, *problem.dilation,
        *x.stride(), weight.stride(0), weight.stride(2), weight.stride(3), *res_strides, *out.stride(),
        R=problem.r, S=problem.s,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_RESIDUAL=residual is not None,
        ACT=ACT_CODES[problem.act], NEG_SLOPE=problem.negative_slope, INDEX_64=needs_int64(x, residual, out),
        BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, num_warps=config.num_warps,
    )
    return out

