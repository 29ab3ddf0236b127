"""Whole-model inference benchmark: torchvision or timm models (ResNets by default), eager vs
torch.compile vs fastres.

Baselines: eager-nchw, eager-cl (channels_last), compile (default mode), compile-max-autotune
(inductor freezing on), and eager-cl+graph (CUDA graph replay). Contenders: fastres-<backend>
(fastres.optimize of the same model), fastres-auto+graph and fastres-auto+compile.
Models get seeded random weights and BN statistics (no download; `named_model`). FLOPs and the
roofline floor count the convs fastres fuses (all of a ResNet's). Every contender's output on
the first images is checked against a float64 CPU run of the same model: it must be no worse
than twice eager's own error (fastres.verify's rule).
"""

from __future__ import annotations

import copy
import functools
import time
from typing import Callable

import torch
import torch.nn as nn

import fastres
from fastres.bench.harness import (Rotation, Settings, Timing, Unit, copies_to_exceed_l2, measure, quiet,
                                   seconds_since, time_fn)
from fastres.bench.layers import floor_ms
from fastres.bench.report import Row, add_speedups
from fastres.numerics import tolerance
from fastres.shapes import model_calls, randomize_batchnorm_
from fastres.verification import judge

BASELINES = ["eager-nchw", "eager-cl", "compile", "compile-max-autotune", "eager-cl+graph"]
CONTENDERS = ["fastres-auto", "fastres-triton", "fastres-cuda", "fastres-cudnn", "fastres-auto+graph",
              "fastres-auto+compile"]
CHECKED_IMAGES = 4


TIMM_PREFIX = "timm:"


def model_name_problem(name: str) -> str | None:
    """Why named_model cannot build `name`, or None."""
    if name.startswith(TIMM_PREFIX):
        try:
            import timm
        except ImportError:
            return f"{name!r} needs timm, which is not installed (pip install timm)"
        if not timm.is_model(name.removeprefix(TIMM_PREFIX)):
            return f"{name!r}: timm has no model named {name.removeprefix(TIMM_PREFIX)!r}"
        return None
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        return (f"{name!r} is not a torchvision classification model (e.g. resnet50, efficientnet_b0); "
                f"name timm's models '{TIMM_PREFIX}<name>'")
    return None


def named_model(name: str, seed: int = 0, weights: str | None = None) -> nn.Module:
    """A model by name, in eval mode with seeded random weights and BN statistics (nothing is
    downloaded): torchvision's classification models by builder name ("resnet50",
    "efficientnet_b0"), timm's as "timm:<name>" ("timm:regnety_040"). `weights`: for a torchvision
    model, the name of its torchvision weights ("DEFAULT", "IMAGENET1K_V2"), built and loaded as
    torchvision builds them (from torch's hub cache, downloaded there the first time)."""
    problem = model_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    if weights is not None:
        return _pretrained(name, weights)
    torch.manual_seed(seed)
    if name.startswith(TIMM_PREFIX):
        import timm

        model = timm.create_model(name.removeprefix(TIMM_PREFIX), pretrained=False)
    else:
        import torchvision

        model = torchvision.models.get_model(name)
    return randomize_batchnorm_(model.eval(), seed)


def _pretrained(name: str, weights: str) -> nn.Module:
    if name.startswith(TIMM_PREFIX):
        raise FileNotFoundError(f"weights {weights!r}: no such file (timm's models take a state_dict file, not a "
                                "name)")
    import torchvision

    from fastres.models import torchvision_weights

    # The builder, not load_state_dict: some weights change the architecture (inception_v3's
    # transform_input) or its class count.
    return torchvision.models.get_model(name, weights=torchvision_weights(name, weights)).eval()


