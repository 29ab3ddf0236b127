"""How fastres.optimize traces a model's module with torch.fx: faithfully, or not at all.

fx's habits that would change what a model computes are corrected or refused here:
- an argument with a constant default (`mask=None`, `flag=False`) is traced as that constant, not
  as a tensor that takes the other branch (`trace`; calls passing another value run the module's
  own forward, fastres.graph_module.EagerFallback);
- in-place operators stay in place (`a += b` is not `a = a + b`: _InPlaceProxy);
- a forward that switches grad mode, inference mode or autocast around traced code (`with
  torch.no_grad():`, a `@torch.autocast` forward), which fx does not record, is untraceable
  (UnfaithfulTrace), as is one whose output does not depend on its inputs (hooks collected it);
- a returned dataclass dict (Hugging Face's ModelOutput), OrderedDict or other dict subclass is
  rebuilt, not a dict (one it cannot rebuild is untraceable);
- what the forward caches into `self` while traced is put back (attributes_kept);
- fx's `_assert_is_none` guards are dropped (pytorch/pytorch#130701).
A module fx cannot trace is traced once more with timm's and Hugging Face's modules and functions
not to trace into as calls (notrace_lists). Which modules are leaves is the tracer's `is_whole`:
fastres.converter's tracer adds the convs, BatchNorms and fused modules it fuses.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import sys
from collections import OrderedDict
from dataclasses import is_dataclass
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.immutable_collections import immutable_dict

from fastres.hooks import call_hooks

__all__ = ["Tracer", "UnfaithfulTrace", "trace", "notrace_lists", "attributes_kept"]


class _InPlaceProxy(fx.Proxy):
    """fx's Proxy has no __iadd__, so Python traces `a += b` as `a = a + b`: the graph then no
    longer writes into a, which another name for that tensor, or the model's caller, may read.
    This one records operator.iadd and kin, which run in place, as eager's code did."""


def _in_place(op: Callable[[Any, Any], Any]) -> Callable[[fx.Proxy, Any], fx.Proxy]:
    def method(self: fx.Proxy, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return method


for _name in ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand", "ior", "ixor",
              "ilshift", "irshift"):
    setattr(_InPlaceProxy, f"__{_name}__", _in_place(getattr(operator, _name)))


class UnfaithfulTrace(RuntimeError):
    """The forward traced, but its graph would not compute what the forward computes."""


