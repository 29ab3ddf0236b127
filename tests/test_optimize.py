"""fastres.optimize on real model zoos and on hand-written models covering every pattern it
fuses and every one it must leave alone: same answers, same state_dict keys, a truthful report."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import io
import random
import re
import threading
import warnings
from collections import OrderedDict, defaultdict
from pathlib import Path

import numpy
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fastres
from fastres.converter import FusedConvBN
from fastres.problem import ACTIVATIONS
from fastres.shapes import ConvCallRecorder, ProjectionCase, randomize_batchnorm_, record_meta_run
from fastres.verification import output_leaves, placed_otherwise
from helpers import (INTERPRETER, Features, HookLog, SamplesInEval, assert_hooks_saw_the_same, hooked_run,
                     overflowing_fp16_model, register_hook)


def _check(model: nn.Module, x: torch.Tensor, fused: int | None, total: int | None = None, **kwargs) -> nn.Module:
    model = randomize_batchnorm_(model).eval()
    keys = set(model.state_dict())
    with torch.no_grad():
        expected = model(x)
        optimized = fastres.optimize(model, **kwargs)
        got = optimized(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    report = optimized.fastres_report
    if fused is not None:
        assert len(report.fused) == fused, str(report)
    if total is not None:
        assert len(report.entries) == total, str(report)
    assert set(optimized.state_dict()) == keys
    own_ops = [w for w in (report.entries[n] for n in report.fused)
               if w != "fused: already a fastres module" and "projected residual" not in w]
    assert sum(isinstance(m, FusedConvBN) for m in optimized.modules()) == len(own_ops)
    return optimized


def _torchvision_extractor() -> nn.Module:
    from torchvision.models.feature_extraction import create_feature_extractor

    model = randomize_batchnorm_(torchvision.models.resnet50()).eval()
    return create_feature_extractor(model, {"layer2": "mid", "layer3": "late", "layer4": "features"})


def _timm_hook_features() -> nn.Module:
    timm = pytest.importorskip("timm")
    return randomize_batchnorm_(
        timm.create_model("resnet50", features_only=True, feature_cls="hook", out_indices=(1, 2, 3))).eval()


@pytest.mark.parametrize("make", [_torchvision_extractor, _timm_hook_features],
                         ids=["torchvision-create_feature_extractor", "timm-FeatureHookNet"])
def test_feature_extractors_fuse_every_conv_and_return_eagers_features(make):
    """torchvision's extractor (a DualGraphModule) comes back from copy.deepcopy in train mode
    with its train graph: optimize's copy keeps the model's modes. timm's FeatureHookNet returns
    what forward hooks (partials of a FeatureHooks object it holds) collected: the copy's hooks
    write into the copy's FeatureHooks, and a trace that froze the collected list (an output that
    reads no input) is not used; its stages are fused one by one, hooks and all."""
    model = make()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        optimized = fastres.optimize(model)
        with ConvCallRecorder() as calls:
            got = optimized(x)
    assert len(optimized.fastres_report.fused) == len(optimized.fastres_report.entries) == 53
    assert len(calls.calls) == 49 and len(got) == len(expected) == 3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("trace", ["create_feature_extractor", "symbolic_trace"])
def test_tracing_an_optimized_model_with_torch_fx_is_refused_in_words(trace):
    """Traced again, an optimized model's flat graph has no node for `layer4`'s output: the
    extractor would return layer4's last BN, before its add and ReLU. Refused, with what to do."""
    from torchvision.models.feature_extraction import create_feature_extractor

    optimized = fastres.optimize(torchvision.models.resnet18().eval())
    with pytest.raises(torch.fx.proxy.TraceError, match=r"its graph is flat, .* Trace the original model \(e.g. "
                                                        r"create_feature_extractor\(model, return_nodes\)\), then "
                                                        r"fastres.optimize what that gives"):
        if trace == "symbolic_trace":
            torch.fx.symbolic_trace(optimized)
        else:
            create_feature_extractor(optimized, {"layer4": "features"})


def _faster_rcnn() -> tuple[nn.Module, list[torch.Tensor]]:
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=128, max_size=160)
    return model, [torch.rand(3, 128, 160), torch.rand(3, 96, 128)]


def _deeplab() -> tuple[nn.Module, torch.Tensor]:
    return torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5), \
        torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("make", [_faster_rcnn, _deeplab], ids=["faster-rcnn-fpn", "deeplabv3-dilated"])
def test_detection_and_segmentation_models_fuse_their_resnet_backbone(make):
    """Faster R-CNN (FrozenBatchNorm2d backbone behind IntermediateLayerGetter and an FPN, an
    untraceable top level over lists of images) and DeepLabV3 (dilation 2 and 4 in its last
    stages): every backbone conv fuses, and the detections and masks are eager's. Optimized before
    its first call, as a freshly loaded model is: Faster R-CNN's MultiScaleRoIAlign caches its
    scales into itself on that call, which tracing must not do with its Proxies."""
    torch.manual_seed(0)
    model, x = make()
    model = randomize_batchnorm_(model).eval()
    with torch.no_grad():
        optimized = fastres.optimize(model)
        expected = model(x)
        got = optimized(x)
    backbone = [name for name in optimized.fastres_report.entries if name.startswith("backbone.")]
    assert len(backbone) >= 53 and all(
        optimized.fastres_report.entries[name].startswith("fused") for name in backbone if ".fpn." not in name)
    assert isinstance(optimized, type(model))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("arch,convs", [("resnet18", 20), ("resnet50", 53), ("resnext50_32x4d", 53), ("wide_resnet50_2", 53)])
def test_torchvision_resnets_are_fully_fused(arch, convs):
    torch.manual_seed(0)
    optimized = _check(getattr(torchvision.models, arch)(), torch.randn(2, 3, 64, 64), fused=convs, total=convs)
    report = optimized.fastres_report
    assert report.entries["conv1"] == "fused: conv+bn+relu"
    last = "layer2.0.conv3" if arch != "resnet18" else "layer2.0.conv2"
    assert report.entries[last] == "fused: conv+bn+add+relu"
    assert report.entries["layer2.0.downsample.0"] == f"fused: conv+bn, the projected residual of {last} (one op)"
    with ConvCallRecorder() as calls, torch.no_grad():
        optimized(torch.randn(1, 3, 32, 32))
    downsamples = 3 if arch == "resnet18" else 4
    assert len(calls.cases) == convs - downsamples
    assert sum(c.projection is not None for c in calls.cases) == downsamples


@pytest.mark.parametrize("arch,convs", [("alexnet", 5), ("vgg11", 8), ("squeezenet1_0", 26)])
def test_torchvision_nets_without_batchnorm_fuse_conv_bias_and_relu(arch, convs):
    torch.manual_seed(0)
    optimized = _check(getattr(torchvision.models, arch)(), torch.randn(2, 3, 64, 64), fused=convs, total=convs)
    assert set(optimized.fastres_report.entries.values()) == {"fused: conv+relu"}


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet18d", "resnext50_32x4d", "seresnet50"])
def test_timm_resnets(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    optimized = _check(model, torch.randn(2, 3, 64, 64), fused=convs, total=convs)
    entries = optimized.fastres_report.entries
    for gate in [n for n in entries if n.endswith(".se.fc2")]:  # squeeze-excite: no BN, bias + act
        assert entries[gate.replace("fc2", "fc1")] == "fused: conv+relu"
        assert entries[gate] == "fused: conv+sigmoid"


def test_the_optimized_model_is_still_an_instance_of_its_class_with_its_attributes():
    """timm's inference scripts read model.pretrained_cfg (resolve_data_config: input size, mean,
    std) and call forward_features / get_classifier: they must find the model's own, also in a
    deepcopy (EMA, checkpoints)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained_cfg_overlay=dict(input_size=(3, 160, 160), mean=(0.5,) * 3))
    model = randomize_batchnorm_(model).eval()
    optimized = fastres.optimize(model)
    x = torch.randn(2, 3, 32, 32)
    for fast in (optimized, copy.deepcopy(optimized)):
        assert isinstance(fast, type(model)) and type(fast).__name__ == "ResNet"
        assert timm.data.resolve_data_config(model=fast) == timm.data.resolve_data_config(model=model)
        assert fast.num_classes == model.num_classes and fast.get_classifier() is fast.fc
        with torch.no_grad():
            torch.testing.assert_close(fast.forward_features(x), model.forward_features(x), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["regnety_002", "efficientnet_b0", "mobilenetv3_small_100", "mixnet_s"])
def test_timm_models_built_on_batchnorm_act_modules(name):
    """timm builds these with BatchNormAct2d (BN, drop and act in one module): every conv with a BN
    fuses, so do the convs without one that an activation follows (squeeze-excite's two convs,
    MobileNetV3's head), RegNet's downsample becomes a projection, and MixNet's convs concatenated
    before one BN (MixedConv2d) each fuse with their slice of it."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    optimized = _check(model, torch.randn(2, 3, 64, 64), fused=convs, total=convs)
    assert not any(type(m).__name__ == "_NormOf" for m in optimized.modules())  # fused views are gone
    entries = optimized.fastres_report.entries
    if name == "regnety_002":
        assert entries["s1.b1.conv3.conv"] == "fused: conv+bn+add+relu"
        assert entries["s1.b1.downsample.conv"] == "fused: conv+bn, the projected residual of s1.b1.conv3.conv (one op)"
        assert entries["s1.b1.se.fc1"] == "fused: conv+relu" and entries["s1.b1.se.fc2"] == "fused: conv+sigmoid"
    if name == "efficientnet_b0":
        assert entries["conv_stem"] == "fused: conv+bn+silu"
        assert entries["blocks.1.1.conv_pwl"] == "fused: conv+bn+add"
        assert entries["blocks.1.1.se.conv_reduce"] == "fused: conv+silu"
        assert entries["blocks.1.1.se.conv_expand"] == "fused: conv+sigmoid"
    if name == "mixnet_s":
        assert entries["blocks.2.0.conv_dw.1"] == "fused: conv+bn+silu"  # the 5x5 of a MixedConv2d's three
    if name == "mobilenetv3_small_100":
        assert entries["conv_stem"] == "fused: conv+bn+hardswish"
        assert entries["conv_head"] == "fused: conv+hardswish"
        assert entries["blocks.0.0.se.conv_expand"] == "fused: conv+hardsigmoid"


def _norm_act(kind: str, act: nn.Module | None, drop: nn.Module | None = None):
    """timm's BatchNorm + activation module of `kind` with channels as its one argument."""
    layers = pytest.importorskip("timm.layers")

    def make(channels: int) -> nn.Module:
        apply = act is not None
        act_layer = type(act) if apply else nn.ReLU
        drop_layer = (lambda: drop) if drop is not None else None
        if kind == "frozen":
            return layers.FrozenBatchNormAct2d(channels, apply_act=apply, act_layer=act_layer, drop_layer=drop_layer)
        module = layers.BatchNormAct2d(channels, apply_act=apply, act_layer=act_layer, drop_layer=drop_layer)
        return layers.convert_sync_batchnorm(module) if kind == "sync" else module

    return make


class NormActBlock(nn.Module):
    """conv -> BN+act, then conv -> BN (no act) -> + x -> act, with timm's norm + act modules."""

    def __init__(self, make_norm_act, make_tail_norm, act: nn.Module):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), make_norm_act(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), make_tail_norm(8)
        self.act = act

    def forward(self, x):
        return self.act(self.bn2(self.conv2(self.bn1(self.conv1(x)))) + x)


@pytest.mark.parametrize("kind", ["batchnorm", "frozen", "sync"])
@pytest.mark.parametrize("act", [nn.ReLU(), nn.SiLU()], ids=["relu", "silu"])
def test_batchnorm_act_modules_split_into_norm_and_act(kind, act):
    block = NormActBlock(_norm_act(kind, act), _norm_act(kind, None), act)
    optimized = _check(block, torch.randn(2, 8, 6, 6), fused=2, total=2)
    name = "relu" if isinstance(act, nn.ReLU) else "silu"
    assert optimized.fastres_report.entries == {"conv1": f"fused: conv+bn+{name}", "conv2": f"fused: conv+bn+add+{name}"}


@pytest.mark.parametrize("act,name", [("GELUTanh", "gelu_tanh"), ("GELU", "gelu"), ("Sigmoid", "sigmoid")])
def test_timm_activation_modules_fuse_as_the_function_they_call(act, name):
    """timm's own activation modules (a BatchNormAct2d's act when a model asks for "gelu_tanh", ...)
    each call one of the op's activations: they fuse as that one."""
    activations = pytest.importorskip("timm.layers.activations")
    module = getattr(activations, act)()
    block = NormActBlock(_norm_act("batchnorm", module), _norm_act("batchnorm", None), module)
    optimized = _check(block, torch.randn(2, 8, 6, 6), fused=2, total=2)
    assert optimized.fastres_report.entries == {
        "conv1": f"fused: conv+bn+{name}", "conv2": f"fused: conv+bn+add+{name}"}


class OneCall(nn.Module):
    def forward(self, x):
        return F.hardswish(x)


class TwoCalls(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class WithState(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), 2.0))

    def forward(self, x):
        return F.silu(x * self.scale)


class CallsAChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x)


@pytest.mark.parametrize("act,entries", [
    (OneCall, ("fused: conv+bn+hardswish", "fused: conv+bn+add+hardswish")),
    (TwoCalls, ("fused: conv+bn", "fused: conv+bn+add")),
    (WithState, ("fused: conv+bn", "fused: conv+bn+add")),
    # in a BatchNormAct2d the module is one call, and fusing it would skip its child's hooks; at
    # the block's end it is traced into, and its child is the ReLU
    (CallsAChild, ("fused: conv+bn", "fused: conv+bn+add+relu")),
], ids=lambda v: getattr(v, "__name__", ""))
def test_a_users_activation_module_fuses_when_its_forward_is_one_of_the_ops_activations(act, entries):
    """A user's activation module, as timm's BatchNormAct2d's act and after the block's add: one
    whose forward is one call of the op's activations is that activation; others run as they are,
    after the fused chain."""
    block = NormActBlock(_norm_act("batchnorm", act()), _norm_act("batchnorm", None), act())
    optimized = _check(block, torch.randn(2, 8, 6, 6), fused=2, total=2)
    assert optimized.fastres_report.entries == dict(zip(("conv1", "conv2"), entries))


