"""Compile the Triton kernels for a GPU without one, and report what the compiler made of them.

Each variant runs its real launcher on meta tensors (full-size shapes, no memory) with the kernel
swapped for a recorder, so the exact arguments a GPU launch would pass are captured; they are
then specialised as Triton's JIT does (ints equal to 1 become constants, pointers and multiples
of 16 get the divisibility hint, as triton.tools.compile does) and compiled with triton.compile
for the target architecture, ptxas included. The report says whether tl.dot became wgmma
(Hopper) or mma.sync (Ampere), how much shared memory a program takes, and its registers per
thread and its stack bytes (where ptxas puts spilled registers).

    python -m fastres.kernels.aot [--arch 90] [--json]

Must run with TRITON_INTERPRET unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from fastres.numerics import conv_tf32
from fastres.problem import ConvProblem, Projection, empty_output
from fastres.shapes import ConvCase, model_cases, model_projection_cases

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
META = torch.device("meta")


class _Recorder:
    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@contextlib.contextmanager
def _recording(module, name: str) -> Iterator[_Recorder]:
    recorder = _Recorder(getattr(module, name))
    setattr(module, name, recorder)
    try:
        yield recorder
    finally:
        setattr(module, name, recorder.kernel)


def compile_call(kernel, args: tuple, kwargs: dict, arch: int):
    """triton.compile for the call kernel[grid](*args, **kwargs), specialised like a JIT launch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = {**dict(zip(kernel.arg_names, args)), **kwargs}
    signature, constants, attrs = {}, {}, {}
    for index, name in enumerate(kernel.arg_names):
        value = bound[name]
        if name in kwargs or value is None or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, TensorDescriptor):
            signature[name] = mangle_type(value)  # e.g. "tensordesc<fp16[128, 64]>", as the JIT names it
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{name}: cannot specialise {type(value).__name__}")
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=target, options=backend.parse_options(options).__dict__)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread and the per-thread stack and local bytes of a cubin (cuobjdump -res-usage).
    ptxas puts spilled registers on the stack: stack_bytes > 0 means the kernel spills."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([tool, "-res-usage", handle.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    return {"registers": int(found[1]), "stack_bytes": int(found[2]), "local_bytes": int(found[3])}


