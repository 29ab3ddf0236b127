"""The "cuda" backend: CUTLASS tensor-core kernels from the C++ extension fastres._C (csrc/).

The extension registers fastres::cutlass_* ops (TORCH_LIBRARY in csrc/fastres.cpp). This module
asks it which cases it covers (the C++ side owns those rules), picks a tile config per shape
(timed once, cached by fastres.tuning) and calls it with channels_last operands.
"""

from __future__ import annotations

import functools

import torch

from fastres import tuning
from fastres.problem import ConvProblem

NAME = "cuda"


@functools.cache
def load_error() -> str | None:
    """None when fastres._C is loaded, else why not."""
    try:
        import fastres._C  # noqa: F401  (registers the fastres::cutlass_* ops)
    except ImportError as exc:
        return f"the CUDA extension fastres._C is not built or does not load ({exc})"
    return None


@functools.cache
def compiled_archs() -> tuple[int, ...]:
    """SM versions with CUTLASS kernels in this build, e.g. (90,)."""
    if load_error() is not None:
        return ()
    return tuple(int(a) for a in torch.ops.fastres.cutlass_archs())


def _arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"CUTLASS kernels need a CUDA device, got {device.type}"
    error = load_error()
    if error is not None:
        return error
    arch = _arch(device)
    if arch not in compiled_archs():
        built = ", ".join(f"sm_{a}" for a in compiled_archs()) or "no architecture"
        return f"this build has CUTLASS kernels for {built}; the device is sm_{arch}"
    return None


@functools.lru_cache(maxsize=4096)
def _unsupported(problem: ConvProblem, arch: int) -> str | None:
    reason = torch.ops.fastres.cutlass_unsupported_reason(
        [problem.n, problem.c, problem.h, problem.w], [problem.k, problem.c_per_group, problem.r, problem.s],
        list(problem.stride), list(problem.padding), list(problem.dilation), problem.groups,
        problem.dtype, problem.act, arch,
    )
    return reason or None


def unsupported_reason(problem: ConvProblem, device: torch.device) -> str | None:
    return _unsupported(problem, _arch(device))


@functools.cache
def configs(dtype: torch.dtype, arch: int) -> tuple[str, ...]:
    """Names of the compiled tile configs for (dtype, arch); the index is the config id."""
    names = torch.ops.fastres.cutlass_configs(dtype, arch)
    return tuple(n for n in names.split(";") if n)


def heuristic(problem: ConvProblem, names: tuple[str, ...]) -> int:
    """Tile before tuning: narrow N for K <= 64, small M for few output pixels, else 128x128."""
    m = problem.n * problem.p * problem.q
    if m <= 64 * 132:
        wanted = "64x64x64"
    elif problem.k <= 64:
        wanted = "128x64x64"
    else:
        wanted = "128x128x64"
    return next((i for i, name in enumerate(names) if wanted in name), 0)


def run(
    problem: ConvProblem,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    cl = torch.channels_last
    x = x.contiguous(memory_format=cl)
    weight = weight.contiguous(memory_format=cl)
    residual = None if residual is None else residual.contiguous(memory_format=cl)
    scale = None if scale is None else scale.float().contiguous()
    shift = None if shift is None else shift.float().contiguous()
    names = configs(problem.dtype, _arch(x.device))
    args = (x, weight, scale, shift, residual, list(problem.stride), list(problem.padding), list(problem.dilation),
            problem.groups, problem.act)
    config = tuning.pick(
        x.device, "cuda.conv_bn_act", problem.key, list(range(len(names))),
        encode=lambda i: names[i], run=lambda i: torch.ops.fastres.cutlass_conv_bn_act(*args, i),
        default=heuristic(problem, names),
    )
    return torch.ops.fastres.cutlass_conv_bn_act(*args, config)