def _graphed(fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn captured in a CUDA graph over a static input buffer; calls copy their input in, then replay."""
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_in)

    def replay(x: torch.Tensor) -> torch.Tensor:
        static_in.copy_(x)
        graph.replay()
        return static_out

    return replay


def build(contender: str, model: nn.Module, dtype: torch.dtype, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward function of `contender` for `model` (a float32 eval model on the target device)."""
    base = contender.split("+")[0]
    if base.startswith("fastres-"):
        # Not optimize's example_inputs: a model that fails must fail here, not come back unfused.
        m = fastres.optimize(model, backend=base.removeprefix("fastres-"), dtype=dtype, channels_last=True)
        fastres.precompile(m, example)  # its Triton kernels in one compile pool; the first call then tunes
    else:
        m = copy.deepcopy(model).to(dtype)
        if base != "eager-nchw":
            m = m.to(memory_format=torch.channels_last)
    fn: Callable[[torch.Tensor], torch.Tensor] = m
    if base == "compile":
        fn = torch.compile(m)
    elif base == "compile-max-autotune":
        # torch.compile is lazy: the first call compiles, so it must run inside the freezing patch.
        with torch._inductor.config.patch(freezing=True), torch.no_grad():
            fn = torch.compile(m, mode="max-autotune")
            fn(example)
    if contender.endswith("+compile"):
        fn = torch.compile(m)
    if contender.endswith("+graph"):
        fn = _graphed(fn, example)
    return fn


def model_floor_ms(arch: str, batch: int, image: int, element_size: int, ceilings) -> float | None:
    """Per-layer roofline of the convs: the sum over layers of each one's floor."""
    if ceilings is None:
        return None
    return sum(floor_ms(call, element_size, ceilings) for call in model_calls(arch, batch, image))


def run_setting(arch: str, model: nn.Module, reference: nn.Module, batch: int, image: int, settings: Settings,
                faults: dict[str, str] | None = None) -> list[Row]:
    """Time every contender on one model at one batch size; `reference` is its float64 CPU copy.
    Contenders in `faults` are not run (see harness.measure)."""
    dtype, device, contenders = settings.dtype, settings.device, settings.contenders
    faults = faults or {}
    rows = []
    flops = sum(c.flops for c in model_calls(arch, 1, image))
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 3, image, image, generator=gen).to(device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), quiet():
        ref = reference(x[:CHECKED_IMAGES].cpu().double())
        eager = build("eager-cl", model, dtype, x)(x)[:CHECKED_IMAGES]
    rotation = Rotation([x], copies_to_exceed_l2(x.numel() * x.element_size(), device))
    floor = model_floor_ms(arch, batch, image, x.element_size(), settings.ceilings)
    for contender in contenders:
        settings.progress(f"{arch} batch {batch} {contender}")

        def attempt(row: Row) -> Timing:
            if contender.endswith("+graph") and device.type != "cuda":
                raise NotImplementedError("CUDA graphs need a CUDA device")
            with quiet() as row.rejected, torch.no_grad():
                started = time.perf_counter()
                fn = build(contender, model, dtype, x)
                out = fn(x)[:CHECKED_IMAGES]
                row.first_call_s = seconds_since(started, device)
                # fastres.verify's rule: no worse than twice eager's own error in this dtype (or within tolerance)
                judged = judge(out, eager, ref, tolerance(dtype))
                row.correct, row.rel_error = judged.ok, judged.fused.rel_norm
                return time_fn(lambda: fn(rotation.next()[0]), device, warmup_ms=50, rep_ms=200)

        row = Row("models", arch, contender, batch, str(dtype).removeprefix("torch."), floor_ms=floor)
        rows.append(measure(row, attempt, device, batch, flops * batch, faults.get(contender)))
    add_speedups(rows, [c for c in contenders if c in BASELINES])
    return rows


def units(archs: list[str], batches: list[int], image: int, settings: Settings) -> list[Unit]:
    """One unit of work per (model, batch size). A model and its float64 copy are built on first use
    and kept for its other batch sizes."""

    @functools.lru_cache(maxsize=1)  # one model on the device at a time
    def models(arch: str) -> tuple[nn.Module, nn.Module]:
        model = named_model(arch).to(settings.device)
        return model, copy.deepcopy(model).cpu().double()

    def run(arch: str, batch: int, faults: dict[str, str]) -> list[Row]:
        return run_setting(arch, *models(arch), batch, image, settings, faults)

    return [Unit(f"{arch} batch {batch}", functools.partial(run, arch, batch)) for arch in archs for batch in batches]
