"""fastres.optimize on Hugging Face transformers' conv nets, built from their configs (random
weights, no download): what they return, what fuses, and their answers against eager's."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn as nn

import fastres
from fastres.shapes import randomize_batchnorm_

transformers = pytest.importorskip("transformers")


def _models() -> dict[str, object]:
    """Small configs of each architecture (fewer and narrower stages than the hub's checkpoints)."""
    t = transformers
    return {
        "resnet-basic": lambda: t.ResNetForImageClassification(
            t.ResNetConfig(layer_type="basic", depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], embedding_size=8)),
        "resnet-bottleneck": lambda: t.ResNetForImageClassification(
            t.ResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], embedding_size=8)),
        "regnet": lambda: t.RegNetForImageClassification(
            t.RegNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], embedding_size=8, groups_width=8)),
        "efficientnet": lambda: t.EfficientNetForImageClassification(
            t.EfficientNetConfig(width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320)),
        "mobilenet_v1": lambda: t.MobileNetV1ForImageClassification(t.MobileNetV1Config(depth_multiplier=0.25)),
        "mobilenet_v2": lambda: t.MobileNetV2ForImageClassification(t.MobileNetV2Config(depth_multiplier=0.35)),
    }


MODELS = list(_models())


def _convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


@pytest.mark.parametrize("name", MODELS)
def test_every_conv_fuses_and_the_model_output_comes_back(name):
    """Every conv fuses: EfficientNet's depthwise convs are a Conv2d subclass, MobileNet's pad with
    TensorFlow's SAME from each input's size (apply_tf_padding). The model returns its ModelOutput
    (its encoder's, read by position inside, too), with eager's logits at odd sizes, and so does
    its torch.save / torch.load copy."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(_models()[name]()).eval()
    optimized = fastres.optimize(model)
    report = optimized.fastres_report
    assert len(report.fused) == len(report.entries) == _convs(model), str(report)
    for size in [(64, 64), (65, 47)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no call may fall back
            got, expected = optimized(x), model(x)
        assert type(got) is type(expected) and list(got.keys()) == list(expected.keys())
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)
    buffer = io.BytesIO()
    torch.save(optimized, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected.logits, rtol=1e-4, atol=1e-4)
    torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))  # loading left torch.fx working


def test_hidden_states_and_a_tuple_output_run_the_models_own_forward():
    """output_hidden_states=True and return_dict=False are not the defaults the graph was traced
    with: those calls run the model's own forward (with a warning), with eager's answers."""
    torch.manual_seed(0)
    model = randomize_batchnorm_(_models()["resnet-basic"]()).eval()
    optimized = fastres.optimize(model)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hidden, expected = optimized(x, output_hidden_states=True), model(x, output_hidden_states=True)
        tupled = optimized(x, return_dict=False)
    assert len(hidden.hidden_states) == len(expected.hidden_states) == 5
    for got, want in zip(hidden.hidden_states, expected.hidden_states):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert isinstance(tupled, tuple)
    torch.testing.assert_close(tupled[0], expected.logits, rtol=1e-4, atol=1e-4)
    assert any("output_hidden_states=True" in str(w.message) for w in caught)
