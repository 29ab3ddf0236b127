"""The "cuda" backend: CUTLASS tensor-core kernels from the C++ extension fastres._C (csrc/).

The extension registers fastres::cutlass_* ops (TORCH_LIBRARY in csrc/fastres.cpp). This module
asks it which cases it covers and which kernels run on the device (the C++ side owns those rules),
picks a kernel per shape (timed once among the usable ones that pass the float64 check of
reference.wrong_answer, cached by fastres.tuning) and calls it with channels_last operands.
Kernel names say family, dtype and tile: "sm90_f16_128x128x64" is the Hopper wgmma kernel,
"sm80_f16_128x128x32" the Ampere mma.sync kernel (also a candidate on Hopper).
"""

from __future__ import annotations

import functools

import torch

from fastres import tuning
from fastres.backends import reference
from fastres.problem import ConvProblem, empty_output

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
def build_digest() -> str | None:
    """What the loaded extension was built from (its sources, CUTLASS version, targets and nvcc,
    digested by setup.py), or None without it. The library's bytes differ from build to build."""
    if load_error() is not None:
        return None
    return str(torch.ops.fastres.cutlass_build_digest())


@functools.cache
def compiled_archs() -> tuple[int, ...]:
    """SM versions this build has device code for, e.g. (80, 90)."""
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
    if not configs(torch.float16, arch):
        built = ", ".join(f"sm_{a}" for a in compiled_archs()) or "no architecture"
        return f"this build has CUTLASS kernels for {built}, none of which runs on the device (sm_{arch})"
    return None


def _problem_args(problem: ConvProblem, arch: int) -> tuple:
    return (
        [problem.n, problem.c, problem.h, problem.w], [problem.k, problem.c_per_group, problem.r, problem.s],
        list(problem.stride), list(problem.padding), list(problem.dilation), problem.groups,
        problem.dtype, problem.act, arch,
    )


@functools.lru_cache(maxsize=4096)
def _unsupported(problem: ConvProblem, arch: int) -> str | None:
    return torch.ops.fastres.cutlass_unsupported_reason(*_problem_args(problem, arch)) or None


@functools.lru_cache(maxsize=4096)
def usable_configs(problem: ConvProblem, arch: int) -> tuple[int, ...]:
    """Ids of the kernels (see `configs`) whose CUTLASS can_implement accepts the problem."""
    return tuple(torch.ops.fastres.cutlass_usable_configs(*_problem_args(problem, arch)))


def unsupported_reason(problem: ConvProblem, device: torch.device) -> str | None:
    return _unsupported(problem, _arch(device))


@functools.cache
def configs(dtype: torch.dtype, arch: int) -> tuple[str, ...]:
    """Names of the kernels that run on SM version `arch` for dtype; the index is the config id."""
    names = torch.ops.fastres.cutlass_configs(dtype, arch)
    return tuple(n for n in names.split(";") if n)


def _tile(name: str) -> tuple[int, int]:
    """(M, N) of a kernel name such as "sm90_f16_128x64x64"."""
    m, n, _ = name.rsplit("_", 1)[1].split("x")
    return int(m), int(n)


def heuristic(problem: ConvProblem, names: tuple[str, ...], usable: tuple[int, ...]) -> int:
    """Kernel before tuning: the device's own family (listed first), then the tile: small M for
    few output pixels, narrow N for K <= 64, else 128x128."""
    m = problem.n * problem.p * problem.q
    if m <= 64 * 132:
        wanted = (64, 64)
    elif problem.k <= 64:
        wanted = (128, 64)
    else:
        wanted = (128, 128)
    family = names[usable[0]].split("_", 1)[0]
    same_family = [i for i in usable if names[i].startswith(family + "_")]
    return next((i for i in same_family if _tile(names[i]) == wanted), usable[0])


def _aligned(t: torch.Tensor, memory_format: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """`t`, dense in `memory_format`, with its data on a 16-byte boundary (the kernels' vector and
    TMA loads need it; a view at an odd storage offset is copied)."""
    t = t.contiguous(memory_format=memory_format)
    return t if t.data_ptr() % 16 == 0 else t.clone(memory_format=memory_format)


def fuses_projection(problem: ConvProblem) -> bool:
    """No: the CUTLASS kernels have one mainloop; a projected residual runs as two calls."""
    return False


def run(
    problem: ConvProblem,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    x = _aligned(x)
    weight = _aligned(weight)
    residual = None if residual is None else _aligned(residual)
    scale = None if scale is None else _aligned(scale.float(), torch.contiguous_format)
    shift = None if shift is None else _aligned(shift.float(), torch.contiguous_format)
    arch = _arch(x.device)
    names = configs(problem.dtype, arch)
    args = (x, weight, scale, shift, residual, list(problem.stride), list(problem.padding), list(problem.dilation),
            problem.groups, problem.act)

    def wrong_answer(config: int) -> str | None:
        """The float64 check, the kernel writing into one output it poisons (the op's `out` form)."""
        out = empty_output(x, problem.output_shape)
        into = torch.ops.fastres.cutlass_conv_bn_act.out
        return reference.wrong_answer(problem, lambda: into(*args, config, out=out), x, weight, scale, shift, residual)

    config = tuning.pick(
        x.device, "cuda.conv_bn_act", problem.key, lambda: usable_configs(problem, arch),
        encode=lambda i: names[i], run=lambda i: torch.ops.fastres.cutlass_conv_bn_act(*args, i),
        default=lambda: heuristic(problem, names, usable_configs(problem, arch)), check=wrong_answer,
    )
    return torch.ops.fastres.cutlass_conv_bn_act(*args, config)
