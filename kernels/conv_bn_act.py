"""Implicit-GEMM conv2d + BN + residual + activation in one Triton kernel.

GEMM view (per group g):  out[m, k] = sum_{r, s, c} x[n, p*sh - ph + r*dh, q*sw - pw + s*dw, g*Cg + c]
                                                    * w[g*Kg + k, c, r, s]
with m = (n, p, q) over N*P*Q output pixels, k over Kg output channels, reduction over R*S*Cg.
Accumulation is fp32 (tl.dot); the epilogue applies scale/shift per channel, adds the residual
(read once, any strides, may alias x), applies the activation and stores in the input dtype.

All tensors are addressed through their strides, so NCHW, channels_last and non-contiguous
views need no copy; channels_last (C innermost) is the fast layout because each A tile row is
then one contiguous run of channels. PLAIN_GEMM (1x1, stride 1, no padding, pixel-dense x)
drops the im2col index math: the conv is a [N*H*W, C] x [C, K] GEMM. INDEX_64 switches the
pixel offsets to int64 when a tensor spans more than 2**31 elements.

HAS_PROJECTION (a ResNet block's downsample branch fused into its last conv): the residual is then
the block's input, and a second GEMM phase computes its strided 1x1 conv into a second fp32
accumulator with its own BN scale and shift before the add. Two accumulators rather than one GEMM
over concatenated K: each branch's scale stays an exact fp32 multiply (folding it into fp16
weights would round them), and a zero BN scale needs no special case.

FLAT_TAPS (convs with few channels per group: the stem's C = 3, ResNeXt's grouped 3x3) reduces
over a filter row's S*C (s, c) taps together, BLOCK_K at a time, instead of C channels per (r, s)
step: the stem then takes 7 steps of 21 useful values each rather than 49 steps of 3.

PACK_GROUPS (tuning candidates for grouped convs with few channels per group, ResNeXt's 4 to 32):
one output tile spans BLOCK_N // KG whole groups instead of one group's KG channels, its inputs
are one contiguous channel run, and the weight tile is block-diagonal; the tensor cores do
BLOCK_N // KG times the useful work in exchange for full-width loads and tiles.

USE_TMA (tuning candidates for 1x1 stride-1 convs on Hopper): the PLAIN_GEMM loop reads its A and B
tiles through tensor descriptors, i.e. the TMA engine copies whole tiles to shared memory with no
address math or masks in the loop (rows and channels past the edge arrive as zeros).

SPLIT_K > 1 (tuning candidates for layers with too few output tiles to fill the GPU: batch 1,
the 7x7 and 14x14 stages) splits the reduction steps over program_id(2); each split stores fp32
partial sums to a workspace and splitk_reduce_kernel adds them in a fixed order and applies the
epilogue, so results stay deterministic.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fastres.kernels import cdiv, next_power_of_2, start
from fastres.kernels.epilogue import ACT_CODES, activation, scale_shift
from fastres.numerics import conv_tf32_enabled
from fastres.problem import ConvProblem, Projection

INT32_MAX = 2**31 - 1
TUNING_KIND = "triton.conv_bn_act"
REDUCE_BLOCK = 64  # split-K reduce tile: a memory-bound pass over a small [M, K] output


@triton.jit
def dot_over_channels(acc, a_rows, sa_c, mask_m, b_cols, sb_c, mask_n, C_BEGIN, C_END, BLOCK_K: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """acc + A[rows, C_BEGIN:C_END] @ B[C_BEGIN:C_END, cols], BLOCK_K channels per step; A rows and
    B columns are base pointers, channels advance by their strides (a 1x1 conv over pixel rows is
    this GEMM)."""
    offs_c = tl.arange(0, BLOCK_K)
    for c0 in range(C_BEGIN, C_END, BLOCK_K):
        cs = c0 + offs_c
        mask_c = cs < C_END
        a = tl.load(a_rows[:, None] + cs[None, :] * sa_c, mask=mask_m[:, None] & mask_c[None, :], other=0.0)
        b = tl.load(b_cols[None, :] + cs[:, None] * sb_c, mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def dot_over_descriptors(acc, a_desc, b_desc, off_m, off_n, C_BEGIN, C_END, BLOCK_K: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """acc + A[off_m:, C_BEGIN:C_END] @ B[off_n:, C_BEGIN:C_END]^T through tensor descriptors: the
    descriptor's zero padding stands in for the masks (B is [K, C], a 1x1 conv's weight as stored)."""
    for c0 in range(C_BEGIN, C_END, BLOCK_K):
        a = a_desc.load([off_m, c0])
        b = b_desc.load([off_n, c0])
        acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def residual_act_store(acc, n, p, q, k, mask, res_ptr, sr_n, sr_c, sr_h, sr_w, out_ptr, so_n, so_c, so_h, so_w,
                       HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr, NEG_SLOPE: tl.constexpr):
    """The epilogue's tail: + residual[n, k, p, q], activation, one store in the output dtype."""
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + (n * sr_n + p * sr_h + q * sr_w)[:, None] + k[None, :] * sr_c, mask=mask, other=0.0)
        acc = acc + res.to(tl.float32)
    acc = activation(acc, ACT, NEG_SLOPE)
    out = out_ptr + (n * so_n + p * so_h + q * so_w)[:, None] + k[None, :] * so_c
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def conv_bn_act_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, pw_ptr, pscale_ptr, pshift_ptr, ws_ptr, x_desc, w_desc,
    BATCH, H, W, P, Q, CG, KG, CP, K,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, pstride_h, pstride_w,
    sx_n, sx_c, sx_h, sx_w,
    sw_k, sw_c, sw_r, sw_s,
    sr_n, sr_c, sr_h, sr_w,
    so_n, so_c, so_h, so_w,
    spw_k, spw_c,
    R: tl.constexpr, S: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
    NEG_SLOPE: tl.constexpr, HAS_PROJECTION: tl.constexpr, HAS_PSCALE: tl.constexpr, HAS_PSHIFT: tl.constexpr,
    PLAIN_GEMM: tl.constexpr, FLAT_TAPS: tl.constexpr, USE_TMA: tl.constexpr, INDEX_64: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PACK_GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid = tl.program_id(0)
    group = tl.program_id(1)
    M = BATCH * P * Q
    num_pid_m = tl.cdiv(M, BLOCK_M)
    N_COLS = K if PACK_GROUPS else KG  # output channels one program row walks
    num_pid_n = tl.cdiv(N_COLS, BLOCK_N)
    # Group-M swizzle: GROUP_M consecutive row-tiles walk the same weight columns, so those
    # weight tiles are reused from L2 instead of being refetched for every pixel tile.
    pids_per_band = GROUP_M * num_pid_n
    first_m = (pid // pids_per_band) * GROUP_M
    band_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_band) % band_m
    pid_n = (pid % pids_per_band) // band_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N_COLS
    n = offs_m // (P * Q)
    pq = offs_m % (P * Q)
    p = pq // Q
    q = pq % Q
    if PACK_GROUPS:
        # Several whole groups per tile (ResNeXt's 4 to 32 channels per group): the tile's inputs
        # are one contiguous channel run, so A loads whole channels_last rows instead of CG
        # channels, and the weight tile is block-diagonal (zero across groups).
        k = offs_n
        first_group = (pid_n * BLOCK_N) // KG
        k_group = k // KG - first_group
        c_base = first_group * CG
        c_count = min((BLOCK_N // KG) * CG, (K // KG) * CG - c_base)
        w_cols = w_ptr + k * sw_k - (k_group * CG) * sw_c
    else:
        k = group * KG + offs_n
        c_base = group * CG
        c_count = CG
        w_cols = w_ptr + k * sw_k
    if INDEX_64:
        c_base = c_base.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Split-K: program_id(2) takes one contiguous share of the reduction steps, for layers with
    # too few output tiles to fill the GPU (batch 1, 7x7 maps); partial sums go to a workspace.
    c_blocks = tl.cdiv(c_count, BLOCK_K)
    tap_blocks = tl.cdiv(S * CG, BLOCK_K)
    if PLAIN_GEMM:
        n_steps = c_blocks
    elif FLAT_TAPS:
        n_steps = R * tap_blocks
    else:
        n_steps = R * S * c_blocks
    if SPLIT_K == 1:
        first_step = 0
        last_step = n_steps
        c_begin = 0
        c_end = c_count
    else:
        per_split = tl.cdiv(n_steps, SPLIT_K)
        first_step = tl.program_id(2) * per_split
        last_step = min(first_step + per_split, n_steps)
        c_begin = first_step * BLOCK_K
        c_end = min(last_step * BLOCK_K, c_count)
    if USE_TMA:
        acc = dot_over_descriptors(acc, x_desc, w_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, c_begin, c_end, BLOCK_K,
                                   DOT_PRECISION)
    elif PLAIN_GEMM:
        a_rows = x_ptr + offs_m * sx_w + c_base * sx_c
        acc = dot_over_channels(acc, a_rows, sx_c, mask_m, w_cols, sw_c, mask_n, c_begin, c_end, BLOCK_K, DOT_PRECISION)
    else:
        x_imgs = x_ptr + n * sx_n + c_base * sx_c
        ih0 = p * stride_h - pad_h
        iw0 = q * stride_w - pad_w
        # Out-of-image taps read as zero (the masks below): that is the conv's zero padding.
        if FLAT_TAPS:
            for step in range(first_step, last_step):
                r = step // tap_blocks
                taps = (step % tap_blocks) * BLOCK_K + offs_c
                s = taps // CG
                cs = taps % CG
                mask_t = taps < S * CG
                ih = ih0 + r * dil_h
                iw = iw0[:, None] + (s * dil_w)[None, :]
                valid = (mask_m & (ih >= 0) & (ih < H))[:, None] & mask_t[None, :] & (iw >= 0) & (iw < W)
                a = tl.load((x_imgs + ih * sx_h)[:, None] + iw * sx_w + (cs * sx_c)[None, :], mask=valid, other=0.0)
                b = tl.load((w_cols + r * sw_r)[None, :] + (s * sw_s + cs * sw_c)[:, None],
                            mask=mask_t[:, None] & mask_n[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        else:
            # One flat loop over (r, s, channel block) steps rather than nested loops: with C = 64 the
            # inner channel loop would have a single iteration, leaving the software pipeliner
            # (num_stages) nothing to overlap; flat, it has R*S*ceil(C/BLOCK_K) steps.
            for step in range(first_step, last_step):
                rs = step // c_blocks
                r = rs // S
                s = rs % S
                cs = (step % c_blocks) * BLOCK_K + offs_c
                mask_c = cs < c_count
                ih = ih0 + r * dil_h
                iw = iw0 + s * dil_w
                valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a_rows = x_imgs + ih * sx_h + iw * sx_w
                a = tl.load(a_rows[:, None] + cs[None, :] * sx_c, mask=valid[:, None] & mask_c[None, :], other=0.0)
                b_cols = w_cols + r * sw_r + s * sw_s
                b_mask = mask_c[:, None] & mask_n[None, :]
                if PACK_GROUPS:
                    b_mask = b_mask & ((cs // CG)[:, None] == k_group[None, :])
                b = tl.load(b_cols[None, :] + cs[:, None] * sw_c, mask=b_mask, other=0.0)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        # Raw fp32 partial sums, ws[split, m, k]; splitk_reduce_kernel sums them and finishes.
        tl.store(ws_ptr + (tl.program_id(2) * M + offs_m)[:, None] * K + k[None, :], acc, mask=mask)
    else:
        acc = scale_shift(acc, k[None, :], mask_n[None, :], scale_ptr, shift_ptr, HAS_SCALE, HAS_SHIFT)
        if HAS_PROJECTION:
            # residual[n, :, p*ps_h, q*ps_w] x w_p[k, :]: always in the image (1x1, no padding).
            r_rows = res_ptr + n * sr_n + (p * pstride_h) * sr_h + (q * pstride_w) * sr_w
            acc_p = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_p = dot_over_channels(acc_p, r_rows, sr_c, mask_m, pw_ptr + k * spw_k, spw_c, mask_n, 0, CP, BLOCK_K,
                                      DOT_PRECISION)
            acc = acc + scale_shift(acc_p, k[None, :], mask_n[None, :], pscale_ptr, pshift_ptr, HAS_PSCALE, HAS_PSHIFT)
        residual_act_store(acc, n, p, q, k, mask, res_ptr, sr_n, sr_c, sr_h, sr_w, out_ptr, so_n, so_c, so_h, so_w,
                           HAS_RESIDUAL and not HAS_PROJECTION, ACT, NEG_SLOPE)


@triton.jit
def splitk_reduce_kernel(
    ws_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr,
    M, P, Q, K,
    sr_n, sr_c, sr_h, sr_w,
    so_n, so_c, so_h, so_w,
    SPLIT_K: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
    NEG_SLOPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Summed in split order, so the result does not depend on which program finished first.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = k < K
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in range(SPLIT_K):
        acc += tl.load(ws_ptr + (split * M + offs_m)[:, None] * K + k[None, :], mask=mask, other=0.0)
    acc = scale_shift(acc, k[None, :], mask_n[None, :], scale_ptr, shift_ptr, HAS_SCALE, HAS_SHIFT)
    n = offs_m // (P * Q)
    p = (offs_m % (P * Q)) // Q
    q = offs_m % Q
    residual_act_store(acc, n, p, q, k, mask, res_ptr, sr_n, sr_c, sr_h, sr_w, out_ptr, so_n, so_c, so_h, so_w,
                       HAS_RESIDUAL, ACT, NEG_SLOPE)


@dataclass(frozen=True)
class Config:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    num_warps: int
    num_stages: int
    SPLIT_K: int = 1
    TMA: bool = False
    PACK_GROUPS: bool = False


# A compact space: large square tiles for the big-M early layers, narrow-N tiles for K = 64
# layers, small-M tiles for the 7x7 / batch-1 late layers; BLOCK_K 64 (fp16/bf16 wgmma K is 16,
# four steps per stage) or 32 for fp32.
CONFIGS: tuple[Config, ...] = (
    Config(128, 128, 64, 8, 8, 3),
    Config(128, 256, 64, 8, 8, 3),
    Config(256, 128, 64, 8, 8, 3),
    Config(128, 64, 64, 8, 4, 4),
    Config(64, 128, 64, 8, 4, 4),
    Config(64, 64, 64, 8, 4, 4),
    Config(128, 128, 32, 8, 4, 4),
    Config(64, 64, 32, 8, 4, 3),
)


def _fits(cfg: Config, problem: ConvProblem, shared_mem: int | None) -> bool:
    """Prune configs far larger than the problem or over the device's shared memory."""
    cols, run, _ = _tile_extents(cfg, problem)
    if cfg.BLOCK_N > max(64, next_power_of_2(cols)):
        return False
    if cfg.BLOCK_K > max(32, next_power_of_2(run)):
        return False
    if problem.dtype == torch.float32 and cfg.BLOCK_K > 32:
        return False
    if shared_mem is not None:
        stage_bytes = (cfg.BLOCK_M + cfg.BLOCK_N) * cfg.BLOCK_K * problem.dtype.itemsize
        if stage_bytes * cfg.num_stages > shared_mem:
            return False
    return True


def _shared_mem(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    index = torch.cuda.current_device() if device.index is None else device.index  # (index 0 is falsy)
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return int(props["max_shared_mem"])


def heuristic(problem: ConvProblem) -> Config:
    """The config used before (or instead of) tuning: tile sizes matched to the GEMM's extents."""
    m = problem.n * problem.p * problem.q
    block_n = 128 if problem.k_per_group >= 128 else max(16, min(64, next_power_of_2(problem.k_per_group)))
    block_k = 32 if problem.dtype == torch.float32 else 64
    # Under 16 channels per group a step takes a filter row's taps (flat_taps): size it to those.
    run = problem.c_per_group if problem.c_per_group >= 16 else problem.s * problem.c_per_group
    block_k = max(16, min(block_k, next_power_of_2(run)))
    block_m = 128 if m >= 128 * 64 else 64
    if problem.projection is not None:
        # Two live accumulators: 64x128 on 4 warps compiles without spills for sm_90 (and sm_80 with
        # triton 3.9; 3.6 keeps 32 B of stack there) (python -m fastres.kernels.aot); 128x128 on
        # 8 warps spills 104 B per thread on sm_90.
        block_m = 64
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return Config(block_m, block_n, block_k, 8, warps, 3)


def flat_taps(problem: ConvProblem, block_k: int) -> bool:
    """Whether reducing over each filter row's (s, c) taps together takes fewer BLOCK_K steps than
    reducing C channels per (r, s) tap: true where C per group is small next to BLOCK_K."""
    if problem.r == problem.s == 1:
        return False
    cg, s = problem.c_per_group, problem.s
    return cdiv(s * cg, block_k) < s * cdiv(cg, block_k)


def packs_groups(problem: ConvProblem, cfg: Config) -> bool:
    """Whether cfg's output tile holds several whole groups: a grouped (not depthwise) conv whose
    channels per group divide BLOCK_N, at most MAX_PACKED_GROUPS of them (the tensor cores do that
    many times the useful work), on tiles of at most 64x64: the block-diagonal weight mask is not
    an outer product of two vectors, and larger tiles spill on sm_90 (python -m fastres.kernels.aot)."""
    kg = problem.k_per_group
    return (problem.groups > 1 and not problem.is_depthwise and kg < cfg.BLOCK_N and cfg.BLOCK_N % kg == 0
            and cfg.BLOCK_N // kg <= MAX_PACKED_GROUPS and cfg.BLOCK_M * cfg.BLOCK_N <= 64 * 64)


def _packed(cfg: Config, problem: ConvProblem) -> bool:
    """Whether cfg runs the packed-groups loop on this problem (a PACK_GROUPS config where groups
    do not pack runs the per-group loop)."""
    return cfg.PACK_GROUPS and packs_groups(problem, cfg)


def _tile_extents(cfg: Config, problem: ConvProblem) -> tuple[int, int, int]:
    """What one program reduces, as the kernel's loops see it: the output channels a row of
    programs walks, the channels (or flat taps) one reduction run covers, and the runs per tile."""
    if _packed(cfg, problem):
        return problem.k, cfg.BLOCK_N // problem.k_per_group * problem.c_per_group, problem.r * problem.s
    if flat_taps(problem, cfg.BLOCK_K):
        return problem.k_per_group, problem.s * problem.c_per_group, problem.r
    return problem.k_per_group, problem.c_per_group, problem.r * problem.s


def _grid(cfg: Config, problem: ConvProblem) -> tuple[int, int]:
    """The GEMM kernel's programs, split-K aside: (pixel tiles x channel tiles, groups)."""
    cols, _, _ = _tile_extents(cfg, problem)
    m = problem.n * problem.p * problem.q
    return cdiv(m, cfg.BLOCK_M) * cdiv(cols, cfg.BLOCK_N), 1 if _packed(cfg, problem) else problem.groups


def _tiles_and_steps(cfg: Config, problem: ConvProblem) -> tuple[int, int]:
    """Output tiles in cfg's grid, and reduction steps per tile."""
    rows, groups = _grid(cfg, problem)
    _, run, runs = _tile_extents(cfg, problem)
    return rows * groups, runs * cdiv(run, cfg.BLOCK_K)


def _accumulators_fit(cfg: Config, problem: ConvProblem) -> bool:
    """A projection keeps two fp32 accumulators live: at most 64 values each per thread, else
    both no longer fit in the 255 registers next to the operand fragments and the kernel spills."""
    return problem.projection is None or cfg.BLOCK_M * cfg.BLOCK_N <= 64 * 32 * cfg.num_warps


MAX_PACKED_GROUPS = 16
SPLITS: tuple[int, ...] = (2, 4, 8, 16)
H100_SMS = 132  # the SM count assumed where there is no CUDA device to ask (interpreter tests)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return H100_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(cfg: Config, problem: ConvProblem, sms: int) -> list[Config]:
    """Split-K versions of cfg worth timing: only while the grid has fewer than two waves of
    programs, each split keeps at least 4 reduction steps (something to pipeline), and the fp32
    workspace stays under 2**31 elements."""
    if problem.projection is not None:
        return []
    m = problem.n * problem.p * problem.q
    tiles, steps = _tiles_and_steps(cfg, problem)
    return [dataclasses.replace(cfg, SPLIT_K=split) for split in SPLITS
            if tiles * split <= 2 * sms and steps >= 4 * split and split * m * problem.k <= INT32_MAX]


def _has_tma(device: torch.device) -> bool:
    """Hopper and later copy tiles with the TMA engine; the interpreter emulates it (CPU tests)."""
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9)


def tma_applies(problem: ConvProblem) -> bool:
    """Tensor-descriptor loads cover the 1x1, stride-1, unpadded, ungrouped convs (a [N*H*W, C] x [C, K]
    GEMM) whose channel rows are a multiple of 16 bytes, as TMA requires of every row stride."""
    return (problem.r == problem.s == 1 and problem.stride == (1, 1) and problem.padding == (0, 0)
            and problem.groups == 1 and problem.c * problem.dtype.itemsize % 16 == 0)


def tiles(problem: ConvProblem, device: torch.device) -> list[Config]:
    """Tuning's first round: every tile config that fits the problem and the device (packed-group
    tiles included), each with the pointer loop and no split."""
    smem = _shared_mem(device)
    plain = [c for c in CONFIGS if _fits(c, problem, smem) and _accumulators_fit(c, problem)]
    packed = (dataclasses.replace(c, PACK_GROUPS=True) for c in CONFIGS if packs_groups(problem, c))
    return plain + [c for c in packed if _fits(c, problem, smem) and _accumulators_fit(c, problem)]


def variants(cfg: Config, problem: ConvProblem, device: torch.device) -> list[Config]:
    """Tuning's second round, for the fastest tiles only: cfg with TMA loads where they apply, and
    split-K versions of both loops where the grid is small."""
    loops = [cfg]
    if tma_applies(problem) and _has_tma(device) and not cfg.PACK_GROUPS:
        loops.append(dataclasses.replace(cfg, TMA=True))
    sms = _sm_count(device)
    return loops[1:] + [split for loop in loops for split in _splits(loop, problem, sms)]


def candidates(problem: ConvProblem, device: torch.device) -> list[Config]:
    """Every config tuning may choose for the problem: the tiles and all their variants."""
    first = tiles(problem, device)
    return first + [v for c in first for v in variants(c, problem, device)]


def _pixel_row_stride(t: torch.Tensor) -> int | None:
    """The stride from each (n, h, w) pixel of t to the next when they all sit one stride apart
    (channels_last, or any layout whose pixel axes collapse into one), else None. x is then a
    [N*H*W, C] matrix with this row stride."""
    n, c, h, w = t.shape
    axes = [(size, stride) for size, stride in ((n, t.stride(0)), (h, t.stride(2)), (w, t.stride(3))) if size > 1]
    if not axes:
        return c  # a single pixel: any row stride addresses it; C keeps TMA's alignment rule
    inner_size, row = axes[-1]
    inner_stride = row
    for size, stride in reversed(axes[:-1]):
        if stride != inner_size * inner_stride:
            return None
        inner_size, inner_stride = size, stride
    return row


def _max_offset(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def _matrix_descriptor(t: torch.Tensor, rows: int, cols: int, row_stride: int, col_stride: int,
                       block: tuple[int, int]) -> TensorDescriptor | None:
    """t's memory as a [rows, cols] matrix for TMA loads, or None where TMA's rules do not hold
    (unit column stride, 16-byte aligned base and row stride)."""
    if col_stride != 1 or (row_stride * t.element_size()) % 16 or t.data_ptr() % 16:
        return None
    return TensorDescriptor(t, [rows, cols], [row_stride, col_stride], list(block))


def needs_int64(*tensors: torch.Tensor | None) -> bool:
    return any(_max_offset(t) > INT32_MAX for t in tensors) or any(
        t is not None and t.numel() > INT32_MAX for t in tensors
    )


def launch(
    problem: ConvProblem,
    config: Config,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    out: torch.Tensor,
    index_64: bool | None = None,
    projection: Projection | None = None,
    compile_only: bool = False,
) -> torch.Tensor:
    """Run the kernel with one config into `out` (any strides). Scale/shift must be float32.
    With `projection`, `residual` is the tensor it projects (problem.projection describes it).
    A TMA config runs its tensor-descriptor loop where x and weight allow one (tma_applies, a
    channels_last-style x, aligned memory) and the pointer loop otherwise. compile_only: compile
    the kernels this call would launch (see fastres.kernels.start), launch nothing."""
    packed = _packed(config, problem)
    row_stride = _pixel_row_stride(x)
    plain = (problem.r == problem.s == 1 and problem.stride == (1, 1) and problem.padding == (0, 0)
             and row_stride is not None and not packed)
    # PLAIN_GEMM reads x's w-stride as the pixel-row stride (they differ only where h, w are 1).
    x_strides = (*x.stride()[:3], row_stride) if plain else x.stride()
    m = problem.n * problem.p * problem.q
    x_desc = w_desc = None
    if config.TMA and plain and tma_applies(problem):
        x_desc = _matrix_descriptor(x, m, problem.c, row_stride, x.stride(1), (config.BLOCK_M, config.BLOCK_K))
        w_desc = _matrix_descriptor(weight, problem.k, problem.c, weight.stride(0), weight.stride(1),
                                    (config.BLOCK_N, config.BLOCK_K))
        if x_desc is None or w_desc is None:
            x_desc = w_desc = None
    if index_64 is None:
        index_64 = needs_int64(x, residual, out)
    if problem.dtype == torch.float32 and not conv_tf32_enabled():
        precision = "ieee"
    else:
        precision = "tf32"
    grid = (*_grid(config, problem), config.SPLIT_K)
    res_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    pw = projection.weight if projection is not None else None
    workspace = None
    if config.SPLIT_K > 1:
        if projection is not None:
            raise ValueError("split-K does not take a projected residual (its two sums scale differently)")
        if config.SPLIT_K * m * problem.k > INT32_MAX:
            raise ValueError(f"split-K {config.SPLIT_K} needs a workspace past 2**31 elements (its offsets are 32-bit)")
        workspace = torch.empty((config.SPLIT_K, m, problem.k), dtype=torch.float32, device=x.device)
    start(conv_bn_act_kernel, grid, compile_only)(
        x, weight, scale, shift, residual, out,
        pw, *((projection.scale, projection.shift) if projection is not None else (None, None)), workspace,
        x_desc, w_desc,
        problem.n, problem.h, problem.w, problem.p, problem.q, problem.c_per_group, problem.k_per_group,
        pw.shape[1] if pw is not None else 0, problem.k,
        *problem.stride, *problem.padding, *problem.dilation,
        *(projection.stride if projection is not None else (1, 1)),
        *x_strides, *weight.stride(), *res_strides, *out.stride(),
        *(pw.stride()[:2] if pw is not None else (0, 0)),
        R=problem.r, S=problem.s,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_RESIDUAL=residual is not None,
        ACT=ACT_CODES[problem.act], NEG_SLOPE=problem.negative_slope,
        HAS_PROJECTION=pw is not None,
        HAS_PSCALE=pw is not None and projection.scale is not None,
        HAS_PSHIFT=pw is not None and projection.shift is not None,
        PLAIN_GEMM=plain, FLAT_TAPS=not plain and not packed and flat_taps(problem, config.BLOCK_K),
        USE_TMA=x_desc is not None, INDEX_64=index_64, DOT_PRECISION=precision, PACK_GROUPS=packed,
        BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K, GROUP_M=config.GROUP_M,
        SPLIT_K=config.SPLIT_K, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if workspace is not None:
        reduce_grid = (cdiv(m, REDUCE_BLOCK), cdiv(problem.k, REDUCE_BLOCK))
        start(splitk_reduce_kernel, reduce_grid, compile_only)(
            workspace, scale, shift, residual, out, m, problem.p, problem.q, problem.k, *res_strides, *out.stride(),
            SPLIT_K=config.SPLIT_K, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
            HAS_RESIDUAL=residual is not None, ACT=ACT_CODES[problem.act], NEG_SLOPE=problem.negative_slope,
            BLOCK_M=REDUCE_BLOCK, BLOCK_N=REDUCE_BLOCK,
        )
    return out

