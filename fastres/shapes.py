"""The one list of conv problems that every backend's tests and the benchmarks share.

Model cases are read off the model zoo itself: the distinct fastres::conv_bn_act calls that
resnet18 / resnet50 / resnext50_32x4d make, recorded on the meta device (no memory, no compute)
with a TorchDispatchMode. The same layers at a smaller input image give the CPU tests' cases:
every channel count and kernel shape, small spatial extents. ODD_CASES add the shapes a model
zoo never makes but a user's net may.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastres.problem import IntPair, output_hw

MODEL_ARCHS: tuple[str, ...] = ("resnet18", "resnet50", "resnext50_32x4d")


@dataclass(frozen=True)
class ConvCase:
    """One conv_bn_act problem: shapes, conv arguments and the epilogue it is used with."""

    name: str
    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: IntPair = (1, 1)
    padding: IntPair = (0, 0)
    dilation: IntPair = (1, 1)
    groups: int = 1
    residual: bool = False
    act: str = "relu"

    @property
    def output_hw(self) -> IntPair:
        return output_hw(self.h, self.w, self.r, self.s, self.stride, self.padding, self.dilation)

    @property
    def reduction(self) -> int:
        return self.c // self.groups * self.r * self.s

    @property
    def flops(self) -> int:
        p, q = self.output_hw
        return 2 * self.n * p * q * self.k * self.reduction

    def replace(self, **changes) -> ConvCase:
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        return self.name


@dataclass
class ConvInputs:
    """Random inputs for a case: x, weight (Kaiming scale), a BN in eval mode and its folded form."""

    x: torch.Tensor
    weight: torch.Tensor
    bn: nn.BatchNorm2d
    scale: torch.Tensor
    shift: torch.Tensor
    residual: torch.Tensor | None

    def op_args(self) -> tuple:
        return (self.x, self.weight, self.scale, self.shift, self.residual)


def make_inputs(
    case: ConvCase, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0
) -> ConvInputs:
    """Seeded random inputs, never all-zeros or all-ones. BN running_var spans 1e-4 to 1e2 so the
    epilogue's scale ranges over ~0.1 to ~100; x and the residual are channels_last."""
    from fastres.numerics import fold_bn

    gen = torch.Generator().manual_seed(seed)
    p, q = case.output_hw
    x = torch.randn(case.n, case.c, case.h, case.w, generator=gen)
    fan_in = case.reduction
    weight = torch.randn(case.k, case.c // case.groups, case.r, case.s, generator=gen) * (2.0 / max(fan_in, 1)) ** 0.5
    bn = nn.BatchNorm2d(case.k).eval()
    with torch.no_grad():
        bn.running_mean.normal_(0.0, 0.5, generator=gen)
        bn.running_var.copy_(10.0 ** (torch.rand(case.k, generator=gen) * 6.0 - 4.0))
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.normal_(0.0, 0.5, generator=gen)
    residual = torch.randn(case.n, case.k, p, q, generator=gen) if case.residual else None
    fold_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale, shift = fold_bn(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, dtype=fold_dtype)
    cl = torch.channels_last
    return ConvInputs(
        x=x.to(device=device, dtype=dtype).contiguous(memory_format=cl),
        weight=weight.to(device=device, dtype=dtype).contiguous(memory_format=cl),
        bn=bn,
        scale=scale.to(device),
        shift=shift.to(device),
        residual=None if residual is None else residual.to(device=device, dtype=dtype).contiguous(memory_format=cl),
    )


def randomize_batchnorm_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded, non-trivial statistics and affine parameters for every BatchNorm-like module of
    `model`, in place (a fold that ignored one of them would then show in any comparison). The
    ranges keep activations bounded through 100+ layers; make_inputs covers the extreme BN ranges
    layer by layer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_var", None) is None:
                continue
            m.running_mean.normal_(0.0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
            if getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.0, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
    return model


class _RecordConvCalls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.fastres.conv_bn_act.default:
            self.calls.append(args)
        return func(*args, **(kwargs or {}))


@functools.cache
def model_calls(arch: str, batch: int = 1, image: int = 224) -> tuple[ConvCase, ...]:
    """Every conv_bn_act call fastres.models.<arch> makes on a batch x 3 x image x image input, in order."""
    from fastres.models import ARCHITECTURES

    with torch.device("meta"):
        model = ARCHITECTURES[arch]().eval()
        x = torch.empty(batch, 3, image, image)
    recorder = _RecordConvCalls()
    with recorder, torch.no_grad():
        model(x)
    calls = []
    for x, w, _scale, _shift, residual, stride, padding, dilation, groups, act, _backend in recorder.calls:
        n, c, h, wd = x.shape
        k, _, r, s = w.shape
        tag = f"{arch}:c{c}h{h}-k{k}:{r}x{s}s{stride[0]}" + (f"g{groups}" if groups > 1 else "")
        tag += ("+res" if residual is not None else "") + ("" if act == "relu" else f"-{act}")
        calls.append(ConvCase(tag, n, c, h, wd, k, r, s, tuple(stride), tuple(padding), tuple(dilation), groups,
                              residual is not None, act))
    return tuple(calls)


def model_cases(arch: str, batch: int = 1, image: int = 224) -> tuple[ConvCase, ...]:
    """The distinct conv_bn_act calls of fastres.models.<arch> (first occurrence of each)."""
    distinct: dict[ConvCase, ConvCase] = {}
    for case in model_calls(arch, batch, image):
        distinct.setdefault(case.replace(name=""), case)
    return tuple(distinct.values())


ODD_CASES: tuple[ConvCase, ...] = (
    ConvCase("odd:1x1-spatial", 2, 32, 1, 1, 48, 3, 3, padding=(1, 1)),
    ConvCase("odd:7x7-batch3", 3, 24, 7, 7, 40, 3, 3, padding=(1, 1)),
    ConvCase("odd:13x13-stride2", 1, 20, 13, 13, 36, 3, 3, stride=(2, 2), padding=(1, 1)),
    ConvCase("odd:dilation2", 2, 16, 9, 11, 24, 3, 3, padding=(2, 2), dilation=(2, 2)),
    ConvCase("odd:stem-C3", 3, 3, 13, 13, 24, 7, 7, stride=(2, 2), padding=(3, 3)),
    ConvCase("odd:1x1-C12-K20", 2, 12, 6, 5, 20, 1, 1),
    ConvCase("odd:1x1-stride2-odd", 2, 24, 7, 9, 40, 1, 1, stride=(2, 2)),
    ConvCase("odd:groups32", 2, 64, 6, 6, 64, 3, 3, padding=(1, 1), groups=32),
    ConvCase("odd:depthwise", 2, 24, 7, 7, 24, 3, 3, padding=(1, 1), groups=24),
    ConvCase("odd:depthwise-mult2-5x5", 1, 8, 9, 9, 16, 5, 5, stride=(2, 2), padding=(2, 2), groups=8),
    ConvCase("odd:rect-3x1", 1, 8, 10, 6, 8, 3, 1, stride=(2, 1), padding=(1, 0)),
    ConvCase("odd:valid-no-pad", 2, 16, 5, 5, 16, 3, 3),
)
