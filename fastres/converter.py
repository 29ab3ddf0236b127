"""fastres.optimize: rewrite an existing eval-mode model so conv -> BN -> (+ residual) -> act chains
run as fused fastres ops, and report, conv by conv, what was fused and why not.

How: torch.fx, with fastres.tracing's tracer, which traces a module faithfully or not at all
(arguments with constant defaults, in-place operators, forwards that switch grad mode or
autocast, returned ModelOutputs). A module that cannot be traced is left as it is and its
children are tried one by one, so an untraceable top level still gets its blocks fused.
In each graph a chain is fused when every link has exactly one user:

    nn.Conv2d (plain, or timm's Conv2dSame; zero padding) -> BatchNorm (BatchNorm2d and subclasses
    with its forward, SyncBatchNorm, torchvision's FrozenBatchNorm2d; running statistics) -> optional
    add of a residual (+, +=, torch.add, .add, .add_) -> optional activation (ReLU / ReLU6 / SiLU /
    Hardswish / Sigmoid / Hardsigmoid / LeakyReLU with a constant slope / GELU's exact form, as
    modules, F.*, torch.* or methods; one module reused in many places is fine)

A conv with no BatchNorm after it fuses the same way when an add or an activation follows it
(VGG's conv + ReLU; the conv's bias becomes the op's shift); a conv alone stays as it is. A
BatchNorm over a channel concatenation of convs (MixNet's MixedConv2d) is split first into a
slice per conv, and the add and activation after it with it (_split_concatenated_norms).

timm's BatchNorm + activation modules (BatchNormAct2d and kin) are first split into three nodes,
the BatchNorm (a _NormOf view), their `drop` and their `act`, so each link follows the rules
above: the act fuses when it is one of ours, an identity act lets a residual add follow. Then
nn.Identity nodes are dropped (timm puts them between BN and ReLU), and `.view` calls become
`.reshape` (a view wherever one is possible; a copy where the channels_last layouts would make
`x.view(n, -1)` fail). The conv and BN modules stay where they were (the state_dict keys do not
change); a FusedConvBN module that refers to them replaces the chain in the graph. It runs the
eager chain whenever a call is outside the op's contract (a broadcasting residual, mixed dtypes),
so the answer never changes, and returns the memory format eager's conv would have.
Each rewritten module runs its own, unfused forward (on the same children) in train mode, as the
graph was traced in eval mode, and while a module its graph does not call has a hook added
after optimize (fastres.graph_module.EagerFallback).
A fused 1x1 conv + BN without activation whose only use is another fused chain's residual (a
ResNet downsample branch) then becomes that chain's residual projection: both convs in one op,
the branch's output never stored.

The GraphModule that replaces a model's module (fastres.graph_module) is an instance of the
module's own class (for a model's own classes) with its plain attributes, so isinstance, timm's
pretrained_cfg and methods such as forward_features keep working, in a deepcopy and after
torch.save / torch.load too.

Hooks (fastres.hooks): a module with forward or backward hooks is traced as a whole, so they see
what they saw in eager; a hooked module that would have been traced through is then rewritten on
its own, and its hooks move onto its replacement. A hooked conv, BatchNorm or activation is never
part of a fused chain. Hooks added later to a module the graph bypasses are watched (HookWatch).
"""

from __future__ import annotations

import copy
import operator
import sys
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from fastres.backends import check_name
from fastres.nn import (_Fused, eager_conv_bn, fused_conv_bn, is_batchnorm, is_norm_act, is_projection_conv,
                        normalize)
from fastres.compilation import precompile
from fastres.graph_module import EagerFallback, graph_module, is_rewritten
from fastres.hooks import call_hooks, hook_memo, hooks_held, move_hooks
from fastres.ops import autocast_dtype, exporting_to_onnx
from fastres.problem import DEFAULT_NEGATIVE_SLOPE, act_text, output_hw
from fastres.tracing import Tracer, UnfaithfulTrace, attributes_kept, trace

if TYPE_CHECKING:
    from fastres.verification import Run  # (it imports this module)

__all__ = ["optimize", "OptimizeReport", "FusedConvBN", "model_copy"]

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
_ACT_FUNCTIONS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6", F.silu: "silu",
    F.hardswish: "hardswish", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", F.hardsigmoid: "hardsigmoid",
}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}
# LeakyReLU's functions: its slope is their second argument (F.leaky_relu_ is torch._C._nn.leaky_relu_).
_LEAKY_RELU_FUNCTIONS = {F.leaky_relu, F.leaky_relu_}
# Functions and methods that are activations the op has no epilogue for (named in the report).
_OTHER_ACT_NAMES = frozenset(
    f"{name}{suffix}" for suffix in ("", "_") for name in (
        "gelu", "leaky_relu", "elu", "selu", "celu", "mish", "tanh", "hardtanh", "softplus", "prelu", "rrelu",
        "logsigmoid"))
# ReLU6 before its base class Hardtanh
_ACT_MODULES = ((nn.ReLU6, "relu6"), (nn.ReLU, "relu"), (nn.SiLU, "silu"), (nn.Hardswish, "hardswish"),
                (nn.Sigmoid, "sigmoid"), (nn.Hardsigmoid, "hardsigmoid"), (nn.LeakyReLU, "leaky_relu"),
                (nn.GELU, "gelu"))
# GELU's two forms, by F.gelu's `approximate`
_GELU_ACTS = {"none": "gelu", "tanh": "gelu_tanh"}


@dataclass
class OptimizeReport:
    """What fastres.optimize did with every conv of the model, by qualified module name."""

    backend: str
    entries: dict[str, str] = field(default_factory=dict)

    @property
    def fused(self) -> list[str]:
        return [name for name, what in self.entries.items() if what.startswith("fused")]

    @property
    def eager(self) -> dict[str, str]:
        return {name: what for name, what in self.entries.items() if not what.startswith("fused")}

    def __str__(self) -> str:
        lines = [f"fastres.optimize: {len(self.fused)} of {len(self.entries)} convs fused (backend={self.backend!r})"]
        width = max((len(n) for n in self.entries), default=0)
        lines += [f"  {name:<{width}}  {what}" for name, what in self.entries.items()]
        return "\n".join(lines)