def _modes() -> dict[str, Any]:
    """The global modes a forward may switch with a `with` block, which fx does not record."""
    return {"grad mode": torch.is_grad_enabled(), "inference mode": torch.is_inference_mode_enabled(),
            **{f"{d} autocast": (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")}}


class Tracer(fx.Tracer):
    """Leaves: what `is_whole` says is one (torch.nn's own modules; the converter adds its own),
    any module with call hooks (they must run as in eager), and instances of `notrace` (with
    `autowrap_functions`: timm's lists and others, notrace_lists). `called` names every module the
    traced forward called, leaves or traced through. In-place operators stay in place
    (_InPlaceProxy). A node recorded while the forward has switched a global mode (_modes) ends the
    trace with UnfaithfulTrace."""

    def __init__(self, notrace: frozenset[type] = frozenset(), autowrap_functions: tuple[Callable, ...] = ()) -> None:
        super().__init__(autowrap_functions=autowrap_functions)
        self.notrace = notrace
        self.called: dict[str, None] = {}
        self._modes_at_start: dict[str, Any] = {}

    def trace(self, root: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._modes_at_start = _modes()
        return super().trace(root, concrete_args)

    def create_node(self, *args, **kwargs) -> fx.Node:
        switched = [name for name, mode in _modes().items() if mode != self._modes_at_start[name]]
        if switched:
            raise UnfaithfulTrace(f"its forward switches {' and '.join(switched)} inside, which torch.fx "
                                  "does not record")
        return super().create_node(*args, **kwargs)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceProxy(node, self)

    def create_arg(self, a: Any) -> Any:
        """fx records any dict as a plain dict: a forward returning a Hugging Face ModelOutput (a
        dataclass and an OrderedDict, indexed by position and read by attribute: `outputs[0]`,
        `.last_hidden_state`), an OrderedDict or another dict subclass would return a dict. These are
        rebuilt; one whose constructor may not take a dict (a defaultdict) makes the trace unfaithful."""
        if isinstance(a, dict) and type(a) not in (dict, immutable_dict):  # (fx's own, for its nodes' kwargs)
            if is_dataclass(a):  # a ModelOutput holds the fields that are not None
                return self.create_node("call_function", type(a), (), {k: self.create_arg(v) for k, v in a.items()})
            if type(a).__init__ in (dict.__init__, OrderedDict.__init__):
                return self.create_node("call_function", type(a), (super().create_arg(dict(a)),), {})
            raise UnfaithfulTrace(f"it returns a {type(a).__name__}, which torch.fx would record as a plain dict")
        return super().create_arg(a)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        self.called.setdefault(self.path_of_module(m))
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return call_hooks(m) is not None or type(m) in self.notrace or self.is_whole(m, qualname)

    def is_whole(self, m: nn.Module, qualname: str) -> bool:
        """Whether m is a leaf whatever its hooks: nothing inside it to trace into."""
        return super().is_leaf_module(m, qualname)


# Hugging Face's helpers that compute TensorFlow's SAME padding from sizes with Python's max(),
# which fx cannot trace; as calls, the convs after them fuse (MobileNetV1 / V2 with tf_padding).
_HF_NOTRACE_FUNCTIONS = (("transformers.models.mobilenet_v1.modeling_mobilenet_v1", "apply_tf_padding"),
                         ("transformers.models.mobilenet_v2.modeling_mobilenet_v2", "apply_tf_padding"))


def notrace_lists() -> tuple[frozenset[type], tuple[Callable, ...]]:
    """The modules and functions not to trace into: those timm registers (timm.layers._fx: what
    timm's own feature extraction hands torch.fx) and Hugging Face's padding helpers, of the
    libraries loaded; else none."""
    registry = sys.modules.get("timm.layers._fx")
    modules = frozenset() if registry is None else frozenset(registry.get_notrace_modules())
    functions = [] if registry is None else [f for f in registry.get_notrace_functions() if callable(f)]
    functions += [getattr(sys.modules[m], name) for m, name in _HF_NOTRACE_FUNCTIONS
                  if hasattr(sys.modules.get(m), name)]
    return modules, tuple(functions)


def trace(module: nn.Module, given: int, tracer: type[Tracer] = Tracer) -> tuple[Tracer, fx.Graph, dict[str, Any]]:
    """module's graph, its tracer, and the arguments it was traced with as constants. fx traces
    every argument as a tensor, so `if mask is None:` took the other branch and the default call
    broke: arguments whose defaults are constants (None, a flag, a number, a string) are traced as
    those constants (the fallback runs calls that pass other values), unless example_inputs gives
    them (`given` positional ones) or that trace fails (code that needs a tensor there): those
    are traced as fx would. A module fx cannot trace is traced again with timm's modules and
    functions not to trace into as calls (a dynamically padded Conv2dSame in a MaxViT block): the
    rest of it then fuses, and those modules are rewritten on their own."""
    constants = _constant_defaults(module, given)
    notrace = notrace_lists()
    tracers = [tracer] + ([functools.partial(tracer, *notrace)] if any(notrace) else [])
    tries = [(tracer, traced_with) for tracer in tracers for traced_with in ([constants, {}] if constants else [{}])]
    for make, traced_with in tries[:-1]:
        try:
            return _traced_as(module, traced_with, make())
        except Exception:  # noqa: BLE001 - code that needs a tensor there, or fx cannot trace it: next try
            pass
    make, traced_with = tries[-1]
    return _traced_as(module, traced_with, make())


def _holds_proxy(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_holds_proxy(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_proxy(v) for v in value.values())
    return isinstance(value, fx.Proxy)


def _put_back(now: dict | list, before: dict | list) -> None:
    """`now` as `before` again, by identity; but keys a dict gained keep their values unless those
    hold a Proxy (fx adds the root's `_tensor_constant0`, ...)."""
    if isinstance(now, list):
        if len(now) != len(before) or any(a is not b for a, b in zip(now, before)):
            now[:] = before
        return
    for key in [k for k, v in now.items() if k not in before and _holds_proxy(v)]:
        del now[key]
    for key, value in before.items():
        if key not in now or now[key] is not value:
            now[key] = value


@contextlib.contextmanager
def attributes_kept(module: nn.Module) -> Iterator[None]:
    """Tracing runs forward's Python, and code that caches into `self` on a first call would keep a
    Proxy of that trace (torchvision's MultiScaleRoIAlign sets self.scales; timm's EfficientViT
    fills a dict, attention_bias_cache): the next trace would build on another graph's nodes, an
    eager call would get a Proxy. Every module's attributes (parameters, buffers and children
    included) and the dicts and lists they hold are put back as they were."""
    saved = []
    for m in module.modules():
        saved.append((vars(m), dict(vars(m))))
        saved += [(v, type(v)(v)) for v in vars(m).values() if type(v) in (dict, list, OrderedDict)]
    try:
        yield
    finally:
        for now, before in saved:
            _put_back(now, before)


def _traced_as(
    module: nn.Module, traced_with: dict[str, Any], tracer: Tracer
) -> tuple[Tracer, fx.Graph, dict[str, Any]]:
    with attributes_kept(module):
        graph = tracer.trace(module, concrete_args=traced_with or None)
    if not _output_reads_an_input(graph):
        # fx followed no data from the inputs to the output: the forward returns what it kept
        # elsewhere (timm's FeatureHookNet returns what hooks collected), which the trace froze.
        raise UnfaithfulTrace("its traced output does not depend on its inputs")
    # fx names a constant's placeholder `name_1`, which would change the forward's keywords.
    for node in graph.nodes:
        original = node.target.rsplit("_", 1)[0] if node.op == "placeholder" else None
        if original in traced_with and node.target != original:
            node.target = original
            node._rename(original)
    # fx guards an argument traced as None with a wrapped call, which the code of a graph module
    # names as `wrap("torch.fx._symbolic_trace._assert_is_none")`: run again after torch.load, that
    # makes every later torch.fx trace in the process fail (pytorch/pytorch#130701). The eager
    # fallback already takes calls that pass another value (EagerFallback.wanted).
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.fx._symbolic_trace._assert_is_none and not node.users:
            graph.erase_node(node)
    return tracer, graph, traced_with


def _output_reads_an_input(graph: fx.Graph) -> bool:
    output = next(node for node in reversed(graph.nodes) if node.op == "output")
    seen, stack = set(), list(output.all_input_nodes)
    while stack:
        node = stack.pop()
        if node.op == "placeholder":
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return False


def _constant_defaults(module: nn.Module, given: int) -> dict[str, Any]:
    """module.forward's arguments whose defaults are constants, with those defaults; but not its
    first `given` positional arguments (example_inputs gives them)."""
    try:
        parameters = list(inspect.signature(type(module).forward).parameters.values())[1 + given:]
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty
            and (p.default is None or type(p.default) in (bool, int, float, str))}