def test_batchnorm_act_with_a_drop_layer_fuses_only_the_norm():
    """A drop layer (identity in eval, not in training) stays in the graph: the act after it is
    not fused, and the model trains as before."""
    block = NormActBlock(_norm_act("batchnorm", nn.SiLU(), drop=nn.Dropout(0.5)), _norm_act("batchnorm", None),
                         nn.ReLU())
    optimized = _check(block, torch.randn(2, 8, 6, 6), fused=2, total=2, channels_last=False)  # same dropout masks
    assert optimized.fastres_report.entries["conv1"] == "fused: conv+bn"
    optimized.train()
    torch.manual_seed(0)
    got = optimized(torch.ones(2, 8, 6, 6))
    torch.manual_seed(0)
    torch.testing.assert_close(got, block.train()(torch.ones(2, 8, 6, 6)))


def test_batchnorm_act_modules_train_with_their_act_applied_once():
    """Train mode runs the eager chain: SiLU once (not again as the chain's act), statistics
    updated in the original modules."""
    block = randomize_batchnorm_(NormActBlock(_norm_act("batchnorm", nn.SiLU()), _norm_act("batchnorm", None),
                                              nn.SiLU())).eval()
    optimized = fastres.optimize(block, channels_last=False).train()
    eager = copy.deepcopy(block).train()
    x = torch.randn(4, 8, 6, 6)
    torch.testing.assert_close(optimized(x), eager(x))
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(optimized.state_dict()[key], value)


def test_a_batchnorm_act_subclass_with_its_own_forward_is_not_split():
    layers = pytest.importorskip("timm.layers")

    class Doubled(layers.BatchNormAct2d):
        def forward(self, x):
            return 2 * super().forward(x)

    block = NormActBlock(lambda c: Doubled(c, act_layer=nn.ReLU), _norm_act("batchnorm", None), nn.ReLU())
    optimized = _check(block, torch.randn(2, 8, 6, 6), fused=1, total=2)
    assert "eager" in optimized.fastres_report.entries["conv1"]


# --- hand-written patterns ------------------------------------------------------------------

class Block(nn.Module):
    """A residual block whose add and activation are written the way `style` says."""

    def __init__(self, style: str, bn=nn.BatchNorm2d, bias: bool = False, act: str = "relu"):
        super().__init__()
        self.style, self.act_name = style, act
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=bias)
        self.bn1 = bn(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding="same", bias=bias)
        self.bn2 = bn(8)
        self.relu = nn.ReLU(inplace=True)  # one module used twice
        self.act = {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "silu": nn.SiLU(), "hardswish": nn.Hardswish(),
                    "sigmoid": nn.Sigmoid(), "hardsigmoid": nn.Hardsigmoid(), "leaky_relu": nn.LeakyReLU(0.2),
                    "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh")}[act]

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.style == "iadd":
            out += x
            return self.relu(out)
        if self.style == "add-functional-relu":
            return F.relu(out + x)
        if self.style == "reversed-torch-add":
            return torch.relu(torch.add(x, out))
        if self.style == "method-add-relu":
            return out.add(x).relu()
        if self.style == "act-module":
            return self.act(out + x)
        raise ValueError(self.style)


PATTERNS = ["iadd", "add-functional-relu", "reversed-torch-add", "method-add-relu"]


@pytest.mark.parametrize("style", PATTERNS)
def test_each_add_and_relu_spelling_is_fused(style):
    optimized = _check(Block(style), torch.randn(2, 8, 6, 6), fused=2, total=2)
    assert optimized.fastres_report.entries["conv2"] == "fused: conv+bn+add+relu"


@pytest.mark.parametrize("act", [a for a in ACTIVATIONS if a not in ("none", "relu")])
def test_other_activations(act):
    optimized = _check(Block("act-module", act=act), torch.randn(2, 8, 6, 6), fused=2)
    in_words = "leaky_relu(0.2)" if act == "leaky_relu" else act
    assert optimized.fastres_report.entries["conv2"] == f"fused: conv+bn+add+{in_words}"


