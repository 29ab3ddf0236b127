"""What replaces a module fastres.optimize traced: a GraphModule that is still the module.

fx's GraphModule keeps only what its graph uses, renames the class, and its deepcopy and pickle
drop plain attributes. graph_module() makes one that keeps every child, root tensor and plain
attribute where the module had them, is an instance of the module's own class (for a model's own
classes: isinstance, timm's pretrained_cfg, forward_features), indexes as a Sequential for a
Sequential, and survives copy.deepcopy and torch.save / torch.load whole.

EagerFallback: when such a module runs its model's own forward instead of the fused graph, in
train mode (the graph was traced in eval mode, its `self.training` branches and
F.dropout(training=...) frozen so), and while a module the graph no longer calls has a hook added
after optimize. The check is the first line of the graph's code (fx's on_generate_code).
"""

from __future__ import annotations

import copy
import functools
import sys
import warnings
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch.fx as fx
import torch.nn as nn

from fastres.hooks import HookWatch, move_hooks

__all__ = ["graph_module", "EagerFallback", "is_rewritten"]


def is_rewritten(module: nn.Module) -> bool:
    """Whether `module` is what fastres.optimize made of a traced module."""
    return "_fastres_eager" in vars(module)


def graph_module(module: nn.Module, graph: fx.Graph, cls: type) -> fx.GraphModule:
    """The GraphModule that runs `graph` in place of `module` (an instance of cls, or what torch.load
    rebuilt of one): every child, root tensor and plain attribute of module's, as module had them."""
    gm = _graph_module_class(cls)(module, graph, class_name=cls.__name__)
    for name, value in vars(module).items():  # plain attributes: timm's pretrained_cfg, num_classes, ...
        gm.__dict__.setdefault(name, value)
    # GraphModule copies only what the graph touches, in the graph's order, into fresh containers;
    # put the original children and root tensors back so every state_dict key (used or not) stays
    # as it was, in its order.
    children = dict(module.named_children())
    gm._modules = {**children, **{name: child for name, child in gm._modules.items() if name not in children}}
    for name, tensor in module._parameters.items():
        if tensor is not None and not hasattr(gm, name):
            gm.register_parameter(name, tensor)
    for name, tensor in module._buffers.items():
        if tensor is not None and not hasattr(gm, name):
            gm.register_buffer(name, tensor, persistent=name not in module._non_persistent_buffers_set)
    # Those the graph reads, GraphModule registers as persistent on torch 2.11 (not on 2.15).
    gm._non_persistent_buffers_set |= module._non_persistent_buffers_set & gm._buffers.keys()
    return gm


