"""The one list of conv problems that every backend's tests and the benchmarks share.

Model cases are read off the model zoo itself: the distinct fastres::conv_bn_act calls that
resnet18 / resnet50 / resnext50_32x4d make, recorded on the meta device (no memory, no compute)
with a TorchDispatchMode. The same layers at a smaller input image give the CPU tests' cases:
every channel count and kernel shape, small spatial extents. ODD_CASES add the shapes a model
zoo never makes but a user's net may.

A call with a projected residual (a block's downsample fused into its last conv) is one case
with `projection` set in `model_projection_cases`, and its two convs (the projection, then the
conv with a plain residual) in `model_calls` / `model_cases`, the per-conv list.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastres.hooks import hooks_held
from fastres.problem import DEFAULT_NEGATIVE_SLOPE, ConvProblem, IntPair, Projection, act_text, output_hw

MODEL_ARCHS: tuple[str, ...] = ("resnet18", "resnet50", "resnext50_32x4d")


@dataclass(frozen=True)
class ProjectionCase:
    """The residual input of a projected case, (N, c, h, w), its 1x1 conv's stride, and whether a
    BN follows that conv (else its bias alone: a model whose BNs were folded into the convs)."""

    c: int
    h: int
    w: int
    stride: IntPair = (1, 1)
    bn: bool = True


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
    projection: ProjectionCase | None = None  # the residual's 1x1 conv (residual must be True)
    bn: bool = True  # False: no BN after the conv (VGG, squeeze-excite), its bias is the shift
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE  # act="leaky_relu"'s

    @property
    def output_hw(self) -> IntPair:
        return output_hw(self.h, self.w, self.r, self.s, self.stride, self.padding, self.dilation)

    @property
    def reduction(self) -> int:
        """This conv's reduction length C/groups * R * S (its fan-in)."""
        return self.c // self.groups * self.r * self.s

    @property
    def accumulated(self) -> int:
        """Products summed into each output: the reduction, plus the projection's channels."""
        return self.reduction + (0 if self.projection is None else self.projection.c)

    @property
    def flops(self) -> int:
        p, q = self.output_hw
        return 2 * self.n * p * q * self.k * self.accumulated

    @property
    def act_kwargs(self) -> dict:
        """The op's activation keywords for this case: act, and negative_slope (LeakyReLU's)."""
        return dict(act=self.act, negative_slope=self.negative_slope)

    def projection_case(self) -> ConvCase:
        """The projection as a conv of its own: 1x1 over the residual input, no residual, no activation."""
        pr = self.projection
        return ConvCase(f"{self.name}/projection", self.n, pr.c, pr.h, pr.w, self.k, 1, 1, pr.stride, act="none")

    def replace(self, **changes) -> ConvCase:
        """A copy with `changes`; another act than leaky_relu drops the case's slope (LeakyReLU's alone)."""
        if changes.get("act", "leaky_relu") != "leaky_relu":
            changes.setdefault("negative_slope", DEFAULT_NEGATIVE_SLOPE)
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        return self.name