class LeakyReLUs(nn.Module):
    """LeakyReLU spelled each way, each with its own slope; the last one's slope is computed in forward."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1, bias=False) for _ in range(5))
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(5))
        self.leaky = nn.LeakyReLU()

    def forward(self, x):
        computed = x.abs().mean().item() * 0.1
        acts = [lambda z: self.leaky(z), lambda z: F.leaky_relu(z, 0.1),
                lambda z: F.leaky_relu(z, negative_slope=0.3, inplace=True), lambda z: F.leaky_relu_(z, -0.5),
                lambda z: F.leaky_relu(z, computed)]
        for conv, bn, act in zip(self.convs, self.bns, acts):
            x = act(bn(conv(x)))
        return x


def test_leaky_relu_fuses_with_its_own_slope():
    """Module, function, keyword, in-place and F.leaky_relu_ spellings each fuse with their slope
    (eager's answers, checked); a slope computed in forward is a graph value, not one the op can take."""
    optimized = _check(LeakyReLUs(), torch.randn(2, 8, 6, 6), fused=5, total=5)
    assert list(optimized.fastres_report.entries.values()) == [
        "fused: conv+bn+leaky_relu(0.01)", "fused: conv+bn+leaky_relu(0.1)", "fused: conv+bn+leaky_relu(0.3)",
        "fused: conv+bn+leaky_relu(-0.5)",
        "fused: conv+bn (then leaky_relu with a slope computed in forward, not one of the op's activations, "
        "runs eagerly)"]


class GELUs(nn.Module):
    """GELU as a module and as F.gelu, in its exact form and its tanh approximation."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1, bias=False) for _ in range(4))
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(4))
        self.exact, self.tanh = nn.GELU(), nn.GELU(approximate="tanh")

    def forward(self, x):
        acts = [self.exact, lambda z: F.gelu(z, approximate="none"), self.tanh, lambda z: F.gelu(z, approximate="tanh")]
        for conv, bn, act in zip(self.convs, self.bns, acts):
            x = act(bn(conv(x)))
        return x


def test_both_gelu_forms_fuse_as_their_own_activation():
    optimized = _check(GELUs(), torch.randn(2, 8, 6, 6), fused=4, total=4)
    assert list(optimized.fastres_report.entries.values()) == [
        "fused: conv+bn+gelu", "fused: conv+bn+gelu", "fused: conv+bn+gelu_tanh", "fused: conv+bn+gelu_tanh"]


def test_timm_efficientvit_l_fuses_its_tanh_gelus():
    """EfficientViT-L (MIT) ends its ConvNormAct blocks with GELU's tanh form: each conv fuses with it."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("efficientvit_l1", pretrained=False)
    optimized = _check(model, torch.randn(1, 3, 64, 64), fused=None)
    entries = optimized.fastres_report.entries
    expected = {f"{name}.conv": f"fused: conv+{'bn+' if isinstance(m.norm, nn.BatchNorm2d) else ''}gelu_tanh"
                for name, m in model.named_modules() if isinstance(getattr(m, "act", None), timm.layers.GELUTanh)}
    assert len(expected) >= 30 and {name: entries[name] for name in expected} == expected


@pytest.mark.parametrize("name,image", [("repvit_m1", 64), ("efficientformer_l1", 224)])
def test_timm_models_with_gelu(name, image):
    """RepViT and EfficientFormer follow their BNs with (exact) GELU: every conv fuses, its GELU too."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    optimized = _check(model, torch.randn(1, 3, image, image), fused=convs, total=convs)
    entries = optimized.fastres_report.entries.values()
    assert not any("runs eagerly" in what for what in entries)
    assert sum(what.endswith("+gelu") for what in entries) >= 10


@pytest.mark.parametrize("name", ["cspresnet50", "darknet53", "tresnet_m"])
def test_timm_models_with_leaky_relu(name):
    """CSPNet, DarkNet and TResNet follow their BNs with LeakyReLU (TResNet at two slopes): each
    fuses into its conv's op, none runs as a pass of its own."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    optimized = _check(model, torch.randn(2, 3, 64, 64), fused=convs, total=convs)
    entries = optimized.fastres_report.entries.values()
    assert not any("runs eagerly" in what for what in entries)
    slopes = {what.split("leaky_relu")[1] for what in entries if "leaky_relu" in what}
    assert slopes == ({"(0.01)", "(0.001)"} if name == "tresnet_m" else {"(0.01)"})


@pytest.mark.parametrize("name,image,chain", [
    ("efficientvit_m0", 64, "stages.1.downsample.res2.0.m.conv"), ("shvit_s1", 64, "stages.1.downsample.3.m.c"),
    ("efficientvim_m1", 64, "stages.0.downsample.dwconv2.conv"), ("pit_xs_224", 224, "patch_embed.conv"),
    ("visformer_tiny", 224, "patch_embed1.proj")])
def test_timm_models_whose_residual_is_the_chains_input_or_a_position_embedding(name, image, chain):
    """EfficientViT (MSRA), SHViT and EfficientViM add a conv + BN's output to what it computed from
    it (`y + bn(conv(y))`: not a projection branch); PiT and Visformer add a (1, C, H, W) position
    embedding to their patch embedding's conv (a residual broadcast over the batch): `chain` fuses
    with its add, and the model gives eager's answers with no warning."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        optimized = _check(model, torch.randn(2, 3, image, image), fused=None)
    assert re.fullmatch(r"fused: conv(\+bn)?\+add", optimized.fastres_report.entries[chain])


class ReadsANonPersistentBuffer(nn.Module):
    """A buffer outside the state_dict that the forward reads (timm's attention_bias_idxs)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.register_buffer("offset", torch.linspace(-1, 1, 8).view(1, 8, 1, 1), persistent=False)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x))) + self.offset


def test_a_buffer_outside_the_state_dict_stays_outside():
    """The graph reads it, and fx's GraphModule (torch 2.11) would register it as persistent: the
    optimized model's state_dict would gain a key the model's own lacks."""
    optimized = _check(ReadsANonPersistentBuffer(), torch.randn(2, 3, 4, 4), fused=1)
    assert "offset" not in optimized.state_dict() and "offset" in dict(optimized.named_buffers())


def test_convs_with_bias_and_frozen_batchnorm():
    from torchvision.ops.misc import FrozenBatchNorm2d

    _check(Block("iadd", bn=FrozenBatchNorm2d, bias=True), torch.randn(2, 8, 6, 6), fused=2)


def test_batchnorm_subclasses():
    class MyBN(nn.BatchNorm2d):
        pass

    _check(Block("iadd", bn=MyBN), torch.randn(2, 8, 6, 6), fused=2)


class StandardizedConv(nn.Conv2d):
    """A conv whose forward standardizes its weights first, as timm's StdConv2d (BiT, hybrid ViTs)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.var(dim=(1, 2, 3), keepdim=True) + 1e-5).sqrt()
        return self._conv_forward(x, w, self.bias)


class ScaledConv(nn.Conv2d):
    """A conv that changes its weight in _conv_forward, which nn.Conv2d's forward calls."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight * 2, bias)


class Unfusable(nn.Module):
    """Chains fastres must leave alone, each for a reason the report names."""

    def __init__(self):
        super().__init__()
        self.elu = nn.Conv2d(4, 8, 3, padding=1)
        self.bn_first = nn.BatchNorm2d(8)
        self.after_bn = nn.Conv2d(8, 8, 1)
        self.used_twice = nn.Conv2d(8, 8, 1)
        self.bn_twice = nn.BatchNorm2d(8)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.bn_reflect = nn.BatchNorm2d(8)
        self.no_stats = nn.Conv2d(8, 8, 1)
        self.bn_no_stats = nn.BatchNorm2d(8, track_running_stats=False)
        self.standardized, self.bn_standardized = StandardizedConv(8, 8, 1), nn.BatchNorm2d(8)
        self.scaled, self.bn_scaled = ScaledConv(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = F.elu(self.elu(x))
        y = self.after_bn(self.bn_first(y))
        t = self.used_twice(y)
        y = self.bn_twice(t) + t
        y = self.bn_reflect(self.reflect(y))
        y = self.bn_no_stats(self.no_stats(y))
        y = F.relu(self.bn_standardized(self.standardized(y)))
        return F.relu(self.bn_scaled(self.scaled(y)))


class SharedConv(nn.Module):
    """One conv called on two inputs, each call ending its own chain (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn1(self.conv(x))) + torch.sigmoid(self.bn2(self.conv(x * 2)))


class SharedHead(nn.Module):
    """One head run on every level of a feature pyramid (RetinaNet's head does this)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x):
        return [self.head(level) for level in (x, F.avg_pool2d(x, 2), F.avg_pool2d(x, 4))]


@pytest.mark.parametrize("make,calls,entry", [
    (SharedConv, 2, "fused: its 2 calls: fused: conv+bn+relu | fused: conv+bn+sigmoid"),
    (SharedHead, 3, "fused: conv+relu (each of its 3 calls)"),
], ids=["two-chains", "one-chain-three-times"])
def test_a_conv_called_more_than_once_fuses_each_call_as_its_own_chain(make, calls, entry):
    """Each call of a shared conv gets its own fused op (one module per call: a second chain must
    not overwrite the first's BN or activation), and the report says what each call became."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(make()).eval()
    x = torch.randn(2, 3, 8, 8)
    optimized = fastres.optimize(model, channels_last=False)
    with torch.no_grad(), ConvCallRecorder() as recorded:
        torch.testing.assert_close(optimized(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(recorded.calls) == sum(isinstance(m, FusedConvBN) for m in optimized.modules()) == calls
    assert next(iter(optimized.fastres_report.entries.values())) == entry


class AddsInPlaceIntoItsResidual(nn.Module):
    """`residual += chain` (or .add_) writes into the residual's tensor: in eager, another name for
    it, or the model's input itself, sees the write."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        if self.style == "into-the-input":
            x += self.bn(self.conv(x))
            return F.relu(x)
        residual = x * 1
        kept = residual
        if self.style == "aliased-iadd":
            residual += self.bn(self.conv(x))
        else:
            residual.add_(self.bn(self.conv(x)))
        return F.relu(residual) + kept


@pytest.mark.parametrize("style", ["aliased-iadd", "aliased-add_", "into-the-input"])
def test_an_in_place_add_into_the_residual_stays_in_place(style):
    """fx alone would trace `a += b` as `a = a + b` and lose the write; optimize's tracer keeps it,
    and such an add is not fused (the op would leave the residual as it was)."""
    model = randomize_batchnorm_(AddsInPlaceIntoItsResidual(style)).eval()
    x = torch.randn(2, 8, 6, 6)
    eager_input, fused_input = x.clone(), x.clone()
    with torch.no_grad():
        expected = model(eager_input)
        optimized = fastres.optimize(model, channels_last=False)
        torch.testing.assert_close(optimized(fused_input), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_input, eager_input, rtol=1e-5, atol=1e-5)
    assert optimized.fastres_report.entries["conv"] == "fused: conv+bn"


class SwitchesAModeInside(nn.Module):
    """A forward that switches a global mode around its own chain (`block`) or around a child
    model's call (`child`): torch.fx records neither the `with` block nor a decorator."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.child = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())

    def _chain(self, x):
        return self.child(F.relu(self.bn(self.conv(x))))

    def forward(self, x):
        if self.style == "no_grad-block":
            with torch.no_grad():
                y = F.relu(self.bn(self.conv(x)))
            return self.child(y)
        if self.style == "autocast-block":
            y = F.relu(self.bn(self.conv(x)))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.child(y)
        if self.style == "set_grad_enabled-call":
            torch.set_grad_enabled(False)
            try:
                return self._chain(x)
            finally:
                torch.set_grad_enabled(True)
        return getattr(self, self.style)(x)

    @torch.autocast("cpu", dtype=torch.bfloat16)
    def autocast_decorated(self, x):
        return self._chain(x)

    @torch.inference_mode()
    def inference_mode_decorated(self, x):
        return self._chain(x)


@pytest.mark.parametrize("style", ["no_grad-block", "autocast-block", "set_grad_enabled-call", "autocast_decorated",
                                   "inference_mode_decorated"])
def test_a_forward_that_switches_grad_mode_or_autocast_is_not_traced(style):
    """fx would trace through the switch and the graph would run without it: float32 where eager
    gives bfloat16, gradients where eager has none. Such a forward is left as it is, with the
    reason in the report; its child module is fused on its own and runs inside the switch."""
    model = randomize_batchnorm_(SwitchesAModeInside(style)).eval()
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    expected = model(x)
    optimized = fastres.optimize(model, channels_last=False)
    with ConvCallRecorder() as recorded:
        got = optimized(x)
    assert got.dtype == expected.dtype and got.requires_grad == expected.requires_grad
    assert got.is_inference() == expected.is_inference()
    tol = 2e-2 if expected.dtype == torch.bfloat16 else 1e-5  # the fused op rounds once, eager after each step
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    mode = {"no_grad-block": "grad mode", "set_grad_enabled-call": "grad mode",
            "inference_mode_decorated": "grad mode and inference mode"}.get(style, "cpu autocast")
    assert optimized.fastres_report.entries["conv"] == (
        f"eager: the model, which calls it, is not traceable with torch.fx (its forward switches {mode} inside, "
        "which torch.fx does not record)")
    assert optimized.fastres_report.entries["child.0"] == "fused: conv+bn+relu" and len(recorded.calls) == 1


def test_unfusable_chains_stay_eager_with_reasons():
    optimized = _check(Unfusable(), torch.randn(2, 4, 6, 6), fused=0, total=7)
    eager = optimized.fastres_report.eager
    assert "not followed by a BatchNorm, residual add or one of the op's activations (next: elu)" in eager["elu"]
    assert "(next: call_module used_twice)" in eager["after_bn"]
    assert "2 users" in eager["used_twice"]
    assert "padding_mode='reflect'" in eager["reflect"]
    assert "running statistics" in eager["no_stats"]
    assert eager["standardized"] == "eager: StandardizedConv has its own forward (not a plain nn.Conv2d)"
    assert eager["scaled"] == "eager: ScaledConv has its own forward (not a plain nn.Conv2d)"


class PlainConv(nn.Conv2d):
    """A Conv2d subclass that computes as nn.Conv2d (Hugging Face EfficientNet's depthwise conv)."""


def test_a_conv2d_subclass_that_computes_as_conv2d_fuses():
    model = nn.Sequential(PlainConv(4, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8), nn.SiLU())
    optimized = _check(model, torch.randn(2, 4, 6, 6), fused=1, total=1)
    assert optimized.fastres_report.entries["0"] == "fused: conv+bn+silu"


@dataclasses.dataclass
class ModelOutput(OrderedDict):
    """What Hugging Face's ModelOutput is: a dataclass, and an OrderedDict of the fields that are not
    None, which callers index by position (`outputs[0]`) and read by attribute."""

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is not None:
                self[f.name] = getattr(self, f.name)

    def __getitem__(self, key):
        return list(self.values())[key] if isinstance(key, int) else super().__getitem__(key)


class Encoder(nn.Module):
    def __init__(self, ordered: bool):
        super().__init__()
        self.ordered = ordered
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        y = self.stem(x)
        z = self.stage(y)
        return OrderedDict(stem=y, stage=z) if self.ordered else ModelOutput(last_hidden_state=z)


class WithModelOutputs(nn.Module):
    """A Hugging Face model's shape: its encoder returns a ModelOutput, read by position."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder(ordered=False)

    def forward(self, x):
        return ModelOutput(last_hidden_state=self.encoder(x)[0].mean((2, 3)))


@pytest.mark.parametrize("model", [WithModelOutputs, lambda: Encoder(ordered=True)], ids=["ModelOutput", "OrderedDict"])
def test_a_forward_returning_a_dict_subclass_returns_it_after_optimize(model):
    """torch.fx records a returned dict subclass as a plain dict: a Hugging Face model's encoder then
    returned a dict, and its caller's `encoder_outputs[0]` raised KeyError (its ResNet, RegNet)."""
    model = randomize_batchnorm_(model()).eval()
    x = torch.randn(2, 3, 8, 8)
    optimized = fastres.optimize(model)
    assert len(optimized.fastres_report.fused) == 2
    with torch.no_grad():
        got, expected = optimized(x), model(x)
    assert type(got) is type(expected) and list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    restored = _saved_and_loaded(optimized)
    with torch.no_grad():
        assert type(restored(x)) is type(expected)


@pytest.mark.parametrize("container", Features.CONTAINERS)
def test_an_optimized_backbone_returns_its_outputs_in_the_models_container(container):
    """A dict subclass fx would record as a plain dict, and a dataclass fx cannot return, come back
    as the model returns them, every map fused."""
    model = Features(container).eval()
    optimized = fastres.optimize(model)
    assert len(optimized.fastres_report.fused) == 20, str(optimized.fastres_report)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, expected = optimized(x), model(x)
    assert type(got) is type(expected) and not placed_otherwise(got, expected)
    for (where, g), (_, e) in zip(output_leaves(got), output_leaves(expected)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=where)


class ReturnsADefaultdict(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return defaultdict(list, out=self.head(self.body(x)))


def test_a_returned_dict_subclass_that_cannot_be_rebuilt_keeps_its_forward_eager_and_says_why():
    """A defaultdict's constructor takes its factory first: not rebuilt from a dict, the forward
    stays the model's own (its children fused), rather than returning a plain dict."""
    model = randomize_batchnorm_(ReturnsADefaultdict()).eval()
    optimized = fastres.optimize(model)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        got = optimized(x)
        assert type(got) is defaultdict and got.default_factory is list
        torch.testing.assert_close(got["out"], model(x)["out"], rtol=1e-5, atol=1e-5)
    assert optimized.fastres_report.entries["body.0"] == "fused: conv+bn+relu"
    assert optimized.fastres_report.entries["head"] == (
        "eager: the model, which calls it, is not traceable with torch.fx (it returns a defaultdict, which torch.fx "
        "would record as a plain dict)")


class NoBatchNorm(nn.Module):
    """Convs with no BatchNorm after them: with and without bias, before an add, an activation, both,
    or nothing (which stays eager)."""

    def __init__(self):
        super().__init__()
        self.relu_bias = nn.Conv2d(4, 8, 3, padding=1)
        self.relu6_no_bias = nn.Conv2d(8, 8, 1, bias=False)
        self.add_relu = nn.Conv2d(8, 8, 3, padding=1)
        self.add_only = nn.Conv2d(8, 8, 1)
        self.alone = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.then_elu = nn.Conv2d(8, 8, 1)
        self.gate, self.hard_gate = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.last = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = F.relu(self.relu_bias(x))
        y = F.relu6(self.relu6_no_bias(y))
        y = F.relu(self.add_relu(y) + y)
        y = self.add_only(y) + y
        y = y * self.gate(y).sigmoid() * F.hardsigmoid(self.hard_gate(y))
        y = self.then_elu(self.alone(y) * 2)
        return self.last(F.elu(self.bn(y)))


def test_convs_without_batchnorm_fuse_their_bias_with_the_add_and_activation():
    torch.manual_seed(0)
    model = NoBatchNorm()
    x = torch.randn(2, 4, 7, 7)
    optimized = _check(model, x, fused=7, total=9)
    entries = optimized.fastres_report.entries
    assert entries["relu_bias"] == entries["add_relu"].replace("+add", "") == "fused: conv+relu"
    assert entries["relu6_no_bias"] == "fused: conv+relu6"
    assert entries["add_only"] == "fused: conv+add"
    assert entries["gate"] == "fused: conv+sigmoid" and entries["hard_gate"] == "fused: conv+hardsigmoid"
    assert "(next: call_function mul)" in entries["alone"]
    assert "(next: the module's output)" in entries["last"]
    assert entries["then_elu"] == "fused: conv+bn (then elu, not one of the op's activations, runs eagerly)"
    with ConvCallRecorder() as calls, torch.no_grad():
        optimized(x)
    scales_and_shifts = [(args[2], args[3]) for args, _ in calls.calls]
    assert [scale is None for scale, _ in scales_and_shifts] == [True] * 6 + [False]
    assert scales_and_shifts[1][1] is None  # no bias, no shift
    torch.testing.assert_close(scales_and_shifts[0][1], model.relu_bias.bias)

    with torch.no_grad():  # an optimizer step on a bias: the next call sees it, nothing stale
        optimized.relu_bias.bias.add_(0.5)
        model.relu_bias.bias.add_(0.5)
        torch.testing.assert_close(optimized(x), model(x), rtol=1e-4, atol=1e-4)
    optimized.train()  # train mode runs the eager chain: the same autograd graph as the model's
    optimized(x).sum().backward()
    assert optimized.relu_bias.weight.grad is not None


@pytest.mark.parametrize("make,channels", [(torchvision.models.resnet18, 3), (NoBatchNorm, 4)],
                         ids=["resnet18", "no-batchnorm"])
def test_gradients_through_an_optimized_eval_model_are_eagers(make, channels):
    """Saliency maps, Grad-CAM, adversarial evaluation: backward through the optimized eval-mode
    model gives eager's gradients, for the input and every parameter (BN's and the conv biases
    too, which reach the op through the fold), while the forward runs the fused ops."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(make()).eval().double()
    optimized = fastres.optimize(model)
    x = torch.randn(2, channels, 32, 32, dtype=torch.float64)
    grads = {}
    for name, m in (("eager", model), ("fused", optimized)):
        xi = x.clone().requires_grad_()
        with ConvCallRecorder() as calls:
            m(xi).square().sum().backward()
        assert len(calls.calls) == sum(isinstance(module, FusedConvBN) for module in m.modules())
        grads[name] = {"input": xi.grad, **{n: p.grad for n, p in m.named_parameters()}}
    assert grads["fused"].keys() == grads["eager"].keys()
    for n, want in grads["eager"].items():
        torch.testing.assert_close(grads["fused"][n], want, rtol=1e-9, atol=1e-12, msg=n)


class Downsampling(nn.Module):
    """A block whose shortcut is a 1x1 conv + BN; `shortcut` says what else happens to it."""

    def __init__(self, shortcut: str):
        super().__init__()
        self.shortcut = shortcut
        self.conv, self.bn = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        kernel = 3 if shortcut == "3x3" else 1
        self.down = nn.Sequential(nn.Conv2d(8, 16, kernel, stride=2, padding=kernel // 2, bias=True), nn.BatchNorm2d(16))
        if shortcut == "no-bn":
            self.down = nn.Conv2d(8, 16, 1, stride=2)

    def forward(self, x):
        identity = self.down(x)
        if self.shortcut == "relu":
            identity = F.relu(identity)
        out = F.relu(self.bn(self.conv(x)) + identity)
        return out + identity if self.shortcut == "reused" else out


def test_a_1x1_shortcut_becomes_the_projected_residual():
    optimized = _check(Downsampling("1x1"), torch.randn(2, 8, 9, 9), fused=2, total=2)
    assert optimized.fastres_report.entries["down.0"] == "fused: conv+bn, the projected residual of conv (one op)"
    with ConvCallRecorder() as calls, torch.no_grad():
        optimized(torch.randn(2, 8, 9, 9))
    assert [c.projection for c in calls.cases] == [ProjectionCase(8, 9, 9, (2, 2))]


def _bns_folded_into_biases(model: nn.Module, how: str) -> nn.Module:
    """model (eval) with every BN folded into its conv's bias, as users do for inference."""
    if how == "torch.fx fuse":
        from torch.fx.experimental.optimization import fuse

        return fuse(model)
    model.fuse_model(is_qat=False)  # torchvision's quantizable models, before quantization's prepare
    return model


@pytest.mark.parametrize("how", ["torch.fx fuse", "quantization fuse_model"])
def test_a_1x1_shortcut_whose_bn_was_folded_into_its_bias_is_still_the_projected_residual(how):
    """A ResNet whose BNs were folded into the convs' biases (torch.fx.experimental.optimization.fuse,
    torchvision's quantizable models' fuse_model) fuses as the unfolded one does: each downsample
    1x1 conv, its bias as the shift, is the projection of its block's last conv, in one op."""
    arch = torchvision.models.resnet18 if how == "torch.fx fuse" else torchvision.models.quantization.resnet18
    torch.manual_seed(0)
    model = _bns_folded_into_biases(randomize_batchnorm_(arch()).eval(), how)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    optimized = _check(model, torch.randn(2, 3, 40, 40), fused=20, total=20)
    entries = optimized.fastres_report.entries
    for block in ("layer2.0", "layer3.0", "layer4.0"):
        assert entries[f"{block}.downsample.0"] == f"fused: conv, the projected residual of {block}.conv2 (one op)"
        assert entries[f"{block}.conv2"] == "fused: conv+add+relu"
    with ConvCallRecorder() as calls, torch.no_grad():
        optimized(torch.randn(2, 3, 40, 40))
    projected = [c for c in calls.cases if c.projection is not None]
    assert len(calls.cases) == 17 and len(projected) == 3
    assert all(not c.bn and not c.projection.bn for c in projected)
    x = torch.randn(2, 3, 40, 40)
    report = fastres.verify(model, optimized, x, per_layer=True)
    assert report.ok and "layer2.0.conv2 + layer2.0.downsample.0" in [r.name for r in report.layers], str(report)
    optimized.layer2.train(), model.layer2.train()  # their fused ops then run eager chains, a projection's too
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_1x1_shortcut_without_bn_that_comes_first_is_the_projected_residual_too():
    """The bias-only 1x1 shortcut runs before the main branch, so its conv takes the add first;
    the roles swap as for a shortcut with a BN."""
    optimized = _check(Downsampling("no-bn"), torch.randn(2, 8, 9, 9), fused=2, total=2)
    assert optimized.fastres_report.entries["down"] == "fused: conv, the projected residual of conv (one op)"
    assert optimized.fastres_report.entries["conv"] == "fused: conv+bn+add+relu"
    with ConvCallRecorder() as calls, torch.no_grad():
        optimized(torch.randn(2, 8, 9, 9))
    assert [c.projection for c in calls.cases] == [ProjectionCase(8, 9, 9, (2, 2), bn=False)]


@pytest.mark.parametrize("shortcut", ["3x3", "relu", "reused"])
def test_shortcuts_that_are_not_a_plain_projection_stay_their_own_op(shortcut):
    optimized = _check(Downsampling(shortcut), torch.randn(2, 8, 9, 9), fused=2, total=2)
    assert "projected residual" not in str(optimized.fastres_report)
    with ConvCallRecorder() as calls, torch.no_grad():
        optimized(torch.randn(2, 8, 9, 9))
    assert len(calls.cases) == 2 and all(c.projection is None for c in calls.cases)


class InputAndResidual(nn.Module):
    """A conv + BN whose output is both the next chain's input and its residual, `y + bn(conv(y))`
    (timm's EfficientViT (MSRA), SHViT and EfficientViM after their downsampling). With a 1x1 first
    and a 3x3 second, or the other way round, one of the two looks like a projection branch."""

    def __init__(self, first: int, second: int):
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(8, 16, first, padding=first // 2, bias=False), nn.BatchNorm2d(16))
        self.second = nn.Sequential(nn.Conv2d(16, 16, second, padding=second // 2, bias=False), nn.BatchNorm2d(16))

    def forward(self, x):
        y = self.first(x)
        return y + self.second(y)


@pytest.mark.parametrize("first,second", [(1, 3), (3, 1), (1, 1)], ids=["1x1-then-3x3", "3x3-then-1x1", "1x1-twice"])
def test_a_chain_whose_input_is_its_residual_is_not_a_projection(first, second):
    optimized = _check(InputAndResidual(first, second), torch.randn(2, 8, 7, 7), fused=2, total=2)
    assert optimized.fastres_report.entries["second.0"] == "fused: conv+bn+add"


def test_a_projected_residual_of_another_shape_runs_eagerly_and_says_so():
    optimized = fastres.optimize(randomize_batchnorm_(Downsampling("1x1")).eval())
    module = next(m for m in optimized.modules() if isinstance(m, FusedConvBN) and m.projection_name)
    x, residual = torch.randn(2, 8, 9, 9), torch.randn(2, 8, 11, 11)
    with pytest.warns(RuntimeWarning, match="ran eagerly"), torch.no_grad():
        with pytest.raises(RuntimeError):  # the eager chain's own error: 5x5 + 6x6 does not add
            module(x, residual)


class MixedConvs(nn.Module):
    """MixNet's MixedConv2d: the input split over convs of different kernels (and channel counts),
    concatenated, then one BatchNorm (`norm`: a BN, or timm's BN + act) and activation over all."""

    def __init__(self, norm=lambda c: nn.BatchNorm2d(c), act: nn.Module | None = nn.SiLU(), style: str = "cat"):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(4, 3, 3, padding=1, bias=False), nn.Conv2d(4, 5, 5, padding=2),
                                    nn.Conv2d(4, 4, 1, stride=1, bias=False)])
        self.bn, self.act, self.style = norm(24 if style == "with-its-input" else 12), act, style
        # what a "+ <name>" style adds after the BN: the block's input, or one that broadcasts
        self.per_channel, self.one_value = nn.Parameter(torch.randn(12, 1, 1)), nn.Parameter(torch.randn(1, 1, 1, 1))

    def forward(self, x):
        parts = torch.split(x, 4, 1)
        outs = [conv(parts[i]) for i, conv in enumerate(self.convs)]
        if self.style == "with-its-input":  # a DenseNet-like cat: not convs alone
            outs.append(x)
        if self.style == "read-twice":
            y = torch.cat(outs, 1) + outs[0].sum()
        else:
            y = torch.cat(outs, dim=-3 if self.style == "dim-keyword" else 1)
        y = self.bn(y)
        if self.style.startswith("+ "):
            added = {"+ x": x, "+ per_channel": self.per_channel, "+ one_value": self.one_value}[self.style]
            y = y + added
        return y if self.act is None else self.act(y)


@pytest.mark.parametrize("norm,act,parts", [
    (lambda c: nn.BatchNorm2d(c), nn.SiLU(), "bn+silu"),
    (lambda c: nn.BatchNorm2d(c), None, "bn"),
    (lambda c: torchvision.ops.FrozenBatchNorm2d(c), nn.ReLU(), "bn+relu"),
    ("norm-act", None, "bn+silu"),
], ids=["batchnorm-silu", "batchnorm", "frozen-relu", "timm-batchnorm-act"])
@pytest.mark.parametrize("style", ["cat", "dim-keyword"])
def test_a_batchnorm_over_concatenated_convs_fuses_its_slice_into_each_conv(norm, act, parts, style):
    """BN is per channel: bn(cat([conv_i(x_i)])) is cat([bn_i(conv_i(x_i))]), bn_i being BN's
    channels of conv_i, and so is an activation after it. Each conv fuses with its slice."""
    norm = _norm_act("batchnorm", nn.SiLU()) if norm == "norm-act" else norm
    model = MixedConvs(norm, act, style)
    optimized = _check(model, torch.randn(2, 12, 7, 6), fused=3, total=3)
    assert set(optimized.fastres_report.entries.values()) == {f"fused: conv+{parts}"}
    with ConvCallRecorder() as calls, torch.no_grad():
        optimized(torch.randn(2, 12, 7, 6))
    assert [args[2].shape[0] for args, _ in calls.calls] == [3, 5, 4]  # each its slice's scale
    assert set(optimized.state_dict()) == set(model.state_dict())


@pytest.mark.parametrize("style", ["+ x", "+ per_channel", "+ one_value"])
def test_a_residual_after_a_batchnorm_over_concatenated_convs_goes_into_each_op_by_its_channels(style):
    """MixNet's skip connection after its MixedConv2d + BN: each conv's op adds the residual's
    channels of that conv (a view); one that broadcasts over the channels is added whole."""
    optimized = _check(MixedConvs(style=style), torch.randn(2, 12, 7, 6), fused=3, total=3)
    assert set(optimized.fastres_report.entries.values()) == {"fused: conv+bn+add+silu"}


def test_a_saved_and_loaded_model_with_sliced_batchnorms_and_residuals_runs_fused():
    """fx rebuilds a loaded graph by tracing its code, where the residual's channels are a call."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(MixedConvs(style="+ x")).eval()
    loaded = _saved_and_loaded(fastres.optimize(model))
    x = torch.randn(2, 12, 7, 6)
    with torch.no_grad(), ConvCallRecorder() as calls:
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)
    assert len(calls.calls) == 3


@pytest.mark.parametrize("style", ["with-its-input", "read-twice"])
def test_a_concatenation_that_is_not_of_convs_alone_keeps_its_batchnorm_whole(style):
    optimized = _check(MixedConvs(style=style), torch.randn(2, 12, 7, 6), fused=0, total=3)
    reasons = optimized.fastres_report.eager.values()
    assert all("not followed by a BatchNorm" in why or "users" in why for why in reasons)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_a_sliced_batchnorm_put_in_train_mode_alone_trains_as_the_whole_one(momentum):
    """A BatchNorm split over concatenated convs, switched to train mode on its own in an eval
    model: the slices run its train-mode arithmetic (batch statistics, running statistics updated
    per channel, the batch counted once), as eager's whole BatchNorm does."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(MixedConvs(lambda c: nn.BatchNorm2d(c, momentum=momentum))).double().eval()
    optimized = fastres.optimize(model)
    eager = copy.deepcopy(model)
    for m in (eager, optimized):
        m.bn.train()
    for _ in range(2):
        x = torch.randn(4, 12, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(optimized(x), eager(x))
    for key, value in eager.bn.state_dict().items():
        torch.testing.assert_close(optimized.bn.state_dict()[key], value)
    assert int(optimized.bn.num_batches_tracked) == 2


class Flattening(nn.Module):
    """Code after the chains that depends on layout: .view of a conv's output, .view_as, and a
    dtype view (a reinterpretation, not a reshape)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.fc = nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        y = self.features(x)
        bits = self.head(y).view(torch.int32).view(torch.float32)
        return self.fc(y.view(y.size(0), -1)) + bits.view_as(bits).sum()


@pytest.mark.parametrize("channels_last", [True, False])
def test_views_after_fused_chains_work_in_either_layout(channels_last):
    optimized = _check(Flattening(), torch.randn(2, 3, 6, 6), fused=2, channels_last=channels_last)
    assert "view(torch.int32)" in optimized.code and "view(torch.float32)" in optimized.code


@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_outputs_keep_the_memory_format_eager_conv_gives(channels_last):
    """channels_last weights (optimize's default) make eager's conv output channels_last too; with
    channels_last=False and NCHW inputs, every fused output is NCHW, as in the original model."""
    optimized = fastres.optimize(randomize_batchnorm_(torchvision.models.resnet18()).eval(), channels_last=channels_last)
    formats = []
    for module in optimized.modules():
        if isinstance(module, FusedConvBN):
            module.register_forward_hook(lambda m, args, out: formats.append(
                out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)))
    with torch.no_grad():
        optimized(torch.randn(2, 3, 32, 32))
    assert len(formats) == 17 and all(formats)


def test_a_model_with_nothing_to_fuse_comes_back_working():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    optimized = fastres.optimize(model.eval())
    x = torch.randn(2, 4)
    torch.testing.assert_close(optimized(x), model(x))
    assert "0 of 0 convs fused" in str(optimized.fastres_report)


class OtherConvs(nn.Module):
    """A 2-D chain between convs fastres does not fuse: a video stem (Conv3d, whose 5-D weight
    Module.to(memory_format=channels_last) refuses), a ConvTranspose2d decoder and a Conv1d."""

    def __init__(self):
        super().__init__()
        self.video = nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
        self.conv, self.bn = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.seq = nn.Conv1d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.up(F.relu(self.bn(self.conv(self.video(x).mean(2)))))
        return self.seq(y.flatten(2))


def test_convs_other_than_conv2d_stay_eager_and_are_named_in_the_report():
    optimized = _check(OtherConvs(), torch.randn(2, 3, 4, 6, 6), fused=1, total=4)
    assert optimized.fastres_report.eager == {
        "video.0": "eager: Conv3d (only nn.Conv2d is fused)",
        "up": "eager: ConvTranspose2d (only nn.Conv2d is fused)",
        "seq": "eager: Conv1d (only nn.Conv2d is fused)",
    }
    assert optimized.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert optimized.video[0].weight.is_contiguous()


def test_a_model_with_uninitialized_lazy_modules_is_refused_in_words():
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    with pytest.raises(ValueError, match=r"module '0' \(LazyConv2d\) has uninitialized parameters; run the model once"):
        fastres.optimize(model)
    x = torch.randn(2, 4, 6, 6)
    model(x)
    _check(model, x, fused=1, total=1)


def test_hooks_run_as_in_eager_and_what_they_watch_is_not_fused():
    """Feature extraction, Grad-CAM, spectral_norm: every forward, pre- and backward hook runs on
    the values it gets in eager, none runs while optimize traces or precompiles; a hooked conv,
    BN or activation stays out of the fused op, and a hooked container is still fused inside."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(torchvision.models.resnet18()).eval()
    log = HookLog()
    model.register_forward_hook(log.forward_hook("model"))
    model.layer3.register_forward_hook(log.forward_hook("layer3"))
    model.layer1[0].conv1.register_forward_hook(log.forward_hook("layer1.0.conv1"))
    model.layer2[0].bn1.register_forward_pre_hook(log.pre_hook("layer2.0.bn1 input"))
    model.layer4[1].relu.register_forward_hook(log.forward_hook("layer4.1.relu"))
    model.layer4.register_full_backward_hook(log.backward_hook)
    x = torch.randn(2, 3, 32, 32)
    optimized = fastres.optimize(model)
    calls = record_meta_run(optimized, (x,)).calls  # precompile's run, on meta tensors
    assert len(calls) == sum(isinstance(m, FusedConvBN) for m in optimized.modules())
    assert log.seen == []
    runs = {}
    for name, m in (("eager", model), ("fused", optimized)):
        log.seen = []
        m(x.clone().requires_grad_()).square().sum().backward()
        runs[name] = log.seen
    assert_hooks_saw_the_same(runs["fused"], runs["eager"])
    assert len(runs["eager"]) == 7  # layer4.1.relu runs twice

    entries = optimized.fastres_report.entries
    assert entries["layer1.0.conv1"] == "eager: it has a forward hook (the fused op would skip it)"
    assert entries["layer2.0.conv1"] == ("eager: its output goes to layer2.0.bn1, which has a forward pre-hook "
                                         "(the fused op would skip it)")
    assert entries["layer4.1.conv1"] == "fused: conv+bn (then layer4.1.relu, which has a forward hook, runs eagerly)"
    assert entries["layer4.1.conv2"] == "fused: conv+bn+add (then layer4.1.relu, which has a forward hook, runs eagerly)"
    assert entries["layer3.1.conv2"] == entries["layer4.0.conv2"] == "fused: conv+bn+add+relu"
    assert len(optimized.fastres_report.fused) == 18


@pytest.mark.parametrize("where", ["layer4.1", "layer1.0.conv1", "layer2.0.bn2", "layer3.0.relu", "layer4", "global"])
def test_hooks_added_after_optimize_run_and_the_model_runs_unfused_while_they_are_there(where):
    """Grad-CAM and feature extractors hook a block, a conv, a BN or an activation of the model
    they are given: on an optimized model the fused graph does not call those modules, so while
    such a hook is there the model runs its own forward (every hook sees eager's values, and a
    warning says why); once it is removed the fused ops run again."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(torchvision.models.resnet18()).eval()
    optimized = fastres.optimize(model)
    x = torch.randn(2, 3, 32, 32)
    want, want_seen, _, _ = hooked_run(model, where, x)
    got, got_seen, fused_calls, messages = hooked_run(optimized, where, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert_hooks_saw_the_same(got_seen, want_seen)
    assert fused_calls == []
    named = "a global module hook is set" if where == "global" else f"{where} has a "
    assert any(m.startswith(f"fastres: {named}") and "runs its own, unfused forward" in m for m in messages), messages
    with ConvCallRecorder() as calls, torch.no_grad():
        torch.testing.assert_close(optimized(x), want.detach(), rtol=1e-4, atol=1e-4)
    assert len(calls.calls) == 17


def test_a_copy_of_an_optimized_model_watches_its_own_modules():
    """copy.deepcopy (EMA, checkpoints) of an optimized Sequential: a hook on the copy's conv makes
    the copy, not the original, run unfused."""
    model = randomize_batchnorm_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())).eval()
    optimized = fastres.optimize(model)
    copied = copy.deepcopy(optimized)
    log = HookLog()
    copied.get_submodule("0").register_forward_hook(log.forward_hook("conv"))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), ConvCallRecorder() as calls, pytest.warns(RuntimeWarning, match="fastres: 0 has a forward"):
        torch.testing.assert_close(copied(x), model(x), rtol=1e-5, atol=1e-5)
    assert calls.calls == [] and len(log.seen) == 1
    with torch.no_grad(), ConvCallRecorder() as calls:
        optimized(x)
    assert len(calls.calls) == 1


def _scaled(model: nn.Module, factor: int) -> nn.Module:
    """A copy of model with every floating parameter and buffer times factor."""
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        for t in (*scaled.parameters(), *scaled.buffers()):
            if t.is_floating_point():
                t.mul_(factor)
    return scaled


def _replicas_on_cpu(model: nn.Module, monkeypatch: pytest.MonkeyPatch, copies: int = 2) -> list[nn.Module]:
    """torch.nn.parallel.replicate(model, [0, 1, ...]) as DataParallel calls it, with a CPU stand-in
    for its broadcast to the GPUs: replica j's parameters and buffers are the model's times j + 1."""
    replicating = importlib.import_module("torch.nn.parallel.replicate")  # (the package's `replicate` is the function)

    def broadcast(tensors, devices, detach):
        return [[(t.detach() * (j + 1) if t.is_floating_point() else t.detach().clone()).requires_grad_(
            t.requires_grad and not detach) for t in tensors] for j in range(len(devices))]

    monkeypatch.setattr(replicating, "_broadcast_coalesced_reshape", broadcast)
    return replicating.replicate(model, list(range(copies)), detach=not torch.is_grad_enabled())


def _sequential() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())


def _sequential_norm_act() -> nn.Module:
    """timm's BatchNorm + activation after a conv (fused) and after a pool (its norm a _NormOf view)."""
    norm_act = _norm_act("batchnorm", nn.ReLU())
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm_act(8), nn.MaxPool2d(2), norm_act(8))


def _mixed_convs() -> nn.Module:
    """A BatchNorm over concatenated convs: its slices (_NormSlice) hold it outside _modules too."""
    return nn.Sequential(nn.Conv2d(3, 12, 1), MixedConvs())


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("make,optimize", [(torchvision.models.resnet18, True), (_sequential, True),
                                           (_sequential_norm_act, True), (_mixed_convs, True),
                                           (fastres.models.resnet18, False)],
                         ids=["optimized-resnet18", "optimized-sequential", "optimized-norm-act", "optimized-sliced-bn",
                              "zoo-resnet18"])
def test_data_parallel_replicas_run_their_own_modules(make, optimize, train, monkeypatch):
    """torch.nn.DataParallel runs a replica per GPU, made by replicate(), which remaps children
    only: the conv and BN a fused op holds outside them, and the train-mode fallback's container,
    must be the replica's too. Checked with a CPU stand-in for the broadcast (no machine here has
    two GPUs): replica j runs the model times j + 1, fused in eval mode, and caches no BN fold
    (on a GPU each new fold waits for its stream); the original is unchanged."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(make()).double().eval()  # float64: train mode's batch statistics over 2x1x1
    fast = fastres.optimize(model) if optimize else model
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = fast(x)
    fast.train(train)
    replicas = _replicas_on_cpu(fast, monkeypatch)
    for factor, replica in enumerate(replicas, start=1):
        reference = _scaled(model, factor).train(train)
        torch.testing.assert_close(replica(x), reference(x))
        with ConvCallRecorder() as calls:
            replica(x)
        assert (len(calls.calls) > 0) != train
    assert not any(m in fastres.nn._fold_cache for r in replicas for m in r.modules())  # they live for one call
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), expected, rtol=0, atol=0)


def test_an_optimized_sequential_indexes_slices_and_iterates_as_the_sequential():
    """fast[0], fast[-1], fast[:2], len(fast), list(fast): the model's layers, as before optimize
    (a slice runs them unfused); a hook on fast[0] is watched like any bypassed module."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())).eval()
    optimized = fastres.optimize(model, channels_last=False)
    assert len(optimized) == 4 and [type(m) for m in optimized] == [type(m) for m in model]
    assert optimized[0] is optimized.get_submodule("0") and optimized[-1] is optimized.get_submodule("3")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(optimized[:3](x), model[:3](x))
    log = HookLog()
    optimized[0].register_forward_hook(log.forward_hook("0"))
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="fastres: 0 has a forward hook"):
        optimized(x)
    assert len(log.seen) == 1


def _saved_and_loaded(model: nn.Module) -> nn.Module:
    """torch.save(model) (the whole module, not its state_dict) and torch.load of what it wrote."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_torch_save_of_the_whole_optimized_model_loads_fused():
    """torch.save(model) mid fine-tuning: fx rebuilds the graph from its code on load, with the
    fused ops, not the train-mode fallback."""
    model = randomize_batchnorm_(torchvision.models.resnet18()).eval()
    loaded = _saved_and_loaded(fastres.optimize(model).train())
    assert loaded.training and loaded.layer1[0].bn1.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), ConvCallRecorder() as calls:
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=1e-4, atol=1e-4)
    assert len(calls.calls) == 17


def test_a_saved_and_loaded_optimized_model_is_the_model_it_was():
    """fx's own pickle loads a plain GraphModule; fastres's loads the model's class, attributes,
    state_dict keys, report and hook watch back, twice over, and an optimized Sequential indexes."""
    timm = pytest.importorskip("timm")
    model = randomize_batchnorm_(timm.create_model("resnet18", num_classes=10)).eval()
    optimized = fastres.optimize(model, channels_last=False)
    loaded = _saved_and_loaded(_saved_and_loaded(optimized))
    assert isinstance(loaded, type(model)) and loaded.pretrained_cfg == model.pretrained_cfg
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert loaded.fastres_report.entries == optimized.fastres_report.entries
    x = torch.randn(2, 3, 32, 32)
    want, want_seen, _, _ = hooked_run(model, "layer4.1", x)
    got, got_seen, fused_calls, messages = hooked_run(loaded, "layer4.1", x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert_hooks_saw_the_same(got_seen, want_seen)
    assert fused_calls == [] and any(m.startswith("fastres: layer4.1 has a forward hook") for m in messages)
    sequential = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    loaded = _saved_and_loaded(fastres.optimize(sequential))
    assert len(loaded) == 3 and loaded[0] is loaded.get_submodule("0")


def test_an_optimized_model_of_a_class_pickle_cannot_find_saves_as_fxs_graph_module_and_says_so():
    """A class made inside a function: pickle cannot name it, so the model saves as fx would, with
    a warning that its train mode and late hooks are then not the model's own."""
    def make():
        class Local(nn.Module):
            def __init__(self):
                super().__init__()
                self.block = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())

            def forward(self, x):
                return self.block(x)
        return Local()

    model = randomize_batchnorm_(make()).eval()
    with pytest.warns(RuntimeWarning, match="Local cannot be imported by name.*save its state_dict instead"):
        loaded = _saved_and_loaded(fastres.optimize(model, channels_last=False))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), ConvCallRecorder() as calls:
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(calls.calls) == 1


class SelfObserving(nn.Module):
    """A module whose hook is its own method, as torch.ao's observers are: the copy's hook must be the copy's."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.calls = 0
        self.register_forward_hook(self.count)

    def count(self, module, args, out):
        self.calls += 1

    def forward(self, x):
        return self.block(x)


def test_a_hook_that_is_a_models_own_method_acts_on_the_copy():
    model = SelfObserving().eval()
    optimized = fastres.optimize(model)
    with torch.no_grad():
        optimized(torch.randn(1, 3, 8, 8))
    assert (model.calls, optimized.calls) == (0, 1)


@pytest.mark.parametrize("hooked", ["identity", "norm_act"])
def test_a_hooked_module_that_fusion_would_remove_keeps_its_hook(hooked):
    """An nn.Identity is dropped and timm's BatchNorm + act is split before fusing, unless hooked."""
    torch.manual_seed(0)
    if hooked == "identity":
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Identity(), nn.ReLU())
        expected = "fused: conv+bn"
    else:
        model = nn.Sequential(nn.Conv2d(3, 8, 3), _norm_act("batchnorm", nn.ReLU())(8))
        expected = "eager: its output goes to 1, which has a forward hook (the fused op would skip it)"
    model = randomize_batchnorm_(model).eval()
    log = HookLog()
    model[-2 if hooked == "identity" else -1].register_forward_hook(log.forward_hook(hooked))
    optimized = fastres.optimize(model)
    assert optimized.fastres_report.entries["0"] == expected
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x), rtol=1e-5, atol=1e-5)
    (_, got), (_, want) = log.seen
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm", ["spectral_norm", "parametrizations.spectral_norm", "parametrizations.weight_norm"])
def test_weight_reparametrizations_follow_their_parameters(norm):
    """A reparametrized weight is recomputed where the model recomputes it: spectral_norm's forward
    pre-hook keeps its conv eager (a fused op would run on a stale weight); a parametrization is
    fused and read afresh each call. Both follow a new state_dict."""
    wrap = eval(f"torch.nn.utils.{norm}")
    torch.manual_seed(0)
    model = nn.Sequential(wrap(nn.Conv2d(3, 8, 3, padding=1)), nn.BatchNorm2d(8), nn.ReLU()).eval()
    optimized = fastres.optimize(model)
    fused = norm.startswith("parametrizations")
    assert optimized.fastres_report.entries["0"] == ("fused: conv+bn+relu" if fused else (
        "eager: it has a forward pre-hook (the fused op would skip it); "
        "torch.nn.utils.remove_spectral_norm(module, 'weight') folds the norm into the weight"))
    _assert_both_follow_a_new_state_dict(model, optimized, ("original0", "weight_orig"))


def _assert_both_follow_a_new_state_dict(model: nn.Module, optimized: nn.Module, scaled: tuple[str, ...]) -> None:
    """Both load model's state_dict with the entries ending in `scaled` times 1.5, then agree."""
    state = {k: v * 1.5 if k.endswith(scaled) else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    optimized.load_state_dict(state)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prune", [True, False], ids=["prune", "weight_norm"])
def test_torchs_weight_recomputing_pre_hooks_keep_their_conv_eager_and_say_how_to_fuse_it(prune):
    """torch.nn.utils.prune and the old weight_norm hold the weight as a tensor autograd computed
    (deepcopy refuses those: optimize used to fail) and recompute it in a forward pre-hook. The
    copy follows its own parameters; the report says how to make the weight permanent, and after
    that call the conv fuses."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())).eval()
    from torch.nn import utils
    from torch.nn.utils import prune as pruning  # a submodule torch.nn.utils does not import itself

    if prune:
        pruning.l1_unstructured(model[0], "weight", amount=0.5)
        remedy, make_permanent = "prune.remove(module, 'weight')", lambda: pruning.remove(model[0], "weight")
    else:
        with pytest.warns(FutureWarning):
            utils.weight_norm(model[0])
        remedy, make_permanent = "remove_weight_norm(module, 'weight')", lambda: utils.remove_weight_norm(model[0])
    assert not model[0].weight.is_leaf
    optimized = fastres.optimize(model)
    assert optimized.fastres_report.entries["0"].startswith("eager: it has a forward pre-hook")
    assert remedy in optimized.fastres_report.entries["0"]
    as_float64 = fastres.optimize(model, dtype=torch.float64)  # verify copies the model to its dtype
    assert fastres.verify(model, as_float64, torch.randn(2, 3, 8, 8, dtype=torch.float64), per_layer=True).ok
    _assert_both_follow_a_new_state_dict(model, optimized, ("weight_orig", "weight_v"))
    make_permanent()
    optimized = fastres.optimize(model)
    assert optimized.fastres_report.entries["0"] == "fused: conv+bn+relu"
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("held", ["a tensor autograd computed, in a list", "a lock"])
def test_a_model_deepcopy_cannot_copy_is_refused_with_the_reason(held):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    if held == "a lock":
        model.lock, error = threading.Lock(), TypeError
    else:
        model.features, error = [torch.randn(2, requires_grad=True) * 2], RuntimeError
    with pytest.raises(error, match=r"works on a copy of the model, and copy.deepcopy\(model\) failed: .*"):
        fastres.optimize(model)


class Untraceable(nn.Module):
    """Data-dependent control flow at the top defeats torch.fx; its blocks still get fused, in a
    ModuleList and a ModuleDict too (containers without a forward, which fx takes for leaves)."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stages = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())])
        self.heads = nn.ModuleDict({"main": nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))})
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.block(x)
        for stage in self.stages:
            y = stage(y)
        y = self.heads["main"](y)
        return self.head(y * 2 if y.sum() > 0 else y)


class RopeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x, rope=None):
        return self.proj(x) if rope is None else self.proj(x) * rope


