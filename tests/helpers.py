"""Shared test helpers: the dtype lists, layout variants and the one check against float64."""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import warnings

import numpy
import torch
import torchvision

from fastres.numerics import compare, tolerance
from fastres.shapes import ConvCallRecorder, ConvCase, ConvInputs, make_inputs, randomize_batchnorm_

HAS_CUDA = torch.cuda.is_available()
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """`t`'s values in another memory layout: NCHW-contiguous or a strided view; or "broadcast",
    a stride-0 view of part of them (the reference must be computed from what this returns)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "nchw":
        return t.contiguous()
    if layout == "strided":
        # Every other channel of a twice-as-wide tensor: no dense layout, channel stride 2.
        wide = torch.empty(t.shape[0], 2 * t.shape[1], *t.shape[2:], dtype=t.dtype, device=t.device)
        wide.fill_(float("nan"))
        view = wide[:, ::2]
        view.copy_(t)
        return view
    if layout == "broadcast":
        # The first image's first row, repeated: stride 0 over N and H, as a (1, C, 1, W) tensor
        # broadcast to t's shape (e.g. a position embedding added to every image).
        return t[:1, :, :1].expand_as(t)
    raise ValueError(layout)


def reference_for(case: ConvCase, inputs: ConvInputs, residual: torch.Tensor | None, act: str | None = None) -> torch.Tensor:
    """The float64 ground truth of `inputs` with `residual` in place of theirs (a relayout, an alias)."""
    return dataclasses.replace(inputs, residual=residual).reference(case, act)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, case: ConvCase, dtype: torch.dtype, scale: torch.Tensor,
                   tf32: bool = False) -> None:
    """The check every backend test ends with: float64 reference, per-dtype tolerance, NaN placement."""
    assert out.shape == ref.shape and out.dtype == dtype
    result = compare(out, ref, tolerance(dtype, case.accumulated, tf32), gain=scale)
    assert result.ok, f"{case.name} {dtype}: {result.message}"


def call_op(case: ConvCase, inputs: ConvInputs, **kwargs) -> torch.Tensor:
    """fastres.ops.conv_bn_act on `inputs` with `case`'s conv arguments and activation; kwargs:
    the op's other keywords (backend)."""
    import fastres

    return fastres.ops.conv_bn_act(
        *inputs.op_args(), stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups,
        **case.act_kwargs, **inputs.op_kwargs(), **kwargs,
    )


