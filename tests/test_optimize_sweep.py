"""fastres.optimize over whole model libraries: every torchvision classification, segmentation and
optical-flow model, and the first few models of every timm family, with seeded random weights.
Each must optimize without an error or a fastres warning, name every conv in its report, and give
eager's answers. Not part of `make test` (about 15 minutes on 2 cores): run it with `make
test-sweep` after changing the converter. Such a sweep found the converter bugs that
benchmarks/NOTES.md lists for the nineteenth session, which the hand-written patterns had missed."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

import fastres
from fastres.bench.models import named_model
from fastres.shapes import randomize_batchnorm_
from fastres.verification import output_leaves, placed_otherwise

pytestmark = pytest.mark.sweep

PER_FAMILY = int(os.environ.get("FASTRES_SWEEP_PER_FAMILY", "3"))
TORCHVISION_KINDS = ("", "segmentation", "optical_flow")  # detection's ranked boxes flip on near-ties


def _timm_models() -> list[str]:
    """The first PER_FAMILY models of each timm family (module), shortest names first: the base
    and small variants, which build and run quickly."""
    try:
        import timm
        from timm.models import _registry
    except ImportError:
        return []
    families: dict[str, list[str]] = {}
    for name in timm.list_models():
        families.setdefault(_registry._model_to_module[name], []).append(name)
    return [n for names in families.values() for n in sorted(names, key=lambda n: (len(n), n))[:PER_FAMILY]]


def _torchvision_models() -> list[str]:
    kinds = [getattr(torchvision.models, kind) if kind else torchvision.models for kind in TORCHVISION_KINDS]
    return [f"{kind or 'classification'}:{name}" for kind, module in zip(TORCHVISION_KINDS, kinds)
            for name in torchvision.models.list_models(module=module)]


def _build(model_id: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model with seeded weights and BN statistics, in eval mode, and inputs it accepts."""
    source, name = model_id.split(":", 1)
    if source in ("timm", "classification"):  # what `fastres bench` and `fastres verify` build
        model = named_model(model_id if source == "timm" else name)
        size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))[1:]
    else:
        torch.manual_seed(0)
        extra = {"weights_backbone": None} if source == "segmentation" else {}
        model = randomize_batchnorm_(torchvision.models.get_model(name, weights=None, **extra)).eval()
        size = (128, 128) if source == "optical_flow" else (224, 224)
    inputs = (torch.randn(2, 3, *size),) * (2 if source == "optical_flow" else 1)
    # Small images first (fast); a model that needs its own size (position embeddings) gets it.
    for hw in ((64, 64), size) if source in ("timm", "classification") else (size,):
        candidate = tuple(torch.randn(2, 3, *hw) for _ in inputs)
        try:
            with torch.no_grad():
                model(*candidate)
        except Exception:  # noqa: BLE001 - too small for this model: try its own size
            continue
        return model, candidate
    return model, inputs


@pytest.mark.parametrize("model_id", [f"timm:{n}" for n in _timm_models()] + _torchvision_models())
def test_optimize_keeps_the_models_answers(model_id):
    model, inputs = _build(model_id)
    with torch.no_grad():
        expected = model(*inputs)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="fastres")
            optimized = fastres.optimize(model)
            got = optimized(*inputs)
    convs = {name for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)}
    assert convs <= set(optimized.fastres_report.entries), str(optimized.fastres_report)
    assert not placed_otherwise(got, expected), f"{type(got).__name__} for {type(expected).__name__}"
    for (where, e), (_, g) in zip(output_leaves(expected), output_leaves(got)):
        if not isinstance(e, torch.Tensor):
            continue
        assert g.shape == e.shape and g.dtype == e.dtype
        if e.is_floating_point():
            # float32 on the CPU (the reference backend): BN folded, rounded in another order.
            error = (g.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30)
            assert error <= 1e-4, f"output {where}: relative error {error:.2e}"
        else:
            assert torch.equal(g, e), f"output {where}"
