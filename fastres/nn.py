"""Fused modules: conv -> BN -> (+ residual) -> activation as one fastres op in eval mode.
A block's downsample branch (1x1 conv + BN) is the residual's projection inside its last op.

The modules keep ordinary nn.Conv2d / nn.BatchNorm2d children (state_dict keys, .to(), .half(),
DDP and checkpoints behave as users expect; BasicBlock and Bottleneck have torchvision's exact
attribute names). In train mode they run the unfused eager chain, so BN statistics update; so
does an op whose conv, BN, relu or downsample has a hook (global module hooks included), calling
its modules in torchvision's order, so hooks see what they see in torchvision, and an op whose
norm the epilogue cannot take (not a BatchNorm in eval with running statistics: `folds`). In eval
mode BN becomes the epilogue's per-channel scale/shift (fastres.numerics.fold_bn), cached per BN
module (a conv without BN: its bias as the float32 shift, per conv) and recomputed whenever a
parameter or buffer changes (tensor versions and storage are part of the cache key: optimizer
steps, load_state_dict and .to() all invalidate it).
Under torch.compile, torch.jit.trace, make_fx (any dispatch mode) and torch.func's transforms the
fold is computed inline, so compiled and traced graphs never hold stale values; with autograd on,
the cached fold comes with its gradient attached (recomputed in the backward), so gradients reach
BN's and the conv's parameters and the forward runs no fold kernels.
A CUDA graph captured in eager mode keeps the folded values of capture time (the folds it read
stay alive with their module, even after a refold replaces them): capture again after changing BN
parameters.
torch.fx symbolic tracing (torchvision's create_feature_extractor, get_graph_node_names) sees
torchvision's modules called in torchvision's order, so its node names are torchvision's; the
traced module is unfused until fastres.optimize fuses it again. torch.onnx.export sees them too:
ONNX has no fastres op, and the exported graph is the one torchvision's model exports (Conv, Add,
Relu; the exporter folds BN into Conv), which ONNX Runtime and TensorRT fuse themselves.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Any, Callable, TypeVar

import torch
import torch.fx as fx
import torch.nn as nn

from fastres.hooks import has_call_hooks
from fastres.numerics import activate, fold_bn
from fastres.ops import conv_bn_act, differentiated_by_transform, exporting_to_onnx, recorded_by_tracer
from fastres.problem import DEFAULT_NEGATIVE_SLOPE, act_text, check_activation

__all__ = ["ConvBNAct", "BasicBlock", "Bottleneck", "fused_conv_bn", "set_backend", "bn_scale_shift"]

_T = TypeVar("_T")
# Per module (a BN, or a conv without one): the key of the tensors a fold read, the fold, whether it lives
# on a CUDA device, and those tensors. Held (per-channel vectors: small), their ids in the key name them
# alone: an address and a version are not enough, since a tensor freed after the fold (a parametrization's
# output, a replaced buffer) leaves its block to the next, which the CUDA caching allocator hands out at
# once, at the same version.
_fold_cache: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Any, bool, tuple]]" = weakref.WeakKeyDictionary()
# Per module: the folds CUDA graphs were captured reading. A graph holds their addresses, not references,
# so they stay alive after a refold replaces them in the cache: a replay reads capture time's values.
_captured_folds: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()
_fold_lock = threading.Lock()  # serving processes call models from many threads
_MISSING = object()
_warned_uncacheable = False  # the inference-tensor warning: once per process


def _tensor_attr(module: nn.Module, name: str) -> torch.Tensor | None:
    """getattr(module, name, None), reading a parameter or buffer from its table directly: the fold cache
    runs per op call, and nn.Module.__getattr__ was a third of a cache hit's time."""
    value = module._parameters.get(name, _MISSING)
    if value is _MISSING:
        value = module._buffers.get(name, _MISSING)
    return getattr(module, name, None) if value is _MISSING else value


def _bn_tensors(bn: nn.Module) -> tuple[torch.Tensor | None, ...]:
    return (_tensor_attr(bn, "running_mean"), _tensor_attr(bn, "running_var"), _tensor_attr(bn, "weight"),
            _tensor_attr(bn, "bias"))


