"""Compile, all at once, the Triton kernels that a model's first call will compile while tuning.

The first call of each new conv shape tunes: the Triton backend compiles a round of configs in
parallel, times them, then does the same for the leaders' variants, layer by layer. Each round
is a few compiles, far fewer than the cores of a GPU machine, so a whole model spends most of its
first call waiting on short, half-empty compile pools. `precompile` runs the model once on meta
tensors (no memory, no GPU work) to list its fastres ops, then compiles every config those ops
will launch in one pool: tuning afterwards finds each kernel compiled. Inside a torch.autocast
region it lists them as autocast will cast them (meta tensors are outside autocast).
`fastres.optimize(model, example_inputs=...)` calls it before its example run.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from fastres import backends
from fastres.backends import triton as triton_backend
from fastres.ops import autocast_arguments
from fastres.problem import DEFAULT_NEGATIVE_SLOPE, ConvProblem, Projection, empty_output, pair
from fastres.shapes import on_device, record_meta_run

log = logging.getLogger("fastres")


def precompile(model: nn.Module, *inputs: Any) -> int:
    """Compile ahead, in one parallel pool, what the first `model(*inputs)` would compile while
    tuning its fastres ops (every Triton config they will time, or the remembered ones). Returns
    how many compiles it started: 0 off CUDA, in the Triton interpreter, or when the model does not
    run on meta tensors. It never raises: whatever it leaves out compiles as its layer tunes."""
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), None)
    if device is None or device.type != "cuda" or triton_backend.unavailable_reason(device) is not None:
        return 0
    from fastres.kernels import compile_ahead

    count = 0

    def counted() -> Iterator[Callable[[], Any]]:
        nonlocal count
        for launch in compile_launches(recorded_calls(model, inputs, device.type), device):
            count += 1
            yield launch

    try:
        with torch.cuda.device(device):  # Triton compiles into the current device's cache, as it launches
            compile_ahead(counted())
    except Exception as exc:  # noqa: BLE001 - a speed-up only: the first call compiles as it tunes instead
        log.debug("fastres.precompile stopped after %d compiles (%s): the first call compiles the rest", count, exc)
    return count


def recorded_calls(model: nn.Module, inputs: tuple, device_type: str | None = None) -> list[dict[str, Any]]:
    """Every fastres::conv_bn_act call of model(*inputs), run on meta copies of its parameters,
    buffers and inputs, as the op's arguments by name (None for those left out); with
    device_type, cast as the op's autocast rule casts them there in the current autocast region."""
    calls = [by_name(call_args, kwargs) for call_args, kwargs in record_meta_run(model, inputs).calls]
    return calls if device_type is None else [autocast_arguments(call, device_type) for call in calls]


def by_name(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A recorded fastres::conv_bn_act call's arguments by name, None for those left out (torch
    versions differ in whether a dispatch mode sees trailing defaults)."""
    names = [a.name for a in torch.ops.fastres.conv_bn_act.default._schema.arguments]
    return {**dict.fromkeys(names), **dict(zip(names, args)), **kwargs}


def compile_launches(calls: list[dict[str, Any]], device: torch.device) -> Iterator[Callable[[], Any]]:
    """The Triton backend's compile-only launches for these calls, one distinct problem at a time,
    on real (empty) tensors shaped and strided like the recorded ones: alignment and strides are
    part of what a compile specialises on. Tensors live only while their problem's launches are
    handed out."""
    seen = set()
    for call in calls:
        projection = None
        if call["residual_weight"] is not None:
            projection = Projection(call["residual_weight"], call["residual_scale"], call["residual_shift"],
                                    pair(call["residual_stride"] or 1, "residual_stride"))
        slope = DEFAULT_NEGATIVE_SLOPE if call["negative_slope"] is None else call["negative_slope"]
        problem = ConvProblem.from_tensors(call["x"], call["weight"], call["scale"], call["shift"], call["residual"],
                                           tuple(call["stride"]), tuple(call["padding"]), tuple(call["dilation"]),
                                           call["groups"], call["act"], projection, slope)
        for tuned in backends.tuned_by(triton_backend.NAME, call["backend"], problem, device):
            args = _arguments(tuned, problem, call, projection)
            # the slope is a kernel constant, though not part of tuning's key
            key = (tuned.key, tuned.negative_slope, *(t.stride() for t in args if isinstance(t, torch.Tensor)))
            if key not in seen:
                seen.add(key)
                yield from triton_backend.compiles(tuned, *(on_device(device, a) for a in args))


def _arguments(tuned: ConvProblem, problem: ConvProblem, call: dict[str, Any], projection: Projection | None) -> tuple:
    """What a run of `tuned` gets: the whole call, or one half of a projected call split in two."""
    x, weight, scale, shift, residual = (call[k] for k in ("x", "weight", "scale", "shift", "residual"))
    if tuned == problem:
        return x, weight, scale, shift, residual, projection
    if tuned == problem.projection:
        return residual, projection.weight, projection.scale, projection.shift, None, None
    return x, weight, scale, shift, empty_output(x, problem.projection.output_shape), None

