"""fastres.verify: check an optimized model against its eager original and a float64 reference.

Whole model: the original and the optimized model run in their dtype (an original held in
another dtype than the optimized model, as after optimize(model, dtype=torch.float16), runs as a
copy cast to the optimized model's); a float64 copy of the original on the CPU is ground truth.
Errors grow over fifty layers in any low precision, so the optimized model passes when its error
is within the per-dtype tolerance or no more than twice the eager model's own error (same dtype,
same inputs): "no worse than what you had".

Under torch.autocast (verify called inside the region) "their dtype" is autocast's: tolerances
are autocast's dtype's, and the float64 reference runs with autocast off.

Per layer (optional): each fused layer's own inputs are captured during the optimized run and
the layer is recomputed in float64 from them; it must meet the per-dtype layer tolerance of
fastres.numerics, exactly as the kernel tests require.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fastres.converter import FusedConvBN, model_copy
from fastres.nn import conv_bn_fold
from fastres.numerics import branch_gain, compare, conv_tf32_enabled, reference_conv_bn_act, tolerance
from fastres.ops import autocast_dtype

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
                 "final output against a float64 reference:"] + table(self.model)
        if self.layers:
            lines += [f"fused layers against float64 on their own inputs ({sum(r.ok for r in self.layers)}"
                      f"/{len(self.layers)} ok):"] + table(self.layers)
        return "\n".join(lines)


def _first_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return _first_tensor(value[0])
    if isinstance(value, dict):
        return _first_tensor(next(iter(value.values())))
    raise TypeError(f"cannot find an output tensor in {type(value).__name__}")


def _as_float64_cpu(inputs: tuple) -> tuple:
    return tuple(t.detach().cpu().double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)


def _parameter_dtype(module: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _as_dtype_of(model: nn.Module, optimized: nn.Module) -> nn.Module:
    """`model`, or a copy of it cast to the dtype `optimized` holds (optimize(model, dtype=...))."""
    dtype = _parameter_dtype(optimized)
    if dtype is None or _parameter_dtype(model) in (None, dtype):
        return model
    return model_copy(model).to(dtype)


def _row(name: str, out: torch.Tensor, ref: torch.Tensor, tol, gain=None, note: str = "") -> Row:
    c = compare(out, ref, tol, gain)
    return Row(name, c.max_abs, c.max_rel, c.rel_norm, c.ok, note)


def verify(
    model: nn.Module,
    optimized: nn.Module,
    inputs: torch.Tensor | tuple,
    per_layer: bool = False,
) -> VerifyReport:
    """Run `model`, `optimized` and a float64 reference on `inputs`; report errors (see module doc)."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    x = _first_tensor(inputs)
    dtype = autocast_dtype(x)
    tf32 = dtype == torch.float32 and x.is_cuda and conv_tf32_enabled()
    report = VerifyReport(dtype)
    baseline = _as_dtype_of(model, optimized)
    captured: list[tuple[FusedConvBN, tuple]] = []
    hooks = []
    if per_layer:
        for module in optimized.modules():
            if isinstance(module, FusedConvBN):
                hooks.append(module.register_forward_hook(
                    lambda m, args, out: captured.append((m, tuple(a.detach() for a in args) + (out.detach(),)))))
    try:
        with torch.no_grad():
            eager_out = _first_tensor(baseline(*inputs))
            fused_out = _first_tensor(optimized(*inputs))
            reference = model_copy(model).cpu().double()
            with torch.autocast("cpu", enabled=False):
                ref_out = _first_tensor(reference(*_as_float64_cpu(inputs)))
    finally:
        for hook in hooks:
            hook.remove()

    tol = tolerance(dtype, tf32=tf32)
    eager = compare(eager_out, ref_out, tol)
    bound = max(tol.rel_norm, 2.0 * eager.rel_norm)
    cast = "" if baseline is model else f" as {str(_parameter_dtype(baseline)).removeprefix('torch.')}"
    report.model.append(Row(f"eager (original{cast})", eager.max_abs, eager.max_rel, eager.rel_norm, True, "baseline"))
    fused = compare(fused_out, ref_out, tol)
    report.model.append(Row("fastres (optimized)", fused.max_abs, fused.max_rel, fused.rel_norm,
                            bool(torch.isfinite(fused_out).eq(torch.isfinite(ref_out)).all()) and fused.rel_norm <= bound,
                            f"rel norm bound {bound:.3g}"))

    for module, args in captured:
        conv, bn = module._modules_ref
        layer_in, residual, out = args[0], (args[1] if len(args) == 3 else None), args[-1]
        gain = conv_bn_fold(conv, bn)[0]
        reduction = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        if module._projection_ref is not None:
            pconv, pbn = module._projection_ref
            residual = reference_conv_bn_act(residual, pconv.weight, conv_bias=pconv.bias, bn=pbn,
                                             stride=pconv.stride, act="none")
            reduction += pconv.in_channels
            gain = branch_gain(gain, conv_bn_fold(pconv, pbn)[0])
        layer_in, padding = module.op_input(layer_in)
        ref = reference_conv_bn_act(
            layer_in, conv.weight, conv_bias=conv.bias, bn=bn, residual=residual,
            stride=conv.stride, padding=padding, dilation=conv.dilation, groups=conv.groups, act=module.act,
            negative_slope=module.negative_slope,
        )
        name = module.conv_name + ("" if module.projection_name is None else f" + {module.projection_name}")
        report.layers.append(_row(name, out, ref, tolerance(dtype, reduction, tf32), gain=gain))
    return report

