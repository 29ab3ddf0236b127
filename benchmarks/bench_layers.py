"""Per-layer pytest-benchmark suite: fused conv + BN + [residual] + ReLU vs the baselines."""

from __future__ import annotations

import pytest
import torch

from fastres.bench import layers
from fastres.bench.harness import Rotation, copies_to_exceed_l2, failure_note
from fastres.shapes import make_inputs

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.float16 if GPU else torch.float32
CASES = layers.layer_cases(["resnet18", "resnet50", "resnext50_32x4d"], batch=128) if GPU else layers.smoke_cases()
CONTENDERS = layers.BASELINES + layers.CONTENDERS


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_layer(benchmark, case, contender):
    inputs = make_inputs(case, DTYPE, DEVICE)
    bytes_per_set = inputs.x.numel() * inputs.x.element_size() * 2
    rotation = Rotation([inputs.x, inputs.residual], copies_to_exceed_l2(bytes_per_set, DEVICE))
    fn = layers.runner(contender, case, inputs, rotation)
    try:
        fn()
    except (NotImplementedError, RuntimeError) as exc:
        note, _ = failure_note(exc)
        if note.startswith("skipped"):
            pytest.skip(note)
        raise
    benchmark.group = case.name
    benchmark.extra_info.update(flops=case.flops, dtype=str(DTYPE))
    benchmark(lambda: (fn(), torch.cuda.synchronize() if GPU else None))
