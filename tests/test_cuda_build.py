"""The CUDA C++ extension on any machine: it builds (CI sets FASTRES_BUILD_CUDA=1, which makes a
compile error fatal), imports, registers its ops, and its host-side support rules answer without
a GPU. Kernel numerics are in test_backends.py (gpu)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from fastres.backends import cuda
from fastres.shapes import model_cases

EXPECT_BUILD = os.environ.get("FASTRES_BUILD_CUDA") == "1" or (
    torch.version.cuda is not None and shutil.which("nvcc") is not None and os.environ.get("FASTRES_BUILD_CUDA") != "0"
)
built = pytest.mark.skipif(cuda.load_error() is not None, reason=f"extension not built: {cuda.load_error()}")


@pytest.mark.skipif(not EXPECT_BUILD, reason="no CUDA torch + nvcc here, so no extension is expected")
def test_extension_was_built_and_loads():
    assert cuda.load_error() is None
    assert 90 in cuda.compiled_archs()


@built
def test_ops_are_registered_with_their_schemas():
    schema = str(torch.ops.fastres.cutlass_conv_bn_act.default._schema)
    assert "Tensor? residual" in schema and "int config" in schema
    assert torch.ops.fastres.cutlass_archs() == [90]


@built
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_tile_configs_are_listed(dtype):
    names = cuda.configs(dtype, 90)
    assert len(names) == 4 and all(n.startswith("sm90_") for n in names)
    assert cuda.configs(torch.float32, 90) == ()
    assert cuda.configs(dtype, 80) == ()


def _reason(case, dtype=torch.float16, act=None, arch=90):
    return torch.ops.fastres.cutlass_unsupported_reason(
        [case.n, case.c, case.h, case.w], [case.k, case.c // case.groups, case.r, case.s],
        list(case.stride), list(case.padding), list(case.dilation), case.groups, dtype, act or case.act, arch,
    )


@built
@pytest.mark.parametrize("case", model_cases("resnet50", 32, 224), ids=str)
def test_cutlass_covers_every_resnet50_layer_but_the_stem(case):
    reason = _reason(case)
    if case.c == 3:
        assert "multiples of 8" in reason
    else:
        assert reason == ""


@built
def test_unsupported_cases_name_the_reason():
    grouped = next(c for c in model_cases("resnext50_32x4d", 8, 224) if c.groups > 1)
    plain = model_cases("resnet50", 8, 224)[2]
    assert "grouped convolution (groups=32)" in _reason(grouped)
    assert "act='silu'" in _reason(plain, act="silu")
    assert "sm_80" in _reason(plain, arch=80)
    assert "float32" in _reason(plain, dtype=torch.float32) or "Float" in _reason(plain, dtype=torch.float32)
    assert _reason(plain, act="relu6") == "" and _reason(plain, act="none") == ""


@built
def test_cuda_backend_is_unavailable_on_cpu_with_a_reason():
    assert "CUDA device" in cuda.unavailable_reason(torch.device("cpu"))
