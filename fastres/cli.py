"""The `fastres` command: demo, verify, bench, backends. `fastres <command> --help` for each."""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path

import torch

DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "fp64": torch.float64, "float64": torch.float64,
}
BACKEND_CHOICES = ("auto", "triton", "cuda", "cudnn", "reference")


def _device(name: torch.device | None) -> torch.device:
    return name or torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device_name(text: str) -> torch.device:
    """argparse's type for --device: torch's own parse, its error in its words."""
    try:
        return torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    """argparse's type for sizes: a batch or image of 0 gives empty outputs, which check nothing."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _unusable(device: torch.device) -> str | None:
    """Why the model cannot run on `device` here (not a CPU or GPU; no driver, no such GPU, in
    torch's words)."""
    if device.type not in ("cpu", "cuda"):
        return f"runs on a cpu or cuda device, not {device.type}"
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:
        return str(exc).strip().splitlines()[0]
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastres", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="a fused ResNet next to its eager reference: agreement and timings")
    demo.add_argument("--model", default=None,
                      help="a ResNet of the zoo, by torchvision's name (default: resnet50 on GPU, resnet18 on CPU)")
    demo.add_argument("--batch", type=_positive, default=None)
    demo.add_argument("--image", type=_positive, default=None)
    demo.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    demo.add_argument("--backend", choices=BACKEND_CHOICES, default=None)

    verify = sub.add_parser("verify", help="check fastres.optimize(model) against eager and float64")
    verify.add_argument("model", help="a torchvision model (resnet50, efficientnet_b0) or timm:<name> (timm:regnety_040)")
    verify.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    verify.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    verify.add_argument("--batch", type=_positive, default=8)
    verify.add_argument("--image", type=_positive, default=224)
    verify.add_argument("--weights", default=None,
                        help="a state_dict file for the model (its own keys), or for a torchvision model the name of "
                             "its torchvision weights (DEFAULT, IMAGENET1K_V2: torch's hub cache, else a download)")
    verify.add_argument("--per-layer", action="store_true", help="also check every fused layer on its own inputs")
    verify.add_argument("--autocast", action="store_true",
                        help="keep the model float32 and run it under torch.autocast at --dtype (fp16 or bf16)")
    verify.add_argument("--device", type=_device_name, default=None)

    bench = sub.add_parser("bench", help="benchmark fused layers or whole models against cuDNN and torch.compile")
    bench.add_argument("suite", choices=("layers", "models", "profile"),
                       help="profile: the layers suite's cases under Nsight Compute, kernel by kernel")
    bench.add_argument("--model", nargs="+", default=None,
                       help="torchvision models or timm:<name> (layers: whose fused convs; models: which to run)")
    bench.add_argument("--batch", nargs="+", type=_positive, default=None)
    bench.add_argument("--cases", nargs="+", default=None,
                       help="layers, profile: only the cases whose name contains one of these")
    bench.add_argument("--image", type=_positive, default=224)
    bench.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    bench.add_argument("--backends", nargs="+", choices=BACKEND_CHOICES, default=None,
                       help="fastres backends to run as contenders (default: all)")
    bench.add_argument("--baselines", nargs="*", default=None, help="baselines to run (default: all of the suite's)")
    bench.add_argument("--out", type=Path, default=Path("bench-out"))
    bench.add_argument("--compare", type=Path, default=None, help="an earlier JSON to compare against")
    bench.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                       help="after the first case, start none that would end after this many seconds (judged by the "
                            "longest case so far); the results so far are written and the exit status is 3")
    bench.add_argument("--resume", action="store_true",
                       help="keep the cases already in the output JSON (same device, software, commit and options) "
                            "and run the rest")
    bench.add_argument("--smoke", action="store_true",
                       help="tiny CPU run through the Triton interpreter: checks the harness, measures nothing")

    sub.add_parser("backends", help="which backends can run here, and why not")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not torch.cuda.is_available():
        # Without a GPU the Triton kernels run in the interpreter; it must be on before they load.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.command == "demo":
        from fastres.demo import run_demo

        return run_demo(args.model, args.batch, args.image, DTYPES.get(args.dtype), args.backend)
    if args.command == "verify":
        return _verify(args)
    if args.command == "bench":
        return _bench(args)
    import fastres

    for name, state in fastres.backend_status().items():
        print(f"{name:10s} {state}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    import fastres
    from fastres.bench.models import model_name_problem

    device, dtype = _device(args.device), DTYPES[args.dtype]
    if (problem := model_name_problem(args.model) or _unusable(device)) is not None:
        print(f"fastres verify: {problem}", file=sys.stderr)
        return 2
    if args.autocast and dtype not in (torch.float16, torch.bfloat16):
        print(f"fastres verify: --autocast runs at fp16 or bf16, not {args.dtype}", file=sys.stderr)
        return 2
    stored = torch.float32 if args.autocast else dtype
    try:
        model = _with_weights(args.model, args.weights)
    except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:  # no file, no download, wrong keys
        print(f"fastres verify: --weights: {exc}", file=sys.stderr)
        return 2
    model = model.to(device=device, dtype=stored).to(memory_format=torch.channels_last)
    optimized = fastres.optimize(model, backend=args.backend)
    x = torch.randn(args.batch, 3, args.image, args.image, generator=torch.Generator().manual_seed(0))
    x = x.to(device=device, dtype=stored).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=dtype, enabled=args.autocast):
        report = fastres.verify(model, optimized, x, per_layer=args.per_layer)
    autocast = " under torch.autocast" if args.autocast else ""
    weights = ("seeded random weights" if args.weights is None else f"weights {args.weights}"
               if os.path.isfile(args.weights) else f"torchvision's {args.weights} weights")
    print(f"{args.model} ({weights}) on {device} ({args.batch}x3x{args.image}x{args.image}){autocast}, "
          f"backend={args.backend!r}")
    print(optimized.fastres_report.__str__().splitlines()[0])
    print(report)
    return 0 if report.ok else 1


