"""The public fused op: y = act(conv2d(x, weight) * scale[k] + shift[k] + residual), where the
residual may first go through a 1x1 conv + BN of its own (a ResNet block's downsample branch).

Registered as `torch.ops.fastres.conv_bn_act` with torch.library.custom_op. custom_op rather
than triton_op on purpose: the op chooses among several backends at run time (Triton, CUTLASS,
cuDNN + a fused epilogue, the reference), per device and per shape, which a traceable triton_op
body cannot express. Opaque to Inductor, it still works under torch.compile(fullgraph=True),
CUDA graphs and torch.export, through the fake kernel below.

Under torch.autocast it casts as autocast casts conv2d: x, weight, residual and residual_weight
to autocast's dtype (float32 ones; float64 stays), while scale and shift stay as given, float32,
since the epilogue applies them in float32 anyway. So an autocast model's fused ops run on the
tensor cores, as its eager convs would, and return autocast's dtype.

ONNX has no such op and its runtimes (ONNX Runtime, TensorRT) fuse conv chains themselves, so
under torch.onnx.export conv_bn_act records its arithmetic in standard ops instead of the custom op
(Conv in x's dtype; Mul, Add and the activation in float32, as the kernels' epilogue). An
ExportedProgram that holds the op exports too: the exporter retraces it, and the op's Autograd
kernel records the same standard ops. (Not an entry in torch._decomp's table, which the exporter
would read too: Inductor refuses to fall back to an op listed there whenever the environment sets
CI, as GitHub Actions does, and FakeTensor would take it over the fake kernel.) torch.func's
transforms (grad, jacrev, jvp, ...) and forward-mode AD get those standard ops as well, from the
wrapper and from the op called directly: they have no rules for a custom op's autograd formula.
Under vmap a batch of images is one call of the op over them all.

A plain eager call of the wrapper (nothing watching: no autocast, profiler, tracer, compiler,
dispatch or function mode, tensor subclass) runs the op's kernel without the dispatcher, and one
that records a gradient runs it inside the op's own autograd function (_Differentiable): the same
checks, result and gradient, without torch.library's Python layers around a custom op (a third of
a fused call's host time; in grad mode, more than the call itself).

Its gradient (register_autograd) is the unfused chain's: the backward recomputes the conv, takes
the activation's derivative with eager autograd's own kernels and the conv's with
aten.convolution_backward, so saliency maps, Grad-CAM or input gradients of an eval-mode fused
model are eager's. Not twice differentiable.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

from fastres import backends
from fastres.backends import reference
from fastres.numerics import activate_backward
from fastres.problem import DEFAULT_NEGATIVE_SLOPE, ConvProblem, Projection, check_inputs, empty_output, pair

__all__ = ["conv_bn_act", "autocast_dtype", "autocast_arguments", "exporting_to_onnx", "recorded_by_tracer",
           "differentiated_by_transform"]


def _compute(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    act: str,
    backend: str,
    residual_weight: Optional[torch.Tensor] = None,
    residual_scale: Optional[torch.Tensor] = None,
    residual_shift: Optional[torch.Tensor] = None,
    residual_stride: Optional[Sequence[int]] = None,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> torch.Tensor:
    """The op's kernel on every device; the wrapper calls it directly for a plain eager call."""
    backends.check_name(backend)
    projection = _projection(residual_weight, residual_scale, residual_shift, residual_stride)
    problem = ConvProblem.from_tensors(
        x, weight, scale, shift, residual, tuple(stride), tuple(padding), tuple(dilation), groups, act, projection,
        negative_slope,
    )
    if math.prod(problem.output_shape) == 0:
        return empty_output(x, problem.output_shape)
    return backends.run(backend, problem, x, weight, scale, shift, residual, projection)


_conv_bn_act = torch.library.custom_op("fastres::conv_bn_act", mutates_args=())(_compute)


