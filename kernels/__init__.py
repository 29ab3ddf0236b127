"""fastres's Triton kernels (installed as the package fastres.kernels).

One file per kernel: the @triton.jit function, its configs and its launcher together.
    conv_bn_act.py  implicit-GEMM conv + BN + residual + activation (every non-depthwise conv)
    depthwise.py    direct depthwise conv (groups == C) with the same epilogue
    epilogue.py     the shared epilogue math, and a stand-alone epilogue pass for the cuDNN backend
    aot.py          compiles every kernel for sm_90 / sm_80 without a GPU and reports wgmma / mma.sync use
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host code: triton 3.9's triton.cdiv is a constexpr_function, about 2 us
    a call from Python, and the launchers' tile math runs on every op call."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1), for host code (see cdiv)."""
    return 1 << max(n - 1, 0).bit_length()


def interpreted() -> bool:
    """True when these kernels were decorated under TRITON_INTERPRET=1 (they then take CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastres.kernels.epilogue import epilogue_kernel

    return isinstance(epilogue_kernel, InterpretedFunction)


def start(kernel: Any, grid: tuple[int, ...], compile_only: bool = False) -> Callable[..., Any]:
    """kernel[grid], or with compile_only the compile alone: JITFunction.warmup specialises the
    arguments exactly as that launch would and compiles (on a worker thread inside compile_ahead)."""
    return functools.partial(kernel.warmup, grid=grid) if compile_only else kernel[grid]


def compile_ahead(compiles: Iterable[Callable[[], Any]]) -> None:
    """Call each compile_only launch with Triton compiling on a thread pool (triton.AsyncCompileMode),
    waiting for all: Triton's passes and ptxas release the GIL, so tuning's candidates compile in
    parallel instead of one by one at their first timed launch. FASTRES_COMPILE_THREADS sets the
    pool's size (default: the CPU cores this process may use; 1: compile at first launch instead).
    A no-op in the interpreter."""
    setting = os.environ.get("FASTRES_COMPILE_THREADS", "").strip()
    if setting and not setting.isdigit():
        raise ValueError(f"FASTRES_COMPILE_THREADS must be a whole number of threads, but got {setting!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = int(setting) if setting else cores
    if interpreted() or threads <= 1:
        return
    import triton

    with ThreadPoolExecutor(max_workers=threads) as pool, \
            triton.AsyncCompileMode(pool, ignore_errors=True):
        for compile_one in compiles:
            try:
                compile_one()
            except Exception:  # noqa: BLE001 - the timed launch of this config raises it again, and tuning skips it
                continue