def _with_weights(name: str, weights: str | None) -> torch.nn.Module:
    """`fastres verify`'s model: seeded random weights, a state_dict file's, or torchvision's named ones."""
    from fastres.bench.models import named_model

    if weights is None or not os.path.isfile(weights):
        return named_model(name, weights=weights)
    model = named_model(name)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model


def bench_refusal(args: argparse.Namespace) -> str | None:
    """Why a `fastres bench` command is refused before anything runs (a model or baseline name it
    does not know: a typo would be timed under its own name, as what it fell back to), or None."""
    from fastres.bench import layers, models, report

    problems = [problem for name in args.model or [] if (problem := models.model_name_problem(name)) is not None]
    known = models.BASELINES if args.suite == "models" else layers.BASELINES  # profile times the layers suite's
    unknown = [b for b in args.baselines or [] if b not in known]
    if unknown:
        problems.append(f"no baseline named {', '.join(unknown)} in the {args.suite} suite "
                        f"(it has {', '.join(known)})")
    if args.compare is not None:  # read at the end of a run that may take an hour: read it first
        try:
            report.Results.load(args.compare)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"--compare {args.compare} is not a results JSON of fastres bench "
                            f"({type(exc).__name__}: {exc})")
    return "; ".join(problems) or None


def _bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from fastres.bench import harness, layers, models, report

    console = Console(width=None if sys.stdout.isatty() else 220)
    device = _device(None)
    if device.type != "cuda" and not args.smoke:
        console.print("[red]fastres bench: no CUDA device here. CPU timings say nothing about GPU speed; "
                      "use --smoke to check the harness end to end.[/red]")
        return 2
    if (refusal := bench_refusal(args)) is not None:
        console.print(f"[red]fastres bench: {refusal}[/red]")
        return 2
    if args.suite == "profile":
        from fastres.bench import profile

        backends = args.backends or ["triton", "cuda", "cudnn", "auto"]
        contenders = (["eager-cl", "conv-only"] if args.baselines is None else args.baselines) + [
            f"fastres-{b}" for b in backends]
        return profile.main(args.model or ["resnet50"], (args.batch or [128])[0], args.dtype, contenders, args.cases,
                            args.smoke, args.out)
    dtype = torch.float32 if args.smoke else DTYPES[args.dtype]
    suite = layers if args.suite == "layers" else models
    backends = args.backends or (["triton", "cudnn", "auto"] if args.smoke else ["triton", "cuda", "cudnn", "auto"])
    contenders = [c for c in suite.CONTENDERS if c.split("+")[0].removeprefix("fastres-") in backends]
    baselines = suite.BASELINES if args.baselines is None else args.baselines
    if args.smoke:
        baselines = [b for b in baselines if "graph" not in b and "max-autotune" not in b]
        contenders = [c for c in contenders if "+" not in c]
    config = {"suite": args.suite, "dtype": str(dtype), "smoke": args.smoke, "baselines": baselines,
              "contenders": contenders}
    if args.suite == "layers":
        batch = (args.batch or [2 if args.smoke else 128])[0]
        cases = layers.smoke_cases() if args.smoke else layers.layer_cases(
            args.model or ["resnet18", "resnet50", "resnext50_32x4d"], batch, args.image)
        cases = layers.pick(cases, args.cases)
        config.update(batch=batch, cases=[c.name for c in cases])
    else:
        archs = args.model or (["resnet18"] if args.smoke else ["resnet18", "resnet50", "resnet101", "resnext50_32x4d"])
        batches = args.batch or ([1] if args.smoke else [1, 32, 256])
        image = 32 if args.smoke else args.image
        config.update(models=archs, batches=batches, image=image)
    env = harness.environment(device)
    stem = f"{args.suite}-{report.slug(env['device'])}-{str(dtype).removeprefix('torch.')}" + ("-smoke" if args.smoke else "")
    json_path = args.out / f"{stem}.json"
    if args.resume and json_path.exists():
        results = report.Results.load(json_path)
        why_not = results.resumable_by(env, config)
        if why_not is not None:
            console.print(f"[red]fastres bench: cannot resume {json_path}: {why_not}. Use another --out.[/red]")
            return 2
        console.print(f"resuming {json_path}: {len(results.done)} cases done, their rows kept")
    else:
        results = report.Results(env, harness.ceilings(device), config)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"bench {args.suite}", total=None)
        step = lambda what: bar.update(task, description=what)  # noqa: E731
        settings = harness.Settings(dtype, device, baselines + contenders, results.ceilings, step)
        work = (layers.units(cases, settings) if args.suite == "layers" else
                models.units(archs, batches, image, settings))
        try:
            harness.run_units(work, results, json_path, args.time_limit, console.print)
        except harness.DeviceLost as lost:
            console.print(f"[red]fastres bench: {lost.contender} lost the CUDA context; {json_path} keeps the cases "
                          f"done. The same command with --resume goes on without {lost.contender} on that case.[/red]")
            return 4
    results.save(json_path)
    rows = results.rows
    report.print_table(rows, baselines, results.env, console)
    plot_base = "conv-only" if args.suite == "layers" else "eager-cl"
    plot_path = report.plot(args.out / f"{stem}.png", rows, results.env, args.suite, plot_base)
    console.print(f"wrote {json_path} and {plot_path}")
    if args.compare is not None:
        report.compare(rows, args.compare, console)
    wrong = [r for r in rows if r.correct is False and r.contender.startswith("fastres")]
    if wrong:
        console.print(f"[red]{len(wrong)} fastres rows failed their correctness check[/red]")
        return 1
    if results.pending:
        console.print(f"[yellow]stopped at the time limit: {len(results.pending)} cases not run "
                      f"({', '.join(results.pending[:3])}{', ...' if len(results.pending) > 3 else ''}); "
                      f"the same command with --resume runs them[/yellow]")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