@_conv_bn_act.register_fake
def _conv_bn_act_fake(x, weight, scale, shift, residual, stride, padding, dilation, groups, act, backend,
                      residual_weight=None, residual_scale=None, residual_shift=None, residual_stride=None,
                      negative_slope=DEFAULT_NEGATIVE_SLOPE):
    backends.check_name(backend)
    projection = _projection(residual_weight, residual_scale, residual_shift, residual_stride)
    shape = check_inputs(x, weight, scale, shift, residual, tuple(stride), tuple(padding), tuple(dilation), groups, act,
                         projection, negative_slope)
    return empty_output(x, shape)


def _setup_context(ctx, inputs, output) -> None:
    (x, weight, scale, shift, residual, stride, padding, dilation, groups, act, _backend,
     residual_weight, residual_scale, residual_shift, residual_stride, negative_slope) = inputs
    ctx.save_for_backward(x, weight, scale, shift, residual, residual_weight, residual_scale, residual_shift)
    ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
    ctx.act, ctx.negative_slope = act, negative_slope
    ctx.residual_stride = [1, 1] if residual_stride is None else list(residual_stride)


def _backward(ctx, grad: torch.Tensor) -> tuple:
    x, weight, scale, shift, residual, residual_weight, residual_scale, residual_shift = ctx.saved_tensors
    needs = ctx.needs_input_grad
    # The epilogue's precision: float32 (float64 for float64 inputs), as in the forward kernels.
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    main = _ConvTerm(x, weight, scale, shift, *ctx.conv_args, acc)
    pre = main.value()
    projected = None
    if residual_weight is not None:
        projected = _ConvTerm(residual, residual_weight, residual_scale, residual_shift, ctx.residual_stride,
                              [0, 0], [1, 1], 1, acc)
        pre = pre + projected.value()
    elif residual is not None:
        pre = pre + residual.to(acc)
    g = activate_backward(grad.to(acc), pre, ctx.act, ctx.negative_slope)
    grad_x, grad_weight, grad_scale, grad_shift = main.gradients(g, needs[0:4])
    grad_residual = grad_rweight = grad_rscale = grad_rshift = None
    if projected is not None:
        grad_residual, grad_rweight, grad_rscale, grad_rshift = projected.gradients(g, needs[4:5] + needs[11:14])
    elif residual is not None and needs[4]:
        grad_residual = g.to(residual.dtype)
    return (grad_x, grad_weight, grad_scale, grad_shift, grad_residual, None, None, None, None, None, None,
            grad_rweight, grad_rscale, grad_rshift, None, None)


class _ConvTerm:
    """conv2d(x, weight) * scale + shift, recomputed in the backward, and its gradients."""

    def __init__(self, x, weight, scale, shift, stride, padding, dilation, groups, acc: torch.dtype) -> None:
        self.x, self.weight, self.scale, self.shift = x, weight, scale, shift
        self.args = (stride, padding, dilation, groups)
        self.acc = acc
        self.conv = F.conv2d(x, weight, None, *self.args).to(acc)

    def value(self) -> torch.Tensor:
        y = self.conv if self.scale is None else self.conv * self.scale.to(self.acc).view(1, -1, 1, 1)
        return y if self.shift is None else y + self.shift.to(self.acc).view(1, -1, 1, 1)

    def gradients(self, g: torch.Tensor, needs: tuple[bool, ...]) -> tuple[torch.Tensor | None, ...]:
        """Gradients w.r.t. (x, weight, scale, shift), given the gradient g of value()."""
        grad_scale = grad_shift = None
        if self.scale is not None and needs[2]:
            grad_scale = (g * self.conv).sum((0, 2, 3)).to(self.scale.dtype)
        if self.shift is not None and needs[3]:
            grad_shift = g.sum((0, 2, 3)).to(self.shift.dtype)
        grad_x = grad_weight = None
        if needs[0] or needs[1]:
            g_conv = g if self.scale is None else g * self.scale.to(self.acc).view(1, -1, 1, 1)
            stride, padding, dilation, groups = self.args
            grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
                g_conv.to(self.x.dtype), self.x, self.weight, None, stride, padding, dilation, False, [0, 0], groups,
                [needs[0], needs[1], False])
        return grad_x, grad_weight, grad_scale, grad_shift