# An optimized graph is flat: traced again, its node names no longer name the model's modules'
# outputs (create_feature_extractor's "layer4" would pick layer4's last BN, before its add and ReLU).
_NOT_TRACEABLE = (
    "fastres: a model fastres.optimize made cannot be traced with torch.fx: its graph is flat, so node names "
    "such as 'layer4' would no longer name what the model's modules return. Trace the original model "
    "(e.g. create_feature_extractor(model, return_nodes)), then fastres.optimize what that gives")


class FusedConvBN(_Fused):
    """act(bn(conv(x)) + residual) as one fastres op; conv and bn stay registered where they were.
    bn is None for a conv with no BatchNorm after it (VGG, SqueezeNet, squeeze-excite): its bias
    is the op's shift.

    conv or bn in train mode (in a model otherwise in eval), or a call outside the op's contract,
    runs the eager chain; so does torch.onnx.export, which then writes the model's own modules.
    torch.fx tracing is refused (_NOT_TRACEABLE). A _Fused module: fastres.nn.set_backend reaches it.
    """

    negative_slope: float = DEFAULT_NEGATIVE_SLOPE  # (class default: modules pickled before LeakyReLU fused)
    HOLDS_MODULES = ("_modules_ref", "_projection_ref")  # tuples of the graph's modules (graph_module)

    def __init__(
        self, name: str, conv: nn.Conv2d, bn: nn.Module | None, padding: tuple[int, int] | str, act: str,
        backend: str, negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    ) -> None:
        super().__init__()
        # A tuple keeps conv/bn out of this module's children: no duplicate state_dict keys.
        self._modules_ref = (conv, bn)
        self.conv_name, self.padding, self.act, self.backend = name, padding, act, backend
        self.negative_slope = negative_slope
        self.projection_name: str | None = None
        self._projection_ref: tuple[nn.Conv2d, nn.Module] | None = None
        self._warned = False

    def fused_modules(self) -> list[nn.Module]:
        """The modules whose work this op does (conv, BN, and the projection's)."""
        return [m for m in (*self._modules_ref, *(self._projection_ref or ())) if m is not None]

    def project_residual(self, name: str, conv: nn.Conv2d, bn: nn.Module) -> None:
        """Take the residual through `conv` (1x1) and `bn` inside this module's op."""
        self.projection_name, self._projection_ref = name, (conv, bn)

    def _fallback(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"fastres: {self.conv_name} ran eagerly for a call the fused op does not take: {why}",
                          RuntimeWarning, stacklevel=3)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        conv, bn = self._modules_ref
        projection = self._projection_ref
        if isinstance(x, fx.Proxy):
            raise fx.proxy.TraceError(_NOT_TRACEABLE)
        if any(m.training for m in self.fused_modules()) or exporting_to_onnx():
            return eager_conv_bn(conv, bn, x, residual, self.act, projection, negative_slope=self.negative_slope)
        residual, why = self._within_contract(x, residual)
        if why is not None:
            self._fallback(why)
            return eager_conv_bn(conv, bn, x, residual, self.act, projection, negative_slope=self.negative_slope)
        padded, padding = self.op_input(x)
        out = fused_conv_bn(conv, bn, padded, residual, self.act, self.backend, projection, self.negative_slope,
                            padding)
        # The op's output is channels_last; eager conv's is only when its input or weight is, and
        # the code after the chain may depend on that (a .view, an export to NCHW consumers).
        return out if _channels_last(x) or _channels_last(conv.weight) else out.contiguous()

    def op_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """x as the op takes it, and the op's (h, w) padding. The op pads symmetrically: an odd
        SAME total's extra row / column, which TensorFlow puts below and right, is padded onto x
        here (a pass over x, which eager's Conv2dSame makes too)."""
        padding, extra = self._op_padding(x)
        return (F.pad(x, (0, extra[1], 0, extra[0])) if any(extra) else x), padding

    def _op_padding(self, x: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
        """The op's (h, w) padding for input x, and the rows and columns to add below and right of x
        first. padding="same" is TensorFlow's SAME, from x's size (_same_padding)."""
        if self.padding != "same":
            return self.padding, (0, 0)
        conv = self._modules_ref[0]
        totals = [_same_padding(size, k, s, d)
                  for size, k, s, d in zip(x.shape[2:], conv.kernel_size, conv.stride, conv.dilation)]
        if torch.jit.is_tracing():  # its sizes are tensors: the trace keeps this size's padding, as eager's does
            totals = [int(t) for t in totals]
        return (totals[0] // 2, totals[1] // 2), (totals[0] % 2, totals[1] % 2)

    def _within_contract(
        self, x: torch.Tensor, residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, str | None]:
        """The residual to hand the op, and why this call is outside its contract (None: inside).
        A residual that broadcasts to the output (a position embedding (1, C, H, W), a bias map)
        goes in expanded: stride 0 where it repeats, the values eager's broadcasting add reads."""
        conv = self._modules_ref[0]
        dtype = autocast_dtype(x)  # under torch.autocast, both the op's and eager's conv compute in autocast's
        if x.dim() != 4 or (conv.weight.dtype != x.dtype and autocast_dtype(conv.weight) != dtype):
            return residual, f"input {x.dtype} of rank {x.dim()} with {conv.weight.dtype} weights"
        if residual is None:
            return None, None
        padding, extra = self._op_padding(x)
        p, q = output_hw(x.shape[2] + extra[0], x.shape[3] + extra[1], *conv.kernel_size, conv.stride, padding,
                         conv.dilation)
        expected = (x.shape[0], conv.out_channels, p, q)
        got, got_dtype, broadcast = tuple(residual.shape), residual.dtype, False
        if self._projection_ref is not None:
            pconv = self._projection_ref[0]
            if residual.dim() != 4 or residual.shape[1] != pconv.in_channels:
                why = f"residual {got} is not the {pconv.in_channels}-channel input of {self.projection_name}"
                return residual, why
            got = (got[0], pconv.out_channels, *output_hw(got[2], got[3], 1, 1, pconv.stride, (0, 0), (1, 1)))
            got_dtype = dtype if residual.dtype == x.dtype else autocast_dtype(residual)
        elif got != expected and _broadcasts_to(got, expected):
            got, broadcast = expected, True
        # A residual of another dtype than the conv's output: eager's add would promote.
        if got != expected or got_dtype != dtype or residual.device != x.device:
            return residual, f"residual {tuple(residual.shape)} {residual.dtype} vs output {expected} {dtype}"
        return residual.expand(expected) if broadcast else residual, None

    def extra_repr(self) -> str:
        projected = "" if self.projection_name is None else f", residual projected by {self.projection_name}"
        same = ", padding='same' (from each input's size)" if self.padding == "same" else ""
        return (f"{self.conv_name}, act={act_text(self.act, self.negative_slope)!r}, backend={self.backend!r}"
                f"{same}{projected}")


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether `shape` broadcasts to `target` (and not `target` to something larger)."""
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _channels_last(t: torch.Tensor) -> bool:
    """Whether torch's conv would call t channels_last (strided so, and not also contiguous)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    """TensorFlow's SAME padding in total along one dimension of `size` (timm's get_same_padding):
    the output is ceil(size / stride) long. An odd total's extra row or column goes last."""
    return max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def _fused_padding(conv: nn.Conv2d) -> tuple[int, int] | str:
    """The padding a FusedConvBN gives the op for conv: (h, w), or "same", computed per call from the
    input's size. That is TensorFlow's SAME, which timm's Conv2dSame applies, and PyTorch's "same"
    too (stride 1, so a total of dilation * (kernel - 1), the odd one out also last)."""
    if _pads_tf_same(conv):
        return "same"
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        return (totals[0] // 2, totals[1] // 2) if all(t % 2 == 0 for t in totals) else "same"
    return tuple(conv.padding)  # type: ignore[return-value]


def _pads_tf_same(conv: nn.Module) -> bool:
    """Whether conv runs timm's Conv2dSame forward: F.pad to TensorFlow's SAME from the input's size
    (its padding attribute is 0), then the conv."""
    same = sys.modules.get("timm.layers.conv2d_same")
    return same is not None and type(conv).forward is same.Conv2dSame.forward


def _own_forward(conv: nn.Module) -> bool:
    """Whether conv computes otherwise than nn.Conv2d (the fused op reads its weight as nn.Conv2d does)."""
    return type(conv).forward is not nn.Conv2d.forward or type(conv)._conv_forward is not nn.Conv2d._conv_forward


def _conv_problem(conv: nn.Module) -> str | None:
    """Why this conv cannot be fused, or None."""
    if _own_forward(conv) and not _pads_tf_same(conv):
        return f"{type(conv).__name__} has its own forward (not a plain nn.Conv2d)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only zero padding is fused)"
    if (hooks := call_hooks(conv)) is not None:
        return f"it has {hooks} (the fused op would skip it){_weight_hook_remedy(conv)}"
    return None


def _weight_hook_remedy(conv: nn.Module) -> str:
    """For a pre-hook of torch's that recomputes a weight every call (torch.nn.utils.prune, the old
    weight_norm and spectral_norm), the call that makes it permanent, after which the conv fuses."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in conv._forward_pre_hooks.values():
        if isinstance(hook, BasePruningMethod):
            return f"; torch.nn.utils.prune.remove(module, {hook._tensor_name!r}) makes the pruning permanent"
        if isinstance(hook, (WeightNorm, SpectralNorm)):
            remove = "remove_weight_norm" if isinstance(hook, WeightNorm) else "remove_spectral_norm"
            return f"; torch.nn.utils.{remove}(module, {hook.name!r}) folds the norm into the weight"
    return ""


def _bn_problem(bn: nn.Module, conv: nn.Conv2d) -> str | None:
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return "its BatchNorm keeps no running statistics (track_running_stats=False)"
    if bn.running_mean.numel() != conv.out_channels:
        return f"its BatchNorm has {bn.running_mean.numel()} features for {conv.out_channels} channels"
    if bn.training:
        return "its BatchNorm is in training mode"
    return None


class _Tracer(Tracer):
    """fastres.tracing's tracer, whose whole modules are also BatchNorms of any origin (with or
    without their own activation), fastres's own fused modules and convs that compute as
    nn.Conv2d; and _channels is a call (fused graphs hold it, and fx traces them again from their
    code when they are loaded)."""

    def __init__(self, notrace: frozenset[type] = frozenset(), autowrap_functions: tuple[Callable, ...] = ()) -> None:
        super().__init__(notrace, (_channels, *autowrap_functions))

    def is_whole(self, m: nn.Module, qualname: str) -> bool:
        """A Conv2d subclass with nn.Conv2d's forward (Hugging Face EfficientNet's depthwise conv) is
        a conv as it is."""
        return (is_batchnorm(m) or is_norm_act(m) or _is_fastres(m)
                or (isinstance(m, nn.Conv2d) and not _own_forward(m)) or super().is_whole(m, qualname))


class _NormOf(nn.Module):
    """The BatchNorm part of a BatchNorm + activation module, as its own graph node. The module
    is held in a tuple: no second state_dict entry, and train()/eval() reach it where it lives."""

    HOLDS_MODULES = ("_ref",)

    def __init__(self, norm_act: nn.Module) -> None:
        super().__init__()
        self._ref = (norm_act,)

    @property
    def module(self) -> nn.Module:
        return self._ref[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(self.module, x)


def _split_norm_acts(gm: fx.GraphModule) -> None:
    """Rewrite each BatchNorm + activation node as norm (a _NormOf view) -> drop -> act nodes."""
    for node in list(gm.graph.nodes):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if module is None or not is_norm_act(module) or call_hooks(module) is not None:
            continue
        view = f"{node.target.replace('.', '_')}_norm_fastres"
        gm.add_submodule(view, _NormOf(module))
        with gm.graph.inserting_before(node):
            last = gm.graph.call_module(view, node.args, node.kwargs)
            for child in ("drop", "act"):
                if hasattr(module, child):
                    last = gm.graph.call_module(f"{node.target}.{child}", (last,))
        node.replace_all_uses_with(last)
        gm.graph.erase_node(node)


class _NormSlice(nn.Module):
    """Channels [start, stop) of a BatchNorm whose input is a channel concatenation of convs, as its
    own graph node after one of them (_split_concatenated_norms): BN is per channel, so each conv
    then fuses with its slice. It reads the BatchNorm's tensors as views and runs in the
    BatchNorm's mode (in train mode, each slice updates its channels' running statistics; the first
    counts the batch). The BatchNorm is held in a tuple: no second state_dict entry."""

    HOLDS_MODULES = ("_ref",)

    def __init__(self, bn: nn.Module, start: int, stop: int) -> None:
        super().__init__()
        self._ref = (bn,)
        self.start, self.stop = start, stop

    @property
    def training(self) -> bool:  # the BatchNorm's, which train() / eval() reach where it lives
        return "_ref" in vars(self) and self._ref[0].training

    @training.setter
    def training(self, mode: bool) -> None:
        pass

    @property
    def eps(self) -> float:
        return self._ref[0].eps

    @property
    def running_mean(self) -> torch.Tensor:
        return self._part("running_mean")

    @property
    def running_var(self) -> torch.Tensor:
        return self._part("running_var")

    @property
    def weight(self) -> torch.Tensor | None:
        return self._part("weight")

    @property
    def bias(self) -> torch.Tensor | None:
        return self._part("bias")

    def _part(self, name: str) -> torch.Tensor | None:
        tensor = getattr(self._ref[0], name, None)
        return None if tensor is None else tensor[self.start:self.stop]

    def extra_repr(self) -> str:
        return f"channels {self.start}:{self.stop} of its {type(self._ref[0]).__name__}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self._ref[0]
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.training:  # a frozen BN, or eval
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.track_running_stats and bn.num_batches_tracked is not None:
            if self.start == 0:
                bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, factor, self.eps)


_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}


def _concatenated_convs(gm: fx.GraphModule, cat: fx.Node) -> list[fx.Node] | None:
    """The conv nodes `cat` concatenates along channels, if it concatenates only fusable convs that
    nothing else reads (MixNet's MixedConv2d), else None."""
    if cat.op != "call_function" or cat.target not in _CAT_FUNCTIONS:
        return None
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if dim not in (1, -3) or not isinstance(tensors, (list, tuple)) or len(set(tensors)) != len(tensors):
        return None
    for node in tensors:
        if not (isinstance(node, fx.Node) and node.op == "call_module" and _single_user(node) is cat):
            return None
        conv = gm.get_submodule(node.target)
        if not isinstance(conv, nn.Conv2d) or _conv_problem(conv) is not None:
            return None
    return list(tensors)


def _split_concatenated_norms(gm: fx.GraphModule) -> None:
    """Rewrite act(bn(cat([conv_i(x_i)], 1)) [+ r]) as cat([act(bn_i(conv_i(x_i)) [+ r_i])], 1),
    bn_i and r_i being BN's and r's channels of conv_i (a _NormSlice, _channels), when cat's convs
    are fusable and read by nothing else, and BN (eval, with running statistics, not SyncBatchNorm),
    the add and the activation are each the one user of what they take: MixNet's MixedConv2d, its
    BatchNormAct2d, and the block's skip connection."""
    for cat in list(gm.graph.nodes):
        convs = _concatenated_convs(gm, cat)
        norm_node = _single_user(cat) if convs else None
        bn = None if norm_node is None else _batchnorm_at(gm, norm_node)
        if (bn is None or norm_node.args[:1] != (cat,) or _hooks_at(gm, norm_node) is not None
                or isinstance(bn, (nn.SyncBatchNorm, _NormSlice)) or bn.training
                or getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None
                or bn.running_mean.numel() != sum(gm.get_submodule(c.target).out_channels for c in convs)):
            continue
        add_node = act_node = residual = None
        nxt = _single_user(norm_node)
        if nxt is not None and (residual := _residual_of(nxt, norm_node)) is not None:
            add_node, nxt = nxt, _single_user(nxt)
        value = add_node or norm_node
        if nxt is not None and _activation(nxt, gm, value) is not None and _hooks_at(gm, nxt) is None:
            act_node = nxt
        tail = act_node or value
        parts, start = [], 0
        with gm.graph.inserting_before(tail):  # where the residual, if any, is defined
            for conv_node in convs:
                stop = start + gm.get_submodule(conv_node.target).out_channels
                name = _free_name(gm, f"{norm_node.target.replace('.', '_')}_{start}_{stop}_fastres")
                gm.add_submodule(name, _NormSlice(bn, start, stop))
                last = gm.graph.call_module(name, (conv_node,))
                if add_node is not None:
                    last = gm.graph.call_function(operator.add, (last, gm.graph.call_function(
                        _channels, (residual, start, stop))))
                if act_node is not None:
                    last = gm.graph.create_node(act_node.op, act_node.target, (last, *act_node.args[1:]),
                                                dict(act_node.kwargs))
                parts.append(last)
                start = stop
            joined = gm.graph.call_function(torch.cat, (parts, 1))
        tail.replace_all_uses_with(joined)
        for node in (act_node, add_node, norm_node, cat):
            if node is not None:
                gm.graph.erase_node(node)


def _channels(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Channels [start, stop) of a residual added to a 4-D output, as a view; a residual that
    broadcasts over the channels (fewer than 3 dimensions, or one channel) as it is."""
    return t[..., start:stop, :, :] if t.dim() >= 3 and t.shape[-3] != 1 else t


def _batchnorm_at(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The BatchNorm module a graph node runs (a view's module for a split norm + act, a slice's
    view itself), or None."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    if isinstance(module, _NormOf):
        return module.module
    return module if isinstance(module, _NormSlice) or is_batchnorm(module) else None


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _activation(node: fx.Node, gm: nn.Module, value: fx.Node) -> tuple[str, float] | None:
    """The activation `node` applies to `value`, if it is one the op has, and its negative_slope
    (LeakyReLU's; the default for the others). gm: the module whose graph holds `node`."""
    if node.args[:1] != (value,):
        return None
    if node.op == "call_module":
        return _module_activation(gm.get_submodule(node.target))
    if node.op == "call_function" and node.target in _LEAKY_RELU_FUNCTIONS:
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", DEFAULT_NEGATIVE_SLOPE)
        # a slope computed in forward is a graph node, not a number the op can take
        return ("leaky_relu", float(slope)) if isinstance(slope, (int, float)) and not isinstance(slope, bool) else None
    if node.op == "call_function" and node.target is F.gelu:
        act = _GELU_ACTS.get(node.kwargs.get("approximate", "none"))
        return None if act is None else (act, DEFAULT_NEGATIVE_SLOPE)
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        return _ACT_FUNCTIONS[node.target], DEFAULT_NEGATIVE_SLOPE
    if node.op == "call_method" and node.target in _ACT_METHODS:
        return _ACT_METHODS[node.target], DEFAULT_NEGATIVE_SLOPE
    return None


def _module_activation(module: nn.Module) -> tuple[str, float] | None:
    """The op's activation a module computes: torch.nn's activation modules, and a module without
    children (whose hooks the op would skip) whose forward is one call of an activation the op has
    (timm's GELUTanh, GELU, Sigmoid: the `act` of its BatchNormAct2d; a user's own)."""
    for cls, act in _ACT_MODULES:
        if isinstance(module, cls):
            if not _is_op_form(module):
                return None
            act = _GELU_ACTS[module.approximate] if isinstance(module, nn.GELU) else act
            return act, float(getattr(module, "negative_slope", DEFAULT_NEGATIVE_SLOPE))
    if next(module.children(), None) is not None:
        return None
    try:
        with attributes_kept(module):
            nodes = list(fx.Tracer().trace(module).nodes)
    except Exception:  # noqa: BLE001 - fx cannot trace it: not one the op can take
        return None
    if len(nodes) != 3 or nodes[0].op != "placeholder" or nodes[2].args != (nodes[1],):
        return None
    return _activation(nodes[1], module, nodes[0])


def _is_op_form(module: nn.Module) -> bool:
    """Whether an activation module computes one of the op's functions: ReLU6 with other bounds
    (a Hardtanh) does not."""
    if isinstance(module, nn.ReLU6):
        return (module.min_val, module.max_val) == (0.0, 6.0)
    return not isinstance(module, nn.GELU) or module.approximate in _GELU_ACTS


def _unfused_activation(node: fx.Node, gm: fx.GraphModule, value: fx.Node) -> str | None:
    """The name of the activation `node` applies to `value` when the op has no epilogue for it
    (Tanh, ELU, a LeakyReLU slope computed in forward, ...), or None."""
    if node.args[:1] != (value,):
        return None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        # torch.nn.modules.activation, timm.layers.activations(_me), ... (not MultiheadAttention)
        is_activation = "activation" in type(module).__module__ and not list(module.children())
        return type(module).__name__ if is_activation else None
    if node.op not in ("call_function", "call_method"):
        return None
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if target not in _OTHER_ACT_NAMES:
        return None
    return f"{target} with a slope computed in forward" if node.target in _LEAKY_RELU_FUNCTIONS else target


def _eager_after(node: fx.Node, gm: fx.GraphModule, value: fx.Node, prefix: str) -> str | None:
    """Why the activation `node` applies to `value` right after a fused chain runs eagerly (it is
    not one of the op's, or its module has hooks), or None when `node` is no activation."""
    hooks = _hooks_at(gm, node)
    if hooks is not None and _activation(node, gm, value) is not None:
        return f"{prefix}{node.target}, which has {hooks}"
    unfused = _unfused_activation(node, gm, value)
    return None if unfused is None else f"{unfused}, not one of the op's activations"


def _hooks_at(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The call hooks of the module a graph node runs (fastres.hooks.call_hooks), or None."""
    return call_hooks(gm.get_submodule(node.target)) if node.op == "call_module" else None


def _describe(node: fx.Node, gm: fx.GraphModule, value: fx.Node) -> str:
    if node.op == "output":
        return "the module's output"
    target = getattr(node.target, "__name__", node.target)  # a function by name, not by its repr's address
    return _unfused_activation(node, gm, value) or f"{node.op} {target}"


def _residual_of(node: fx.Node, value: fx.Node) -> fx.Node | None:
    """If `node` is value + other (alpha 1, no broadcasting scalar), the other operand. Not for an
    in-place add into `other` (`other += value`): code after it, or the caller, may read the
    tensor it wrote, which the fused op would leave as it was."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS)
    if not is_add or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1 or set(node.kwargs) - {"alpha"}:
        return None
    a, b = node.args
    if node.target in (operator.iadd, "add_") and a is not value:
        return None
    other = b if a is value else a if b is value else None
    return other if isinstance(other, fx.Node) and other is not value else None


def _views_to_reshapes(gm: fx.GraphModule) -> None:
    """x.view(shape) -> x.reshape(shape), x.view_as(y) -> x.reshape_as(y): the same view wherever
    a view is possible, and a copy instead of an error where the channels_last layouts that
    optimize chose make it impossible (e.g. x.view(n, -1) after a conv). x.view(dtype) stays."""
    for node in gm.graph.nodes:
        if node.op != "call_method" or node.target not in ("view", "view_as"):
            continue
        if not any(isinstance(a, torch.dtype) for a in (*node.args[1:], *node.kwargs.values())):
            node.target = "reshape" if node.target == "view" else "reshape_as"


def _drop_identities(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        is_identity = node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Identity
        if is_identity and len(node.args) == 1 and _hooks_at(gm, node) is None:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _fuse_graph(gm: fx.GraphModule, prefix: str, backend: str, report: OptimizeReport) -> int:
    _split_norm_acts(gm)
    _drop_identities(gm)
    _split_concatenated_norms(gm)
    _views_to_reshapes(gm)
    fused = 0
    calls: dict[str, list[str]] = {}  # per conv, what became of each of its calls (a shared conv has several)
    for conv_node in list(gm.graph.nodes):
        if conv_node.op != "call_module" or not isinstance(gm.get_submodule(conv_node.target), nn.Conv2d):
            continue
        conv = gm.get_submodule(conv_node.target)
        name = prefix + conv_node.target
        why = _conv_problem(conv)
        first = _single_user(conv_node)
        if why is None and first is None:
            why = f"its output has {len(conv_node.users)} users (must feed only a BatchNorm, residual add or activation)"
        if why is None and (hooks := _hooks_at(gm, first)) is not None:
            why = f"its output goes to {prefix}{first.target}, which has {hooks} (the fused op would skip it)"
        bn = _batchnorm_at(gm, first) if why is None else None
        if why is None and bn is not None:
            why = _bn_problem(bn, conv)
        if why is not None:
            calls.setdefault(name, []).append(f"eager: {why}")
            continue
        chain = [conv_node] if bn is None else [conv_node, first]
        last, residual, (act, slope) = chain[-1], None, ("none", DEFAULT_NEGATIVE_SLOPE)
        nxt = _single_user(last)
        if nxt is not None and (other := _residual_of(nxt, last)) is not None:
            chain.append(nxt)
            last, residual = nxt, other
            nxt = _single_user(last)
        if nxt is not None and (found := _activation(nxt, gm, last)) is not None and _hooks_at(gm, nxt) is None:
            chain.append(nxt)
            last, (act, slope) = nxt, found
        projected = len(chain) == 1 and _projects_residual_of(gm, first, conv_node)
        if len(chain) == 1 and not projected:  # a conv alone: its bias is all there is to fuse
            calls.setdefault(name, []).append("eager: not followed by a BatchNorm, residual add or one of the op's "
                                              f"activations (next: {_describe(first, gm, conv_node)})")
            continue
        # an activation right after the chain that runs eagerly (named in the report)
        after = None if nxt is None or act != "none" else _eager_after(nxt, gm, last, prefix)
        # One module per call: a conv called twice (shared weights) may end two different chains.
        fused_name = _free_name(gm, f"{conv_node.target.replace('.', '_')}_fastres")
        gm.add_submodule(fused_name, FusedConvBN(name, conv, bn, _fused_padding(conv), act, backend, slope))
        with gm.graph.inserting_before(last):
            args = (conv_node.args[0],) if residual is None else (conv_node.args[0], residual)
            new = gm.graph.call_module(fused_name, args)
        last.replace_all_uses_with(new)
        for node in reversed(chain):
            gm.graph.erase_node(node)
        parts = "conv" + ("" if bn is None else "+bn") + ("+add" if residual is not None else "") + (
            "" if act == "none" else f"+{act_text(act, slope)}")
        calls.setdefault(name, []).append(f"fused: {parts}" + ("" if after is None else f" (then {after}, runs eagerly)"))
        fused += 1
    for name, whats in calls.items():
        report.entries[name] = _calls_in_words(whats)
    _fuse_projections(gm, report)
    used = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    for name, child in list(gm.named_children()):
        if isinstance(child, _NormOf) and name not in used:  # its node became part of a fused op
            gm.delete_submodule(name)
    gm.graph.lint()
    gm.recompile()
    return fused


def _free_name(gm: fx.GraphModule, base: str) -> str:
    """base, or base_1, base_2, ...: the first name gm has no attribute of."""
    name, n = base, 0
    while hasattr(gm, name):
        n += 1
        name = f"{base}_{n}"
    return name


def _calls_in_words(whats: list[str]) -> str:
    """A conv's report entry from what became of each of its calls (one, or several for a shared conv)."""
    if len(whats) == 1:
        return whats[0]
    if len(set(whats)) == 1:
        return f"{whats[0]} (each of its {len(whats)} calls)"
    fused = sum(w.startswith("fused") for w in whats)
    verdict = "fused" if fused == len(whats) else "eager" if fused == 0 else "partly fused"
    return f"{verdict}: its {len(whats)} calls: " + " | ".join(whats)


def _projects_residual_of(gm: fx.GraphModule, user: fx.Node, conv_node: fx.Node) -> bool:
    """Whether conv_node, a conv without a BN (its BN folded into its bias), is only the residual
    of the fused chain `user` and can be that op's projection (_fuse_projections makes it so)."""
    fused = _fused_module(gm, user)
    return (fused is not None and fused.projection_name is None and len(user.args) == 2
            and user.args[1] is conv_node and user.args[0] is not conv_node
            and _fused_padding(gm.get_submodule(conv_node.target)) == (0, 0)
            and is_projection_conv(gm.get_submodule(conv_node.target)))


def _fused_module(gm: fx.GraphModule, node: object) -> FusedConvBN | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, FusedConvBN):
            return module
    return None


def _fuse_projections(gm: fx.GraphModule, report: OptimizeReport) -> None:
    """Fold each fused 1x1 conv + BN whose output is only another fused chain's residual (a ResNet
    downsample branch) into that chain's op as its residual projection. When the 1x1 branch is
    the chain that took the add (it came first in the graph), the roles swap: the other branch,
    a plain conv + BN, becomes the op's main conv and the 1x1 branch its projection. A residual
    that is also the chain's input (`y + bn(conv(y))`) is one user by fx's count, and no branch."""
    for node in list(gm.graph.nodes):
        outer = _fused_module(gm, node)
        inner_node = node.args[1] if outer is not None and len(node.args) == 2 else None
        inner = _fused_module(gm, inner_node)
        if (inner is None or outer.projection_name is not None or len(inner_node.args) != 1
                or len(inner_node.users) != 1 or node.args[0] is inner_node
                or inner.act != "none" or inner.projection_name is not None):
            continue
        if _projectable(inner):
            main, main_input, branch, branch_input = outer, node.args[0], inner, inner_node.args[0]
        elif _projectable(outer):
            main, main_input, branch, branch_input = inner, inner_node.args[0], outer, node.args[0]
            main.act, main.negative_slope = outer.act, outer.negative_slope
        else:
            continue
        main.project_residual(branch.conv_name, *branch._modules_ref)
        main_target = node.target if main is outer else inner_node.target
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_module(main_target, (main_input, branch_input))
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        gm.graph.erase_node(inner_node)
        gm.delete_submodule(inner_node.target if main is outer else node.target)
        parts = "conv" + ("" if main._modules_ref[1] is None else "+bn") + "+add" + (
            "" if main.act == "none" else f"+{act_text(main.act, main.negative_slope)}")
        report.entries[main.conv_name] = f"fused: {parts}"
        branch_parts = "conv" + ("" if branch._modules_ref[1] is None else "+bn")
        report.entries[branch.conv_name] = f"fused: {branch_parts}, the projected residual of {main.conv_name} (one op)"


def _projectable(module: FusedConvBN) -> bool:
    """A 1x1 conv, with a BN or with its BN folded into its bias (torch.fx's fuse, quantization's
    fuse_modules): the op takes it as its residual's projection."""
    return module.padding == (0, 0) and is_projection_conv(module._modules_ref[0])


def _is_fastres(module: nn.Module) -> bool:
    """fastres's own modules (the zoo's, FusedConvBN) and models fastres.optimize made: kept whole."""
    return isinstance(module, _Fused) or is_rewritten(module)


def _report_as_before(module: nn.Module, prefix: str, report: OptimizeReport) -> None:
    """Report the convs of one of fastres's own modules as an earlier optimize did, or as fused."""
    earlier = getattr(module, "fastres_report", None)
    fused = {id(m) for sub in module.modules() if isinstance(sub, FusedConvBN) for m in sub.fused_modules()}
    for name, conv in module.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        if isinstance(earlier, OptimizeReport) and name in earlier.entries:
            report.entries[prefix + name] = earlier.entries[name]
        elif isinstance(module, _Fused) or id(conv) in fused:
            report.entries[prefix + name] = "fused: already a fastres module"
        else:
            report.entries[prefix + name] = "eager: left unfused by an earlier fastres.optimize"


def _rewrite(module: nn.Module, prefix: str, backend: str, report: OptimizeReport, given: int = 1) -> nn.Module:
    """The module with its chains fused: a GraphModule if it traces, else itself with rewritten
    children. `given`: how many positional arguments its calls pass (the model's example_inputs)."""
    if _is_fastres(module):
        _report_as_before(module, prefix, report)
        return module
    if not any(isinstance(m, nn.Conv2d) for m in module.modules()):
        # Nothing to fuse inside (a transformer block, a head): left as it is, not traced. Traced,
        # a block its untraceable parent calls with a non-default argument (a rope table) would
        # run its own forward at every call, with a warning.
        return module
    if type(module).forward is nn.Module.forward:  # no forward (ModuleList, ModuleDict): fuse in each child
        return _rewrite_children(module, prefix, backend, report)
    if _Tracer().is_whole(module, prefix.rstrip(".")):  # a conv, a BN, an activation: nothing inside to fuse
        return module
    try:
        tracer, graph, traced_with = trace(module, given, _Tracer)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: try the children
        why = str(exc) if isinstance(exc, UnfaithfulTrace) else type(exc).__name__
        for child_name, child in module.named_children():
            if isinstance(child, nn.Conv2d):
                report.entries[f"{prefix}{child_name}"] = (
                    f"eager: {prefix.rstrip('.') or 'the model'}, which calls it, is not traceable with torch.fx "
                    f"({why})")
        return _rewrite_children(module, prefix, backend, report)
    gm = graph_module(module, graph, type(module))
    _fuse_graph(gm, prefix, backend, report)
    # fastres's own modules were leaves of this trace: report them. Hooked modules and timm's
    # not-to-trace ones were too: fuse inside them on their own.
    for target in dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "call_module"):
        sub = gm.get_submodule(target)
        if _is_fastres(sub) and not isinstance(sub, FusedConvBN):  # (this graph's own are reported)
            _report_as_before(sub, f"{prefix}{target}.", report)
        elif (call_hooks(sub) is not None or type(sub) in tracer.notrace) and not tracer.is_whole(sub, target):
            parent, _, child = target.rpartition(".")
            setattr(gm.get_submodule(parent), child, _rewrite(sub, f"{prefix}{target}.", backend, report))
    move_hooks(module, gm)
    still_called = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    # The model's own class: its forward runs on gm's children. Torch's containers (no tensors of
    # their own): the original container runs.
    unfused = None if isinstance(gm, type(module)) else module
    EagerFallback.install(gm, type(module), unfused, [name for name in tracer.called if name not in still_called],
                          traced_with)
    return gm


def _rewrite_children(module: nn.Module, prefix: str, backend: str, report: OptimizeReport) -> nn.Module:
    """module itself, each of its children replaced by its _rewrite."""
    for child_name, child in list(module.named_children()):
        setattr(module, child_name, _rewrite(child, f"{prefix}{child_name}.", backend, report))
    return module


def model_copy(model: nn.Module, memo: dict[int, object] | None = None) -> nn.Module:
    """copy.deepcopy(model, memo), where each tensor a module holds as a plain attribute that
    autograd computed is copied detached: torch.nn.utils.prune's `weight` (weight_orig * mask, which
    its pre-hook recomputes every call) and the old weight_norm's, which deepcopy refuses."""
    computed = {id(value): value.detach().clone() for module in model.modules() for value in vars(module).values()
                if isinstance(value, torch.Tensor) and not value.is_leaf}
    return copy.deepcopy(model, {**(memo or {}), **computed})


def _copy(model: nn.Module) -> nn.Module:
    """optimize's deepcopy of `model`, sharing the user's hook callables (fastres.hooks.hook_memo),
    with every module in the mode it had in `model`."""
    try:
        copied = model_copy(model, hook_memo(model))
    except (RuntimeError, TypeError) as exc:  # a tensor autograd computed, elsewhere; a lock, a file
        why = f"fastres.optimize works on a copy of the model, and copy.deepcopy(model) failed: {exc}"
        raise (TypeError if isinstance(exc, TypeError) else RuntimeError)(why) from exc
    # Some modules come back from deepcopy in train mode: torchvision's feature extractor
    # (DualGraphModule) re-runs its __init__, which calls train(). Its train() also swaps its graph.
    if copied.training != model.training:
        copied.train(model.training)
    modes = {name: module.training for name, module in model.named_modules()}
    for name, module in copied.named_modules():
        module.training = modes.get(name, module.training)
    return copied


_EXPORT_HINT = ("optimize the eager model, then export or trace that: torch.export.export(fastres.optimize(model), "
                "args) keeps the fused op")
_ATEN_CONVS = (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)


def _check_optimizable(model: nn.Module) -> None:
    """What optimize refuses, in words: anything but an eager module in eval mode with its parameters."""
    if isinstance(model, torch.export.ExportedProgram) or (
            isinstance(model, fx.GraphModule) and any(n.target in _ATEN_CONVS for n in model.graph.nodes)):
        raise TypeError("fastres.optimize takes an eager nn.Module, not a torch.export program or its .module() "
                        "(aten ops, not the conv and BatchNorm modules fastres fuses); " + _EXPORT_HINT)
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("fastres.optimize takes an eager nn.Module, not a TorchScript module (torch.fx cannot "
                        "trace one); " + _EXPORT_HINT)
    if model.training:
        raise RuntimeError(
            "fastres.optimize expects a model in eval mode (BatchNorm must use its running statistics); "
            "call model.eval() first. Training runs the unfused model."
        )
    for name, module in model.named_modules():
        if any(nn.parameter.is_lazy(t) for t in (*module.parameters(False), *module.buffers(False))):
            where = f"module {name!r} ({type(module).__name__})" if name else f"the model ({type(model).__name__})"
            raise ValueError(
                f"fastres.optimize: {where} has uninitialized parameters; run the model once on an example "
                "batch to initialize its lazy modules, then optimize it")


def optimize(
    model: nn.Module,
    backend: str = "auto",
    dtype: torch.dtype | None = None,
    channels_last: bool = True,
    example_inputs: tuple | torch.Tensor | None = None,
) -> nn.Module:
    """A copy of `model` whose conv -> BN -> (+ residual) -> act chains run as fused fastres ops
    (and conv -> (+ residual) -> act chains without a BN, the conv's bias as the op's shift).

    model: an eval-mode nn.Module (torchvision / timm ResNets, your own conv net); it is not changed.
    backend: the fused op's backend; dtype: cast the copy (e.g. torch.float16); channels_last:
    store 4-D weights channels_last (the kernels' fast layout). example_inputs: if given, the
    optimized copy is run on them once (its Triton kernels compiled first, all in one parallel
    pool: fastres.precompile), and should that fail, its output's containers and keys differ
    from the model's, or its answers fail fastres.verify's rule (checked against a float64 copy
    when they differ from the unfused copy's by more than the dtype's tolerance; for a model that
    draws random numbers, a failure then), the unfused copy is returned; inputs the model itself
    fails on raise its error. Arguments of
    forward with constant defaults (`mask=None`, `flag=False`) are traced as those defaults, and
    calls that pass other values run the model's own forward, unless example_inputs passes them.
    The result carries `fastres_report` (an OptimizeReport: every conv, fused into what or why not).
    """
    check_name(backend)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"fastres.optimize: dtype must be a floating-point torch.dtype (torch.float16, "
                        f"torch.bfloat16, ...) or None, but got {dtype!r}")
    _check_optimizable(model)
    # Made under torch.inference_mode, the copy's tensors would be inference tensors, which have no
    # version counter to key the BN fold cache on: every call would fold every BN afresh.
    with torch.inference_mode(False):
        model = _copy(model)
        if dtype is not None:
            model = model.to(dtype)
        if channels_last:
            # Module.to(memory_format=channels_last) fails on a Conv3d's 5-D weight; only 2-D convs fuse.
            model = model._apply(lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
        baseline = _copy(model) if example_inputs is not None else None
    report = OptimizeReport(backend)
    given = len(example_inputs) if isinstance(example_inputs, tuple) else 1
    optimized = _rewrite(model, "", backend, report, given)
    for name, module in optimized.named_modules():
        if isinstance(module, nn.Conv2d) and name not in report.entries:
            # A subclass with its own forward (timm's weight-standardized StdConv2d) is traced through.
            why = (_conv_problem(module) if _own_forward(module) else None) or "not called by any traced forward"
            report.entries[name] = f"eager: {why}"
        elif isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.Conv2d):
            report.entries[name] = f"eager: {type(module).__name__} (only nn.Conv2d is fused)"
    report.entries = dict(sorted(report.entries.items(), key=lambda kv: _module_order(optimized, kv[0])))
    if example_inputs is not None:
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        expected = _unfused_output(baseline, inputs)
        try:
            precompile(optimized, *inputs)
            refused = _refused_on(optimized, baseline, inputs, expected)
        except Exception as exc:  # noqa: BLE001 - never hand back a model that breaks
            refused = (f"{type(exc).__name__}: {exc}", type(exc).__name__)
        if refused is not None:
            warnings.warn(f"fastres.optimize: the optimized model failed on example_inputs ({refused[0]}); "
                          "returning the unfused model", RuntimeWarning, stacklevel=2)
            report.entries = {n: f"eager: optimized model failed on example_inputs ({refused[1]})"
                              for n in report.entries}
            optimized = baseline
        elif not _holds_values(expected.output):
            warnings.warn("fastres.optimize: the model's output on example_inputs holds no floating-point values (an "
                          "integer label, an empty batch): the fused copy ran on them, but its answers were not "
                          "checked", RuntimeWarning, stacklevel=2)
    optimized.fastres_report = report
    return optimized


def _holds_values(output: Any) -> bool:
    """Whether a model's output has a floating-point tensor with values, which answers can be judged by."""
    from fastres.verification import output_leaves  # (it imports this module)

    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() for _, t in output_leaves(output))


def _unfused_output(baseline: nn.Module, inputs: tuple) -> Run:
    """The unfused copy's run on example_inputs (its hooks held: yours see one call, the optimized
    copy's). Inputs the model itself fails on are the caller's error, raised as it is."""
    from fastres.verification import run_from_here  # (it imports this module)

    try:
        with hooks_held(baseline):
            return run_from_here(baseline, inputs)
    except Exception as exc:
        exc.add_note("fastres.optimize: the model itself (an unfused copy, with optimize's dtype and layout) fails on "
                     "example_inputs")
        raise


def _refused_on(optimized: nn.Module, baseline: nn.Module, inputs: tuple, expected: Run) -> tuple[str, str] | None:
    """Why the optimized copy cannot be handed back, by its output on example_inputs next to the
    unfused copy's run (`expected`), in long and short words; or None. The output must have the
    model's containers and keys, and answers verify would pass."""
    from fastres.verification import disagreement, placed_otherwise, run_from_here  # (it imports this module)

    got = run_from_here(optimized, inputs).output
    if placed_otherwise(got, expected.output):
        return (f"it returned a {type(got).__name__} shaped otherwise than the model's "
                f"{type(expected.output).__name__}", "output shaped otherwise")
    why = disagreement(baseline, inputs, got, expected.output, expected.sampled)
    return None if why is None else (why, "answers off")


def _module_order(model: nn.Module, name: str) -> int:
    for index, (qualname, _) in enumerate(model.named_modules()):
        if qualname == name:
            return index
    return 1 << 30
