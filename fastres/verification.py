"""fastres.verify: check an optimized model against its eager original and a float64 reference.

Whole model: the original and the optimized model run in their dtype (an original held in
another dtype than the optimized model, as after optimize(model, dtype=torch.float16), runs as a
copy cast to the optimized model's); a float64 copy of the original on the CPU is ground truth.
Errors grow over fifty layers in any low precision, so the optimized model passes when its error
is within the per-dtype tolerance or no more than twice the eager model's own error (same dtype,
same inputs), each value finite or not as in the float64 or in the eager output (Inf where an fp16
model overflows in eager, or a finite value there): "no worse than what you had" (`judge`). Every
floating output with values is judged so (each leaf of a tuple, list, dict or dataclass output: a
feature extractor's maps, a detector's heads); the optimized model must return them in the same
places.

A model that draws random numbers in eval (noise, a random crop) has no float64 ground truth: a
float64 copy draws other numbers. The eager and the optimized model run from the caller's random
state (torch's generators and those the eager model holds as attributes, which the optimized
model's of the same names start from; all are left as they were), so both draw the same numbers,
and the optimized model must then agree with the eager one within the dtype's tolerance. Python's
and numpy's random states are forked too. A model drawing from a generator no fork reaches (a
global torch.Generator object) is caught where it would pass: an optimized model within twice the
eager model's error fails if the eager model, run again from the same state, answers otherwise.

Under torch.autocast (verify called inside the region) "their dtype" is autocast's: tolerances
are autocast's dtype's, and the float64 reference runs with autocast off.

Per layer (optional): each fused layer's own inputs are captured during the optimized run and
the layer is recomputed in float64 from them; it must meet the per-dtype layer tolerance of
fastres.numerics, exactly as the kernel tests require.

`disagreement` is the same whole-model rule for `fastres.optimize(model, example_inputs=...)`,
which already holds both models' outputs: it builds a float64 reference only when they differ by
more than the dtype's tolerance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pickle
import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves, tree_map, tree_structure

from fastres.converter import FusedConvBN, model_copy
from fastres.hooks import hooks_held
from fastres.nn import _Fused, conv_bn_fold, folds
from fastres.numerics import (Comparison, Tolerance, branch_gain, compare, reference_conv_bn_act, tf32_in_use,
                              tolerance)
from fastres.ops import autocast_dtype
from fastres.problem import DEFAULT_NEGATIVE_SLOPE

__all__ = ["verify", "VerifyReport", "Row"]


@dataclass
class Row:
    name: str
    max_abs: float
    max_rel: float
    rel_norm: float
    ok: bool
    note: str = ""


@dataclass
class VerifyReport:
    dtype: torch.dtype
    model: list[Row] = field(default_factory=list)
    layers: list[Row] = field(default_factory=list)
    reference: str = "a float64 reference"  # what the final output was judged against
    unchecked: list[str] = field(default_factory=list)  # output tensors not judged, and why
    layers_note: str = ""  # why per_layer gave no rows

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.model + self.layers)

    def __str__(self) -> str:
        def table(rows: list[Row]) -> list[str]:
            width = max((len(r.name) for r in rows), default=4)
            out = [f"  {'':<{width}}  {'max abs':>10}  {'max rel':>10}  {'rel norm':>10}  result"]
            out += [f"  {r.name:<{width}}  {r.max_abs:>10.3g}  {r.max_rel:>10.3g}  {r.rel_norm:>10.3g}  "
                    f"{'ok' if r.ok else 'FAIL'}{'  ' + r.note if r.note else ''}" for r in rows]
            return out

        lines = [f"fastres.verify ({str(self.dtype).removeprefix('torch.')}): {'PASS' if self.ok else 'FAIL'}",
                 f"final output against {self.reference}:"] + table(self.model)
        if self.unchecked:
            lines.append(f"outputs not compared: {', '.join(self.unchecked)}")
        if self.layers:
            lines += [f"fused layers against float64 on their own inputs ({sum(r.ok for r in self.layers)}"
                      f"/{len(self.layers)} ok):"] + table(self.layers)
        elif self.layers_note:
            lines.append(f"fused layers: {self.layers_note}")
        return "\n".join(lines)


def output_leaves(value: Any, where: str = "") -> list[tuple[str, Any]]:
    """A model output's leaves, each with where it sits (`['out']`, `[0]`, `.logits`; "" for a
    lone tensor), looking also into the containers torch's pytree takes for leaves (a dict subclass,
    a dataclass), so that no tensor in them goes unchecked."""
    if isinstance(value, Mapping):
        return [leaf for key, v in value.items() for leaf in output_leaves(v, f"{where}[{key!r}]")]
    if isinstance(value, (tuple, list)):
        return [leaf for i, v in enumerate(value) for leaf in output_leaves(v, f"{where}[{i}]")]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [leaf for f in dataclasses.fields(value) for leaf in output_leaves(getattr(value, f.name),
                                                                                   f"{where}.{f.name}")]
    return [(where, value)]


def placed_otherwise(got: Any, expected: Any) -> bool:
    """Whether `got` holds its tensors in other places or containers than `expected` (pytree's
    structure, and `output_leaves` for the containers pytree does not look into)."""
    def places(value: Any) -> list:
        return [(where, isinstance(leaf, torch.Tensor)) for where, leaf in output_leaves(value)]

    return (type(got) is not type(expected) or tree_structure(got) != tree_structure(expected)
            or places(got) != places(expected))


def _first_floating(inputs: tuple) -> torch.Tensor | None:
    """The first floating-point tensor in `inputs` (in lists and dicts too): its dtype is the one
    checked at. An integer argument (a size, an index) may come first."""
    return next((t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.is_floating_point()), None)


def _as_float64(inputs: tuple, device: torch.device | None = None) -> tuple:
    """`inputs` with each floating-point tensor in them (in lists and dicts too) as float64, and each
    tensor on `device` if given."""
    def cast(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach() if device is None else t.detach().to(device)
        return t.double() if t.is_floating_point() else t

    return tree_map(cast, inputs)


def _parameter_dtype(module: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _as_dtype_of(model: nn.Module, optimized: nn.Module) -> nn.Module:
    """`model`, or a copy of it cast to the dtype `optimized` holds (optimize(model, dtype=...))."""
    dtype = _parameter_dtype(optimized)
    if dtype is None or _parameter_dtype(model) in (None, dtype):
        return model
    return model_copy(model).to(dtype)


@dataclass(frozen=True)
class Judgement:
    eager: Comparison
    fused: Comparison
    bound: float
    ok: bool


def judge(fused_out: torch.Tensor, eager_out: torch.Tensor, ref_out: torch.Tensor, tol: Tolerance) -> Judgement:
    """The whole-model rule: the fused output's error against the float64 reference within the
    tolerance or at most twice the eager model's own, and each value finite or not as in the
    reference or as in the eager model (an fp16 model that overflows in eager may overflow fused
    too, or less: the fused op rounds once, after BN's scale)."""
    eager = compare(eager_out, ref_out, tol)
    fused = compare(fused_out, ref_out, tol)
    bound = max(tol.rel_norm, 2.0 * eager.rel_norm)
    finite = torch.isfinite(fused_out).cpu()
    as_expected = finite.eq(torch.isfinite(ref_out).cpu()) | finite.eq(torch.isfinite(eager_out).cpu())
    return Judgement(eager, fused, bound, bool(as_expected.all()) and fused.rel_norm <= bound)


@dataclass(frozen=True)
class Run:
    output: Any
    sampled: bool  # it drew random numbers, which a float64 copy would draw otherwise


def _held_generators(model: nn.Module) -> dict[str, torch.Generator]:
    """Each torch.Generator a module of `model` holds as an attribute, by qualified name (one
    generator may be held under several names: fx keeps one of its own for a graph's use)."""
    return {f"{path}.{attr}".removeprefix("."): value for path, module in model.named_modules()
            for attr, value in vars(module).items() if isinstance(value, torch.Generator)}


@contextlib.contextmanager
def _random_state_forked(model: nn.Module, like: nn.Module | None) -> Iterator[Callable[[], bool]]:
    """Every random state `model` can draw from that can be found, restored on exit: torch's
    generators (the CPU's, each initialized CUDA device's), those it holds (`_held_generators`, each
    started, if `like` holds one of its device under its name, from that one's state), Python's
    and, once imported, numpy's. Yields a test of whether any of them has moved."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    names = _held_generators(model)
    held = list({id(g): g for g in names.values()}.values())
    numpy = sys.modules.get("numpy")  # a model can draw from numpy's generator only once it is imported
    saved_held, saved_python = [g.get_state() for g in held], random.getstate()
    saved_numpy = numpy.random.get_state() if numpy else None

    def state() -> list:
        tensors = [torch.get_rng_state(), *map(torch.cuda.get_rng_state, devices), *(g.get_state() for g in held)]
        host = [random.getstate(), pickle.dumps(numpy.random.get_state()) if numpy else None]
        return [t.tolist() for t in tensors] + host

    try:
        for name, theirs in (_held_generators(like) if like is not None else {}).items():
            if name in names and names[name].device == theirs.device:
                names[name].set_state(theirs.get_state())
        with torch.random.fork_rng(devices=devices):
            before = state()
            yield lambda: state() != before
    finally:
        for generator, generator_state in zip(held, saved_held):
            generator.set_state(generator_state)
        random.setstate(saved_python)
        if numpy:
            numpy.random.set_state(saved_numpy)


def run_from_here(model: nn.Module, inputs: tuple, like: nn.Module | None = None) -> Run:
    """model(*inputs) without grad, from the caller's random state, which it leaves as it was: copies
    of a model that samples in eval mode (noise, a random crop) draw the same numbers. A generator
    `model` holds starts from the state of the one `like` (another copy) holds under its name; see
    `_random_state_forked`. Whether the model drew any numbers is read off the generators it moved."""
    with _random_state_forked(model, like) as moved, torch.no_grad():
        output = model(*inputs)
        return Run(output, moved())


def _within(got: torch.Tensor, expected: torch.Tensor, tol: Tolerance, rel_norm: float | None = None) -> bool:
    """Within `rel_norm` (the dtype's tolerance unless given) of each other, with Inf / NaN in the
    same places."""
    return (compare(got, expected, tol).rel_norm <= (tol.rel_norm if rel_norm is None else rel_norm)
            and bool(torch.isfinite(got).eq(torch.isfinite(expected)).all()))


def _repeat_limit(tol: Tolerance, eager_error: float) -> float:
    """How far a second eager run from the same random state may be from the first where an
    optimized output passed only within twice the eager output's error against float64. That bound
    means something only if the error is the eager model's numerics; a model that answers otherwise
    by half that error or more draws from a generator no fork reaches (a global torch.Generator
    object, one kept in a list) or keeps state across calls. (Half, not the tolerance: a kernel
    that reduces in a nondeterministic order moves an output by rounding only.)"""
    return max(tol.rel_norm, eager_error / 2)


def _answers_again(model: nn.Module, inputs: tuple, first: Any, tol: Tolerance, limits: dict[str, float]) -> bool:
    """Whether `model`, run again from the same random state, gives each floating output of
    `limits` (by where it sits) within its relative norm limit of its `first` output's (see
    `_repeat_limit`)."""
    again = _float_pairs(run_from_here(model, inputs).output, first)
    return all(_within(a, f, tol, limits[where]) for where, a, f in again if where in limits)


_UNREPEATABLE = ("answers otherwise when run again from the same random state (it draws from a generator no fork "
                 "reaches, such as a global torch.Generator, or keeps state across calls), so its error against "
                 "float64 bounds nothing")


def _float_pairs(got: Any, expected: Any) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(where, got, expected) for each floating tensor leaf (`output_leaves`) in the same place of
    two outputs, with the same shape in both (a detector's boxes may number otherwise: left out)."""
    return [(where, g, e) for (where, g), (there, e) in zip(output_leaves(got), output_leaves(expected))
            if where == there and isinstance(g, torch.Tensor) and isinstance(e, torch.Tensor)
            and g.is_floating_point() and e.is_floating_point() and g.shape == e.shape]


def _output(where: str) -> str:
    return "the output" if where == "" else f"output {where}"


def disagreement(model: nn.Module, inputs: tuple, got: Any, expected: Any, sampled: bool = False) -> str | None:
    """Why the optimized model's output `got` on `inputs` cannot be trusted next to `expected`, the
    unfused `model`'s (the same dtype, an output of the same structure, the same random draws), or
    None. Floating tensors within the dtype's tolerance of each other pass; otherwise a float64 copy
    of `model` runs on the inputs' device and verify's whole-model rule (`judge`) decides each of
    them, unless the model `sampled` random numbers, which that copy would draw otherwise. One that
    passes only within twice the unfused model's own error also needs that model to answer the
    same when run again (`_repeat_limit`)."""
    x = _first_floating(inputs)
    pairs = _float_pairs(got, expected)
    if x is None or not pairs:
        return None
    dtype = autocast_dtype(x)  # autocast's, in an autocast region
    tol = tolerance(dtype, tf32=tf32_in_use(dtype, x.device))
    differing = [(where, g, e) for where, g, e in pairs if not _within(g, e, tol)]
    if not differing:
        return None
    name = str(dtype).removeprefix("torch.")
    if sampled:
        return (f"{_output(differing[0][0])} differs from the unfused model's, on the same random draws, by more "
                f"than the {name} tolerance (the model draws random numbers, so no float64 copy can say which is "
                "right)")
    try:
        reference = model_copy(model).double()
        with hooks_held(reference), torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            ref = run_from_here(reference, _as_float64(inputs)).output
    except Exception as exc:  # noqa: BLE001 - a model that cannot run in float64: nothing decides
        return (f"its output differs from the unfused model's by more than the {name} tolerance, and a float64 "
                f"copy of the model, which would say which is right, failed ({exc})")
    refs = {where: r for where, r, _ in _float_pairs(ref, expected)}
    loosened = {}  # outputs that passed only within twice the unfused model's own error
    for where, g, e in differing:
        if where not in refs:
            return (f"{_output(where)} differs from the unfused model's by more than the {name} tolerance, and a "
                    "float64 copy of the model returns no such output to say which is right")
        j = judge(g, e, refs[where], tol)
        if j.fused.rel_norm > j.bound:
            return (f"{_output(where)}'s error against float64 is {j.fused.rel_norm:.3g} (relative norm), over its "
                    f"bound {j.bound:.3g}: the {name} tolerance or twice the unfused model's {j.eager.rel_norm:.3g}")
        if not j.ok:
            return (f"{_output(where)} has Inf or NaN where neither a float64 copy nor the unfused model has them, "
                    "or finite values where both have Inf or NaN")
        if j.bound > tol.rel_norm:
            loosened[where] = _repeat_limit(tol, j.eager.rel_norm)
    if loosened:
        with hooks_held(model):
            if not _answers_again(model, inputs, expected, tol, loosened):
                return f"its output differs from the unfused model's, and the unfused model {_UNREPEATABLE}"
    return None


def _compiled(model: nn.Module) -> bool:
    """Whether torch.compile runs `model` or a module in it (a wrapper, or Module.compile())."""
    from torch._dynamo.eval_frame import OptimizedModule

    return any(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
               for m in model.modules())


def _row(name: str, out: torch.Tensor, ref: torch.Tensor, tol, gain=None, note: str = "") -> Row:
    c = compare(out, ref, tol, gain)
    return Row(name, c.max_abs, c.max_rel, c.rel_norm, c.ok, note)


def _nonfinite(out: torch.Tensor, ref: torch.Tensor) -> str:
    """A note on the Inf and NaN `out` has where `ref` is finite (an fp16 model that overflows),
    which its errors, taken over the values finite in both, leave out; "" if none."""
    count = int((~torch.isfinite(out.cpu()) & torch.isfinite(ref.cpu())).sum())
    return f"Inf or NaN at {count} of {out.numel()} values where the reference is finite" if count else ""


def _unjudged(why: str) -> Row:
    return Row("fastres (optimized)", math.nan, math.nan, math.nan, False, why)


def _judge_outputs(report: VerifyReport, fused: Any, eager: Run, ref: Any, tol: Tolerance, cast: str,
                   compiled: bool, baseline: nn.Module, inputs: tuple) -> None:
    """Two rows per floating output (eager's and the optimized model's error against `ref`), by the
    whole-model rule; the output tensors that cannot be judged go to `report.unchecked`. Outputs
    held otherwise than eager's, or none to judge, are one failed row."""
    if placed_otherwise(fused, eager.output):
        report.model.append(_unjudged(f"returns a {type(fused).__name__} holding its tensors otherwise than the "
                                      f"eager model's {type(eager.output).__name__}"))
        return
    refs = {where: r for where, r, _ in _float_pairs(ref, eager.output)}
    judged = [(where, f, e) for where, f, e in _float_pairs(fused, eager.output) if where in refs and e.numel()]
    judged_at = {where for where, _, _ in judged}
    for where, leaf in output_leaves(eager.output):
        if isinstance(leaf, torch.Tensor) and where not in judged_at:
            why = ("not floating point" if not leaf.is_floating_point() else "empty" if leaf.numel() == 0 else
                   "its shape differs between the runs" if where in refs else "no like output in the float64 run")
            report.unchecked.append(f"{where or 'the output'} ({why})")
    if not judged:
        report.model.append(_unjudged("no floating-point output with values to judge"))
        return
    loosened: dict[str, float] = {}
    rows: dict[str, Row] = {}
    for where, fused_out, eager_out in judged:
        j = judge(fused_out, eager_out, refs[where], tol)
        suffix = f" {where}" if where else ""
        report.model.append(Row(f"eager (original{cast}){suffix}", j.eager.max_abs, j.eager.max_rel,
                                j.eager.rel_norm, True, "the reference" if eager.sampled else
                                "; ".join(filter(None, ["baseline", _nonfinite(eager_out, refs[where])]))))
        note = "; ".join(filter(None, [f"rel norm bound {j.bound:.3g}", _nonfinite(fused_out, refs[where])]))
        if eager.sampled and not j.ok and compiled:
            note += ("; torch.compile's random ops draw other numbers than eager's from the same state "
                     "(torch._inductor.config.fallback_random = True draws eager's)")
        rows[where] = Row(f"fastres (optimized){suffix}", j.fused.max_abs, j.fused.max_rel, j.fused.rel_norm,
                          j.ok, note)
        report.model.append(rows[where])
        if j.ok and j.bound > tol.rel_norm:
            loosened[where] = _repeat_limit(tol, j.eager.rel_norm)
    if loosened and not _answers_again(baseline, inputs, eager.output, tol, loosened):
        for where in loosened:
            rows[where].ok, rows[where].note = False, f"{rows[where].note}; the eager model {_UNREPEATABLE}"


@dataclass
class _Layer:
    """One fused op's call, as verify recorded it: its modules, its inputs as the op took them, its output."""
    name: str
    conv: nn.Conv2d
    bn: nn.Module | None
    projection: tuple[nn.Conv2d, nn.Module] | None
    act: str
    negative_slope: float
    x: torch.Tensor
    padding: Any
    residual: torch.Tensor | None
    out: torch.Tensor


@contextlib.contextmanager
def _layers_recorded(model: nn.Module, captured: list[_Layer]) -> Iterator[None]:
    """While inside, each fused op `model` runs appends a _Layer to `captured`: an optimized model's
    FusedConvBN modules (forward hooks) and the zoo's fused blocks (fastres.models; their
    `_conv_bn`, shadowed on each instance, so nothing is added to a call outside verify)."""
    names = {id(m): name.removeprefix("_orig_mod.") for name, m in model.named_modules()}  # (a torch.compile wrapper)

    def fused_conv_bn(m: FusedConvBN, args: tuple, out: torch.Tensor) -> None:
        conv, bn = m._modules_ref
        x, padding = m.op_input(args[0].detach())
        name = m.conv_name + ("" if m.projection_name is None else f" + {m.projection_name}")
        captured.append(_Layer(name, conv, bn, m._projection_ref, m.act, m.negative_slope, x, padding,
                               args[1].detach() if len(args) > 1 else None, out.detach()))

    def recording(block: _Fused) -> Callable[..., torch.Tensor]:
        def conv_bn(conv, bn, x, residual=None, act="relu", projection=None, negative_slope=DEFAULT_NEGATIVE_SLOPE):
            out = type(block)._conv_bn(block, conv, bn, x, residual, act, projection, negative_slope)
            # A hooked downsample, or a norm the epilogue cannot take (GroupNorm): the op ran as its modules.
            if isinstance(projection, nn.Module) or not folds(bn):
                return out
            pconv = projection[0] if projection is not None else None
            name = names[id(conv)] + ("" if pconv is None else f" + {names[id(pconv)]}")
            captured.append(_Layer(name, conv, bn, projection, act, negative_slope, x.detach(), conv.padding,
                                   None if residual is None else residual.detach(), out.detach()))
            return out
        return conv_bn

    hooks = [m.register_forward_hook(fused_conv_bn) for m in model.modules() if isinstance(m, FusedConvBN)]
    blocks = [m for m in model.modules() if isinstance(m, _Fused) and not isinstance(m, FusedConvBN)]
    for block in blocks:
        vars(block)["_conv_bn"] = recording(block)
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for block in blocks:
            vars(block).pop("_conv_bn", None)


def _layer_row(layer: _Layer, dtype: torch.dtype, tf32: bool) -> Row:
    """A recorded fused op against float64 on its own inputs, by its modules (conv, BN, projection),
    at the per-dtype layer tolerance for its reduction length."""
    conv, bn, residual = layer.conv, layer.bn, layer.residual
    gain = conv_bn_fold(conv, bn)[0]
    reduction = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    if layer.projection is not None:
        pconv, pbn = layer.projection
        residual = reference_conv_bn_act(residual, pconv.weight, conv_bias=pconv.bias, bn=pbn, stride=pconv.stride,
                                         act="none")
        reduction += pconv.in_channels
        gain = branch_gain(gain, conv_bn_fold(pconv, pbn)[0])
    ref = reference_conv_bn_act(layer.x, conv.weight, conv_bias=conv.bias, bn=bn, residual=residual,
                                stride=conv.stride, padding=layer.padding, dilation=conv.dilation, groups=conv.groups,
                                act=layer.act, negative_slope=layer.negative_slope)
    return _row(layer.name, layer.out, ref, tolerance(dtype, reduction, tf32), gain=gain)


def verify(
    model: nn.Module,
    optimized: nn.Module,
    inputs: torch.Tensor | tuple,
    per_layer: bool = False,
) -> VerifyReport:
    """Run `model`, `optimized` and a float64 reference on `inputs`; report errors (see module doc)."""
    for name, module in (("model", model), ("optimized", optimized)):
        if module.training:
            raise RuntimeError(f"fastres.verify checks models in eval mode, but {name} is in train mode (its "
                               "BatchNorms would use batch statistics and update their running ones, and an "
                               f"optimized model runs unfused in train mode); call {name}.eval() first")
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    x = _first_floating(inputs)
    if x is None:
        raise TypeError("fastres.verify: expected inputs to hold a floating-point tensor (its dtype sets the "
                        "tolerance), but found none")
    dtype = autocast_dtype(x)
    tf32 = tf32_in_use(dtype, x.device)
    tol = tolerance(dtype, tf32=tf32)
    report = VerifyReport(dtype)
    baseline = _as_dtype_of(model, optimized)
    captured: list[_Layer] = []
    eager = run_from_here(baseline, inputs)
    with _layers_recorded(optimized, captured) if per_layer else contextlib.nullcontext():
        fused = run_from_here(optimized, inputs, like=baseline).output
    if eager.sampled:
        report.reference = ("the eager model's, on the same random draws (the model draws random numbers, "
                            "which a float64 copy would draw otherwise)")
        ref = eager.output
    else:
        reference = model_copy(model).cpu().double()
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            ref = reference(*_as_float64(inputs, torch.device("cpu")))

    cast = "" if baseline is model else f" as {str(_parameter_dtype(baseline)).removeprefix('torch.')}"
    _judge_outputs(report, fused, eager, ref, tol, cast, _compiled(optimized), baseline, inputs)

    for layer in captured:
        report.layers.append(_layer_row(layer, dtype, tf32))
    if per_layer and not captured:
        report.layers_note = "no fused op ran, so no layer was checked on its own"
    return report