_conv_bn_act.register_autograd(_backward, setup_context=_setup_context)

# The operands autocast casts (conv2d's: the convs' inputs and weights), by name and by position.
_AUTOCAST_NAMES = frozenset({"x", "weight", "residual", "residual_weight"})
_AUTOCAST_OPERANDS = frozenset(i for i, argument in enumerate(torch.ops.fastres.conv_bn_act.default._schema.arguments)
                               if argument.name in _AUTOCAST_NAMES)
_AUTOCAST_DEVICES = ("cpu", "cuda")
_AUTOCAST_CAST = (torch.float32, torch.float16, torch.bfloat16)  # float64 is never cast
_LIB = torch.library.Library("fastres", "IMPL")


def autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype the op computes the operand `t` in: autocast's, for a float32 or float16/bfloat16
    tensor inside an autocast region enabled for its device type, else t's own."""
    return _autocast_to(t.dtype, "cuda" if t.is_cuda else "cpu" if t.is_cpu else None)  # (cheaper than t.device.type)


def _autocast_to(dtype: torch.dtype, device_type: str | None) -> torch.dtype:
    if device_type is not None and dtype in _AUTOCAST_CAST and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def autocast_arguments(call: dict[str, Any], device_type: str) -> dict[str, Any]:
    """The op's arguments by name, made elsewhere (meta tensors: fastres.precompile), as the op's
    autocast rule casts them for a call on `device_type` in the current autocast region."""
    return {name: a.to(_autocast_to(a.dtype, device_type)) if name in _AUTOCAST_NAMES and a is not None else a
            for name, a in call.items()}


def _register_autocast(device_type: str) -> None:
    """torch.library.register_autocast casts every floating operand to one dtype fixed at
    registration; this rule reads autocast's dtype at each call and leaves scale/shift alone."""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    below = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keyset, *args):
        args = tuple(a.to(autocast_dtype(a))
                     if i in _AUTOCAST_OPERANDS and a is not None and a.device.type == device_type else a
                     for i, a in enumerate(args))
        with torch._C._ExcludeDispatchKeyGuard(below):
            return torch.ops.fastres.conv_bn_act.default(*args)

    _LIB.impl("conv_bn_act", kernel, key, with_keyset=True)


for _device_type in _AUTOCAST_DEVICES:
    _register_autocast(_device_type)


def exporting_to_onnx() -> bool:
    """Whether torch.onnx.export (either exporter) is tracing the caller: it cannot export the op."""
    # torch.onnx.is_in_onnx_export costs ~1 us a call; outside of tracing, the first test answers in
    # ~0.2 us. Its exporters trace with torch.export (is_compiling holds) or torch.jit.trace.
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()) and torch.onnx.is_in_onnx_export()


def recorded_by_tracer() -> bool:
    """Whether a compiler, tracer or dispatch mode (torch.compile, torch.jit.trace, make_fx, fake
    tensors, ...) sees the caller: it records calls from their inputs, never a shortcut's result."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0


def differentiated_by_transform() -> bool:
    """Whether torch.func's transforms (grad, vmap, jvp, ...) or forward-mode AD (a dual_level) see
    the caller: a custom op's autograd formula has rules for neither, so the op computes its
    standard-op form (eager forward AD would otherwise drop the tangent without a word)."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


class _Differentiable(torch.autograd.Function):
    """The op's autograd record (register_autograd's formula) for a call that needs one. torch's
    generated function refills the arguments the dispatcher dropped as defaults through
    torch._library.utils.fill_defaults, which rebuilds the schema's argument list once per argument:
    about 80 us a call here, more than the fused call itself. The defaults are fixed: a tuple."""

    @staticmethod
    def forward(ctx: Any, *args: Any) -> torch.Tensor:
        *args, keyset = args
        if keyset is None:  # from the wrapper's plain eager call: the kernel itself
            output = _compute(*args)
        else:
            output = _below_autograd(keyset, *args)
        _setup_context(ctx, (*args, *_SCHEMA_DEFAULTS[len(args):]), output)
        return output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return (*_backward(ctx, grad), None)


