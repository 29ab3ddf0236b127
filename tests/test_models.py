"""The model zoo has torchvision's exact architecture and state_dict keys, and the same answers."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

import fastres
from fastres.models import ARCHITECTURES
from fastres.numerics import compare, tolerance
from fastres.shapes import ConvCallRecorder, randomize_batchnorm_
from helpers import INTERPRETER, assert_hooks_saw_the_same, hooked_run

ARCHS = sorted(ARCHITECTURES)


def _leaves(model: nn.Module) -> list[tuple[str, str, tuple]]:
    return [(name, type(m).__name__, tuple((n, tuple(p.shape)) for n, p in m.named_parameters(recurse=False)))
            for name, m in model.named_modules() if not list(m.children())]


@pytest.mark.parametrize("arch", ARCHS)
def test_same_architecture_and_keys_as_torchvision(arch):
    ours, theirs = ARCHITECTURES[arch](), getattr(torchvision.models, arch)()
    assert _leaves(ours) == _leaves(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_weights_give_torchvision_answers_both_ways(arch, dtype):
    torch.manual_seed(0)
    theirs = randomize_batchnorm_(getattr(torchvision.models, arch)()).eval().to(dtype)
    ours = ARCHITECTURES[arch](weights=theirs.state_dict(), backend="reference").eval().to(dtype)
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, **_tol(dtype))
        back = getattr(torchvision.models, arch)().eval().to(dtype)
        back.load_state_dict(ours.state_dict())
        torch.testing.assert_close(back(x), expected, rtol=0, atol=0)


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_under_autocast_the_zoo_is_torchvision_in_autocasts_dtype(dtype):
    torch.manual_seed(0)
    theirs = randomize_batchnorm_(torchvision.models.resnet50()).eval()
    ours = ARCHITECTURES["resnet50"](weights=theirs.state_dict()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        report = fastres.verify(theirs, ours, x)
        assert ours(x).dtype == theirs(x).dtype == dtype
    assert report.ok and report.dtype == dtype, str(report)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_fx_tracing_sees_torchvisions_graph_and_optimize_fuses_it_again(arch):
    """torchvision's feature extraction on a zoo model: torch.fx sees torchvision's modules and
    node names (unfused while traced); fastres.optimize of the extractor fuses every conv again."""
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    theirs = randomize_batchnorm_(getattr(torchvision.models, arch)()).eval()
    ours = ARCHITECTURES[arch](weights=theirs.state_dict()).eval()
    assert get_graph_node_names(ours) == get_graph_node_names(theirs)
    nodes = {"layer2": "mid", "layer4": "features"}
    optimized = fastres.optimize(create_feature_extractor(ours, nodes))
    assert len(optimized.fastres_report.fused) == len(optimized.fastres_report.entries)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), create_feature_extractor(theirs, nodes)(x), rtol=1e-4, atol=1e-4)


def test_weights_from_a_path(tmp_path):
    theirs = randomize_batchnorm_(torchvision.models.resnet18()).eval()
    path = tmp_path / "resnet18.pt"
    torch.save(theirs.state_dict(), path)
    ours = fastres.models.resnet18(weights=path, backend="reference").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("given", ["member", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"])
def test_torchvision_weights_load_as_torchvision_loads_them(given, hub_cache):
    """Code written for torchvision (`resnet18(weights=ResNet18_Weights.DEFAULT)`, or its name)
    runs unchanged: the zoo model gets the state torchvision's own builder gets."""
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    hub_cache(weights, randomize_batchnorm_(torchvision.models.resnet18()).state_dict())
    theirs = torchvision.models.resnet18(weights=weights, progress=False)
    ours = fastres.models.resnet18(weights=weights if given == "member" else given, progress=False)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("options,error,words", [
    (dict(weights=torchvision.models.ResNet50_Weights.DEFAULT), TypeError, "expected ResNet18_Weights but received "
                                                                           "ResNet50_Weights"),
    (dict(weights="IMAGENET1K_V9"), FileNotFoundError, "'IMAGENET1K_V9': no such file, nor a name of torchvision's "
                                                       r"ResNet18_Weights \(IMAGENET1K_V1, DEFAULT\)"),
    (dict(weights="DEFAULT", num_classes=10), ValueError, "'num_classes' expected value 1000 but got 10"),
])
def test_torchvision_weights_for_another_model_are_refused_in_torchvisions_words(options, error, words, hub_cache):
    hub_cache(torchvision.models.ResNet18_Weights.DEFAULT, torchvision.models.resnet18().state_dict())
    with pytest.raises(error, match=words):
        fastres.models.resnet18(**options)


def test_train_mode_matches_torchvision_including_bn_statistics():
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(num_classes=10).train()
    ours = fastres.models.resnet18(weights=theirs.state_dict(), num_classes=10).train()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.layer2[0].bn1.running_var, theirs.layer2[0].bn1.running_var)