class PassesItsBlocksAnArgument(nn.Module):
    """An untraceable forward handing its conv-free blocks an argument they default to None (a
    rope table, as timm's Qwen3 ViT does)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleList([RopeBlock(), RopeBlock()])

    def forward(self, x):
        x = self.stem(x)
        rope = torch.linspace(0.5, 1.5, 6) if x.sum() > 0 else torch.ones(6)
        for block in self.blocks:
            x = block(x, rope)
        return x


def test_modules_with_no_conv_inside_are_left_as_they_are():
    """Nothing to fuse in them, so they are not traced: traced with rope=None, the blocks would run
    their own forward at every call (the parent passes a rope), with a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        optimized = _check(PassesItsBlocksAnArgument(), torch.randn(2, 3, 6, 6), fused=1, total=1)
    assert all(type(block) is RopeBlock for block in optimized.blocks)


class CachesOnFirstCall(nn.Module):
    """Keeps what it computed from its first input: in an attribute, as torchvision's
    MultiScaleRoIAlign keeps its scales (Faster R-CNN's box and mask heads), in a new one, in a
    list, and in a dict, per device, as timm's EfficientViT keeps attention biases. And makes a tensor inside
    forward, which fx keeps as an attribute of the traced module (`_tensor_constant0`, as in timm's
    BEiT)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.size = None
        self.cache, self.seen = {}, []

    def forward(self, x):
        if self.size is None:
            self.size = x.shape[-1]
        if not hasattr(self, "height"):  # an attribute made on the first call
            self.height = x.shape[-2]
        if "scale" not in self.cache:
            self.cache["scale"] = x.shape[1]
        if not self.seen:
            self.seen.append(x.shape[0])
        y = F.relu(self.bn(self.conv(x))) / self.size * self.height / self.cache["scale"] * self.seen[0]
        return y * torch.tensor(0.5)


def test_a_forward_that_caches_into_self_keeps_no_trace_of_tracing():
    """Tracing runs the forward with Proxies: what it set on the module is undone (but not what fx
    added), so the optimized copy holds no Proxy, fuses, and its own forward (train mode) works."""
    model = randomize_batchnorm_(CachesOnFirstCall()).eval()
    optimized = fastres.optimize(model)  # before the model's first call
    assert optimized.size is None and not hasattr(optimized, "height")
    assert optimized.cache == {} and optimized.seen == []
    assert optimized.fastres_report.entries["conv"] == "fused: conv+bn+relu"
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(optimized.train()(x), model.train()(x), rtol=1e-5, atol=1e-5)


def test_untraceable_top_level_falls_back_to_its_children():
    """Its Sequentials are fused, those in its ModuleList and ModuleDict too; its own conv stays
    an nn.Conv2d (nothing to trace inside it), and the report says why it runs eagerly."""
    optimized = _check(Untraceable(), torch.randn(2, 3, 6, 6), fused=3, total=4)
    assert type(optimized) is Untraceable and type(optimized.head) is nn.Conv2d
    assert type(optimized.stages) is nn.ModuleList and type(optimized.heads) is nn.ModuleDict
    entries = optimized.fastres_report.entries
    assert entries["block.0"] == entries["stages.0.0"] == "fused: conv+bn+relu"
    assert entries["heads.main.0"] == "fused: conv+bn"
    assert optimized.fastres_report.entries["head"] == "eager: the model, which calls it, is not traceable with torch.fx (TraceError)"


class NotTracedInto(nn.Module):
    """A module the test registers with timm as not to be traced into."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        return self.body(x)