def _cuda_device(tensors: tuple[torch.Tensor | None, ...]) -> torch.device | None:
    return next((t.device for t in tensors if t is not None and t.is_cuda), None)


def _cached(owner: nn.Module, tensors: tuple[torch.Tensor | None, ...], extra: tuple,
            compute: Callable[..., _T]) -> _T:
    """compute(*tensors), cached per owner module until any of `tensors` changes. When gradients are
    wanted the cached value comes with autograd attached (_WithGradient): no fold kernels run in the
    forward, and a backward gets compute's gradients."""
    # Tracers (torch.compile, torch.jit.trace, make_fx and other dispatch modes) record the fold from the
    # parameters, never a cached constant; torch.func and forward AD need it computed on their tensors.
    if recorded_by_tracer() or differentiated_by_transform():
        return compute(*tensors)
    grad = torch.is_grad_enabled()
    wants_grad = False
    key = list(extra)
    for t in tensors:
        if t is None:
            key.append(None)
            continue
        if t.is_inference():  # made under torch.inference_mode: no version counter to key on
            _warn_uncacheable()
            return compute(*tensors)
        wants_grad = wants_grad or (grad and t.requires_grad)
        key.append((id(t), t._version, t.data_ptr(), t.device, t.dtype, t.shape))
    value = _lookup_or_compute(owner, tuple(key), tensors, compute)
    return _WithGradient.apply(compute, value, *tensors) if wants_grad else value


def _warn_uncacheable() -> None:
    global _warned_uncacheable
    if _warned_uncacheable:
        return
    _warned_uncacheable = True
    warnings.warn(
        "fastres: this model's parameters or buffers are inference tensors (made, moved or cast under "
        "torch.inference_mode), which have no version counter, so BatchNorm's fold cannot be cached: every "
        "call folds every BN again (a few small kernels per fused op). Build, move and cast the model outside "
        "inference mode (`with torch.inference_mode(False): ...`), or pass it through fastres.optimize, whose "
        "copy has ordinary tensors even when made inside it.", RuntimeWarning, stacklevel=2)


def _lookup_or_compute(owner: nn.Module, key: tuple, tensors: tuple[torch.Tensor | None, ...],
                       compute: Callable[..., _T]) -> _T:
    if vars(owner).get("_is_replica"):  # DataParallel's: made for one forward, on copies made for it
        with torch.no_grad():
            return compute(*tensors)
    with _fold_lock:
        cached = _fold_cache.get(owner)
    if cached is not None and cached[0] == key:
        # Also inside a CUDA graph capture after a warm-up: the graph reads the cached fold, no fold kernels.
        if cached[2] and torch.cuda.is_current_stream_capturing():
            _keep_for_graphs(owner, cached[1])
        return cached[1]
    # Never an inference tensor, even when the first call is inside torch.inference_mode: a later call
    # that wants gradients (saliency, fine-tuning) would otherwise fail saving it for backward.
    # inference_mode(False) turns grad mode on, so no_grad goes inside it.
    with torch.inference_mode(False), torch.no_grad():
        value = compute(*tensors)
    device = _cuda_device(tensors)
    if device is not None:
        # Inside a capture compute() only recorded kernels: cached, the value would hold nothing until
        # the graph's first replay, and an eager call before it would read that.
        if torch.cuda.is_current_stream_capturing():
            return value
        # Another thread may read the cached value at once on its own stream: it must be written by then.
        torch.cuda.current_stream(device).synchronize()
    with _fold_lock:
        _fold_cache[owner] = (key, value, device is not None, tensors)
    return value


