"""Per-layer benchmark: every distinct conv + BN + [residual] + ReLU of the chosen models (a conv
with no BN after it, as in VGG or squeeze-excite: conv + bias + ...; its case name ends "-nobn"), then
every block tail with a projected residual (last conv + downsample branch + add + ReLU, one op).

Baselines, timed in the same run on the same inputs:
    eager-nchw        nn.Conv2d, nn.BatchNorm2d, add, ReLU on NCHW tensors (cuDNN)
    eager-cl          the same on channels_last tensors
    conv-only         cuDNN's conv(s) alone on channels_last: the floor a fused kernel should reach
    compile           torch.compile of the unfused layer (default mode)
Contenders: fastres-{triton,cuda,cudnn,auto} (fastres.ops.conv_bn_act with that backend).
Every output is checked against the float64 reference before it is timed.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastres
from fastres.bench.harness import (Rotation, Settings, Timing, Unit, copies_to_exceed_l2, measure, quiet,
                                   seconds_since, time_fn)
from fastres.bench.report import Row, add_speedups
from fastres.nn import eager_conv_bn
from fastres.numerics import compare, tf32_in_use, tolerance
from fastres.shapes import ODD_CASES, PROJECTION_ODD_CASES, ConvCase, make_inputs, model_cases, model_projection_cases

BASELINES = ["eager-nchw", "eager-cl", "conv-only", "compile"]
CONTENDERS = ["fastres-triton", "fastres-cuda", "fastres-cudnn", "fastres-auto"]


def layer_cases(models: Iterable[str], batch: int, image: int = 224) -> list[ConvCase]:
    """Distinct conv layers of the given models at this batch size (a layer shared by two models once)."""
    seen: dict[ConvCase, ConvCase] = {}
    for arch in models:
        for case in model_cases(arch, batch, image) + model_projection_cases(arch, batch, image):
            seen.setdefault(case.replace(name=""), case)
    return list(seen.values())


def pick(cases: list[ConvCase], patterns: list[str] | None) -> list[ConvCase]:
    """The cases whose name contains one of `patterns` (all of them when there are none)."""
    return [c for c in cases if not patterns or any(pattern in c.name for pattern in patterns)]


def smoke_cases() -> list[ConvCase]:
    """Tiny cases for CPU smoke runs (the Triton interpreter is slow): a residual, a projected one."""
    return [ODD_CASES[1].replace(name="smoke:c24h7-k40:3x3s1+res", residual=True),
            PROJECTION_ODD_CASES[0].replace(name="smoke:c20h7-k36:3x3s1+proj(c12h13s2)")]


def _modules(
    case: ConvCase, weight: torch.Tensor, bn: nn.BatchNorm2d | None, bias: torch.Tensor | None, memory_format
) -> tuple[nn.Conv2d, nn.Module | None]:
    """The unfused layer's modules; without a BN, the conv carries `bias` (the op's shift)."""
    conv = nn.Conv2d(case.c, case.k, (case.r, case.s), case.stride, case.padding, case.dilation, case.groups,
                     bias=bn is None and bias is not None)
    conv = conv.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if conv.bias is not None:
            conv.bias.copy_(bias)
    conv = conv.to(memory_format=memory_format).eval()
    return conv, None if bn is None else bn.to(device=weight.device, dtype=weight.dtype).eval()


def runner(contender: str, case: ConvCase, inputs, rotation: Rotation) -> Callable[[], torch.Tensor]:
    """A zero-argument callable running `contender` on the next rotated inputs."""
    conv_args = dict(stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups)
    if contender.startswith("fastres-"):
        backend = contender.removeprefix("fastres-")
        scale, shift, weight, projection = inputs.scale, inputs.shift, inputs.weight, inputs.op_kwargs()

        def run():
            x, residual = rotation.next()
            return fastres.ops.conv_bn_act(x, weight, scale, shift, residual, backend=backend, **case.act_kwargs,
                                           **conv_args, **projection)

        return run
    if contender == "conv-only":
        weight, pr = inputs.weight, inputs.projection

        def run():
            x, residual = rotation.next()
            if pr is not None:  # both convs; the main one's output is what gets checked
                F.conv2d(residual, pr.weight, None, pr.stride)
            return F.conv2d(x, weight, None, **conv_args)

        return run
    memory_format = torch.contiguous_format if contender == "eager-nchw" else torch.channels_last
    conv, bn = _modules(case, inputs.weight, inputs.bn, inputs.shift, memory_format)
    projection = None
    if case.projection is not None:
        projection = _modules(case.projection_case(), inputs.projection.weight, inputs.projection_bn,
                              inputs.projection.shift, memory_format)
    layer = lambda x, residual: eager_conv_bn(conv, bn, x, residual, case.act, projection,  # noqa: E731
                                              negative_slope=case.negative_slope)
    if contender == "compile":
        layer = torch.compile(layer)
    nchw = rotation if memory_format is torch.channels_last else Rotation(
        [t.contiguous() if t is not None else None for t in rotation.sets[0]], len(rotation.sets))

    def run():
        x, residual = nchw.next()
        return layer(x, residual)

    return run


def floor_ms(case: ConvCase, element_size: int, ceilings: dict[str, float] | None) -> float | None:
    """Roofline floor: max(FLOPs / matmul rate, bytes moved / copy bandwidth), bytes = x + w + out
    (+ residual, or + the projection's input and weight)."""
    if ceilings is None:
        return None
    p, q = case.output_hw
    elements = case.n * case.c * case.h * case.w + case.k * case.reduction + case.n * case.k * p * q
    if case.projection is not None:
        pr = case.projection
        elements += case.n * pr.c * pr.h * pr.w + case.k * pr.c
    elif case.residual:
        elements += case.n * case.k * p * q
    compute_ms = case.flops / (ceilings["matmul_tflops"] * 1e12) * 1e3
    memory_ms = elements * element_size / (ceilings["copy_gbps"] * 1e9) * 1e3
    return max(compute_ms, memory_ms)


def run_case(case: ConvCase, settings: Settings, faults: dict[str, str] | None = None) -> list[Row]:
    """Time every contender on one case; skipped or failing contenders (and those in `faults`, see
    harness.measure) get a row with a note."""
    dtype, device, contenders = settings.dtype, settings.device, settings.contenders
    faults = faults or {}
    rows = []
    tf32 = tf32_in_use(dtype, device)
    inputs = make_inputs(case, dtype, device)
    bytes_per_set = sum(t.numel() * t.element_size() for t in (inputs.x, inputs.residual) if t is not None)
    rotation = Rotation([inputs.x, inputs.residual], copies_to_exceed_l2(bytes_per_set, device))
    ref = inputs.reference(case)
    conv_ref = dataclasses.replace(inputs, bn=None, shift=None, residual=None, projection=None).reference(case, act="none")
    floor = floor_ms(case, inputs.x.element_size(), settings.ceilings)
    for contender in contenders:
        settings.progress(f"{case.name} {contender}")

        def attempt(row: Row) -> Timing:
            started = time.perf_counter()
            fn = runner(contender, case, inputs, rotation)
            with quiet() as row.rejected:
                out = fn()
            row.first_call_s = seconds_since(started, device)
            result = compare(out, conv_ref if contender == "conv-only" else ref,
                             tolerance(dtype, case.accumulated, tf32),
                             gain=None if contender == "conv-only" else inputs.gain)
            row.correct, row.rel_error = result.ok, result.rel_norm
            return time_fn(fn, device)

        row = Row("layers", case.name, contender, case.n, str(dtype).removeprefix("torch."), floor_ms=floor)
        rows.append(measure(row, attempt, device, case.n, case.flops, faults.get(contender)))
    add_speedups(rows, [c for c in contenders if c in BASELINES])
    return rows


def units(cases: list[ConvCase], settings: Settings) -> list[Unit]:
    """One unit of work per case: all its contenders are timed together, in one run."""
    return [Unit(f"{case.name} batch {case.n}", functools.partial(run_case, case, settings)) for case in cases]