def even_crop(x: torch.Tensor) -> torch.Tensor:
    """x cropped to an even height and width: control flow on its shape, which fx cannot trace
    (the test registers it with timm as not to be traced into)."""
    if x.shape[-2] % 2 or x.shape[-1] % 2:
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
    return x


class SamePadded(nn.Module):
    """A TF-"same" strided conv (timm's Conv2dSame: it pads by the input's size, which torch.fx
    cannot trace) between conv + BN + ReLU chains, as in timm's MaxViT "tf" blocks."""

    def __init__(self):
        super().__init__()
        layers = pytest.importorskip("timm.layers")
        layers.register_notrace_module(NotTracedInto)
        layers.register_notrace_function(even_crop)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.down, self.down_bn = layers.Conv2dSame(8, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.leaf = NotTracedInto()

    def forward(self, x):
        y = even_crop(F.relu(self.bn1(self.conv1(x))))
        return self.leaf(F.relu(self.bn2(self.conv2(self.down_bn(self.down(y))))))


def test_a_model_fx_cannot_trace_is_traced_with_timms_modules_not_to_trace_into_as_calls():
    """Conv2dSame and a registered function stay calls (timm registers its own so for its fx
    feature extraction), the chains around them fuse, and a registered module with a chain
    inside is fused on its own."""
    optimized = _check(SamePadded(), torch.randn(2, 8, 9, 10), fused=4, total=4)
    assert optimized.fastres_report.entries == {
        "conv1": "fused: conv+bn+relu", "down": "fused: conv+bn", "conv2": "fused: conv+bn+relu",
        "leaf.body.0": "fused: conv+bn+relu"}
    assert isinstance(optimized, SamePadded) and isinstance(optimized.leaf, NotTracedInto)


class SameConvBNAct(nn.Module):
    """conv + BN + ReLU [+ x, then ReLU] whose conv pads as TensorFlow's SAME does: from the input's
    size, an odd total's extra row or column last (timm's Conv2dSame; PyTorch's padding="same")."""

    def __init__(self, conv: nn.Conv2d, add: bool = False):
        super().__init__()
        self.conv, self.bn, self.add = conv, nn.BatchNorm2d(conv.out_channels), add

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x) if self.add else F.relu(self.bn(self.conv(x)))


