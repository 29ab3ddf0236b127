"""ResNet model zoo on fused blocks, with torchvision's exact architecture and state_dict keys.

    model = fastres.models.resnet50()
    model.load_state_dict(torchvision.models.resnet50(weights=...).state_dict())
    model.eval().half().cuda().to(memory_format=torch.channels_last)

`weights` is a state_dict, a path to one, or torchvision's weights for the architecture
(`torchvision.models.ResNet50_Weights.DEFAULT`, or its name, "DEFAULT"), which load as torchvision
loads them: from torch's hub cache, downloaded there the first time.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

from fastres.nn import BasicBlock, Bottleneck, _Fused, foldable, set_backend

__all__ = [
    "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "wide_resnet101_2", "ARCHITECTURES",
]


class ResNet(_Fused):
    """torchvision.models.ResNet with fused blocks; the stem conv+bn+relu is one fused op too."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: list[bool] | None = None,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes = 64
        self.dilation = 1
        replace_stride_with_dilation = replace_stride_with_dilation or [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                f"replace_stride_with_dilation should be None or a 3-element tuple, got {replace_stride_with_dilation}"
            )
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if not foldable(self.bn1):
            # stacklevel: the caller of a builder (resnet50(...) -> _build -> ResNet.__init__)
            warnings.warn(f"fastres.models: norm_layer makes {type(self.bn1).__name__} modules, not BatchNorms with "
                          "running statistics, which the fused op takes as its epilogue: the model runs unfused, as "
                          "torchvision's", RuntimeWarning, stacklevel=4)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                norm_layer(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                                dilation=self.dilation, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._conv_bn(self.conv1, self.bn1, x)
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def torchvision_weights(name: str, weights: Any) -> Any:
    """torchvision's weights enum member `weights` names for model `name` (a member, or its
    name: "DEFAULT", "IMAGENET1K_V2", "ResNet50_Weights.DEFAULT"), or None for a string that is a
    path. Another architecture's member is torchvision's TypeError; a string that is neither a file
    nor a name, a FileNotFoundError that lists the names."""
    is_member = hasattr(weights, "get_state_dict") and hasattr(weights, "meta")
    if not is_member and (not isinstance(weights, str) or os.path.exists(weights)):
        return None
    try:
        from torchvision.models import get_model_weights
    except ImportError:  # (a member comes with torchvision) without it, a name is a path that does not exist
        return None
    enum = get_model_weights(name)
    if not is_member and weights.removeprefix(f"{enum.__name__}.") not in enum.__members__:
        raise FileNotFoundError(f"weights {weights!r}: no such file, nor a name of torchvision's {enum.__name__} "
                                f"({', '.join(enum.__members__)})")
    return enum.verify(weights)


def _build(
    name: str, block, layers: list[int], weights: Any, backend: str, progress: bool = True, **kwargs: Any
) -> ResNet:
    named = torchvision_weights(name, weights) if weights is not None else None
    if named is not None:
        # torchvision's builders take the class count from the weights, and refuse another.
        classes = len(named.meta["categories"])
        if kwargs.setdefault("num_classes", classes) != classes:
            raise ValueError(f"The parameter 'num_classes' expected value {classes} but got {kwargs['num_classes']} "
                             "instead.")
    # Parameters made under torch.inference_mode would have no version counter for the BN fold cache.
    with torch.inference_mode(False):
        model = ResNet(block, layers, **kwargs)
        if named is not None:
            model.load_state_dict(named.get_state_dict(progress=progress, check_hash=True))
        elif weights is not None:
            state = weights if isinstance(weights, dict) else torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
    return set_backend(model, backend)


def _architecture(name: str, title: str, block, layers: list[int], **arch: Any) -> Callable[..., ResNet]:
    def build(weights=None, backend: str = "auto", progress: bool = True, **kwargs: Any) -> ResNet:
        return _build(name, block, layers, weights, backend, progress, **arch, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"{title} with fused blocks. weights: a state_dict or a path to one, with torchvision's keys, or "
        f"torchvision's weights for {name} (an enum member or its name, loaded as torchvision loads them, "
        f"`progress` its download bar); backend: the fused op's backend for every layer; other keyword "
        f"arguments as torchvision.models.{name}."
    )
    return build


resnet18 = _architecture("resnet18", "ResNet-18", BasicBlock, [2, 2, 2, 2])
resnet34 = _architecture("resnet34", "ResNet-34", BasicBlock, [3, 4, 6, 3])
resnet50 = _architecture("resnet50", "ResNet-50", Bottleneck, [3, 4, 6, 3])
resnet101 = _architecture("resnet101", "ResNet-101", Bottleneck, [3, 4, 23, 3])
resnet152 = _architecture("resnet152", "ResNet-152", Bottleneck, [3, 8, 36, 3])
resnext50_32x4d = _architecture("resnext50_32x4d", "ResNeXt-50 32x4d", Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4)
resnext101_32x8d = _architecture(
    "resnext101_32x8d", "ResNeXt-101 32x8d", Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=8
)
wide_resnet50_2 = _architecture("wide_resnet50_2", "Wide ResNet-50-2", Bottleneck, [3, 4, 6, 3], width_per_group=128)
wide_resnet101_2 = _architecture("wide_resnet101_2", "Wide ResNet-101-2", Bottleneck, [3, 4, 23, 3], width_per_group=128)


ARCHITECTURES: dict[str, Callable[..., ResNet]] = {
    f.__name__: f
    for f in (resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d,
              wide_resnet50_2, wide_resnet101_2)
}
