"""What one conv_bn_act call computes: argument normalisation, input validation and shape math.

Validation lives here and only here. The op's fake (meta) kernel and its real kernel both call
`check_inputs`, so eager, torch.compile and torch.export users get the same errors, worded the
way PyTorch's own conv2d words them where it has a message for the case.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

# "gelu" is GELU's exact (erf) form, F.gelu's default; "gelu_tanh" is F.gelu(approximate="tanh").
ACTIVATIONS: tuple[str, ...] = (
    "none", "relu", "relu6", "silu", "hardswish", "sigmoid", "hardsigmoid", "leaky_relu", "gelu", "gelu_tanh")
# F.leaky_relu's default; the op's negative_slope argument is read by act="leaky_relu" only.
DEFAULT_NEGATIVE_SLOPE = 0.01
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

IntPair = tuple[int, int]


def pair(value: int | Sequence[int], name: str) -> IntPair:
    """Normalise an int or an (h, w) pair, as nn.Conv2d accepts them."""
    if isinstance(value, int):
        return (value, value)
    values = tuple(value)
    if len(values) != 2 or not all(isinstance(v, int) for v in values):
        raise RuntimeError(
            f"expected {name} to be a single integer value or a list of 2 values to match the "
            f"convolution dimensions, but got {name}={list(values)}"
        )
    return values  # type: ignore[return-value]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_vector(name: str, v: torch.Tensor | None, weight: torch.Tensor) -> None:
    if v is None:
        return
    if v.dim() != 1 or v.shape[0] != weight.shape[0]:
        raise RuntimeError(
            f"Given weight of size {list(weight.shape)}, expected {name} to be 1-dimensional with "
            f"{weight.shape[0]} elements, but got {name} of size {list(v.shape)} instead"
        )
    if not v.dtype.is_floating_point:
        raise RuntimeError(f"expected {name} to be a floating-point tensor (float32 preferred), but got {_dtype_name(v.dtype)}")


def check_activation(act: str, negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> None:
    """Raise unless act is one of ACTIVATIONS; a negative_slope is for act="leaky_relu" only."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {', '.join(repr(a) for a in ACTIVATIONS)}, but got {act!r}")
    if act != "leaky_relu" and negative_slope != DEFAULT_NEGATIVE_SLOPE:
        raise ValueError(f"negative_slope={negative_slope} is only used by act='leaky_relu', but act={act!r}")


def act_text(act: str, negative_slope: float = DEFAULT_NEGATIVE_SLOPE) -> str:
    """An activation in words, LeakyReLU's slope included: 'relu', 'leaky_relu(0.1)'."""
    return f"{act}({negative_slope:g})" if act == "leaky_relu" else act


def output_hw(h: int, w: int, r: int, s: int, stride: IntPair, padding: IntPair, dilation: IntPair) -> IntPair:
    p = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    q = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    return p, q


@dataclass(frozen=True)
class Projection:
    """The optional 1x1 conv + BN the residual goes through before the add (a ResNet downsample
    branch): residual' = conv1x1(residual, weight, stride) * scale + shift."""

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    stride: IntPair = (1, 1)


def _check_projection(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, projection: Projection) -> None:
    pw = projection.weight
    if residual is None:
        raise RuntimeError("residual_weight was given without a residual to project")
    if residual.dim() != 4:
        raise RuntimeError(f"Expected 4D (batched) residual to project, but got residual of size: {list(residual.shape)}")
    if pw.dim() != 4 or pw.shape[0] != weight.shape[0] or pw.shape[1] != residual.shape[1] or tuple(pw.shape[2:]) != (1, 1):
        raise RuntimeError(
            f"Expected residual_weight of size {[weight.shape[0], residual.shape[1], 1, 1]} (a 1x1 conv from the "
            f"residual's {residual.shape[1]} channels to the output's {weight.shape[0]}), but got residual_weight of "
            f"size {list(pw.shape)}"
        )
    if pw.dtype != x.dtype:
        raise RuntimeError(f"Input type ({_dtype_name(x.dtype)}) and residual_weight type ({_dtype_name(pw.dtype)}) should be the same")
    if any(v <= 0 for v in projection.stride):
        raise RuntimeError("non-positive residual_stride is not supported")
    _check_vector("residual_scale", projection.scale, pw)
    _check_vector("residual_shift", projection.shift, pw)


