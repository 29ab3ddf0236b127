"""Timing and context for benchmarks: one fair way to time, and the facts every figure needs.

- `time_fn`: triton.testing.do_bench on CUDA (CUDA events, warm-up excluded, median and the
  20th/80th percentiles); on the CPU (smoke runs only) perf_counter medians, labelled as such.
- `quiet`: warnings off while contenders build and run, but for tuning's rejected candidates,
  which are shown and collected for the row's JSON.
- `seconds_since`: wall time of a contender's setup and first call (torch.compile's compile,
  fastres's tuning and kernel compiles): what a user waits for the first answer.
- `Rotation`: several copies of the inputs, cycled call by call, so a benchmark does not just
  re-read what the last call left in L2.
- `measure`: one contender's row from its first call, check and timing, or why it did not run;
  a crash that loses the CUDA context raises DeviceLost (no more GPU work in this process).
- `environment`: device, driver, CUDA / cuDNN / torch / triton / Python versions, git commit and
  a digest of the code measured.
- `ceilings`: the measured dense fp16 matmul rate and device copy bandwidth of this device,
  from which each layer's roofline floor is computed.
- `Unit`, `run_units`: a suite as units of work (a layer, a model at one batch size), run under a
  time limit, the results file rewritten after each one, so a run cut short keeps what it measured
  and `--resume` goes on from there.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

import fastres
from fastres.bench.report import Results, Row
from fastres.tuning import code_digest, kernel_files


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


# fastres.tuning's warning for a candidate that failed its float64 check or raised
REJECTED_CANDIDATE = r"fastres: .* candidate .*; not used"


@contextlib.contextmanager
def quiet() -> Iterator[list[str]]:
    """Warnings off while contenders are built and run (compilers' and torch's), but for tuning's
    rejected candidates: a config that computes wrongly on this GPU must reach the log. Their
    messages are also collected in the list given, for the benchmark's results file."""
    rejected: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.filterwarnings("always", message=REJECTED_CANDIDATE)
        show = warnings.showwarning

        def collect(message, category, filename, lineno, file=None, line=None) -> None:
            rejected.append(str(message))
            show(message, category, filename, lineno, file, line)

        warnings.showwarning = collect  # only the warnings the filters let through reach it
        yield rejected


def failure_note(exc: Exception) -> tuple[str, bool | None]:
    """A contender that cannot run this case is skipped; one that crashes is a failure."""
    first_line = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    if isinstance(exc, NotImplementedError) or "is unavailable" in first_line:
        return f"skipped: {first_line}", None
    return f"ERROR: {type(exc).__name__}: {first_line}", False


class DeviceLost(RuntimeError):
    """A contender's crash took the CUDA context with it (a kernel faulted): this process can run
    no more GPU work."""

    def __init__(self, contender: str, note: str) -> None:
        super().__init__(f"{contender}: {note}")
        self.contender, self.note = contender, note


def measure(row: Row, attempt: Callable[[Row], Timing], device: torch.device, images: int, flops: float,
            fault: str | None = None) -> Row:
    """Fill `row` from `attempt(row)`: setup and first call (which record their time and check
    into the row), then the timing. If it raises, the row notes why. A crash that leaves the CUDA
    context unusable raises DeviceLost; `fault` is what such a crash left in an earlier run, and
    the contender is then not run again."""
    if fault is not None:
        row.note, row.correct = f"ERROR: lost the CUDA context in an earlier run: {fault}", False
        return row
    try:
        timing = attempt(row)
    except (NotImplementedError, RuntimeError) as exc:
        row.note, row.correct = failure_note(exc)
        if device.type == "cuda":
            try:
                torch.cuda.synchronize(device)
            except RuntimeError as lost:
                raise DeviceLost(row.contender, row.note) from lost
        return row
    row.median_ms, row.p20_ms, row.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
    row.images_per_s = images / (timing.median_ms / 1e3)
    row.tflops = flops / (timing.median_ms / 1e3) / 1e12
    if row.floor_ms is not None:
        row.pct_of_floor = 100.0 * row.floor_ms / timing.median_ms
    return row


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


def source_digest() -> str:
    """sha256 (12 hex digits) of the code being measured: fastres's and its Triton kernels' Python
    files and what the CUDA extension was built from (not its bytes: no two builds are equal, and
    a resumed run rebuilds). Names the code exactly where the commit cannot (no git, a dirty tree)."""
    from fastres.backends import cuda

    return code_digest([*Path(fastres.__file__).parent.rglob("*.py"), *kernel_files()], cuda.build_digest())


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
        "source": source_digest(),
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


@dataclass(frozen=True)
class Settings:
    """What every case of a suite's run shares: dtype, device, contenders (baselines included),
    the measured ceilings, and a progress callback given each "case contender" as it starts."""

    dtype: torch.dtype
    device: torch.device
    contenders: list[str]
    ceilings: dict[str, float] | None
    progress: Callable[[str], None] = lambda _: None


@dataclass(frozen=True)
class Unit:
    """One case of a suite. Its contenders and baselines are timed together, so every speedup
    compares figures from one run. `run(faults)` measures them all but those in `faults`
    (contender -> what it crashed with in an earlier run)."""

    key: str
    run: Callable[[dict[str, str]], list[Row]]


def run_units(
    units: Sequence[Unit],
    results: Results,
    path: Path,
    time_limit_s: float | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Run the units not yet in `results.done`, saving `results` to `path` after each one.

    With a time limit, the first unit always runs and a later one starts only if it should end
    within the limit, judging by the longest unit so far; those not started are listed in
    `results.pending`. A contender that loses the CUDA context is recorded in `results.faults`
    before DeviceLost goes up: a resumed run measures the rest of its unit without it."""
    started = time.monotonic()
    longest = 0.0
    todo = [u for u in units if u.key not in results.done]
    results.pending = [u.key for u in todo]
    for i, unit in enumerate(todo, 1):
        elapsed = time.monotonic() - started
        if time_limit_s is not None and i > 1 and elapsed + longest > time_limit_s:
            log(f"time limit: {len(results.pending)} of {len(units)} cases left after {elapsed:.0f} s")
            break
        unit_started = time.monotonic()
        try:
            rows = unit.run(results.faults.get(unit.key, {}))
        except DeviceLost as lost:
            results.faults.setdefault(unit.key, {})[lost.contender] = lost.note
            results.save(path)
            log(f"[{i}/{len(todo)}] {unit.key}: {lost.contender} lost the CUDA context ({lost.note})")
            raise
        longest = max(longest, time.monotonic() - unit_started)
        results.rows += rows
        results.done.append(unit.key)
        results.pending.remove(unit.key)
        results.save(path)
        log(f"[{i}/{len(todo)}] {unit.key}: {time.monotonic() - unit_started:.1f} s")