def _below_autograd(keyset: torch._C.DispatchKeySet, *args: Any) -> torch.Tensor:
    """The op's kernel for the keys below the Autograd one that called it (autocast, the device's)."""
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.fastres.conv_bn_act.default.redispatch(keyset & torch._C._after_autograd_keyset, *args)


def _records_gradient(*args: Any) -> bool:
    """Whether autograd records a call with these arguments (grad mode on, a tensor needing one)."""
    return torch.is_grad_enabled() and torch._C._any_requires_grad(*args)


_SCHEMA_DEFAULTS = tuple(a.default_value for a in torch.ops.fastres.conv_bn_act.default._schema.arguments)


def _register_transform_rules() -> None:
    """The op's Autograd kernel for each device type, for `torch.ops.fastres.conv_bn_act` called
    directly (an exported or traced graph) too: the standard-op form under torch.onnx.export (an
    ExportedProgram's retrace), torch.func's transforms and forward AD, whose rules a custom op's
    autograd formula lacks (torch.func.grad / jacrev reject torch's generated function for want of
    a setup_context; eager forward AD passes through it dropping the tangent: pytorch/pytorch#168393,
    #179652); _Differentiable when a gradient is wanted; the kernel below autograd otherwise.

    Without a vmap rule the op under vmap would loop over the batch with a warning."""
    op = torch.ops.fastres.conv_bn_act.default

    def kernel(keyset, *args):
        if differentiated_by_transform() or exporting_to_onnx():
            return _standard_ops(*args)
        if _records_gradient(*args):
            return _Differentiable.apply(*args, keyset)
        return _below_autograd(keyset, *args)

    # Runtime keys (AutogradCPU, ...) take precedence over custom_op's registration on the alias.
    for device_type in (*_AUTOCAST_DEVICES, "meta"):
        _LIB.impl("conv_bn_act", kernel, "Autograd" + torch._C._dispatch_key_for_device(device_type), with_keyset=True)

    @_conv_bn_act.register_vmap
    def _batched(info, in_dims, x, weight, scale, shift, residual, *rest):
        """A batch of x (and of residual) is more images: one call over them all. A batch of any
        other operand (per-sample weights, an ensemble) runs one call per sample."""
        size = info.batch_size
        args = (x, weight, scale, shift, residual, *rest)
        dims = [d if isinstance(d, int) else None for d in in_dims]  # a list argument's in_dims is a list of None
        if any(d is not None for i, d in enumerate(dims) if i not in (0, 4)) or x.dim() != 4 + (dims[0] is not None):
            return torch.stack([op(*(a if d is None else a.select(d, i) for a, d in zip(args, dims)))
                                for i in range(size)]), 0

        def images(t, dim):
            return (t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)).flatten(0, 1)

        residual = None if residual is None else images(residual, dims[4])
        return op(images(x, dims[0]), weight, scale, shift, residual, *rest).unflatten(0, (size, -1)), 0


