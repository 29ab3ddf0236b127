"""The CUDA C++ extension on any machine: it builds (CI sets FASTRES_BUILD_CUDA=1, which makes a
compile error fatal), imports, registers its ops, and its host-side support rules answer without
a GPU. Kernel numerics are in test_backends.py (gpu)."""

from __future__ import annotations

import os
import re
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
    assert cuda.compiled_archs() == (80, 90)  # setup.py's default TORCH_CUDA_ARCH_LIST


@built
def test_the_extension_names_the_sources_it_was_built_from():
    """setup.py's build_digest, compiled in: the library's own bytes differ from build to build."""
    assert re.fullmatch(r"[0-9a-f]{12}", cuda.build_digest())


@built
def test_ops_are_registered_with_their_schemas():
    schema = str(torch.ops.fastres.cutlass_conv_bn_act.default._schema)
    assert "Tensor? residual" in schema and "int config" in schema
    out_form = str(torch.ops.fastres.cutlass_conv_bn_act.out._schema)  # tuning's check writes into a poisoned output
    assert out_form.startswith(schema.split(") ->")[0].replace("cutlass_conv_bn_act", "cutlass_conv_bn_act.out"))
    assert out_form.endswith("*, Tensor(a!) out) -> Tensor(a!)")
    assert "int[]" in str(torch.ops.fastres.cutlass_usable_configs.default._schema)


@built
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_kernels_are_listed_per_device_arch(dtype):
    """Hopper gets its wgmma kernels first, then the Ampere ones (sm_90a code of both); every 8.x
    GPU runs the sm_80 code; nothing runs on older GPUs, on sm_100, or in float32."""
    tag = "f16" if dtype == torch.float16 else "bf16"
    hopper = cuda.configs(dtype, 90)
    assert [n.split("_")[:2] for n in hopper] == [["sm90", tag]] * 4 + [["sm80", tag]] * 4
    for arch in (80, 86, 89):
        assert cuda.configs(dtype, arch) == hopper[4:]
    for arch in (75, 100):
        assert cuda.configs(dtype, arch) == ()
    assert cuda.configs(torch.float32, 90) == ()


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
    assert "act='silu'" in _reason(plain, act="silu") and "act='hardswish'" in _reason(plain, act="hardswish")
    assert "act='sigmoid'" in _reason(plain, act="sigmoid") and "act='hardsigmoid'" in _reason(plain, act="hardsigmoid")
    assert "act='leaky_relu'" in _reason(plain, act="leaky_relu") and "act='gelu'" in _reason(plain, act="gelu")
    assert "act='gelu_tanh'" in _reason(plain, act="gelu_tanh")
    assert "sm_75" in _reason(plain, arch=75) and "sm_80, sm_90" in _reason(plain, arch=75)
    assert _reason(plain, arch=80) == "" and _reason(plain, arch=89) == ""
    assert "float32" in _reason(plain, dtype=torch.float32) or "Float" in _reason(plain, dtype=torch.float32)
    assert _reason(plain, act="relu6") == "" and _reason(plain, act="none") == ""
    widening = next(c for c in model_cases("resnet50", 8, 224) if c.name.endswith("c64h56-k256:1x1s1-none"))
    huge_output = widening.replace(n=8 * 512)  # 3.3e9 output elements from 8.2e8 input elements
    assert "2**31 elements" in _reason(huge_output) and _reason(widening) == ""


