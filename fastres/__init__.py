"""fastres: fused conv + batch-norm + residual-add + activation kernels for ResNet-style inference.

    import fastres
    model = fastres.optimize(torchvision.models.resnet50().eval())   # fused, same answers
    print(model.fastres_report)

The op: fastres.ops.conv_bn_act (torch.ops.fastres.conv_bn_act). Backends: fastres.backend_status().
"""

from __future__ import annotations

__version__ = "0.1.0"

from fastres import ops
from fastres.backends import status as backend_status
from fastres.ops import conv_bn_act

__all__ = ["__version__", "ops", "conv_bn_act", "backend_status", "nn", "models", "optimize", "verify", "precompile"]


def __getattr__(name: str):
    # The model-level modules import torch.fx and friends; load them on first use.
    import importlib

    if name in ("nn", "models"):
        return importlib.import_module(f"fastres.{name}")
    if name == "optimize":
        return importlib.import_module("fastres.converter").optimize
    if name == "precompile":
        return importlib.import_module("fastres.compilation").precompile
    if name == "verify":
        return importlib.import_module("fastres.verification").verify
    raise AttributeError(f"module 'fastres' has no attribute {name!r}")