def _projection(
    weight: torch.Tensor | None, scale: torch.Tensor | None, shift: torch.Tensor | None, stride: Sequence[int] | None
) -> Projection | None:
    if weight is None:
        named = [n for n, v in (("residual_scale", scale), ("residual_shift", shift), ("residual_stride", stride)) if v is not None]
        if named:
            raise RuntimeError(f"{' and '.join(named)} given without residual_weight (they describe the residual's 1x1 conv)")
        return None
    return Projection(weight, scale, shift, pair(1 if stride is None else stride, "residual_stride"))


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    act: str = "relu",
    backend: str = "auto",
    residual_weight: torch.Tensor | None = None,
    residual_scale: torch.Tensor | None = None,
    residual_shift: torch.Tensor | None = None,
    residual_stride: int | tuple[int, int] | None = None,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> torch.Tensor:
    """y = act(conv2d(x, weight, stride, padding, dilation, groups) * scale[k] + shift[k] + residual).

    x: (N, C, H, W), any memory format (channels_last is the fast one); weight: (K, C/groups, R, S)
    of x's dtype. scale, shift: optional per-output-channel vectors (used in float32). residual:
    optional, the output's shape and dtype, any memory format, may alias x. act: "none", "relu",
    "relu6", "silu", "hardswish", "sigmoid", "hardsigmoid", "gelu" (exact), "gelu_tanh" (tanh
    approximation) or "leaky_relu" (with negative_slope, as F.leaky_relu's). backend: "auto", "triton",
    "cuda", "cudnn" or "reference".
    residual_weight: optional (K, C_res, 1, 1) weight that projects the residual first (a ResNet
    downsample branch), with its own BN as residual_scale / residual_shift and residual_stride:
    residual is then (N, C_res, H_res, W_res) and the added term conv1x1(residual) * residual_scale[k]
    + residual_shift[k], kept in fp32 inside the kernel. Backends without a fused form run it as two calls.
    Returns a channels_last tensor of x's dtype.
    """
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    if exporting_to_onnx() or differentiated_by_transform():
        return _standard_ops(x, weight, scale, shift, residual, stride, padding, dilation, groups, act, backend,
                             residual_weight, residual_scale, residual_shift, residual_stride, negative_slope)
    args = (x, weight, scale, shift, residual, list(stride), list(padding), list(dilation),
            groups, act, backend, residual_weight, residual_scale, residual_shift,
            None if residual_stride is None else list(pair(residual_stride, "residual_stride")), negative_slope)
    tensors = (x, weight, scale, shift, residual, residual_weight, residual_scale, residual_shift)
    if _watched(*tensors):
        return torch.ops.fastres.conv_bn_act.default(*args)
    if _records_gradient(*tensors):
        return _Differentiable.apply(*args, None)
    return _compute(*args)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _watched(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether a call must go through the dispatcher, which runs what watches or transforms it (a
    compiler or tracer, dispatch or function mode, profiler, autocast, a tensor subclass or a device
    other than CPU / CUDA). Otherwise the wrapper runs the op's kernel (or autograd record) itself:
    the same checks, kernel and gradient without torch.library's Python layers around a custom op,
    a third of a fused call's host time (benchmarks/bench_host.py)."""
    if recorded_by_tracer() or torch._C._is_torch_function_mode_enabled() or torch.autograd._profiler_enabled():
        return True
    device_type = "cuda" if x.is_cuda else "cpu" if x.is_cpu else None
    if device_type is None or torch.is_autocast_enabled(device_type):
        return True
    return any(t is not None and type(t) not in _PLAIN_TENSORS for t in (x, *tensors))


def _standard_ops(x, weight, scale, shift, residual, stride, padding, dilation, groups, act, backend,
                  residual_weight=None, residual_scale=None, residual_shift=None, residual_stride=None,
                  negative_slope=DEFAULT_NEGATIVE_SLOPE):
    """The op, checked as the op checks, in ops ONNX has: convs in x's dtype (tensor cores in the
    runtime), the epilogue in float32 as in the kernels, x's dtype out. What the wrapper and the
    op's Autograd kernel record under torch.onnx.export and compute under torch.func's transforms."""
    backends.check_name(backend)
    projection = _projection(residual_weight, residual_scale, residual_shift, residual_stride)
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    with warnings.catch_warnings():
        # The TorchScript exporter traces sizes as tensors; the checks hold for the shapes it exports.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        check_inputs(x, weight, scale, shift, residual, stride, padding, dilation, groups, act, projection,
                     negative_slope)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = reference.chain(x, weight, scale, shift, residual, projection, act, compute, conv_dtype=x.dtype,
                        negative_slope=negative_slope, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return y.to(x.dtype)


_register_transform_rules()