NORM_LAYERS = {
    "FrozenBatchNorm2d": (torchvision.ops.FrozenBatchNorm2d, 17),  # detection backbones': folded, every op fused
    "GroupNorm": (lambda c: nn.GroupNorm(8, c), 0),
    "InstanceNorm2d": (nn.InstanceNorm2d, 0),
    "Identity": (nn.Identity, 0),
    "BatchNorm2d-untracked": (lambda c: nn.BatchNorm2d(c, track_running_stats=False), 0),  # batch statistics
}


@pytest.mark.parametrize("norm", NORM_LAYERS)
def test_any_norm_layer_torchvision_takes_gives_torchvisions_answers(norm):
    """torchvision's ResNet takes any norm_layer. One the op cannot take as its epilogue (not a
    BatchNorm with running statistics) runs as its modules, with a warning; it failed deep in the
    BN fold with an AttributeError."""
    norm_layer, fused = NORM_LAYERS[norm]
    theirs = torchvision.models.resnet18(norm_layer=norm_layer).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = fastres.models.resnet18(norm_layer=norm_layer, weights=theirs.state_dict(), backend="reference").eval()
    assert [str(w.message).split(" modules,")[0] for w in caught] == (
        [] if fused else [f"fastres.models: norm_layer makes {type(theirs.bn1).__name__}"])
    x = torch.randn(2, 3, 64, 64)
    with ConvCallRecorder() as calls, torch.no_grad():
        got = ours(x)
        torch.testing.assert_close(got, theirs(x), rtol=1e-4, atol=1e-4)
    assert len(calls.calls) == fused
    report = fastres.verify(theirs, ours, x, per_layer=True)  # each fused op checked, no other
    assert report.ok and len(report.layers) == fused, str(report)


def test_a_batchnorm_in_train_mode_in_an_eval_model_normalizes_by_the_batch_as_in_torchvision():
    """A BN put in train mode on its own (a model otherwise in eval) uses and updates batch
    statistics in torchvision; the zoo's op that would fold its running statistics runs it as a
    module instead, and the others stay fused."""
    theirs = randomize_batchnorm_(torchvision.models.resnet18()).eval()
    ours = fastres.models.resnet18(weights=theirs.state_dict(), backend="reference").eval()
    for model in (theirs, ours):
        model.layer2[0].bn2.train()
    x = torch.randn(4, 3, 32, 32)
    with ConvCallRecorder() as calls, torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
    assert len(calls.calls) == 16  # layer2.0's last op (its projection too) runs as modules; the rest fuse
    torch.testing.assert_close(ours.layer2[0].bn2.running_var, theirs.layer2[0].bn2.running_var)


@pytest.mark.parametrize("where,fused", [("layer1.0.conv1", 16), ("layer2.0.bn2", 16), ("layer3.1.relu", 15),
                                         ("layer4.0.downsample.0", 16), ("layer4", 17), ("global", 0)])
def test_hooks_on_a_blocks_modules_run_as_in_torchvision(where, fused):
    """A hook on a conv, BN, relu or downsample inside a block runs as in torchvision (with the
    values torchvision gives it): the ops that call that module run as eager modules, the
    others stay fused."""
    torch.manual_seed(0)
    theirs = randomize_batchnorm_(torchvision.models.resnet18()).eval()
    ours = fastres.models.resnet18(weights=theirs.state_dict(), backend="reference").eval()
    x = torch.randn(2, 3, 32, 32)
    want, want_seen, _, _ = hooked_run(theirs, where, x)
    got, got_seen, fused_calls, _ = hooked_run(ours, where, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert_hooks_saw_the_same(got_seen, want_seen)
    assert len(fused_calls) == fused


def test_zoo_options_follow_torchvision():
    model = fastres.models.resnet50(zero_init_residual=True, replace_stride_with_dilation=[False, True, True])
    theirs = torchvision.models.resnet50(zero_init_residual=True, replace_stride_with_dilation=[False, True, True])
    assert _leaves(model) == _leaves(theirs)
    assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for b in model.modules() if isinstance(b, fastres.nn.Bottleneck))


@pytest.mark.skipif(not INTERPRETER, reason="CPU runs of the Triton kernels need TRITON_INTERPRET=1")
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_triton_backend_whole_model(arch):
    torch.manual_seed(0)
    theirs = randomize_batchnorm_(getattr(torchvision.models, arch)()).eval()
    ours = ARCHITECTURES[arch](weights=theirs.state_dict(), backend="triton").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        reference = theirs.double()(x.double())
        got = ours(x)
        eager = theirs.float()(x)
    fused, baseline = compare(got, reference, tolerance(torch.float32)), compare(eager, reference, tolerance(torch.float32))
    assert fused.rel_norm <= max(tolerance(torch.float32).rel_norm, 2 * baseline.rel_norm), (fused, baseline)
