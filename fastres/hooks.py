"""Module hooks under fastres.optimize: a hook must run where and when it ran in the user's model.

optimize treats a module with call hooks (forward, forward pre-, backward) as a whole in its trace,
so they run on the values eager gives them; it never fuses a hooked conv, BatchNorm or activation
(the fused op would skip their hooks), and moves a rewritten module's hooks onto its replacement.
Its copy of the model keeps the user's hook callables themselves: a hook that is a bound method
must go on writing to the user's object, not to a copy of it.
A hook added after optimize to a module the fused graph runs without calling (a fused conv, a
block it traced through) is seen by a HookWatch, so the graph can run its model's own forward.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections import OrderedDict
from typing import Iterator

import torch.nn as nn
from torch.nn.modules.module import _has_any_global_hook

__all__ = ["call_hooks", "has_call_hooks", "move_hooks", "hook_memo", "hooks_held", "HookWatch"]

# The hooks nn.Module.__call__ runs, and how a report names them.
_CALL_HOOKS = {"_forward_pre_hooks": "forward pre-hook", "_forward_hooks": "forward hook",
               "_backward_pre_hooks": "backward pre-hook", "_backward_hooks": "backward hook"}
# Everything a module's hooks consist of (flags and state_dict hooks included), moved together.
_HOOK_STATE = (*_CALL_HOOKS, "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_is_full_backward_hook", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def call_hooks(module: nn.Module) -> str | None:
    """The hooks that run when `module` is called, in words ("a forward hook", "2 forward
    pre-hooks and a backward hook"), or None when it has none."""
    kinds = []
    for attr, kind in _CALL_HOOKS.items():
        count = len(getattr(module, attr, None) or ())
        if count:
            kinds.append(f"a {kind}" if count == 1 else f"{count} {kind}s")
    return " and ".join(kinds) or None


def has_call_hooks(*modules: nn.Module | None) -> bool:
    """Whether calling any of `modules` would run a hook, global module hooks included (cheap
    enough for every call of a fused op)."""
    if _has_any_global_hook():
        return True
    for m in modules:
        if m is not None and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks):
            return True
    return False


def move_hooks(source: nn.Module, target: nn.Module) -> None:
    """Give `target`, the module that replaces `source`, source's hooks (they then receive target
    as their module argument; a hook that is a method of source becomes target's)."""
    def rebound(hook: object) -> object:
        return types.MethodType(hook.__func__, target) if getattr(hook, "__self__", None) is source else hook

    for attr in _HOOK_STATE:
        if not hasattr(source, attr):
            continue
        value = getattr(source, attr)
        if isinstance(value, dict):
            value = type(value)((key, rebound(hook)) for key, hook in value.items())
        setattr(target, attr, value)


def hook_memo(model: nn.Module) -> dict[int, object]:
    """A copy.deepcopy memo under which the hook callables of `model` are kept, not copied; but a
    hook that is a method (or a functools.partial of one) of one of model's own modules, or of an
    object one of them holds (a quantization observer, a lazy module's state_dict hook, timm's
    FeatureHooks collecting features for FeatureHookNet), is copied with it, so the copy's hook
    acts on the copy."""
    own = {id(module) for module in model.modules()}
    own |= {id(value) for module in model.modules() for value in vars(module).values()}
    return {id(hook): hook for module in model.modules() for attr in _HOOK_STATE
            if isinstance(hooks := getattr(module, attr, None), dict) for hook in hooks.values()
            if id(_bound_to(hook)) not in own}


def _bound_to(hook: object) -> object:
    """The object a hook is a method of, through functools.partial wrappers; None for a function."""
    while isinstance(hook, functools.partial):
        hook = hook.func
    return getattr(hook, "__self__", None)


@contextlib.contextmanager
def hooks_held(model: nn.Module) -> Iterator[None]:
    """Call hooks of every module of `model` held off for the duration (a run on meta tensors, to
    list the model's op calls, must not feed meta tensors to user hooks)."""
    held = [(module, {attr: getattr(module, attr) for attr in _CALL_HOOKS}) for module in model.modules()]
    for module, _ in held:
        for attr in _CALL_HOOKS:
            setattr(module, attr, OrderedDict())
    try:
        yield
    finally:
        for module, hooks in held:
            for attr, value in hooks.items():
                setattr(module, attr, value)


class _WatchedHooks(OrderedDict):
    """A module's hook dict that marks its HookWatch changed when a hook is added or removed."""

    def __init__(self, hooks: dict | tuple = (), watch: HookWatch | None = None) -> None:
        self.watch = watch  # before the items: OrderedDict's init adds them through __setitem__
        super().__init__(hooks)

    def __setitem__(self, key: object, value: object) -> None:
        super().__setitem__(key, value)
        if self.watch is not None:
            self.watch.changed = True

    def __delitem__(self, key: object) -> None:
        super().__delitem__(key)
        if self.watch is not None:
            self.watch.changed = True


class HookWatch:
    """Which of some modules has call hooks now, global module hooks included. The modules' hook
    dicts report additions and removals, so a call costs an attribute read until one happens."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.names = list(modules)
        self._watched: list[tuple[str, _WatchedHooks, str]] = []
        for name, module in modules.items():
            for attr, kind in _CALL_HOOKS.items():
                hooks = _WatchedHooks(getattr(module, attr), self)
                setattr(module, attr, hooks)
                self._watched.append((name, hooks, kind))
        self._recount()  # now, so torch.compile's first call sees the state later calls see

    def _recount(self) -> None:
        self.changed = False
        self._hooked = next((f"{name} has a {kind}" for name, hooks, kind in self._watched if hooks), None)

    def hooked(self) -> str | None:
        """The first watched module with a call hook ("layer1.0.conv1 has a forward hook"), or
        the global module hooks, which every module runs; None if there are none."""
        if self.changed or self._hooked is not None:  # recounted while hooked: removals by any means
            self._recount()
        if self._hooked is None and _has_any_global_hook():
            return "a global module hook is set (nn.modules.module.register_module_forward_hook and kin)"
        return self._hooked
