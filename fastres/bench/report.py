"""Benchmark results: the row type, the terminal table, the JSON file, the plots, and --compare."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class Row:
    """One contender on one case: time, rates, roofline, correctness, speedups over the baselines."""

    suite: str
    name: str
    contender: str
    batch: int
    dtype: str
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    images_per_s: float | None = None
    tflops: float | None = None
    floor_ms: float | None = None
    pct_of_floor: float | None = None
    correct: bool | None = None
    rel_error: float | None = None
    first_call_s: float | None = None  # setup + first call: compiling, tuning (wall seconds)
    note: str = ""
    speedup: dict[str, float] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)  # tuning candidates that failed their float64 check or raised

    @property
    def key(self) -> tuple:
        return (self.suite, self.name, self.contender, self.batch, self.dtype)


def add_speedups(rows: list[Row], baselines: list[str]) -> None:
    """Fill row.speedup[b] = time(b) / time(row) for each baseline b measured on the same case;
    a contender whose answer was wrong gets no speedup (it is a failure, not a win)."""
    by_case: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        by_case.setdefault((row.suite, row.name, row.batch, row.dtype), {})[row.contender] = row
    for row in rows:
        if row.median_ms is None or row.correct is False:
            continue
        for base in baselines:
            ref = by_case[(row.suite, row.name, row.batch, row.dtype)].get(base)
            if ref is not None and ref.median_ms is not None and ref is not row:
                row.speedup[base] = ref.median_ms / row.median_ms


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[Row], baselines: list[str], env: dict[str, str], console: Console | None = None) -> None:
    console = console or Console()
    title = f"{env['device']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | commit {env['commit']}"
    table = Table(title=title, show_lines=False)
    for column in ("case", "contender", "batch", "median ms", "p20-p80", "img/s", "TFLOP/s", "% floor", "ok",
                   *[f"x {b}" for b in baselines], "1st call s", "note"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            row.name, row.contender, str(row.batch), fmt(row.median_ms, ".4g"),
            "-" if row.p20_ms is None else f"{row.p20_ms:.3g}-{row.p80_ms:.3g}",
            fmt(row.images_per_s, ".4g"), fmt(row.tflops, ".3g"), fmt(row.pct_of_floor, ".0f"),
            {True: "yes", False: "WRONG", None: "-"}[row.correct],
            *[fmt(row.speedup.get(b), ".2f") for b in baselines], fmt(row.first_call_s, ".3g"), table_note(row),
        )
    console.print(table)


def table_note(row: Row) -> str:
    """The row's note, and how many tuning candidates it rejected (the results file lists them)."""
    if not row.rejected:
        return row.note
    rejected = f"{len(row.rejected)} tuning candidate{'s' if len(row.rejected) > 1 else ''} rejected"
    return f"{row.note}; {rejected}" if row.note else rejected


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


@dataclass
class Results:
    """A results file: the environment and ceilings of the run, its configuration, its rows, which
    cases are done or still pending (a run stopped by its time limit), and which contenders lost
    the CUDA context on which case (`faults`: case -> contender -> note)."""

    env: dict[str, str]
    ceilings: dict[str, float] | None
    config: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    faults: dict[str, dict[str, str]] = field(default_factory=dict)

    def save(self, path: Path) -> Path:
        """Write atomically, so a run killed mid-write leaves the previous complete file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"environment": self.env, "ceilings": self.ceilings, "config": self.config,
                   "done": self.done, "pending": self.pending, "faults": self.faults, "rows": [asdict(r) for r in self.rows]}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> "Results":
        data = json.loads(Path(path).read_text())
        return cls(data["environment"], data["ceilings"], data["config"], [Row(**r) for r in data["rows"]],
                   data.get("done", []), data.get("pending", []), data.get("faults", {}))

    def resumable_by(self, env: dict[str, str], config: dict[str, Any]) -> str | None:
        """Why a run with this environment and configuration may not add to these results (None: it may)."""
        for name in ("device", "driver", "cuda", "cudnn", "torch", "triton", "fastres", "commit", "source"):
            if self.env.get(name) != env.get(name):
                return f"it was measured with {name} {self.env.get(name)!r}, this run has {env.get(name)!r}"
        for name, value in config.items():
            if self.config.get(name) != value:
                return f"its {name} is {self.config.get(name)!r}, this run's is {value!r}"
        return None


def compare(new: list[Row], old_path: Path, console: Console | None = None) -> Table:
    """Print the change in median time of every row also present in an earlier JSON."""
    console = console or Console()
    old = {r.key: r for r in Results.load(old_path).rows}
    table = Table(title=f"change against {old_path}")
    for column in ("case", "contender", "batch", "dtype", "old ms", "new ms", "new/old"):
        table.add_column(column)
    for row in new:
        before = old.get(row.key)
        if before is None or before.median_ms is None or row.median_ms is None:
            continue
        table.add_row(row.name, row.contender, str(row.batch), row.dtype, f"{before.median_ms:.4g}",
                      f"{row.median_ms:.4g}", f"{row.median_ms / before.median_ms:.3f}")
    console.print(table)
    return table


def plot(path: Path, rows: list[Row], env: dict[str, str], suite: str, baseline: str) -> Path:
    """layers: speedup of each fastres contender over `baseline`, per layer.
    models: throughput (images/s) of every contender, per model and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if suite == "layers":
        cases = list(dict.fromkeys(r.name for r in rows))
        contenders = [c for c in dict.fromkeys(r.contender for r in rows) if c.startswith("fastres")]
        fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(cases)), 5))
        width = 0.8 / max(1, len(contenders))
        for i, contender in enumerate(contenders):
            values = [next((r.speedup.get(baseline, 0.0) for r in rows if r.name == case and r.contender == contender), 0.0)
                      for case in cases]
            ax.bar([j + i * width for j in range(len(cases))], values, width, label=contender)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylabel(f"speedup over {baseline}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, rotation=75, ha="right", fontsize=7)
    else:
        groups = list(dict.fromkeys((r.name, r.batch) for r in rows))
        contenders = list(dict.fromkeys(r.contender for r in rows))
        fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 5))
        width = 0.8 / max(1, len(contenders))
        for i, contender in enumerate(contenders):
            values = [next((r.images_per_s or 0.0 for r in rows if (r.name, r.batch) == g and r.contender == contender
                            and r.correct is not False), 0.0) for g in groups]
            ax.bar([j + i * width for j in range(len(groups))], values, width, label=contender)
        ax.set_ylabel("images / s")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], [f"{n}\nbatch {b}" for n, b in groups], fontsize=8)
    ax.set_title(f"fastres {suite}: {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date'][:10]}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