def _same_conv(kind: str, kernel, stride: int = 1, dilation: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    if kind == "Conv2dSame":
        layers = pytest.importorskip("timm.layers")
        return layers.Conv2dSame(8, 8, kernel, stride=stride, dilation=dilation, groups=groups, bias=bias)
    return nn.Conv2d(8, 8, kernel, stride=stride, padding="same", dilation=dilation, groups=groups, bias=bias)


# (kind, kernel, stride, dilation, groups), and the (h, w) input size the op sees and its padding for a
# 9 x 10 input: TF's SAME total along a size is (ceil(size / stride) - 1) * stride + dilation * (k - 1)
# + 1 - size, half of it on each side, the odd one out below / right (added by F.pad before the op).
SAME_CASES = [
    ("Conv2dSame", 3, 2, 1, 1, (9, 11), (1, 0)),     # totals 2, 1: only the width is padded first
    ("Conv2dSame", 5, 2, 1, 8, (9, 11), (2, 1)),     # depthwise; totals 4, 3
    ("Conv2dSame", 3, 1, 2, 1, (9, 10), (2, 2)),     # stride 1: dilation * (k - 1) = 4, symmetric
    ("Conv2dSame", (4, 3), 1, 1, 1, (10, 10), (1, 1)),   # an even kernel's odd total 3
    ("Conv2dSame", 1, 2, 1, 1, (9, 10), (0, 0)),     # 1x1: never padded
    ("padding='same'", 2, 1, 1, 1, (10, 11), (0, 0)),    # PyTorch's own: total 1 goes last too
    ("padding='same'", (4, 5), 1, 1, 8, (10, 10), (1, 2)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # eager's own conv, for ours
@pytest.mark.parametrize("kind,kernel,stride,dilation,groups,seen,padding", SAME_CASES,
                         ids=[f"{c[0]}-k{c[1]}s{c[2]}d{c[3]}g{c[4]}" for c in SAME_CASES])
def test_tf_same_padding_fuses_with_the_odd_row_and_column_padded_first(kind, kernel, stride, dilation, groups,
                                                                       seen, padding):
    """The op pads symmetrically: an odd SAME total's extra row / column is padded onto the input
    first (eager's Conv2dSame pads it all), an even one is the op's own padding (no pass over x)."""
    torch.manual_seed(0)
    model = SameConvBNAct(_same_conv(kind, kernel, stride, dilation, groups))
    optimized = _check(model, torch.randn(2, 8, 9, 10), fused=1, total=1)
    assert optimized.fastres_report.entries == {"conv": "fused: conv+bn+relu"}
    assert "padding='same' (from each input's size)" in repr(optimized)
    with ConvCallRecorder() as calls, torch.no_grad():
        optimized(torch.randn(2, 8, 9, 10))
    (case,) = calls.cases
    assert ((case.h, case.w), case.padding) == (seen, padding)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kind", ["Conv2dSame", "padding='same'"])
def test_tf_same_padding_takes_a_residual_and_any_input_size(kind):
    """The output's size, which the residual must match, comes from each call's input (stride 1,
    an even kernel: an odd total whatever the size)."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(SameConvBNAct(_same_conv(kind, 2), add=True)).eval()
    optimized = fastres.optimize(model)
    assert optimized.fastres_report.entries == {"conv": "fused: conv+bn+add+relu"}
    for size in [(5, 5), (6, 9), (1, 2)]:
        x = torch.randn(2, 8, *size)
        with torch.no_grad():
            expected = model(x)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a fallback to eager would warn
                got = optimized(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kind", ["Conv2dSame", "padding='same'"])
def test_a_same_padded_conv_without_batchnorm_caches_its_bias_once(kind):
    """A conv + ReLU with its bias as the op's shift: the float32 shift is made once and cached for
    the conv (on a GPU, a new one waits for its stream), whatever its padding, not per call."""
    conv = _same_conv(kind, 2, bias=True) if kind == "padding='same'" else _same_conv(kind, 3, stride=2, bias=True)
    optimized = fastres.optimize(nn.Sequential(conv, nn.ReLU()).eval(), dtype=torch.bfloat16)
    assert optimized.fastres_report.entries == {"0": "fused: conv+relu"}
    x = torch.randn(2, 8, 9, 10, dtype=torch.bfloat16)
    with torch.no_grad():
        optimized(x)
        cached = fastres.nn._fold_cache.get(optimized[0])
        optimized(x)
    assert cached is not None and fastres.nn._fold_cache[optimized[0]][1] is cached[1]
    assert cached[1].dtype == torch.float32


def test_torch_jit_trace_of_a_tf_same_padded_model_keeps_its_inputs_padding():
    """torch.jit.trace hands the forward its sizes as tensors; the trace keeps the traced input
    size's padding (as a trace of eager's Conv2dSame does) and gives eager's answer there."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(SameConvBNAct(_same_conv("Conv2dSame", 3, stride=2))).eval()
    optimized = fastres.optimize(model)
    x = torch.randn(2, 8, 9, 10)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(optimized, x)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not INTERPRETER, reason="CPU runs of the Triton kernels need TRITON_INTERPRET=1")
def test_tf_ported_timm_model_fuses_every_conv_on_the_triton_kernels():
    """tf_mobilenetv3's stem and stride-2 depthwise convs are Conv2dSame: with them every conv fuses,
    and the Triton kernels give eager's answer on odd and even input sizes."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_batchnorm_(timm.create_model("tf_mobilenetv3_small_minimal_100")).eval()
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    optimized = fastres.optimize(model, backend="triton", channels_last=False)
    assert len(optimized.fastres_report.fused) == convs, str(optimized.fastres_report)
    for size in [32, 33]:
        x = torch.randn(1, 3, size, size + 1)
        with torch.no_grad():
            torch.testing.assert_close(optimized(x), model(x), rtol=1e-3, atol=1e-3)


class DefaultArguments(nn.Module):
    """A forward whose optional arguments choose its path (`if scale is not None`, a flag), or
    (`residual`) must be given a tensor."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x, scale=None, pooled: bool = False):
        y = F.relu(self.bn(self.conv(x)))
        if scale is not None:
            y = y * scale
        return y.mean((2, 3)) if pooled else y


class NeedsItsResidual(DefaultArguments):
    def forward(self, x, residual=None):
        return F.relu(self.bn(self.conv(x)) + residual)


def test_arguments_with_constant_defaults_are_traced_as_their_defaults():
    """fx alone traces `scale=None` as a tensor, takes the `is not None` branch, and the default
    call breaks; optimize traces constants as their defaults: the default call is fused, a call
    with other values runs the model's own forward (and says so once), keyword calls work."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(DefaultArguments()).eval()
    x = torch.randn(2, 3, 6, 6)
    optimized = fastres.optimize(model, channels_last=False)
    assert optimized.fastres_report.entries["conv"] == "fused: conv+bn+relu"
    warned = []
    for kwargs in ({}, {"scale": 2.0}, {"pooled": True}, {"scale": torch.tensor(3.0), "pooled": False}, {}):
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught, ConvCallRecorder() as recorded:
            warnings.simplefilter("always")
            torch.testing.assert_close(optimized(x, **kwargs), model(x, **kwargs), rtol=1e-5, atol=1e-5)
        assert len(recorded.calls) == (0 if kwargs else 1), kwargs
        warned += [str(w.message) for w in caught]
    assert len(warned) == 1 and "this call's scale=2.0 is not the None the graph" in warned[0], warned


def test_loading_a_model_traced_with_a_none_default_leaves_torch_fx_working():
    """fx guards an argument traced as None with a wrapped call that a graph module's code names
    `wrap("torch.fx._symbolic_trace._assert_is_none")`; run again by torch.load, it made every
    later torch.fx trace in the process fail with a KeyError (pytorch/pytorch#130701), optimize's
    own included. The loaded model still takes a call with another value to its own forward."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(DefaultArguments()).eval()
    loaded = _saved_and_loaded(fastres.optimize(model))
    torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    assert fastres.optimize(model).fastres_report.entries["conv"] == "fused: conv+bn+relu"
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that scale=2.0 runs the model's own forward
        for kwargs in ({}, {"scale": 2.0}):
            torch.testing.assert_close(loaded(x, **kwargs), model(x, **kwargs), rtol=1e-5, atol=1e-5)


def test_example_inputs_that_pass_an_argument_trace_it_as_a_tensor():
    """A `residual=None` that callers always fill: with example_inputs passing it, the graph takes
    it as a tensor and fuses the add; without, such calls run the model's own forward."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(NeedsItsResidual()).eval()
    x, residual = torch.randn(2, 3, 6, 6), torch.randn(2, 8, 6, 6)
    for example_inputs, fused_calls in (((x, residual), 1), (None, 0)):
        optimized = fastres.optimize(model, channels_last=False, example_inputs=example_inputs)
        with torch.no_grad(), warnings.catch_warnings(), ConvCallRecorder() as recorded:
            warnings.simplefilter("ignore")
            torch.testing.assert_close(optimized(x, residual), model(x, residual), rtol=1e-5, atol=1e-5)
        assert len(recorded.calls) == fused_calls
    assert fastres.optimize(model, example_inputs=(x, residual)).fastres_report.entries["conv"] == "fused: conv+bn+add+relu"


class Broadcast(nn.Module):
    """conv -> BN + a learned tensor of `shape` -> ReLU: a position embedding (1, C, H, W) as in
    timm's PiT and Visformer patch embeddings, or a per-channel bias map (1, C, 1, 1)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8)
        self.embed = nn.Parameter(torch.randn(shape))

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + self.embed)


@pytest.mark.parametrize("shape", [(1, 8, 5, 5), (1, 8, 1, 1), (8, 1, 5)], ids=str)
def test_a_residual_that_broadcasts_to_the_output_is_fused_as_a_stride_0_view(shape):
    model = Broadcast(shape)
    x = torch.randn(3, 4, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ran eagerly"
        optimized = _check(model, x, fused=1)
    with ConvCallRecorder() as recorded, torch.no_grad():
        optimized(x)
    assert [c.residual for c in recorded.cases] == [True]
    # Autograd sums the gradient over the broadcast, as eager's add does.
    grads = [torch.autograd.grad(m(x).square().sum(), m.embed)[0] for m in (model, optimized)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)


def test_a_residual_the_output_broadcasts_to_runs_eagerly_and_says_so():
    with pytest.warns(RuntimeWarning, match=r"ran eagerly .* residual \(2, 8, 5, 5\)"):
        _check(Broadcast((2, 8, 5, 5)), torch.randn(1, 4, 5, 5), fused=1)


def test_training_mode_models_are_refused():
    with pytest.raises(RuntimeError, match="eval mode"):
        fastres.optimize(torchvision.models.resnet18().train())


@pytest.mark.parametrize("options,error,words", [
    (dict(backend="tensorrt"), ValueError, r"backend must be one of .* but got 'tensorrt'"),
    (dict(dtype="float16"), TypeError, r"dtype must be a floating-point torch.dtype .* but got 'float16'"),
    (dict(dtype=torch.int8), TypeError, r"dtype must be a floating-point torch.dtype .* but got torch.int8"),
])
def test_bad_arguments_are_refused_in_words(options, error, words):
    with pytest.raises(error, match=words):
        fastres.optimize(torchvision.models.resnet18().eval(), **options)


def _exported(model: nn.Module) -> torch.export.ExportedProgram:
    return torch.export.export(model, (torch.randn(1, 3, 32, 32),))


@pytest.mark.parametrize("make,words", [
    (lambda m: torch.jit.trace(m, torch.randn(1, 3, 32, 32)), "not a TorchScript module"),
    (_exported, "not a torch.export program"),
    (lambda m: _exported(m).module(), "not a torch.export program or its .module()"),
], ids=["torch.jit.trace", "ExportedProgram", "ExportedProgram.module"])
@pytest.mark.filterwarnings("ignore:`torch.jit.trace.* is deprecated:FutureWarning")
def test_compiled_forms_of_a_model_are_refused_with_the_way_round_that_works(make, words):
    """A TorchScript or torch.export form holds no conv / BatchNorm modules to fuse (and
    ep.module() cannot even be put in eval mode); the message says what works instead."""
    with pytest.raises(TypeError, match=f"{re.escape(words)}.*torch.export.export\\(fastres.optimize\\(model\\)"):
        fastres.optimize(make(torchvision.models.resnet18().eval()))


def test_the_original_model_is_not_changed():
    model = randomize_batchnorm_(torchvision.models.resnet18()).eval()
    before = copy.deepcopy(model.state_dict())
    fastres.optimize(model, dtype=torch.float64, channels_last=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert model.conv1.weight.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_an_optimized_float32_model_under_autocast_fuses_every_chain_in_autocasts_dtype(dtype):
    """torch.autocast on a float32 model: each fused op takes autocast's dtype, as eager's conv
    would (never a float32 op, never an eager fallback), and fastres.verify passes at that dtype."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(torchvision.models.resnet50()).eval()
    optimized = fastres.optimize(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype), warnings.catch_warnings():
        warnings.simplefilter("error")
        with ConvCallRecorder() as calls:
            out = optimized(x)
        report = fastres.verify(model, optimized, x, per_layer=True)
        assert out.dtype == model(x).dtype == dtype
    assert len(calls.calls) == 49 and {(args[0].dtype, args[1].dtype) for args, _ in calls.calls} == {(dtype, dtype)}
    assert report.ok and report.dtype == dtype and len(report.layers) == 49, str(report)


def test_dtype_and_channels_last_options():
    optimized = fastres.optimize(torchvision.models.resnet18().eval(), dtype=torch.float64)
    assert optimized.conv1.weight.dtype == torch.float64
    assert optimized.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert optimized(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_example_inputs_that_break_the_fused_model_return_the_unfused_one():
    model = randomize_batchnorm_(torchvision.models.resnet18()).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(RuntimeWarning, match="returning the unfused model"):
        optimized = fastres.optimize(model, backend="cuda", example_inputs=x)  # no GPU here: cuda cannot run
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x))
    assert not optimized.fastres_report.fused


def test_example_inputs_on_which_the_fused_output_changes_shape_return_the_unfused_model(monkeypatch):
    """A fused graph whose output is not built as the model's (here: torch.fx's own handling of a
    returned OrderedDict, a plain dict) is caught on example_inputs: the unfused copy comes back."""
    from fastres import converter

    monkeypatch.setattr(converter._Tracer, "create_arg", torch.fx.Tracer.create_arg)
    model = randomize_batchnorm_(Encoder(ordered=True)).eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match="it returned a dict shaped otherwise than the model's OrderedDict"):
        optimized = fastres.optimize(model, example_inputs=x)
    assert not optimized.fastres_report.fused
    with torch.no_grad():
        assert type(optimized(x)) is OrderedDict


@pytest.mark.parametrize("x, dtype", [(torch.randn(1, 1, 32, 32), None), (torch.randn(1, 3, 32, 32), torch.float64)],
                         ids=["wrong-channels", "wrong-dtype"])
def test_example_inputs_the_model_itself_fails_on_raise_its_error(x, dtype):
    """Not a fused copy's failure: the inputs are wrong for the model (or for the dtype optimize
    casts it to), and the model's own error says so."""
    model = torchvision.models.resnet18().eval()
    with pytest.raises(RuntimeError) as caught:
        fastres.optimize(model, dtype=dtype, example_inputs=x)
    assert "the model itself (an unfused copy, with optimize's dtype and layout) fails" in caught.value.__notes__[0]


def _off_by(monkeypatch, factor: float) -> None:
    """Make the CPU backend's fused calls wrong by `factor` (a kernel bug on some GPU)."""
    from fastres.backends import reference

    run = reference.run
    monkeypatch.setattr(reference, "run", lambda *args: run(*args) * factor)


def test_example_inputs_on_which_the_fused_answers_are_off_return_the_unfused_model(monkeypatch):
    _off_by(monkeypatch, 1.01)
    model = randomize_batchnorm_(torchvision.models.resnet18()).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(RuntimeWarning, match=r"the output's error against float64 is .* over its bound"):
        optimized = fastres.optimize(model, example_inputs=x)
    assert not optimized.fastres_report.fused
    eager = set(optimized.fastres_report.eager.values())
    assert eager == {"eager: optimized model failed on example_inputs (answers off)"}
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model(x))


