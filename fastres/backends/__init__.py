"""Backend registry and dispatch: which implementations exist, which can run a call, and "auto".

Every backend module exposes the same five names:
    NAME                                     -> str
    unavailable_reason(device)               -> why it cannot run on this device at all, or None
    unsupported_reason(problem, device)      -> why it cannot run this particular case, or None
    fuses_projection(problem)                -> whether run() also takes the residual's 1x1 projection
    run(problem, x, weight, scale, shift, residual[, projection]) -> channels_last output

A call whose residual is projected (problem.projection) runs in one kernel on a backend that fuses
it, and as two calls (the projection, then the conv with that as its residual) on any other.

"auto" runs the fastest backend that supports the case on the device whose answers pass the
float64 check (reference.wrong_answer): measured once per shape (fastres.tuning, cached on disk)
and never while a CUDA graph is being captured. Until a shape
has been measured it takes the first supported one in AUTO_DEFAULT_ORDER. For a projected residual
"auto" times the backends that fuse it against SPLIT, the two calls each with "auto"; SPLIT is
the unmeasured default. On the CPU it is the reference: the Triton interpreter is a correctness
tool, never a speed path.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch

from fastres import tuning
from fastres.backends import cuda, cudnn, reference
from fastres.backends import triton as triton_backend
from fastres.problem import ConvProblem, Projection

log = logging.getLogger("fastres")

NAMES: tuple[str, ...] = ("auto", "triton", "cuda", "cudnn", "reference")
_BACKENDS: dict[str, ModuleType] = {m.NAME: m for m in (triton_backend, cuda, cudnn, reference)}
# Unmeasured default: cuDNN's conv plus one fused epilogue pass is a known-good floor; the fused
# kernels are chosen once timing has shown them faster on this device and shape.
AUTO_DEFAULT_ORDER: tuple[str, ...] = ("cudnn", "cuda", "triton", "reference")
# "auto"'s name for running a projected residual as two calls (never a user-facing backend).
SPLIT = "split"


def check_name(backend: str) -> None:
    if backend not in NAMES:
        raise ValueError(f"backend must be one of {', '.join(repr(n) for n in NAMES)}, but got {backend!r}")


def status(device: torch.device | str | None = None) -> dict[str, str]:
    """For each backend: "available", or why it is not, on `device` (default: cuda if present, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    report = {}
    for name, module in _BACKENDS.items():
        reason = module.unavailable_reason(device)
        report[name] = "available" if reason is None else f"unavailable: {reason}"
    return report


def supported(problem: ConvProblem, device: torch.device) -> list[str]:
    """Backends that can run this case on this device, in AUTO_DEFAULT_ORDER."""
    return [name for name in AUTO_DEFAULT_ORDER if _runs(name, problem, device)]


def _auto_candidates(device: torch.device, problem: ConvProblem) -> list[str]:
    if device.type != "cuda":
        return ["reference"]
    if problem.projection is not None:
        fused = [n for n in supported(problem, device) if n != "reference" and _BACKENDS[n].fuses_projection(problem)]
        return [SPLIT] + fused
    return [n for n in supported(problem, device) if n != "reference"] or ["reference"]


def _runs(name: str, problem: ConvProblem, device: torch.device) -> bool:
    if name == SPLIT:
        return problem.projection is not None
    module = _BACKENDS.get(name)
    return module is not None and module.unavailable_reason(device) is None and module.unsupported_reason(problem, device) is None


def choose(problem: ConvProblem, device: torch.device, args: tuple) -> str:
    """The backend "auto" runs for this call (see module docstring); it supports the call."""
    candidates = functools.partial(_auto_candidates, device, problem)
    choice = tuning.pick(
        device, "auto", problem.key, candidates,
        encode=lambda name: name,
        run=lambda name: run(name, problem, *args),
        default=lambda: candidates()[0],
        check=lambda name: reference.wrong_answer(problem, lambda: run(name, problem, *args), *args),
    )
    log.debug("fastres auto: %s -> %s", problem.key, choice)
    return choice


def tuned_by(name: str, backend: str, problem: ConvProblem, device: torch.device) -> list[ConvProblem]:
    """The problems backend `name` will tune when a call with `backend` first runs `problem` on this
    device (none it already remembers a choice against): what compiling `name`'s kernels ahead of
    that call must cover. Mirrors run() and choose()."""
    if backend == "auto":
        candidates = _auto_candidates(device, problem)
        remembered = tuning.lookup(device, "auto", problem.key)
        if remembered in candidates:
            chosen = [remembered]
        else:  # all are timed, or without timing the first runs untried
            chosen = candidates[:None if tuning.may_time(device) else 1]
        problems = []
        for candidate in chosen:
            if candidate == SPLIT:
                problems += tuned_by(name, "auto", problem.projection, device) + tuned_by(name, "auto", problem.main, device)
            elif candidate == name:
                problems += tuned_by(name, name, problem, device)
        return problems
    if backend != name or not _runs(name, problem, device):
        return []
    if problem.projection is not None and not _BACKENDS[name].fuses_projection(problem):
        return tuned_by(name, name, problem.projection, device) + tuned_by(name, name, problem.main, device)
    return [problem]


def _check(name: str, problem: ConvProblem, device: torch.device) -> None:
    """Raise, in words, unless backend `name` can run this call (auto's choices need no check)."""
    module = _BACKENDS[name]
    reason = module.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"fastres backend {name!r} is unavailable: {reason}")
    reason = module.unsupported_reason(problem, device)
    if reason is not None:
        raise NotImplementedError(
            f"fastres backend {name!r} does not support this case ({problem.key}): {reason}. "
            f"backend='auto' picks one that does."
        )


def run(
    backend: str,
    problem: ConvProblem,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    projection: Projection | None = None,
) -> torch.Tensor:
    """Run one validated call on the named backend (or the one "auto" picks), on x's device."""
    index = other_cuda_device(x)
    if index is None:
        return _run(backend, problem, x, weight, scale, shift, residual, projection)
    with torch.cuda.device(index):
        return _run(backend, problem, x, weight, scale, shift, residual, projection)


def other_cuda_device(x: torch.Tensor) -> int | None:
    """x's CUDA device when it is not this thread's current device, else None. Triton launches and
    tuning times on the current device, not on the tensors' (a model on cuda:1, a serving thread
    whose current device is the default 0)."""
    if not x.is_cuda:
        return None
    index = x.get_device()
    return None if index == torch.cuda.current_device() else index


def _run(backend: str, problem: ConvProblem, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
         shift: torch.Tensor | None, residual: torch.Tensor | None, projection: Projection | None) -> torch.Tensor:
    if backend == "auto":
        backend = choose(problem, x.device, (x, weight, scale, shift, residual, projection))
    elif backend != SPLIT:
        _check(backend, problem, x.device)
    if problem.projection is not None and (backend == SPLIT or not _BACKENDS[backend].fuses_projection(problem)):
        halves = "auto" if backend == SPLIT else backend
        shortcut = _run(halves, problem.projection, residual, projection.weight, projection.scale, projection.shift,
                        None, None)
        return _run(halves, problem.main, x, weight, scale, shift, shortcut, None)
    module = _BACKENDS[backend]
    if problem.projection is not None:
        return module.run(problem, x, weight, scale, shift, residual, projection)
    return module.run(problem, x, weight, scale, shift, residual)