class _WithGradient(torch.autograd.Function):
    """A cached value of compute(*tensors) as that call's differentiable result: the forward returns
    it (an eval-mode model run without torch.no_grad would otherwise refold every BN, about five
    to nine tiny kernels each, per call); the backward recomputes compute with autograd for the
    gradients of the tensors that want them."""

    @staticmethod
    def forward(ctx: Any, compute: Callable[..., Any], value: Any, *tensors: torch.Tensor | None) -> Any:
        ctx.compute = compute
        ctx.save_for_backward(*tensors)
        return tuple(v.detach() for v in value) if isinstance(value, tuple) else value.detach()

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple:
        needs = ctx.needs_input_grad[2:]
        create_graph = torch.is_grad_enabled()  # backward(create_graph=True): keep these differentiable
        tensors = ctx.saved_tensors
        with torch.enable_grad():
            # From the saved tensors themselves, so a second derivative sees the fold's own terms too.
            outputs = ctx.compute(*tensors)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            wanted = [t for t, need in zip(tensors, needs) if need]
            found = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True, create_graph=create_graph))
        return (None, None, *(next(found) if need else None for need in needs))


def _keep_for_graphs(owner: nn.Module, value: Any) -> None:
    with _fold_lock:
        kept = _captured_folds.setdefault(owner, [])
        if all(v is not value for v in kept):
            kept.append(value)