def check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    residual: torch.Tensor | None,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    groups: int,
    act: str,
    projection: Projection | None = None,
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
) -> list[int]:
    """Validate one call and return the output size [N, K, P, Q]. Raises on any bad input."""
    if x.dim() != 4:
        raise RuntimeError(f"Expected 4D (batched) input to conv_bn_act, but got input of size: {list(x.shape)}")
    if weight.dim() != 4:
        raise RuntimeError(
            f"Expected 4D weight (out_channels, in_channels / groups, kH, kW) to conv_bn_act, "
            f"but got weight of size: {list(weight.shape)}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        supported = ", ".join(_dtype_name(d) for d in SUPPORTED_DTYPES)
        raise NotImplementedError(f'"conv_bn_act" not implemented for \'{_dtype_name(x.dtype)}\' (supported: {supported})')
    if weight.dtype != x.dtype:
        raise RuntimeError(f"Input type ({_dtype_name(x.dtype)}) and weight type ({_dtype_name(weight.dtype)}) should be the same")
    if projection is not None:
        _check_projection(x, weight, residual, projection)
    if residual is not None and residual.dtype != x.dtype:
        raise RuntimeError(
            f"Input type ({_dtype_name(x.dtype)}) and residual type ({_dtype_name(residual.dtype)}) should be the same"
        )
    projection_tensors = () if projection is None else (projection.weight, projection.scale, projection.shift)
    for t in (weight, scale, shift, residual, *projection_tensors):
        if t is not None and t.device != x.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, {x.device} and {t.device}!"
            )
    check_activation(act, negative_slope)
    if any(v <= 0 for v in stride):
        raise RuntimeError("non-positive stride is not supported")
    if any(v < 0 for v in padding):
        raise RuntimeError("negative padding is not supported")
    if any(v <= 0 for v in dilation):
        raise RuntimeError("non-positive dilation is not supported")
    if groups <= 0:
        raise RuntimeError("non-positive groups is not supported")
    if weight.shape[0] % groups != 0:
        raise RuntimeError(
            f"Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
            f"but got weight of size {list(weight.shape)} instead"
        )
    if x.shape[1] != weight.shape[1] * groups:
        raise RuntimeError(
            f"Given groups={groups}, weight of size {list(weight.shape)}, expected input{list(x.shape)} to have "
            f"{weight.shape[1] * groups} channels, but got {x.shape[1]} channels instead"
        )
    padded = (x.shape[2] + 2 * padding[0], x.shape[3] + 2 * padding[1])
    kernel = (dilation[0] * (weight.shape[2] - 1) + 1, dilation[1] * (weight.shape[3] - 1) + 1)
    if padded[0] < kernel[0] or padded[1] < kernel[1]:
        raise RuntimeError(
            f"Calculated padded input size per channel: ({padded[0]} x {padded[1]}). Kernel size: "
            f"({kernel[0]} x {kernel[1]}). Kernel size can't be greater than actual input size"
        )
    _check_vector("scale", scale, weight)
    _check_vector("shift", shift, weight)
    p, q = output_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding, dilation)
    out_shape = [x.shape[0], weight.shape[0], p, q]
    if projection is not None:
        projected = [residual.shape[0], weight.shape[0],
                     *output_hw(residual.shape[2], residual.shape[3], 1, 1, projection.stride, (0, 0), (1, 1))]
        if projected != out_shape:
            raise RuntimeError(
                f"Expected the projected residual to have the output's size {out_shape}, but residual of size "
                f"{list(residual.shape)} with residual_stride={list(projection.stride)} gives {projected}"
            )
    elif residual is not None and list(residual.shape) != out_shape:
        raise RuntimeError(
            f"Expected residual of size {out_shape} (the output's size), but got residual of size {list(residual.shape)}"
        )
    return out_shape