class EagerFallback:
    """When a fused graph runs its model's own forward instead: in train mode; while a module the
    graph runs without calling (a fused conv, BN or activation, a block traced through) has hooks
    added after optimize, which only the model's forward would run; and for a call whose argument
    differs from the constant the graph was traced with (`traced_with`)."""

    def __init__(self, cls: type | None, unfused: nn.Module | None, watch: HookWatch | None,
                 traced_with: dict[str, Any] | None = None) -> None:
        self.cls, self.unfused, self.watch = cls, unfused, watch
        self.traced_with = traced_with or {}
        self._warned: set[str] = set()

    @staticmethod
    def install(gm: fx.GraphModule, cls: type, unfused: nn.Module | None, bypassed: list[str],
                traced_with: dict[str, Any]) -> None:
        """Give gm, which replaces an instance of cls, its fallback to cls's forward: on gm itself,
        or on `unfused` (a torch container whose children gm shares). `bypassed` names the modules
        the traced forward called that gm's graph no longer calls; `traced_with`, the arguments
        the graph was traced with as constants (their defaults: None, a flag): a call that passes
        another value runs the forward, which branches on it."""
        watch = HookWatch({name: gm.get_submodule(name) for name in bypassed})
        gm._fastres_eager = EagerFallback(cls, unfused, watch, traced_with)
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        star = next((i for i, n in enumerate(names) if n.startswith("*")), len(names))
        passed = ", ".join(["self", *names[:star], *(n if n.startswith("*") else f"{n}={n}" for n in names[star:])])
        checked = ", ".join(["self", *(f"{name}={name}" for name in traced_with)])
        line = f"if self._fastres_eager.wanted({checked}): return self._fastres_eager({passed})\n"
        gm.graph.on_generate_code(lambda previous: functools.partial(_prepend, line, previous))
        gm.recompile()

    def wanted(self, gm: nn.Module, **arguments: Any) -> bool:
        if "_fastres_replica_of" in vars(gm):  # (vars: fx's load runs this on a _CodeOnlyModule too)
            _adopt_replica(gm)
        if self.watch is None:
            return False
        if gm.training:
            return True
        for name, value in arguments.items():
            traced = self.traced_with[name]
            if value is not traced and (type(value) is not type(traced) or value != traced):
                self._warn_once("arguments", f"fastres: this call's {name}={value!r} is not the {traced!r} the "
                                "graph fastres.optimize fused was traced with; the model runs its own, unfused forward "
                                "for such calls (optimize traces the arguments its example_inputs do not pass as their "
                                "defaults)")
                return True
        hooked = self.watch.hooked()
        if hooked is not None:
            self._warn_once("hooks", f"fastres: {hooked}, which the graph fastres.optimize fused would skip; the model "
                            "runs its own, unfused forward while it is there (register hooks before optimize to keep "
                            "the fused ops)")
        return hooked is not None

    def _warn_once(self, why: str, message: str) -> None:
        if why not in self._warned:
            self._warned.add(why)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def __call__(self, gm: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.unfused is None:
            return self.cls.forward(gm, *args, **kwargs)
        self.unfused.training = gm.training
        return self.cls.forward(self.unfused, *args, **kwargs)

    def replicated(self, replica_of: dict[int, nn.Module]) -> EagerFallback:
        """This fallback for a replica of its module, whose modules replica_of maps by id."""
        unfused = self.unfused
        if unfused is not None:  # a container: its replica holds the replica's children
            unfused = unfused._replicate_for_data_parallel()
            unfused._modules = {name: replica_of.get(id(child), child) for name, child in unfused._modules.items()}
        replica = EagerFallback(self.cls, unfused, self.watch, self.traced_with)
        replica._warned = self._warned
        return replica

    def __deepcopy__(self, memo: dict) -> EagerFallback:
        return EagerFallback(self.cls, copy.deepcopy(self.unfused, memo), copy.deepcopy(self.watch, memo),
                             self.traced_with)

    def __reduce__(self) -> tuple:
        # Pickled inside fx's GraphModule state, which torch.load re-traces from the graph's code:
        # off there, so the check drops out of the trace; _GraphModule.__reduce__ turns it back on.
        return (EagerFallback, (None, None, None))


def _adopt_replica(replica: fx.GraphModule) -> None:
    """Point a DataParallel replica's references to modules outside _modules (a fused op's conv and
    BN: HOLDS_MODULES; the fallback's container) at the replica's own modules. replicate() remaps
    only _modules, after copying each module's attributes, so the first call of the replica does it."""
    original = vars(replica).pop("_fastres_replica_of")
    replica_of = {id(o): r for o, r in zip(original.modules(), replica.modules())}
    for module in replica.modules():
        for attr in getattr(module, "HOLDS_MODULES", ()):
            refs = vars(module).get(attr)
            if refs is not None:
                vars(module)[attr] = tuple(m if m is None else replica_of.get(id(m), m) for m in refs)
    replica._fastres_eager = original._fastres_eager.replicated(replica_of)


def _prepend(line: str, previous: Callable[[list[str]], list[str]] | None, body: list[str]) -> list[str]:
    return [line, *(body if previous is None else previous(body))]


class _GraphModule(fx.GraphModule):
    """What replaces a traced module: fx's deepcopy keeps only what the graph uses and renames the
    class; this one keeps plain attributes (the eager fallback, timm's pretrained_cfg) and the name.
    fx's pickle loads back a plain GraphModule; this one's loads back its class and fallback too.
    A torch.nn.DataParallel replica remaps the modules its fused ops hold on its first call."""

    def _replicate_for_data_parallel(self) -> fx.GraphModule:
        # fx's replica is a plain GraphModule of what the graph uses (no fallback, class or other
        # children: its forward fails). This is nn.Module's, but of this instance's own class, which
        # holds its forward (nn.Module's `self.__new__` would make a fresh GraphModule class).
        replica = object.__new__(type(self))
        replica.__dict__ = {**self.__dict__, "_parameters": {}, "_buffers": dict(self._buffers),
                            "_modules": dict(self._modules), "_is_replica": True,
                            "_fastres_replica_of": self}  # the module copied: a plain attribute, not a child
        return replica

    def __reduce__(self) -> tuple:
        fallback = self.__dict__.get("_fastres_eager")
        cls = None if fallback is None else fallback.cls
        if cls is None:
            return fx.GraphModule.__reduce__(self)
        if not _importable(cls):
            warnings.warn(f"fastres: {cls.__qualname__} cannot be imported by name, so this optimized model "
                          "pickles as fx's plain GraphModule: loaded, it runs the graph traced in eval mode in "
                          "train mode too and skips hooks added to fused modules (save its state_dict instead)",
                          RuntimeWarning, stacklevel=2)
            return fx.GraphModule.__reduce__(self)
        return (_load_graph_module, (fx.GraphModule.__reduce__(self), cls, fallback.unfused, fallback.watch.names,
                                     fallback.traced_with))

    def __deepcopy__(self, memo: dict) -> fx.GraphModule:
        copied = fx.GraphModule.__deepcopy__(self, memo)
        for name, value in self.__dict__.items():
            if name not in copied.__dict__:
                copied.__dict__[name] = copy.deepcopy(value, memo)
        type(copied).__name__ = type(self).__name__
        return copied


def _importable(cls: type) -> bool:
    """Whether pickle can find cls by its module and qualified name (not a class made in a function)."""
    try:
        return functools.reduce(getattr, cls.__qualname__.split("."), sys.modules[cls.__module__]) is cls
    except (KeyError, AttributeError):
        return False


def _load_graph_module(fx_reduced: tuple, cls: type, unfused: nn.Module | None, bypassed: list[str],
                       traced_with: dict[str, Any]) -> fx.GraphModule:
    """torch.load's rebuild of a _GraphModule: fx re-traces the saved code into a plain GraphModule
    (the fallback's check, saved off, drops out of that trace); then the class and the fallback."""
    load, (body, import_block) = fx_reduced
    plain = load(body, import_block)
    for container in ("_modules", "_parameters", "_buffers"):  # fx's keep only what its graph uses
        setattr(plain, container, body[container])
    gm = graph_module(plain, plain.graph, cls)
    move_hooks(plain, gm)
    EagerFallback.install(gm, cls, unfused, bypassed, traced_with)
    return gm


class _GraphSequential(_GraphModule):
    """What replaces an nn.Sequential: indexing, slicing, len and iteration see its layers (the
    modules the graph's fused ops refer to), as the Sequential's would, not the fused modules."""

    def _layer_names(self) -> list[str]:
        return list(self._fastres_eager.unfused._modules)

    def __getitem__(self, index: int | slice) -> nn.Module:
        names = self._layer_names()
        if isinstance(index, slice):
            return nn.Sequential(OrderedDict((name, self._modules[name]) for name in names[index]))
        return self._modules[names[index]]

    def __len__(self) -> int:
        return len(self._layer_names())

    def __bool__(self) -> bool:  # fx tests `if graph.owning_module:`, before and after the layers are known
        return True

    def __iter__(self) -> Iterator[nn.Module]:
        return (self._modules[name] for name in self._layer_names())


class _ModuleInit(nn.Module):
    """Between GraphModule and a model's class: GraphModule's super().__init__() is nn.Module's."""

    def __init__(self) -> None:
        nn.Module.__init__(self)


@functools.cache
def _graph_module_class(cls: type) -> type:
    """The GraphModule class that replaces an instance of `cls`: for a model's own classes (not
    torch's, not containers, whose indexing would see the fused modules), a subclass of both, so
    isinstance holds and cls's other methods (forward_features, get_classifier, ...) work; they
    run on the original children: unfused, but right. A Sequential's indexes as a Sequential."""
    if issubclass(cls, nn.Sequential):
        return _GraphSequential
    if cls.__module__.startswith("torch.") or issubclass(cls, (fx.GraphModule, nn.ModuleList, nn.ModuleDict)):
        return _GraphModule
    try:
        return type(cls.__name__, (_GraphModule, _ModuleInit, cls), {"__module__": __name__})
    except TypeError:  # a metaclass or __init_subclass__ that refuses: a plain GraphModule, as before
        return _GraphModule