def bn_scale_shift(
    bn: nn.Module, conv_bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """BN (eval) as (scale, shift) on BN's device, cached until any BN or bias tensor changes."""
    eps = bn.eps
    return _cached(bn, _bn_tensors(bn) + (conv_bias,), (eps, dtype),
                   lambda mean, var, weight, bias, conv_bias: fold_bn(mean, var, weight, bias, eps, conv_bias, dtype))


Projection = tuple[nn.Conv2d, nn.Module]  # a residual's (1x1 conv, BN): a ResNet downsample branch

_BN_FORWARDS = frozenset({nn.modules.batchnorm._BatchNorm.forward, nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward})
_batchnorm_types: dict[type, bool] = {}  # is_batchnorm by type
_folding_types: dict[type, bool] = {}  # by type, whether `folds` may take the norm: the zoo asks on every op call


def is_batchnorm(module: nn.Module) -> bool:
    """Whether `module` computes as a BatchNorm with torch's forward (a subclass too), or is
    torchvision's FrozenBatchNorm2d: a per-channel affine map in eval, which the op's epilogue takes."""
    kind = _batchnorm_types.get(type(module))
    if kind is None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            kind = type(module).forward in _BN_FORWARDS
        else:
            kind = type(module).__name__ == "FrozenBatchNorm2d" and all(
                hasattr(module, a) for a in ("weight", "bias", "running_mean", "running_var", "eps"))
        _batchnorm_types[type(module)] = kind
    return kind


def foldable(norm: nn.Module) -> bool:
    """Whether the op's epilogue can take `norm` once in eval mode: a BatchNorm (is_batchnorm, or the
    BatchNorm part of timm's is_norm_act modules) with running statistics (a buffer in every such
    kind; None when not tracked)."""
    kind = _folding_types.get(type(norm))
    if kind is None:
        kind = _folding_types[type(norm)] = is_batchnorm(norm) or is_norm_act(norm)
    return kind and norm._buffers.get("running_mean") is not None


def folds(bn: nn.Module | None) -> bool:
    """Whether the op can take `bn` (None: a conv alone) as its epilogue now: foldable and in eval
    mode. Another norm (GroupNorm, a BN in train mode in an eval model) runs as its module."""
    return bn is None or (not bn.training and foldable(bn))


def is_projection_conv(conv: nn.Module) -> bool:
    """Whether the op can take `conv` as a residual projection: a plain unpadded 1x1 nn.Conv2d
    (any stride; dilation means nothing for 1x1; a bias is folded into the BN shift)."""
    return (type(conv).forward is nn.Conv2d.forward and tuple(conv.kernel_size) == (1, 1) and conv.groups == 1
            and conv.padding in ((0, 0), "valid", "same"))


def conv_bn_fold(conv: nn.Conv2d, bn: nn.Module | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """bn (and conv's bias) as the op's (scale, shift): float64 for a float64 conv, else float32.
    Without a BN there is no scale, and conv's bias (if any) is the shift."""
    dtype = torch.float64 if conv.weight.dtype == torch.float64 else torch.float32
    if bn is not None:
        return bn_scale_shift(bn, conv.bias, dtype)
    bias = conv.bias
    if bias is None:
        return None, None
    return None, _cached(conv, (bias,), (dtype,), lambda bias: bias.to(dtype).contiguous())


def fused_conv_bn(
    conv: nn.Conv2d,
    bn: nn.Module | None,
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    act: str = "relu",
    backend: str = "auto",
    projection: Projection | None = None,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    padding: tuple[int, int] | None = None,
) -> torch.Tensor:
    """act(bn(conv(x)) + residual) through fastres.ops.conv_bn_act (BN in eval form; bn=None: a
    conv with no BN after it); with `projection`, act(bn(conv(x)) + pbn(pconv(residual))) in one call.
    padding: the op's (h, w), when conv's own is not numbers (padding="same", timm's Conv2dSame)."""
    scale, shift = conv_bn_fold(conv, bn)
    extra = {}
    if projection is not None:
        pconv, pbn = projection
        pscale, pshift = conv_bn_fold(pconv, pbn)
        extra = dict(residual_weight=pconv.weight, residual_scale=pscale, residual_shift=pshift,
                     residual_stride=pconv.stride)
    return conv_bn_act(
        x, conv.weight, scale, shift, residual,
        stride=conv.stride, padding=conv.padding if padding is None else padding, dilation=conv.dilation,
        groups=conv.groups, act=act, backend=backend, negative_slope=negative_slope, **extra,
    )


# timm's BatchNorm + activation modules: a BatchNorm followed by their own `drop` and `act` children
# (RegNet, EfficientNet, MobileNet and other timm models build every BN this way).
_NORM_ACT_CLASSES = frozenset({"BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"})


def is_norm_act(module: nn.Module) -> bool:
    """Whether `module` is one of timm's BatchNorm + activation modules, with timm's own forward."""
    owner = next((cls for cls in type(module).__mro__ if "forward" in vars(cls)), None)
    return owner is not None and owner.__name__ in _NORM_ACT_CLASSES


def normalize(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """bn's normalization alone: its forward, or for a BatchNorm + activation module (is_norm_act)
    the BatchNorm part, without its drop and act."""
    if not is_norm_act(bn):
        return bn(x)
    if isinstance(bn, nn.SyncBatchNorm):
        return nn.SyncBatchNorm.forward(bn, x)
    if isinstance(bn, nn.BatchNorm2d):
        return nn.BatchNorm2d.forward(bn, x)
    # timm's FrozenBatchNormAct2d keeps its statistics as buffers: its own arithmetic, minus the act.
    scale = bn.weight.reshape(1, -1, 1, 1) * (bn.running_var.reshape(1, -1, 1, 1) + bn.eps).rsqrt()
    return x * scale + (bn.bias.reshape(1, -1, 1, 1) - bn.running_mean.reshape(1, -1, 1, 1) * scale)


def eager_conv_bn(
    conv: nn.Conv2d, bn: nn.Module | None, x: torch.Tensor, residual: torch.Tensor | None = None, act: str = "relu",
    projection: Projection | nn.Module | None = None, act_module: nn.Module | None = None,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> torch.Tensor:
    """The same computation as separate eager modules (train mode, and the ground truth), in
    torchvision's order; a projection may be a whole module (a block's downsample), and
    act_module, if given, applies `act` (so their hooks run)."""
    y = conv(x) if bn is None else normalize(bn, conv(x))
    if isinstance(projection, nn.Module):
        residual = projection(residual)
    elif projection is not None:
        pconv, pbn = projection
        residual = pconv(residual) if pbn is None else normalize(pbn, pconv(residual))
    if residual is not None:
        y = y + residual
    return activate(y, act, negative_slope) if act_module is None else act_module(y)


def records_modules(x: torch.Tensor) -> bool:
    """Whether the call is being recorded for another runtime that should see the model's own
    modules, not the op: torch.fx symbolic tracing, or torch.onnx.export."""
    return isinstance(x, fx.Proxy) or exporting_to_onnx()


def not_scriptable(module: nn.Module) -> nn.Module:
    """torch.jit.script's hook on fused modules: refuse in words, rather than fail deep in TorchScript."""
    raise RuntimeError(
        f"fastres's {type(module).__name__} cannot be compiled with torch.jit.script, which "
        "torch deprecates; torch.jit.trace, torch.export and torch.compile all keep the fused op")


class _Fused(nn.Module):
    """Shared switch: fused op in eval mode (backend chosen per module); the eager chain of modules
    in train mode, under torch.fx symbolic tracing and torch.onnx.export, and while one of the op's
    modules (conv, BN, a block's `relu`) has a hook."""

    backend: str = "auto"
    __prepare_scriptable__ = not_scriptable

    def _conv_bn(
        self, conv: nn.Conv2d, bn: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None, act: str = "relu",
        projection: Projection | nn.Module | None = None, negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    ) -> torch.Tensor:
        act_module = self._modules.get("relu") if act == "relu" else None
        if (self.training or isinstance(projection, nn.Module) or not folds(bn) or records_modules(x)
                or has_call_hooks(conv, bn, act_module, *(projection or ()))):
            return eager_conv_bn(conv, bn, x, residual, act, projection, act_module, negative_slope)
        return fused_conv_bn(conv, bn, x, residual, act, self.backend, projection, negative_slope)

    def _shortcut(self, x: torch.Tensor) -> tuple[torch.Tensor, Projection | nn.Module | None]:
        """The block's residual and its projection: the downsample's 1x1 conv + BN go into the
        block's last op (eval) when the op can take them, else run first, as their own op. In
        train mode, under fx tracing or ONNX export and while it has hooks, the downsample module is
        the projection: the last op then runs eagerly, calling it where torchvision does."""
        if self.downsample is None:
            return x, None
        if self.training or records_modules(x) or has_call_hooks(self.downsample):
            return x, self.downsample
        conv, bn = self.downsample[0], self.downsample[1]
        if is_projection_conv(conv) and len(self.downsample) == 2 and folds(bn):
            return x, (conv, bn)
        return self._conv_bn(conv, bn, x, act="none"), None


class ConvBNAct(_Fused):
    """conv -> BN -> (+ residual) -> act. Holds `conv` and `bn` children; act: one of
    fastres.problem.ACTIVATIONS, negative_slope: LeakyReLU's (act="leaky_relu")."""

    negative_slope: float = DEFAULT_NEGATIVE_SLOPE  # (class default: modules pickled before LeakyReLU fused)

    def __init__(self, conv: nn.Conv2d, bn: nn.Module, act: str = "relu", backend: str = "auto", *,
                 negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> None:
        super().__init__()
        check_activation(act, negative_slope)
        self.conv, self.bn, self.act, self.backend = conv, bn, act, backend
        self.negative_slope = float(negative_slope)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self._conv_bn(self.conv, self.bn, x, residual, self.act, negative_slope=self.negative_slope)

    def extra_repr(self) -> str:
        return f"act={act_text(self.act, self.negative_slope)!r}, backend={self.backend!r}"


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride, dilation, groups=groups, bias=False, dilation=dilation)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)


class BasicBlock(_Fused):
    """torchvision's BasicBlock; in eval: conv1+bn1+relu, and conv2+bn2+residual+relu, each one op."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, groups: int = 1,
        base_width: int = 64, dilation: int = 1, norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual, projection = self._shortcut(x)
        out = self._conv_bn(self.conv1, self.bn1, x)
        return self._conv_bn(self.conv2, self.bn2, out, residual, projection=projection)


class Bottleneck(_Fused):
    """torchvision's Bottleneck (stride on the 3x3); the last 1x1 conv carries residual + relu."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, groups: int = 1,
        base_width: int = 64, dilation: int = 1, norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual, projection = self._shortcut(x)
        out = self._conv_bn(self.conv1, self.bn1, x)
        out = self._conv_bn(self.conv2, self.bn2, out)
        return self._conv_bn(self.conv3, self.bn3, out, residual, projection=projection)


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Route every fused module of `model` to `backend` ("auto", "triton", "cuda", "cudnn", "reference")."""
    from fastres.backends import check_name

    check_name(backend)
    for module in model.modules():
        if isinstance(module, _Fused):
            module.backend = backend
    return model
