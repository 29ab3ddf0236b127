"""`make demo` / `fastres demo`: a torchvision ResNet, fastres.optimize of it, and the model zoo's
fused ResNet loaded from the same state_dict, side by side: agreement with a float64 reference
and timings. On a GPU: resnet50, batch 32, 224x224, fp16, real kernels. Without one: resnet18
on a 2x3x64x64 input through the Triton kernels in the Triton interpreter (correctness only;
interpreter times say nothing about GPU speed).
"""

from __future__ import annotations

import copy
import os
import sys
import time

import torch

import fastres
from fastres.bench.harness import environment, time_fn
from fastres.bench.models import named_model


def run_demo(
    model_name: str | None = None,
    batch: int | None = None,
    image: int | None = None,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> int:
    """Print agreement and timings of fused vs eager; returns 0 when every check passes."""
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    model_name = model_name or ("resnet50" if gpu else "resnet18")
    if model_name not in fastres.models.ARCHITECTURES:  # the demo loads the zoo's model too
        print(f"fastres demo: --model is one of the zoo's ({', '.join(fastres.models.ARCHITECTURES)}), "
              f"not {model_name!r}", file=sys.stderr)
        return 2
    batch = batch or (32 if gpu else 2)
    image = image or (224 if gpu else 64)
    dtype = dtype or (torch.float16 if gpu else torch.float32)
    backend = backend or ("auto" if gpu else "triton")
    env = environment(device)
    print(f"fastres {fastres.__version__} demo on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
          f"CUDA {env['cuda']}{', Triton interpreter' if os.environ.get('TRITON_INTERPRET') == '1' else ''})")
    print(f"model: torchvision {model_name} (seeded random weights and BN statistics), input {batch}x3x{image}x{image} "
          f"{str(dtype).removeprefix('torch.')}, backend={backend!r}")
    print("backends here:", ", ".join(f"{k}: {v}" for k, v in fastres.backend_status(device).items()))

    eager = named_model(model_name).to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
    start = time.perf_counter()
    optimized = fastres.optimize(eager, backend=backend)
    print(f"\n{optimized.fastres_report.__str__().splitlines()[0]} in {time.perf_counter() - start:.2f} s")

    zoo = fastres.models.ARCHITECTURES[model_name](backend=backend)
    zoo.load_state_dict(eager.state_dict())
    zoo = zoo.eval().to(device=device, dtype=dtype).to(memory_format=torch.channels_last)

    x = torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(0))
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    print("\n== agreement: fastres.optimize(model) ==")
    report = fastres.verify(eager, optimized, x, per_layer=not gpu)
    print(report)
    print("\n== agreement: fastres.models." + model_name + " with the torchvision state_dict ==")
    zoo_report = fastres.verify(eager, zoo, x, per_layer=not gpu)
    print(zoo_report)

    print("\n== timings (median, warm-up excluded) ==")
    fused_runs = 3 if gpu or backend != "triton" else 1  # the interpreter takes seconds per forward
    with torch.no_grad():
        eager_nchw = copy.deepcopy(eager).to(memory_format=torch.contiguous_format)
        timings = {
            "eager NCHW": time_fn(lambda: eager_nchw(x.contiguous()), device),
            "eager channels_last": time_fn(lambda: eager(x), device),
            f"fastres.optimize ({backend})": time_fn(lambda: optimized(x), device, cpu_runs=fused_runs),
            f"fastres.models.{model_name} ({backend})": time_fn(lambda: zoo(x), device, cpu_runs=fused_runs),
        }
    base = timings["eager channels_last"].median_ms
    for name, t in timings.items():
        print(f"  {name:<36} {t.median_ms:10.3f} ms   {batch / t.median_ms * 1e3:10.1f} images/s   "
              f"{base / t.median_ms:5.2f}x eager channels_last")
    if not gpu:
        print("  (CPU: the Triton interpreter checks correctness; these times say nothing about GPU speed)")
    ok = report.ok and zoo_report.ok
    print("\nresult:", "PASS, fused and eager agree" if ok else "FAIL, see the tables above")
    return 0 if ok else 1
