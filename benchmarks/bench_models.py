"""Whole-model pytest-benchmark suite: fastres.optimize vs eager and torch.compile."""

from __future__ import annotations

import pytest
import torch

from fastres.bench import models

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.float16 if GPU else torch.float32
SETTINGS = [(a, b, 224) for a in ("resnet18", "resnet50", "resnext50_32x4d") for b in (1, 32, 256)] if GPU \
    else [("resnet18", 1, 32)]
CONTENDERS = ["eager-cl", "compile", "fastres-auto", "fastres-triton", "fastres-cuda"] + (
    ["eager-cl+graph", "fastres-auto+graph"] if GPU else [])


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("arch,batch,image", SETTINGS)
def test_model(benchmark, arch, batch, image, contender):
    model = models.named_model(arch).to(DEVICE)
    x = torch.randn(batch, 3, image, image, device=DEVICE, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        try:
            fn = models.build(contender, model, DTYPE, x)
            fn(x)
        except (NotImplementedError, RuntimeError) as exc:
            pytest.skip(f"{contender}: {str(exc).splitlines()[0]}")
        benchmark.group = f"{arch} batch {batch}"
        benchmark(lambda: (fn(x), torch.cuda.synchronize() if GPU else None))
