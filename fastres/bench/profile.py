"""`fastres bench profile`: Nsight Compute (ncu) counters for every kernel of every contender on
every layer, next to each layer's roofline floor.

It runs itself under ncu (`--profile-from-start off`): each (case, contender) is called once
unprofiled (tuning, compiles), then once between cudaProfilerStart/Stop, right after a marker
kernel whose grid size is the region's number. ncu's CSV lists kernels in launch order, so each
marker says which region the kernels after it belong to. Per kernel: duration, SM and DRAM
throughput (% of peak), registers per thread, achieved occupancy, grid; per region: the summed
duration and the floor's share of it. Tuning is not profiled; carry the tuning cache for speed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import triton
import triton.language as tl

from fastres.bench.harness import Rotation, ceilings, environment, failure_note, quiet
from fastres.bench.layers import floor_ms, layer_cases, pick, runner, smoke_cases
from fastres.bench.report import fmt
from fastres.cli import DTYPES
from fastres.shapes import make_inputs

MARKER = "fastres_profile_marker"
SECTIONS = ("SpeedOfLight", "LaunchStats", "Occupancy")
METRICS = {  # ncu's names (details page) -> ours
    "Duration": "duration_us",
    "Compute (SM) Throughput": "sm_pct",
    "DRAM Throughput": "dram_pct",
    "Registers Per Thread": "registers",
    "Achieved Occupancy": "occupancy_pct",
}
TIME_UNITS_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3,
                 "s": 1e6, "second": 1e6}


@dataclass
class Kernel:
    name: str
    grid: str
    duration_us: float | None = None
    sm_pct: float | None = None
    dram_pct: float | None = None
    registers: float | None = None
    occupancy_pct: float | None = None


@dataclass
class Region:
    """One contender on one case: the kernels it launched, their summed time, the floor's share."""

    case: str
    contender: str
    floor_ms: float | None = None
    kernels: list[Kernel] = field(default_factory=list)

    @property
    def duration_us(self) -> float | None:
        times = [k.duration_us for k in self.kernels]
        return sum(times) if times and None not in times else None

    @property
    def pct_of_floor(self) -> float | None:
        if self.floor_ms is None or not self.duration_us:
            return None
        return 100.0 * self.floor_ms * 1e3 / self.duration_us


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse_ncu_csv(text: str) -> list[Kernel]:
    """Kernels in launch order from `ncu --csv --page details` output (lines before the CSV header,
    such as ==PROF== messages, are skipped)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return []
    kernels: dict[str, Kernel] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        launch = row.get("ID")
        if launch is None or row.get("Kernel Name") is None:
            continue
        kernel = kernels.setdefault(launch, Kernel(row["Kernel Name"], row.get("Grid Size", "")))
        ours = METRICS.get(row.get("Metric Name", ""))
        value = _number(row.get("Metric Value", ""))
        if row.get("Metric Name") == "Grid Size" and not kernel.grid and value is not None:
            kernel.grid = f"({value:.0f})"  # ncu versions without the column: LaunchStats' block count
        if ours is None or value is None:
            continue
        if ours == "duration_us":
            value *= TIME_UNITS_US.get(row.get("Metric Unit", "").strip(), float("nan"))
        setattr(kernel, ours, value)
    return [kernels[k] for k in sorted(kernels, key=int)]


def _marker_index(kernel: Kernel) -> int | None:
    if MARKER not in kernel.name:
        return None
    return int(kernel.grid.strip("()").split(",")[0]) - 1


def assign(kernels: list[Kernel], regions: list[Region]) -> list[Region]:
    """Give each region the kernels that follow its marker."""
    current = None
    for kernel in kernels:
        index = _marker_index(kernel)
        if index is not None:  # a marker past the list's end: a region whose record was lost
            current = regions[index] if index < len(regions) else None
        elif current is not None:
            current.kernels.append(kernel)
    return regions


@triton.jit
def fastres_profile_marker(ptr):
    # The grid size is the region's number; the store makes it a launch no compiler drops.
    tl.store(ptr + tl.program_id(0), 1)


def run_regions(args: argparse.Namespace, device: torch.device, limits: dict[str, float] | None,
                saved: Callable[[list[Region]], None]) -> list[Region]:
    """The inner run (under ncu): every contender on every case, profiled once after its warm-up;
    `saved(regions)` after each, so a run cut short still says what its kernels were."""
    dtype = torch.float32 if args.smoke else DTYPES[args.dtype]
    cases = pick(smoke_cases() if args.smoke else layer_cases(args.model, args.batch), args.cases)
    flags = torch.zeros(len(cases) * len(args.contenders) + 1, dtype=torch.int32, device=device)
    regions = []
    for case in cases:
        inputs = make_inputs(case, dtype, device)
        rotation = Rotation([inputs.x, inputs.residual], 1)  # ncu flushes the caches before each kernel
        for contender in args.contenders:
            region = Region(case.name, contender, floor_ms(case, inputs.x.element_size(), limits))
            try:
                fn = runner(contender, case, inputs, rotation)
                with quiet():
                    fn()
            except (NotImplementedError, RuntimeError) as exc:
                print(f"{case.name} {contender}: not profiled: {failure_note(exc)[0]}")
                continue
            regions.append(region)
            saved(regions)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
            fastres_profile_marker[(len(regions),)](flags)
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
    return regions


def _print_table(regions: list[Region], env: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ncu: {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    for column in ("case", "contender", "us", "% floor", "kernel", "kernel us", "SM %", "DRAM %", "regs", "occ %",
                   "grid"):
        table.add_column(column, overflow="fold")
    for region in regions:
        for i, k in enumerate(region.kernels or [Kernel("(no kernel seen)", "")]):
            first = i == 0
            table.add_row(region.case if first else "", region.contender if first else "",
                          fmt(region.duration_us, ".1f") if first else "", fmt(region.pct_of_floor, ".0f") if first else "",
                          k.name[:60], fmt(k.duration_us, ".1f"), fmt(k.sm_pct, ".0f"), fmt(k.dram_pct, ".0f"),
                          fmt(k.registers, ".0f"), fmt(k.occupancy_pct, ".0f"), k.grid)
    Console(width=None if sys.stdout.isatty() else 220).print(table)


def main(models: list[str], batch: int, dtype: str, contenders: list[str], cases: list[str] | None, smoke: bool,
         out: Path) -> int:
    """The outer run: ncu over the inner one (the cases of `models` at `batch`, those whose name
    contains one of `cases` if given), then the CSV parsed into a table and out/profile.json."""
    ncu = shutil.which("ncu")
    if ncu is None:
        print("fastres bench profile: Nsight Compute (ncu) is not on PATH")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    csv_path, manifest = out / "ncu.csv", out / "regions.json"
    inner = [sys.executable, "-m", "fastres.bench.profile", "--manifest", str(manifest), "--dtype", dtype,
             "--batch", str(batch), "--model", *models, "--contenders", *contenders,
             *(["--cases", *cases] if cases else []), *(["--smoke"] if smoke else [])]
    sections = [arg for section in SECTIONS for arg in ("--section", section)]
    command = [ncu, "--profile-from-start", "off", "--csv", "--page", "details", "--print-units", "base",
               "--clock-control", "none", *sections, "--log-file", str(csv_path), *inner]
    print(" ".join(command), flush=True)
    status = subprocess.run(command).returncode
    if not (manifest.exists() and csv_path.exists()):
        print(f"fastres bench profile: the profiled run failed (status {status}) before profiling anything")
        return 1
    summarize(out)
    if status != 0:
        print(f"fastres bench profile: ncu or the profiled run failed (status {status}): the table is partial")
    return 0 if status == 0 else 1


def summarize(out: Path) -> list[Region]:
    """Parse out/ncu.csv by out/regions.json (also after a run cut short), print the table and write
    out/profile.json."""
    saved = json.loads((out / "regions.json").read_text())
    regions = assign(parse_ncu_csv((out / "ncu.csv").read_text()),
                     [Region(r["case"], r["contender"], r["floor_ms"]) for r in saved["regions"]])
    _print_table(regions, saved["environment"])
    result = out / "profile.json"
    result.write_text(json.dumps({"environment": saved["environment"], "ceilings": saved["ceilings"],
                                  "regions": [dict(asdict(r), duration_us=r.duration_us, pct_of_floor=r.pct_of_floor)
                                              for r in regions]}, indent=1))
    print(f"wrote {result}")
    return regions


def _inner(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastres.bench.profile")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--model", nargs="+", default=["resnet50"])
    parser.add_argument("--contenders", nargs="+", required=True)
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env, limits = environment(device), ceilings(device)

    def saved(regions: list[Region]) -> None:
        args.manifest.write_text(json.dumps({"environment": env, "ceilings": limits,
                                             "regions": [asdict(r) for r in regions]}, indent=1))

    saved(run_regions(args, device, limits, saved))
    return 0


if __name__ == "__main__":
    sys.exit(_inner(sys.argv[1:]))