@dataclass
class ConvInputs:
    """Random inputs for a case: x, weight (Kaiming scale), a BN in eval mode and its folded form
    (a case without BN: no BN, no scale, and a conv bias as the shift); for a projected case also
    the projection's weight, BN and folded form (residual is its input)."""

    x: torch.Tensor
    weight: torch.Tensor
    bn: nn.BatchNorm2d | None
    scale: torch.Tensor | None
    shift: torch.Tensor | None
    residual: torch.Tensor | None
    projection: Projection | None = None
    projection_bn: nn.BatchNorm2d | None = None

    def op_args(self) -> tuple:
        return (self.x, self.weight, self.scale, self.shift, self.residual)

    def problem(self, case: ConvCase) -> ConvProblem:
        """The validated ConvProblem of the op call these inputs make for `case`."""
        return ConvProblem.from_tensors(*self.op_args(), case.stride, case.padding, case.dilation, case.groups,
                                        case.act, self.projection, case.negative_slope)

    def op_kwargs(self) -> dict:
        """The op's residual_* keyword arguments (none without a projection)."""
        if self.projection is None:
            return {}
        pr = self.projection
        return dict(residual_weight=pr.weight, residual_scale=pr.scale, residual_shift=pr.shift, residual_stride=pr.stride)

    @property
    def gain(self) -> torch.Tensor | None:
        """Per-channel |scale| for fastres.numerics.compare: the larger of the two branches' scales."""
        from fastres.numerics import branch_gain

        return branch_gain(self.scale, None if self.projection is None else self.projection.scale)

    def reference(self, case: ConvCase, act: str | None = None) -> torch.Tensor:
        """The float64 ground truth for these inputs: the unfused chain (bn None: the shift alone, a
        conv bias, or nothing)."""
        from fastres.numerics import reference_conv_bn_act

        residual = self.residual
        if self.projection is not None:
            pr = self.projection
            residual = reference_conv_bn_act(residual, pr.weight, bn=self.projection_bn,
                                             shift=pr.shift if self.projection_bn is None else None,
                                             stride=pr.stride, act="none")
        if act is not None:
            case = case.replace(act=act)
        return reference_conv_bn_act(
            self.x, self.weight, bn=self.bn, shift=self.shift if self.bn is None else None, residual=residual,
            stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups, **case.act_kwargs,
        )


def _random_bn(k: int, gen: torch.Generator, fold_dtype: torch.dtype) -> tuple[nn.BatchNorm2d, torch.Tensor, torch.Tensor]:
    """A BatchNorm2d in eval mode with seeded statistics, and its folded (scale, shift)."""
    from fastres.numerics import fold_bn

    bn = nn.BatchNorm2d(k).eval()
    with torch.no_grad():
        bn.running_mean.normal_(0.0, 0.5, generator=gen)
        bn.running_var.copy_(10.0 ** (torch.rand(k, generator=gen) * 6.0 - 4.0))
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.normal_(0.0, 0.5, generator=gen)
        return bn, *fold_bn(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, dtype=fold_dtype)