@pytest.mark.parametrize("container", Features.CONTAINERS)
def test_example_inputs_judge_every_output_in_any_container(container, monkeypatch):
    """Off answers are refused in a dict subclass or a dataclass too, which torch's pytree takes for
    a leaf holding no tensors; the warning names the output."""
    _off_by(monkeypatch, 1.01)
    with pytest.warns(RuntimeWarning, match=r"output (\[0\]|\['shallow'\]|\.shallow)'s error against float64"):
        optimized = fastres.optimize(Features(container).eval(), example_inputs=torch.randn(1, 3, 32, 32))
    assert not optimized.fastres_report.fused


class _NoFloat64(nn.Module):
    """A model that cannot run in float64 (a kernel of its own for fp16 / fp32 only)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        torch._assert(x.dtype != torch.float64, "no float64 kernel")
        return self.body(x)


def test_example_inputs_whose_answers_no_float64_copy_can_judge_return_the_unfused_model(monkeypatch):
    _off_by(monkeypatch, 1.01)
    model = randomize_batchnorm_(_NoFloat64()).eval()
    with pytest.warns(RuntimeWarning, match="a float64 copy of the model, which would say which is right, failed "
                                            r"\(no float64 kernel\)"):
        optimized = fastres.optimize(model, example_inputs=torch.randn(2, 3, 8, 8))
    assert not optimized.fastres_report.fused


class _Labels(nn.Module):
    """A classifier that returns its predicted labels: integers, no values to compare."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        return self.body(x).flatten(1).argmax(1)


@pytest.mark.parametrize("make,x", [(_Labels, torch.randn(2, 3, 8, 8)), (_NoFloat64, torch.randn(0, 3, 8, 8))],
                         ids=["integer-labels", "empty-batch"])
def test_example_inputs_with_no_values_to_compare_say_the_answers_were_not_checked(make, x):
    model = randomize_batchnorm_(make()).eval()
    with pytest.warns(RuntimeWarning, match="holds no floating-point values .* its answers were not checked"):
        optimized = fastres.optimize(model, example_inputs=x)
    assert optimized.fastres_report.fused == ["body.0"]