def empty_output(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The op's output: channels_last (NHWC), same dtype and device as x."""
    return torch.empty(list(shape), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


@dataclass(frozen=True)
class ConvProblem:
    """The shape-defining facts of one call: what backends dispatch and tuning caches key on."""

    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: IntPair
    padding: IntPair
    dilation: IntPair
    groups: int
    dtype: torch.dtype
    has_scale: bool
    has_shift: bool
    has_residual: bool
    act: str
    # The residual's 1x1 conv + BN, itself a conv_bn_act problem (no residual, no activation).
    projection: ConvProblem | None = None
    # LeakyReLU's slope (DEFAULT_NEGATIVE_SLOPE for other activations). Not in `key`: tuning
    # decisions do not depend on it.
    negative_slope: float = DEFAULT_NEGATIVE_SLOPE

    # cached_property writes the instance __dict__ directly, so it works on a frozen dataclass;
    # these are read several times per op call (dispatch, tuning keys, launch).
    @cached_property
    def p(self) -> int:
        return output_hw(self.h, self.w, self.r, self.s, self.stride, self.padding, self.dilation)[0]

    @cached_property
    def q(self) -> int:
        return output_hw(self.h, self.w, self.r, self.s, self.stride, self.padding, self.dilation)[1]

    @property
    def output_shape(self) -> list[int]:
        return [self.n, self.k, self.p, self.q]

    @property
    def c_per_group(self) -> int:
        return self.c // self.groups

    @property
    def k_per_group(self) -> int:
        return self.k // self.groups

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.c_per_group == 1

    @property
    def accumulated(self) -> int:
        """Products summed into each output: C/groups * R * S, plus the projection's channels."""
        return self.c_per_group * self.r * self.s + (0 if self.projection is None else self.projection.c)

    @property
    def flops(self) -> int:
        """2 * MACs of the convolution and its projection (the epilogue's few ops per output are not counted)."""
        own = 2 * self.n * self.p * self.q * self.k * self.c_per_group * self.r * self.s
        return own + (0 if self.projection is None else self.projection.flops)

    @cached_property
    def key(self) -> str:
        """Stable text key for tuning caches: every shape-defining argument, the dtype and the epilogue."""
        flags = "".join(f for f, on in (("S", self.has_scale), ("B", self.has_shift), ("R", self.has_residual)) if on)
        return (
            f"n{self.n}c{self.c}h{self.h}w{self.w}k{self.k}r{self.r}s{self.s}"
            f"st{self.stride[0]}x{self.stride[1]}pd{self.padding[0]}x{self.padding[1]}"
            f"dl{self.dilation[0]}x{self.dilation[1]}g{self.groups}"
            f"-{_dtype_name(self.dtype)}-{flags or 'plain'}-{self.act}"
            + ("" if self.projection is None else f"-proj[{self.projection.key}]")
        )

    @property
    def main(self) -> ConvProblem:
        """This conv with its residual taken as given: what runs after the projection, split apart."""
        return dataclasses.replace(self, projection=None)

    @classmethod
    def from_tensors(
        cls,
        x: torch.Tensor,
        weight: torch.Tensor,
        scale: torch.Tensor | None,
        shift: torch.Tensor | None,
        residual: torch.Tensor | None,
        stride: IntPair,
        padding: IntPair,
        dilation: IntPair,
        groups: int,
        act: str,
        projection: Projection | None = None,
        negative_slope: float = DEFAULT_NEGATIVE_SLOPE,
    ) -> ConvProblem:
        """Validate (see check_inputs) and describe one call."""
        check_inputs(x, weight, scale, shift, residual, stride, padding, dilation, groups, act, projection,
                     negative_slope)
        n, c, h, w = (int(v) for v in x.shape)
        k, _, r, s = (int(v) for v in weight.shape)
        projected = None
        if projection is not None:
            projected = cls(
                n, *(int(v) for v in residual.shape[1:]), k, 1, 1, tuple(projection.stride), (0, 0), (1, 1), 1, x.dtype,
                projection.scale is not None, projection.shift is not None, False, "none",
            )
        return cls(
            n, c, h, w, k, r, s, tuple(stride), tuple(padding), tuple(dilation), int(groups), x.dtype,
            scale is not None, shift is not None, residual is not None, act, projected, float(negative_slope),
        )