def make_inputs(
    case: ConvCase, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0
) -> ConvInputs:
    """Seeded random inputs, never all-zeros or all-ones. BN running_var spans 1e-4 to 1e2 so the
    epilogue's scale ranges over ~0.1 to ~100; x and the residual are channels_last."""
    gen = torch.Generator().manual_seed(seed)
    cl = torch.channels_last
    fold_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(case.n, case.c, case.h, case.w, generator=gen)
    fan_in = case.reduction
    weight = torch.randn(case.k, case.c // case.groups, case.r, case.s, generator=gen) * (2.0 / max(fan_in, 1)) ** 0.5
    bn, scale, shift = _random_bn(case.k, gen, fold_dtype)
    if not case.bn:  # the folded shift stands in for the conv's bias
        bn, scale = None, None
    residual = projection = projection_bn = None
    if case.projection is not None:
        pr = case.projection
        residual = torch.randn(case.n, pr.c, pr.h, pr.w, generator=gen)
        pweight = torch.randn(case.k, pr.c, 1, 1, generator=gen) * (2.0 / pr.c) ** 0.5
        projection_bn, pscale, pshift = _random_bn(case.k, gen, fold_dtype)
        if not pr.bn:  # the folded shift stands in for the projection conv's bias
            projection_bn, pscale = None, None
        projection = Projection(pweight.to(device=device, dtype=dtype).contiguous(memory_format=cl),
                                None if pscale is None else pscale.to(device), pshift.to(device), pr.stride)
    elif case.residual:
        residual = torch.randn(case.n, case.k, *case.output_hw, generator=gen)
    return ConvInputs(
        x=x.to(device=device, dtype=dtype).contiguous(memory_format=cl),
        weight=weight.to(device=device, dtype=dtype).contiguous(memory_format=cl),
        bn=bn,
        scale=None if scale is None else scale.to(device),
        shift=shift.to(device),
        residual=None if residual is None else residual.to(device=device, dtype=dtype).contiguous(memory_format=cl),
        projection=projection,
        projection_bn=projection_bn,
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


class ConvCallRecorder(TorchDispatchMode):
    """Records every fastres::conv_bn_act call made inside it: its arguments (`calls`) and each as a
    ConvCase (`cases`, `prefix` starting its name)."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix
        self.calls: list[tuple[tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.fastres.conv_bn_act.default:
            self.calls.append((args, kwargs or {}))
        return func(*args, **(kwargs or {}))

    @property
    def cases(self) -> list[ConvCase]:
        return [self._case(*args, **kwargs) for args, kwargs in self.calls]

    def _case(self, x, w, scale, _shift, residual, stride, padding, dilation, groups, act, _backend,
              residual_weight=None, residual_scale=None, _residual_shift=None, residual_stride=None,
              negative_slope=DEFAULT_NEGATIVE_SLOPE) -> ConvCase:
        n, c, h, wd = x.shape
        k, _, r, s = w.shape
        projection = None
        if residual_weight is not None:
            projection = ProjectionCase(*residual.shape[1:], tuple(residual_stride or (1, 1)),
                                        bn=residual_scale is not None)
        case = ConvCase("", n, c, h, wd, k, r, s, tuple(stride), tuple(padding), tuple(dilation), groups,
                        residual is not None, act, projection, bn=scale is not None, negative_slope=negative_slope)
        return case.replace(name=_tag(self.prefix, case))


def _tag(prefix: str, case: ConvCase) -> str:
    """A case's name: channels, input size, output channels, kernel and stride, then its epilogue."""
    tag = f"{prefix}c{case.c}h{case.h}-k{case.k}:{case.r}x{case.s}s{case.stride[0]}"
    tag += f"g{case.groups}" if case.groups > 1 else ""
    if case.projection is not None:
        pr = case.projection
        tag += f"+proj(c{pr.c}h{pr.h}s{pr.stride[0]}{'' if pr.bn else '-nobn'})"
    elif case.residual:
        tag += "+res"
    return tag + ("" if case.act == "relu" else f"-{act_text(case.act, case.negative_slope)}") + (
        "" if case.bn else "-nobn")


def on_device(device: torch.device, value):
    """An empty tensor on `device` shaped and strided like `value` (a Projection's tensors too);
    anything else as it is."""
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=device)
    if isinstance(value, Projection):
        return Projection(*(on_device(device, v) for v in (value.weight, value.scale, value.shift)), value.stride)
    return value


def record_meta_run(model: nn.Module, inputs: tuple, prefix: str = "") -> ConvCallRecorder:
    """The fastres ops of model(*inputs), run on meta copies of its parameters, buffers and inputs
    (no memory, no kernels; the model itself is untouched, BN's cached folds included, and its
    modules' hooks are held off)."""
    meta = torch.device("meta")
    state = {name: on_device(meta, t) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    with ConvCallRecorder(prefix) as recorder, torch.no_grad(), hooks_held(model):
        torch.func.functional_call(model, state, tuple(on_device(meta, t) for t in inputs))
    return recorder


@functools.cache
def _recorded_calls(arch: str, batch: int, image: int) -> tuple[ConvCase, ...]:
    """The op calls of fastres.models.<arch>, or of fastres.optimize(<arch>) for any other model
    name (fastres.bench.models.named_model: torchvision's, or timm's as "timm:<name>")."""
    from fastres.models import ARCHITECTURES

    if arch in ARCHITECTURES:
        with torch.device("meta"):
            model = ARCHITECTURES[arch]().eval()
    else:
        from fastres.bench.models import named_model
        from fastres.converter import optimize

        model = optimize(named_model(arch))
    x = torch.empty(batch, 3, image, image, device="meta")
    return tuple(record_meta_run(model, (x,), f"{arch}:").cases)


def _split(case: ConvCase, prefix: str) -> tuple[ConvCase, ...]:
    """A projected case as its two convs, named (after `prefix`) as the unfused model would name them."""
    if case.projection is None:
        return (case,)
    first, main = case.projection_case(), case.replace(projection=None)
    return (first.replace(name=_tag(prefix, first)), main.replace(name=_tag(prefix, main)))


def model_calls(arch: str, batch: int = 1, image: int = 224) -> tuple[ConvCase, ...]:
    """Every fused conv of model `arch` (a fastres.models name, or any named_model name) on a
    batch x 3 x image x image input, in call order (a projected call's projection just before its
    conv): the per-conv view, each one a conv_bn_act."""
    return tuple(conv for call in _recorded_calls(arch, batch, image) for conv in _split(call, f"{arch}:"))


def _distinct(cases) -> tuple[ConvCase, ...]:
    distinct: dict[ConvCase, ConvCase] = {}
    for case in cases:
        distinct.setdefault(case.replace(name=""), case)
    return tuple(distinct.values())


def model_cases(arch: str, batch: int = 1, image: int = 224) -> tuple[ConvCase, ...]:
    """The distinct fused convs of model `arch` (first occurrence of each; see model_calls)."""
    return _distinct(model_calls(arch, batch, image))


def model_projection_cases(arch: str, batch: int = 1, image: int = 224) -> tuple[ConvCase, ...]:
    """The distinct calls of model `arch` whose residual is projected (downsampling blocks)."""
    return _distinct(c for c in _recorded_calls(arch, batch, image) if c.projection is not None)


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
    # 20 groups of 4: a tile of several whole groups (PACK_GROUPS) ends past the last group
    ConvCase("odd:groups20-C4", 2, 80, 6, 5, 80, 3, 3, padding=(1, 1), groups=20),
    # 1x1 whose rows are whole 16-byte units (TMA-eligible) with an edge in M, N and the channels
    ConvCase("odd:1x1-C72-K36", 3, 72, 5, 7, 36, 1, 1),
    # no BN after the conv (VGG, squeeze-excite): no scale, the bias alone as the shift
    ConvCase("odd:bias-no-bn", 2, 16, 6, 7, 24, 3, 3, padding=(1, 1), bn=False),
    # LeakyReLU(0.1) after the add, as in DarkNet / CSPNet blocks (other cases run it at 0.01)
    ConvCase("odd:leaky0.1+res", 2, 24, 7, 6, 32, 3, 3, padding=(1, 1), residual=True, act="leaky_relu",
             negative_slope=0.1),
)


# Projected residuals a model zoo never makes: strides that differ per axis, a grouped or 3x3
# main conv, projection channels that take several masked BLOCK_K steps, other activations.
PROJECTION_ODD_CASES: tuple[ConvCase, ...] = (
    ConvCase("odd:proj-3x3-C20-from-C12s2", 2, 20, 7, 7, 36, 3, 3, padding=(1, 1), residual=True,
             projection=ProjectionCase(12, 13, 13, (2, 2))),
    ConvCase("odd:proj-1x1-stride2x1", 1, 24, 5, 9, 40, 1, 1, residual=True, projection=ProjectionCase(8, 9, 9, (2, 1))),
    ConvCase("odd:proj-groups4-relu6", 2, 16, 6, 6, 32, 3, 3, padding=(1, 1), groups=4, residual=True, act="relu6",
             projection=ProjectionCase(8, 6, 6)),
    ConvCase("odd:proj-C72-K20-none", 2, 12, 4, 6, 20, 1, 1, residual=True, act="none",
             projection=ProjectionCase(72, 7, 11, (2, 2))),
    ConvCase("odd:proj-1x1-leaky0.2", 2, 16, 5, 6, 24, 1, 1, residual=True, act="leaky_relu", negative_slope=0.2,
             projection=ProjectionCase(8, 10, 12, (2, 2))),
    # BNs folded into the convs' biases (torch.fx.experimental.optimization.fuse, quantization's fuse_modules)
    ConvCase("odd:proj-biases-only", 2, 10, 5, 7, 24, 3, 3, padding=(1, 1), residual=True, bn=False,
             projection=ProjectionCase(6, 9, 13, (2, 2), bn=False)),
)