@built
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("case", model_cases("resnet50", 32, 224)[1:] + model_cases("resnet50", 1, 224)[-3:], ids=str)
def test_every_kernel_accepts_resnet50_layers(case, arch):
    """CUTLASS's own can_implement, per kernel: no ResNet-50 layer is left to a subset of tiles."""
    from fastres.problem import ConvProblem

    problem = ConvProblem(case.n, case.c, case.h, case.w, case.k, case.r, case.s, case.stride, case.padding,
                          case.dilation, case.groups, torch.float16, has_scale=True, has_shift=True,
                          has_residual=case.residual, act=case.act)
    assert cuda.usable_configs(problem, arch) == tuple(range(len(cuda.configs(torch.float16, arch))))


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
def test_kernels_are_tensor_core_machine_code_for_each_target():
    """SASS per target: the Hopper kernels' mainloop issues wgmma (HGMMA) and loads through the
    tensor memory accelerator (UTMALDG); the Ampere kernels issue mma.sync (HMMA) fed by cp.async
    (LDGSTS) and are built for sm_80 and for sm_90a. Tensor-core paths, not fallbacks."""
    import re
    import subprocess

    import fastres._C

    sass = subprocess.run([_cuobjdump(), "--dump-sass", fastres._C.__file__], capture_output=True, text=True, check=True)
    found: dict[tuple[str, str], int] = {}
    chunks = re.split(r"\n\s*code for (sm_\w+)", sass.stdout)
    for target, code in zip(chunks[1::2], chunks[2::2]):
        for body in re.split(r"\n\s*Function : ", code)[1:]:
            name = body.split("\n", 1)[0]
            if "ConvUniversal" in name and target == "sm_90a":
                family, needs = "sm90", ("HGMMA", "UTMALDG")
            elif "ImplicitGemmConvolution" in name:
                family, needs = "sm80", ("HMMA", "LDGSTS")
            else:
                continue  # the scale/shift packing kernel, and Hopper-only kernels' empty sm_80 stubs
            assert all(op in body for op in needs), f"{target} {name[:160]} lacks {needs}"
            found[(family, target)] = found.get((family, target), 0) + 1
    per_dtype = {family: sum(n.startswith(family) for n in cuda.configs(torch.float16, 90)) for family in ("sm90", "sm80")}
    assert found == {
        ("sm90", "sm_90a"): 2 * per_dtype["sm90"],
        ("sm80", "sm_80"): 2 * per_dtype["sm80"],
        ("sm80", "sm_90a"): 2 * per_dtype["sm80"],
    }


HOPPER_NAMES = ("sm90_f16_128x128x64", "sm90_f16_128x64x64", "sm90_f16_64x128x64", "sm90_f16_64x64x64",
                "sm80_f16_256x128x32", "sm80_f16_128x128x32", "sm80_f16_128x64x32", "sm80_f16_64x64x32")


@pytest.mark.parametrize(
    ("layer", "usable", "expected"),
    [
        ("c64h56-k64:3x3s1", range(8), "sm90_f16_128x64x64"),          # K = 64: narrow N
        ("c128h28-k128:3x3s1", range(8), "sm90_f16_128x128x64"),       # 25088 rows, K = 128
        ("c128h28-k128:3x3s1", range(4, 8), "sm80_f16_128x128x32"),    # Ampere: same tile, own family
        ("c128h28-k128:3x3s1", (1, 7), "sm90_f16_128x64x64"),          # wanted tile rejected
        ("c512h7-k512:3x3s1", range(8), "sm90_f16_64x64x64"),          # 1568 rows: small tiles
    ],
)
def test_heuristic_prefers_the_device_family_then_the_tile(layer, usable, expected):
    from fastres.problem import ConvProblem

    case = next(c for c in model_cases("resnet50", 32, 224) if c.name.endswith(layer))
    problem = ConvProblem(case.n, case.c, case.h, case.w, case.k, case.r, case.s, case.stride, case.padding,
                          case.dilation, case.groups, torch.float16, has_scale=True, has_shift=True,
                          has_residual=case.residual, act=case.act)
    assert HOPPER_NAMES[cuda.heuristic(problem, HOPPER_NAMES, tuple(usable))] == expected