def run_op_case(
    case: ConvCase,
    dtype: torch.dtype,
    backend: str,
    device: torch.device = DEVICE,
    layout: str = "channels_last",
    residual_layout: str = "channels_last",
    residual_alias: bool = False,
    seed: int = 0,
) -> None:
    """Run fastres.ops.conv_bn_act on one case and check it against the float64 reference."""
    inputs = make_inputs(case, dtype, device, seed)
    x = relayout(inputs.x, layout)
    residual = relayout(inputs.residual, residual_layout) if inputs.residual is not None else None
    if residual_alias:
        residual = x
    out = call_op(case, dataclasses.replace(inputs, x=x, residual=residual), backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out.device.type == device.type
    assert_matches(out, reference_for(case, inputs, residual), case, dtype, inputs.gain)


def poison_cuda_allocator(nbytes: int, device: torch.device) -> None:
    """Fill soon-to-be-reused CUDA caching-allocator blocks with NaN, so an output element a
    kernel fails to write reads as NaN (the op allocates its own outputs)."""
    block = torch.full((nbytes // 2 + 1,), float("nan"), dtype=torch.float16, device=device)
    del block


class HookLog:
    """Records what each hook saw, by hook name; a bound method as a hook, as feature extractors use."""

    def __init__(self):
        self.seen: list[tuple[str, torch.Tensor]] = []

    def forward_hook(self, name):
        return lambda module, args, out: self.seen.append((name, out.detach().clone()))

    def pre_hook(self, name):
        return lambda module, args: self.seen.append((name, args[0].detach().clone()))

    def backward_hook(self, module, grad_input, grad_output):
        self.seen.append(("layer4 backward", grad_output[0].detach().clone()))


def register_hook(model: torch.nn.Module, where: str, log: HookLog):
    """A hook on the module named `where` (a BN: a pre-hook; "layer4": a full backward hook;
    "global": a global module forward hook), recording into `log`; returns its handle."""
    if where == "global":
        return torch.nn.modules.module.register_module_forward_hook(log.forward_hook(where))
    module = model.get_submodule(where)
    if isinstance(module, torch.nn.BatchNorm2d):
        return module.register_forward_pre_hook(log.pre_hook(where))
    if where == "layer4":
        return module.register_full_backward_hook(log.backward_hook)
    return module.register_forward_hook(log.forward_hook(where))


def hooked_run(model: torch.nn.Module, where: str, x: torch.Tensor) -> tuple[torch.Tensor, list, list, list[str]]:
    """model(x), forward and backward, with a hook on `where` (register_hook) removed afterwards:
    the output, what the hook saw, the fastres op calls made, and the warnings' messages."""
    log = HookLog()
    handle = register_hook(model, where, log)
    try:
        with ConvCallRecorder() as calls, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model(x.clone().requires_grad_())
            out.square().sum().backward()
    finally:
        handle.remove()
    return out, log.seen, calls.calls, [str(w.message) for w in caught]


def assert_hooks_saw_the_same(got: list, want: list) -> None:
    """Two HookLog.seen lists: the same hooks, in the same order, on the same values (fp32 tolerance)."""
    assert [n for n, _ in got] == [n for n, _ in want] and got
    for (name, seen), (_, expected) in zip(got, want):
        torch.testing.assert_close(seen, expected, rtol=1e-4, atol=1e-4, msg=name)


_GLOBAL_GENERATOR = torch.Generator().manual_seed(0)


class SamplesInEval(torch.nn.Module):
    """A conv net that adds noise in eval mode too (a generative model's sampling step), drawn from
    `source`: torch's generator, a torch.Generator it holds ("own"), Python's, numpy's, or a global
    torch.Generator object, which only its user knows of."""

    def __init__(self, source: str = "torch"):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                                        torch.nn.ReLU())
        self.source = source
        self.generator = torch.Generator().manual_seed(0) if source == "own" else None

    def forward(self, x):
        if self.source == "python":
            noise = torch.tensor([random.gauss(0.0, 1.0) for _ in range(x.numel())]).view_as(x).to(x)
        elif self.source == "numpy":
            noise = torch.from_numpy(numpy.random.standard_normal(tuple(x.shape))).to(x)
        else:
            generator = _GLOBAL_GENERATOR if self.source == "global" else self.generator
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return self.body(x + noise)

    def random_state(self) -> object:
        """The state of the generator its noise comes from, comparable with ==."""
        if self.source == "python":
            return random.getstate()
        if self.source == "numpy":
            return pickle.dumps(numpy.random.get_state())
        generator = {"torch": torch.default_generator, "own": self.generator, "global": _GLOBAL_GENERATOR}[self.source]
        return generator.get_state().tolist()


@dataclasses.dataclass
class FeatureMaps:
    shallow: torch.Tensor
    deep: torch.Tensor
    label: torch.Tensor


class MapsDict(dict):
    """A dict subclass, which torch's pytree takes for a leaf."""


class Features(torch.nn.Module):
    """A resnet18's first and last stage's maps and its predicted class (shallow, deep, label: an
    integer tensor), returned in one of CONTAINERS: a detection or segmentation backbone's outputs."""

    CONTAINERS = ("tuple", "dict", "dict subclass", "dataclass")

    def __init__(self, container: str):
        super().__init__()
        self.container = container
        self.net = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10))

    def forward(self, x: torch.Tensor):
        net = self.net
        shallow = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))
        deep = net.layer4(net.layer3(net.layer2(shallow)))
        label = net.fc(torch.flatten(net.avgpool(deep), 1)).argmax(1)
        if self.container == "tuple":
            return shallow, deep, label
        if self.container == "dataclass":
            return FeatureMaps(shallow, deep, label)
        return (dict if self.container == "dict" else MapsDict)(shallow=shallow, deep=deep, label=label)


def overflowing_fp16_model() -> tuple[torch.nn.Module, torch.Tensor]:
    """Two conv + BN + ReLU chains in fp16 with large weights, and an input on which part of the
    output overflows in eager fp16 where float64 is finite (and where the fused op, which rounds
    once after BN's scale, may stay finite)."""
    model = torch.nn.Sequential(*[layer for _ in range(2) for layer in (
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())])
    model = randomize_batchnorm_(model).eval()
    with torch.no_grad():
        for conv in (model[0], model[3]):
            conv.weight.mul_(300)
    x = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(0)) * 100
    return model.half(), x.half()