def _meta_inputs(case: ConvCase, dtype: torch.dtype):
    cl = torch.channels_last
    x = torch.empty(case.n, case.c, case.h, case.w, dtype=dtype, device=META).contiguous(memory_format=cl)
    w = torch.empty(case.k, case.c // case.groups, case.r, case.s, dtype=dtype, device=META).contiguous(memory_format=cl)
    scale, shift = (torch.empty(case.k, device=META) for _ in range(2))
    p, q = case.output_hw
    residual = torch.empty(case.n, case.k, p, q, dtype=dtype, device=META).contiguous(memory_format=cl) if case.residual else None
    projection = None
    if case.projection is not None:
        pr = case.projection
        residual = torch.empty(case.n, pr.c, pr.h, pr.w, dtype=dtype, device=META).contiguous(memory_format=cl)
        pw = torch.empty(case.k, pr.c, 1, 1, dtype=dtype, device=META).contiguous(memory_format=cl)
        projection = Projection(pw, torch.empty(case.k, device=META), torch.empty(case.k, device=META), pr.stride)
    problem = ConvProblem.from_tensors(x, w, scale, shift, residual, case.stride, case.padding, case.dilation,
                                       case.groups, case.act, projection, case.negative_slope)
    return problem, (x, w, scale, shift, residual, empty_output(x, problem.output_shape)), projection


@dataclass(frozen=True)
class Variant:
    name: str
    kernel: str  # "conv_bn_act", "splitk_reduce", "depthwise" or "epilogue"
    case: ConvCase
    dtype: torch.dtype
    tf32: bool = True
    index_64: bool | None = None
    expect_tensor_cores: bool = True
    config: object | None = None  # a kernel Config; None: the launcher's heuristic
    min_arch: int = 0  # TMA configs are tuning candidates from Hopper on only


def _capture(variant: Variant) -> tuple:
    from fastres.kernels import conv_bn_act, depthwise, epilogue

    with conv_tf32(variant.tf32):
        if variant.kernel == "epilogue":
            y = torch.empty(variant.case.n, variant.case.k, *variant.case.output_hw, dtype=variant.dtype, device=META)
            y = y.contiguous(memory_format=torch.channels_last)
            scale, shift = (torch.empty(variant.case.k, device=META) for _ in range(2))
            with _recording(epilogue, "epilogue_kernel") as rec:
                epilogue.apply_epilogue_(y, scale, shift, torch.empty_like(y), variant.case.act,
                                         variant.case.negative_slope)
        elif variant.kernel == "depthwise":
            problem, tensors, _ = _meta_inputs(variant.case, variant.dtype)
            with _recording(depthwise, "depthwise_kernel") as rec:
                depthwise.launch(problem, variant.config or depthwise.heuristic(problem), *tensors)
        else:  # the GEMM kernel, or (split-K configs) the reduce kernel it is followed by
            problem, tensors, projection = _meta_inputs(variant.case, variant.dtype)
            config = variant.config or conv_bn_act.heuristic(problem)
            with _recording(conv_bn_act, "conv_bn_act_kernel") as gemm, \
                    _recording(conv_bn_act, "splitk_reduce_kernel") as reduce:
                conv_bn_act.launch(problem, config, *tensors, index_64=variant.index_64, projection=projection)
            rec = reduce if variant.kernel == "splitk_reduce" else gemm
    (args, kwargs), = rec.calls
    return rec.kernel, args, kwargs


def variants() -> list[Variant]:
    from fastres.kernels import conv_bn_act

    r50 = {c.name.split(":", 1)[1]: c for c in model_cases("resnet50", 128, 224)}
    grouped = next(c for c in model_cases("resnext50_32x4d", 128, 224) if c.groups > 1)
    conv3x3, conv1x1, stem = r50["c64h56-k64:3x3s1"], r50["c256h56-k64:1x1s1"], r50["c3h224-k64:7x7s2"]
    tail = next(c for c in model_projection_cases("resnet50", 128, 224) if c.name.endswith("k512:1x1s1+proj(c256h56s2)"))
    late = next(c for c in model_cases("resnet50", 1, 224) if c.name.endswith("c512h7-k512:3x3s1"))
    huge = ConvCase("huge", 1, 8, 2**14, 2**14 + 64, 8, 1, 1)
    return [
        Variant("gemm fp16 3x3", "conv_bn_act", conv3x3, torch.float16),
        Variant("gemm bf16 3x3", "conv_bn_act", conv3x3, torch.bfloat16),
        Variant("gemm fp16 1x1 (plain GEMM)", "conv_bn_act", conv1x1, torch.float16),
        Variant("gemm fp16 1x1 +res", "conv_bn_act", r50["c64h56-k256:1x1s1+res"], torch.float16),
        Variant("gemm fp16 1x1 +projection", "conv_bn_act", tail, torch.float16),
        Variant("gemm fp16 3x3 batch 1 split-K 8", "conv_bn_act", late, torch.float16,
                config=conv_bn_act.Config(64, 128, 64, 8, 4, 3, SPLIT_K=8)),
        Variant("split-K reduce fp16 +res", "splitk_reduce", late.replace(residual=True), torch.float16,
                config=conv_bn_act.Config(64, 128, 64, 8, 4, 3, SPLIT_K=8), expect_tensor_cores=False),
        Variant("gemm bf16 1x1 +projection", "conv_bn_act", tail, torch.bfloat16),
        Variant("gemm fp16 1x1 TMA", "conv_bn_act", conv1x1, torch.float16,
                config=conv_bn_act.Config(128, 64, 64, 8, 4, 4, TMA=True), min_arch=90),
        Variant("gemm bf16 1x1 +res TMA", "conv_bn_act", r50["c64h56-k256:1x1s1+res"], torch.bfloat16,
                config=conv_bn_act.Config(128, 128, 64, 8, 8, 3, TMA=True), min_arch=90),
        Variant("gemm fp32 tf32 1x1 TMA", "conv_bn_act", conv1x1, torch.float32,
                config=conv_bn_act.Config(128, 128, 32, 8, 4, 4, TMA=True), min_arch=90),
        Variant("gemm fp16 1x1 +projection TMA", "conv_bn_act", tail, torch.float16,
                config=conv_bn_act.Config(64, 128, 64, 8, 4, 3, TMA=True), min_arch=90),
        Variant("gemm fp16 stem C=3", "conv_bn_act", stem, torch.float16),
        Variant("gemm fp16 grouped g=32", "conv_bn_act", grouped, torch.float16),
        Variant("gemm fp16 grouped g=32 packed 16 groups", "conv_bn_act", grouped, torch.float16,
                config=conv_bn_act.Config(64, 64, 64, 8, 4, 4, PACK_GROUPS=True)),
        Variant("gemm fp16 int64 offsets", "conv_bn_act", huge, torch.float16, index_64=True),
        Variant("gemm fp32 tf32", "conv_bn_act", conv3x3, torch.float32),
        Variant("gemm fp32 ieee", "conv_bn_act", conv3x3, torch.float32, tf32=False, expect_tensor_cores=False),
        Variant("depthwise fp16", "depthwise", ConvCase("dw", 128, 256, 28, 28, 256, 3, 3, padding=(1, 1), groups=256),
                torch.float16, expect_tensor_cores=False),
        Variant("epilogue fp16", "epilogue", conv1x1.replace(residual=True), torch.float16, expect_tensor_cores=False),
        Variant("epilogue fp64 silu", "epilogue", conv1x1.replace(act="silu"), torch.float64, expect_tensor_cores=False),
        Variant("epilogue fp32 gelu", "epilogue", conv1x1.replace(act="gelu"), torch.float32,
                expect_tensor_cores=False),
        Variant("epilogue fp64 leaky_relu 0.1", "epilogue", conv1x1.replace(act="leaky_relu", negative_slope=0.1),
                torch.float64, expect_tensor_cores=False),
        Variant("gemm fp16 3x3 +res leaky_relu 0.1", "conv_bn_act",
                conv3x3.replace(residual=True, act="leaky_relu", negative_slope=0.1), torch.float16),
    ] + [
        Variant(f"gemm fp16 config {c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K}w{c.num_warps}s{c.num_stages}", "conv_bn_act",
                r50["c256h28-k256:3x3s2"], torch.float16, config=c)
        for c in conv_bn_act.CONFIGS
    ] + [
        Variant(f"gemm fp16 1x1 TMA config {c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K}w{c.num_warps}s{c.num_stages}",
                "conv_bn_act", r50["c256h56-k128:1x1s1"], torch.float16, config=dataclasses.replace(c, TMA=True),
                min_arch=90)
        for c in conv_bn_act.CONFIGS
    ] + [
        # every config, also those tuning skips for a projection: the report shows their spills
        Variant(f"gemm fp16 +projection config {c.BLOCK_M}x{c.BLOCK_N}x{c.BLOCK_K}w{c.num_warps}s{c.num_stages}",
                "conv_bn_act", tail, torch.float16, config=c)
        for c in conv_bn_act.CONFIGS
    ]


def report(arch: int, progress: Callable[[str], None] = lambda _: None) -> list[dict]:
    rows = []
    for variant in (v for v in variants() if arch >= v.min_arch):
        progress(variant.name)
        row = {"name": variant.name, "arch": arch, "expect_tensor_cores": variant.expect_tensor_cores}
        try:
            kernel, args, kwargs = _capture(variant)
            compiled = compile_call(kernel, args, dict(kwargs), arch)
            ptx = compiled.asm["ptx"]
            row.update(ok=True, wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync.aligned"),
                       tma_loads=ptx.count("cp.async.bulk.tensor"),
                       shared_bytes=int(compiled.metadata.shared), cubin_bytes=len(compiled.asm["cubin"]),
                       **resource_usage(compiled.asm["cubin"]),
                       constexprs={k: v for k, v in kwargs.items() if k.isupper() and isinstance(v, (int, str, bool))})
        except Exception as exc:  # noqa: BLE001 - the report says what failed to compile
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastres.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = [row for arch in args.arch for row in report(arch, lambda name: print(f"compiling {name}", file=sys.stderr))]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            what = (f"wgmma {r['wgmma']:3d}  mma.sync {r['mma_sync']:3d}  tma {r['tma_loads']:2d}  smem {r['shared_bytes']:6d} B  "
                    f"regs {r['registers']:3d}  stack {r['stack_bytes']:5d} B" if r["ok"] else f"FAILED {r['error']}")
            print(f"sm_{r['arch']}  {r['name']:<48} {what}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
