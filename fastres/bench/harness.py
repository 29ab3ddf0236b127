"""Timing and context for benchmarks: one fair way to time, and the facts every figure needs.

- `time_fn`: triton.testing.do_bench on CUDA (CUDA events, warm-up excluded, median and the
  20th/80th percentiles); on the CPU (smoke runs only) perf_counter medians, labelled as such.
- `seconds_since`: wall time of a contender's setup and first call (torch.compile's compile,
  fastres's tuning and kernel compiles): what a user waits for the first answer.
- `Rotation`: several copies of the inputs, cycled call by call, so a benchmark does not just
  re-read what the last call left in L2.
- `environment`: device, driver, CUDA / cuDNN / torch / triton / Python versions, git commit.
- `ceilings`: the measured dense fp16 matmul rate and device copy bandwidth of this device,
  from which each layer's roofline floor is computed.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import fastres


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def time_fn(
    fn: Callable[[], Any], device: torch.device, warmup_ms: int = 25, rep_ms: int = 100, cpu_runs: int = 3
) -> Timing:
    """Median and 20/80 percentiles of fn's time in ms, warm-up excluded (cpu_runs timed runs on a CPU)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        median, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(median), float(p20), float(p80))
    fn()
    samples = []
    for _ in range(cpu_runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return Timing(statistics.median(samples), samples[0], samples[-1])


def seconds_since(start: float, device: torch.device) -> float:
    """Wall seconds from time.perf_counter() `start` to now, with the device's queued work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


class Rotation:
    """Cycle through `copies` independent copies of some tensors (same values)."""

    def __init__(self, tensors: Sequence[torch.Tensor | None], copies: int) -> None:
        self.sets = [tuple(None if t is None else t.clone() for t in tensors) for _ in range(max(1, copies))]
        self.index = 0

    def next(self) -> tuple:
        self.index = (self.index + 1) % len(self.sets)
        return self.sets[self.index]


def copies_to_exceed_l2(bytes_per_set: int, device: torch.device, limit: int = 8) -> int:
    """How many input sets make the working set larger than L2 (so no set is still cached)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return int(min(limit, max(2, -(-2 * l2 // max(bytes_per_set, 1)))))


def _git_commit() -> str:
    if os.environ.get("FASTRES_COMMIT"):
        return os.environ["FASTRES_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device) -> dict[str, str]:
    """The context every published figure carries."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"{platform.processor() or platform.machine()} (CPU)",
        "driver": _driver_version() if cuda else "n/a",
        "cuda": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()) if cuda else "n/a",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "fastres": fastres.__version__,
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "triton_interpreter": os.environ.get("TRITON_INTERPRET", "0"),
    }


def ceilings(device: torch.device) -> dict[str, float] | None:
    """Measured dense fp16 matmul TFLOP/s and device-to-device copy GB/s (None on the CPU)."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    matmul = time_fn(lambda: a @ b, device, warmup_ms=100, rep_ms=400).median_ms
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), device, warmup_ms=100, rep_ms=400).median_ms
    return {"matmul_tflops": 2 * n**3 / matmul / 1e9, "copy_gbps": 2 * src.numel() / copy / 1e6}
