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


def _cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, or the copy Triton's package carries."""
    import importlib.util
    from pathlib import Path

    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


@built
@pytest.mark.skipif(_cuobjdump() is None, reason="no cuobjdump here")
def test_cutlass_kernels_are_hopper_wgmma_and_tma_kernels():
    """Every compiled kernel is sm_90a machine code whose mainloop issues wgmma (HGMMA in SASS)
    and loads through the tensor memory accelerator (UTMALDG): the Hopper path, not a fallback."""
    import re
    import subprocess

    import fastres._C

    elves = subprocess.run([_cuobjdump(), "--list-elf", fastres._C.__file__], capture_output=True, text=True, check=True)
    assert re.findall(r"\.(sm_\w+)\.cubin", elves.stdout) == ["sm_90a", "sm_90a"]
    sass = subprocess.run([_cuobjdump(), "--dump-sass", fastres._C.__file__], capture_output=True, text=True, check=True)
    kernels = re.split(r"\n\s*Function : ", sass.stdout)[1:]
    assert len(kernels) == 2 * len(cuda.configs(torch.float16, 90))
    for body in kernels:
        assert "HGMMA" in body and "UTMALDG" in body, body.split("\n", 1)[0][:200]