def test_example_inputs_that_differ_by_more_than_the_tolerance_are_judged_against_float64(monkeypatch):
    """fp16 answers that differ from the unfused copy's by more than fp16's tolerance (here: made
    tiny) are not refused for that: a float64 copy runs, and the fused model, as close to it as
    the unfused one, is kept."""
    from fastres import verification
    from fastres.numerics import Tolerance

    monkeypatch.setattr(verification, "tolerance", lambda *args, **kwargs: Tolerance(1e-12, 1e-12, 1e-12))
    copies = []
    model_copy = verification.model_copy
    monkeypatch.setattr(verification, "model_copy", lambda m: copies.append(m) or model_copy(m))
    model = randomize_batchnorm_(torchvision.models.resnet18()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimized = fastres.optimize(model, dtype=torch.float16, example_inputs=torch.randn(2, 3, 32, 32).half())
    assert len(optimized.fastres_report.fused) == 20 and len(copies) == 1


def test_example_inputs_keep_a_fused_fp16_model_that_overflows_where_eager_does_or_less():
    """Where eager fp16 overflows and float64 does not, the fused op (one rounding, after BN's
    scale) gives Inf there or a finite value: no worse than the unfused copy, so it is kept."""
    model, x = overflowing_fp16_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimized = fastres.optimize(model, example_inputs=x)
    assert optimized.fastres_report.fused == ["0", "3"]
    with torch.no_grad():
        assert not model(x).isfinite().all(), "the case must overflow"


@pytest.mark.parametrize("source", ["torch", "own", "python", "numpy"])
def test_example_inputs_run_both_copies_on_one_random_state_and_leave_yours_as_it_was(source):
    """Your random state (torch's generator, one your model holds, Python's, numpy's) is where it
    was, and the copy handed back draws next what your model would."""
    model = randomize_batchnorm_(SamplesInEval(source)).eval()
    x = torch.randn(2, 3, 8, 8)
    before = model.random_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimized = fastres.optimize(model, example_inputs=x)
    assert model.random_state() == before
    assert optimized.fastres_report.fused == ["body.0"]
    with torch.random.fork_rng():
        host_states = random.getstate(), numpy.random.get_state()
        expected = model(x)
        random.setstate(host_states[0])
        numpy.random.set_state(host_states[1])
    torch.testing.assert_close(optimized(x), expected)


@pytest.mark.parametrize("source", ["torch", "own", "python", "numpy"])
def test_example_inputs_judge_a_model_that_draws_random_numbers_against_its_unfused_copy(monkeypatch, source):
    """A float64 copy of a model that samples draws other numbers, so it cannot judge: answers off
    on the same draws are refused, not passed against twice the unfused copy's (large) error."""
    _off_by(monkeypatch, 1.01)
    model = randomize_batchnorm_(SamplesInEval(source)).eval()
    with pytest.warns(RuntimeWarning, match="on the same random draws, by more than the float32 tolerance"):
        optimized = fastres.optimize(model, example_inputs=torch.randn(2, 3, 8, 8))
    assert not optimized.fastres_report.fused


def test_example_inputs_refuse_answers_of_a_model_whose_draws_cannot_be_repeated():
    """Noise from a global torch.Generator object: the copies draw different numbers, and the
    unfused model run again answers otherwise, so no float64 copy can judge: the unfused copy."""
    model = randomize_batchnorm_(SamplesInEval("global")).eval()
    with pytest.warns(RuntimeWarning, match="the unfused model answers otherwise when run again"):
        optimized = fastres.optimize(model, example_inputs=torch.randn(2, 3, 8, 8))
    assert not optimized.fastres_report.fused


def test_checking_example_inputs_runs_your_hooks_once():
    """optimize runs the optimized copy and the unfused one on example_inputs; the hooks, which both
    share with your model, see the optimized copy's call only."""
    model = randomize_batchnorm_(Encoder(ordered=True)).eval()
    calls = []
    model.stage.register_forward_hook(lambda module, args, out: calls.append(module))
    fastres.optimize(model, example_inputs=torch.randn(2, 3, 8, 8))
    assert len(calls) == 1


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["float32", "autocast-bf16"])
def test_precompile_lists_the_calls_on_meta_tensors_and_leaves_the_model_untouched(monkeypatch, autocast):
    """What precompile compiles ahead is read off a meta-tensor run: the same calls, shapes,
    strides and dtypes as the real first call (in an autocast region, autocast's, though meta
    tensors are outside it), and the real call afterwards is still right (BN's cached fold is not
    left holding meta tensors)."""
    from fastres.compilation import by_name, recorded_calls

    model = randomize_batchnorm_(torchvision.models.resnet18()).eval()
    optimized = fastres.optimize(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        planned = recorded_calls(optimized, (x,), "cpu")
        with ConvCallRecorder() as recorder, torch.no_grad():
            got, expected = optimized(x), model(x)
    tol = 1e-4 if autocast is None else 2e-2  # bf16: eager rounds after every step, the op once
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    # Strides compared where they matter: a size-1 dim's stride is never used (here the 1x1 maps
    # of a 32x32 input, whose strides the CPU reference leaves as its conv made them).
    tensors = lambda call: [(v.shape, [st for st, n in zip(v.stride(), v.shape) if n > 1], v.dtype)  # noqa: E731
                            if isinstance(v, torch.Tensor) else v for v in call]
    assert len(planned) == len(recorder.calls) == 17
    assert [tensors(p.values()) for p in planned] == [tensors(by_name(*call).values()) for call in recorder.calls]
    assert all(p["x"].device.type == "meta" and p["x"].dtype == (autocast or torch.float32) for p in planned)
    assert fastres.precompile(optimized, x) == 0  # nothing to compile for CPU tensors

    seen = []
    monkeypatch.setattr("fastres.converter.precompile", lambda m, *inputs: seen.append((m, inputs)))
    fastres.optimize(model, example_inputs=x)
    assert len(seen) == 1 and seen[0][1] == (x,)


def test_precompile_compiles_on_its_inputs_device(monkeypatch):
    """Triton compiles into the current device's kernel cache: a model on cuda:1 precompiled from a
    thread whose current device is 0 must compile with cuda:1 current, or its first call compiles
    again. Checked with a fake cuda:1 input and stand-ins for the device switch and the compiles."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastres import compilation, kernels
    from fastres.backends import triton as triton_backend

    current = [0]

    class Device:  # torch.cuda.device's stand-in
        def __init__(self, device: torch.device) -> None:
            self.index = torch.device(device).index

        def __enter__(self) -> None:
            current.append(self.index)

        def __exit__(self, *exc) -> None:
            current.pop()

    compiled_on = []
    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(triton_backend, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(compilation, "recorded_calls", lambda model, inputs, device_type: [])
    monkeypatch.setattr(compilation, "compile_launches",
                        lambda calls, device: [lambda: compiled_on.append(current[-1])])
    monkeypatch.setattr(kernels, "compile_ahead", lambda compiles: [compile_one() for compile_one in compiles])
    with FakeTensorMode():
        x = torch.empty(1, 3, 8, 8, device="cuda:1")
    assert fastres.precompile(nn.Identity(), x) == 1
    assert compiled_on == [1] and current == [0]


def test_precompile_compiles_each_leaky_relu_slope(monkeypatch):
    """The slope is a Triton kernel constant: two layers of one shape, LeakyReLU(0.1) and (0.2),
    are two compiles ahead, each with its own slope (not tuning's shared key, not the default)."""
    from fastres import backends, compilation
    from fastres.backends import triton as triton_backend

    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.2)).eval()
    optimized = fastres.optimize(model, backend="triton")
    calls = compilation.recorded_calls(optimized, (torch.randn(2, 8, 6, 6),))
    slopes = []
    monkeypatch.setattr(backends, "tuned_by", lambda name, backend, problem, device: [problem])
    monkeypatch.setattr(triton_backend, "compiles", lambda problem, *args: slopes.append(problem.negative_slope) or [])
    list(compilation.compile_launches(calls, torch.device("cpu")))
    assert slopes == [0.1, 0.2]


def test_train_mode_after_optimize_runs_eagerly():
    model = randomize_batchnorm_(torchvision.models.resnet18()).eval()
    optimized = fastres.optimize(model, channels_last=False).train()  # same layout: same summation order
    eager = copy.deepcopy(model).train()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(optimized(x), eager(x))
    stats = {k: v for k, v in eager.state_dict().items() if "running" in k}
    assert "layer2.0.downsample.1.running_mean" in stats  # a projected residual's BN learns too
    for key, value in stats.items():
        torch.testing.assert_close(optimized.state_dict()[key], value)


@pytest.mark.parametrize("saved", [False, True], ids=["optimized", "saved-and-loaded"])
@pytest.mark.parametrize("name,drop", [("resnet18", dict(drop_rate=0.5)), ("efficientnet_b0", dict(drop_path_rate=0.2))],
                         ids=["head-dropout", "stochastic-depth"])
def test_train_mode_runs_the_models_own_forward(name, drop, saved):
    """The graph is traced in eval mode; a forward that reads self.training (timm's head dropout,
    F.dropout(training=self.training), and its DropPath's stochastic depth) must see train mode
    when fine-tuning the optimized model, or one torch.save wrote and torch.load read back: the
    same masks as eager from the same seed."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_batchnorm_(timm.create_model(name, num_classes=10, **drop)).eval()
    optimized = fastres.optimize(model, channels_last=False)
    optimized = (_saved_and_loaded(optimized) if saved else optimized).train()
    eager = copy.deepcopy(model).train()
    x = torch.randn(4, 3, 32, 32)
    outs = []
    for m in (optimized, eager):
        torch.manual_seed(1)
        outs.append(m(x))
    torch.testing.assert_close(*outs)
    with ConvCallRecorder() as calls, torch.no_grad():
        optimized.eval()(x)
    assert len(calls.calls) == sum(isinstance(m, FusedConvBN) for m in optimized.modules()) > 0


def test_torch_jit_trace_of_the_optimized_model_follows_its_parameters():
    """torch.jit.trace (deprecated, still used to deploy) works with or without autograd, and
    traces BN's fold inline: a parameter changed after tracing reaches the traced module."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(torchvision.models.resnet18()).eval()
    optimized = fastres.optimize(model)
    x = torch.randn(2, 3, 32, 32)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation and the tracer's warnings
            traced = torch.jit.trace(optimized, x)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        for m in (model, optimized):
            m.layer1[0].bn1.weight.mul_(2.0)
        torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [lambda: fastres.optimize(torchvision.models.resnet18().eval()),
                                  lambda: fastres.models.resnet18().eval()], ids=["optimized", "zoo"])
def test_torch_jit_script_is_refused_in_words(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation
        with pytest.raises(RuntimeError, match="cannot be compiled with torch.jit.script, which torch deprecates; "
                                               "torch.jit.trace, torch.export and torch.compile all keep the fused op"):
            torch.jit.script(make())


def test_torch_compile_on_the_optimized_model():
    torch._dynamo.reset()
    model = randomize_batchnorm_(torchvision.models.resnet18()).eval()
    optimized = fastres.optimize(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(optimized)(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_torch_compile_with_dynamic_shapes_on_the_optimized_model(layout):
    """A second image size makes torch.compile trace sizes symbolically: the op's output must keep
    its strides there too, also for a 1x1 conv, whose weight is both layouts at once and whose
    conv2d output follows x's (the compiled code once asserted NCHW and got channels_last).
    Eager's values, and the uncompiled model's memory format, come back at every size."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomize_batchnorm_(nn.Sequential(
        nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())).eval()
    optimized = fastres.optimize(model)
    compiled = torch.compile(optimized)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for size in [(9, 10), (12, 7), (5, 5)]:
        x = torch.randn(2, 4, *size).contiguous(memory_format=memory_format)
        with torch.no_grad(), inductor_config.patch(fx_graph_cache=False):  # compiled here, not loaded
            got, fused, expected = compiled(x), optimized(x), model(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert got.stride() == fused.stride()


@pytest.mark.parametrize("inside", [False, True], ids=["alone", "inside-a-model"])
def test_optimizing_a_fastres_model_keeps_it(inside):
    model = fastres.models.resnet18().eval()
    optimized = fastres.optimize(nn.Sequential(model, nn.Softmax(1)).eval() if inside else model)
    assert len(optimized.fastres_report.fused) == 20
    assert set(optimized.fastres_report.entries.values()) == {"fused: already a fastres module"}
    assert ("0.layer1.0.conv1" if inside else "layer1.0.conv1") in optimized.fastres_report.entries


def test_optimizing_an_optimized_model_keeps_its_graph_report_and_hook_watch():
    """optimize(optimize(model)): the same fused graph and report, the same later-hook check."""
    model = randomize_batchnorm_(torchvision.models.resnet18()).eval()
    model.layer1[0].conv1.register_forward_hook(lambda m, args, out: None)
    once = fastres.optimize(model)
    twice = fastres.optimize(once)
    assert twice.fastres_report.entries == once.fastres_report.entries
    assert len(twice.fastres_report.fused) == 19
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), ConvCallRecorder() as calls:
        torch.testing.assert_close(twice(x), model(x), rtol=1e-4, atol=1e-4)
    assert len(calls.calls) == 16
    log = HookLog()
    register_hook(twice, "layer2.0.conv1", log)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="layer2.0.conv1 has a forward hook"):
        twice(x)
    assert len(log.seen) == 1


@pytest.mark.gpu
def test_gpu_cuda_graph_of_the_optimized_model():
    model = randomize_batchnorm_(torchvision.models.resnet50()).eval().cuda().half()
    optimized = fastres.optimize(model)
    x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        optimized(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = optimized(x)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, optimized(x))
    assert fastres.verify(model, optimized, x).ok


@pytest.mark.gpu
def test_gpu_an_eager_call_between_a_cuda_graph_capture_without_warm_up_and_its_replay():
    """A capture only records the BN folds' kernels: an eager call before the first replay must
    fold for itself, not read what the capture left unwritten."""
    model = randomize_batchnorm_(torchvision.models.resnet18()).eval().cuda().half()
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        fastres.optimize(model)(x)  # compiles and loads the kernels; its folds are its own copy's
        optimized = fastres.optimize(model)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = optimized(x)
        eager = optimized(x).clone()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, eager)
    assert fastres.verify(model, optimized, x).ok


@pytest.mark.gpu
def test_gpu_a_cuda_graph_keeps_capture_time_folds_after_bn_changes_and_an_eager_refold():
    """The graph reads the folds cached by the warm-up; an eager call after BN changes refolds into
    new tensors, and the graph's must stay alive and unchanged (reallocated, they would be garbage)."""
    model = randomize_batchnorm_(torchvision.models.resnet18()).eval().cuda().half()
    optimized = fastres.optimize(model)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        before = optimized(x).clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = optimized(x)
        for module in optimized.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.mul_(4.0)
        after = optimized(x).clone()
        garbage = [torch.full((1 << 16,), float("nan"), device="cuda") for _ in range(64)]
        graph.replay()
        torch.cuda.synchronize()
        del garbage
        torch.testing.assert_close(captured, before)
        assert not torch.allclose(after, before)


@pytest.mark.gpu
def test_gpu_reduce_overhead_compile():
    model = randomize_batchnorm_(torchvision.models.resnet18()).eval().cuda().half()
    optimized = fastres.optimize(model)
    x = torch.randn(2, 3, 224, 224, device="cuda", dtype=torch.float16)
    compiled = torch.compile(optimized, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):
            out = compiled(x)
        torch.testing.assert_close(out, optimized(x), rtol=2e-3, atol=2e-3)


def test_the_readme_example_works_when_pasted():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("## Speed up your own ResNet", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own snippet
    assert namespace["y"].shape == (8, 1000)
    assert len(namespace["fast"].fastres_report.fused) == 53