# The Ampere epilogue's arithmetic, on the host: the same header the kernels include, compiled
# into a small program that reads fragments on stdin and prints what the op stores.
OUTPUT_OP_PROGRAM = r"""
#include <cstdio>
#include "conv_sm80_epilogue.h"

int main() {
  constexpr int N = 8;
  using Op = fastres::ScaleShiftResidualClamp<ELEMENT, N>;
  typename Op::Params params;
  int residual;
  while (std::scanf("%f %f %d", &params.lower, &params.upper, &residual) == 3) {
    params.residual = residual != 0;
    typename Op::FragmentAccumulator acc;
    typename Op::FragmentCompute affine;
    typename Op::FragmentC c;
    for (int i = 0; i < N; ++i) std::scanf("%f", &acc[i]);
    for (int i = 0; i < N; ++i) std::scanf("%f %f", &affine[i].scale, &affine[i].shift);
    for (int i = 0; i < N; ++i) { float v; std::scanf("%f", &v); c[i] = ELEMENT(v); }
    Op op(params);
    typename Op::FragmentZ z;
    typename Op::FragmentT unused;
    if (op.is_source_needed()) op(z, unused, acc, c, affine); else op(z, unused, acc, affine);
    for (int i = 0; i < N; ++i) std::printf("%.9g ", float(z[i]));
    std::printf("\n");
  }
}
"""


def _nvcc() -> str | None:
    return shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="no nvcc here")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_ampere_output_op_arithmetic_on_the_host(tmp_path, dtype):
    """clamp(scale * acc + shift [+ residual]) in fp32, rounded once to the output dtype, NaN and
    Inf propagating, for every clamp the binding uses and with / without the residual."""
    import importlib.util
    import math
    import subprocess
    from pathlib import Path

    cutlass = Path(importlib.util.find_spec("cutlass_library").origin).parent / "source" / "include"
    root = Path(__file__).resolve().parents[1]
    element = "cutlass::half_t" if dtype == torch.float16 else "cutlass::bfloat16_t"
    (tmp_path / "op.cu").write_text(OUTPUT_OP_PROGRAM)
    includes = [f"-I{root / 'csrc'}", f"-I{cutlass}"]
    subprocess.run([_nvcc(), "-std=c++17", f"-DELEMENT={element}", *includes, "-o", str(tmp_path / "op"),
                    str(tmp_path / "op.cu")], check=True, capture_output=True, text=True)

    gen = torch.Generator().manual_seed(0)
    inf = math.inf
    lines, expected = [], []
    for lower, upper in ((-inf, inf), (0.0, inf), (0.0, 6.0)):
        for residual in (0, 1):
            acc = torch.randn(8, generator=gen) * 4
            acc[0], acc[1] = math.nan, inf
            scale = torch.rand(8, generator=gen) * 3
            shift = torch.randn(8, generator=gen)
            c = (torch.randn(8, generator=gen) * 2).to(dtype).float()
            c[2] = -inf
            y = scale * acc + shift + (c if residual else 0)
            y = torch.where(y.isnan(), y, y.clamp(lower, upper))
            expected.append(y.to(dtype).float())
            fields = [lower, upper, residual, *acc.tolist(), *[v for pair in zip(scale.tolist(), shift.tolist()) for v in pair], *c.tolist()]
            lines.append(" ".join(repr(float(v)) if not isinstance(v, int) else str(v) for v in fields))
    run = subprocess.run([str(tmp_path / "op")], input="\n".join(lines) + "\n", capture_output=True, text=True, check=True)
    got = [torch.tensor([float(v) for v in row.split()]) for row in run.stdout.strip().splitlines()]
    assert len(got) == len(expected)
    for out, ref in zip(got, expected):
        # One rounding step apart at most (the compiler may fuse scale * acc + shift into an FMA).
        assert torch.equal(out.isnan(), ref.isnan()), (out, ref)
        one_step = (out - ref).abs() <= torch.finfo(dtype).eps * ref.abs()
        assert ((out == ref) | one_step | ref.isnan()).all(), (out, ref)
