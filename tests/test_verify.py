"""fastres.verify, `fastres verify` and the demo that runs it: honest reports, and a wrong model is caught."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torchvision

import fastres
from fastres.converter import FusedConvBN
from fastres.bench.models import named_model
from fastres.numerics import tolerance
from fastres.shapes import randomize_batchnorm_
from fastres.verification import judge
from helpers import Features, SamplesInEval, overflowing_fp16_model


def _fused_resnet18(model: nn.Module, how: str) -> nn.Module:
    return fastres.optimize(model) if how == "optimize" else fastres.models.resnet18(weights=model.state_dict()).eval()


@pytest.mark.parametrize("how", ["optimize", "zoo"])
def test_verify_checks_every_fused_layer_of_an_optimized_or_zoo_resnet(how, monkeypatch):
    """Every conv is checked against float64 on the inputs its op took (a projection shares its
    op's row), whether optimize fused the model or it is the zoo's; a layer 1% off fails on its own."""
    model = named_model("resnet18")
    fast = _fused_resnet18(model, how)
    x = torch.randn(2, 3, 32, 32)
    report = fastres.verify(model, fast, x, per_layer=True)
    assert report.ok, str(report)
    checked = [name for r in report.layers for name in r.name.split(" + ")]
    assert sorted(checked) == sorted(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d))
    assert "layer2.0.conv2 + layer2.0.downsample.0" in [r.name for r in report.layers]

    wrong, fused_conv_bn = fast.get_submodule("layer4.1.conv2"), fastres.nn.fused_conv_bn

    def one_layer_off(conv, *args, **kwargs):
        out = fused_conv_bn(conv, *args, **kwargs)
        return out * 1.01 if conv is wrong else out

    for namespace in (fastres.nn, fastres.converter):
        monkeypatch.setattr(namespace, "fused_conv_bn", one_layer_off)
    report = fastres.verify(model, fast, x, per_layer=True)
    assert [r.name for r in report.layers if not r.ok] == ["layer4.1.conv2"], str(report)


def test_verify_says_when_no_fused_layer_ran():
    model = named_model("resnet18")
    report = fastres.verify(model, model, torch.randn(1, 3, 32, 32), per_layer=True)
    assert report.ok and "fused layers: no fused op ran, so no layer was checked on its own" in str(report)


def test_verify_checks_convs_fused_without_a_batchnorm():
    model = named_model("squeezenet1_0")
    optimized = fastres.optimize(model)
    report = fastres.verify(model, optimized, torch.randn(2, 3, 64, 64), per_layer=True)
    assert report.ok, str(report)
    assert sorted(r.name for r in report.layers) == sorted(optimized.fastres_report.fused)
    assert len(report.layers) == 26


def test_verify_checks_each_layer_at_its_own_leaky_relu_slope():
    """TResNet's layers use LeakyReLU at 0.01 and at 0.001: each fused layer passes against float64
    at its own slope; a rewrite that got one slope wrong fails the whole model's check."""
    model = named_model("timm:tresnet_m")
    optimized = fastres.optimize(model)
    x = torch.randn(1, 3, 64, 64)
    report = fastres.verify(model, optimized, x, per_layer=True)
    assert report.ok and len(report.layers) == 94, str(report)
    wrong = next(m for m in optimized.modules() if isinstance(m, FusedConvBN) and m.negative_slope == 0.001)
    wrong.negative_slope = 0.01
    report = fastres.verify(model, optimized, x, per_layer=True)
    assert not report.ok and not report.model[1].ok


@pytest.mark.parametrize("name,layer", [("tf_mobilenetv3_small_minimal_100", "conv_stem"),
                                        ("mixnet_s", "blocks.2.0.conv_dw.1")])
def test_verify_checks_tf_same_padded_and_sliced_batchnorm_layers(name, layer):
    """tf_mobilenetv3's Conv2dSame layers pad by the input's size (an odd total's extra row or
    column below and right), MixNet's concatenated convs each fuse with a slice of one BatchNorm:
    each layer is checked against float64 on the input and padding the op took, with its slice."""
    model = named_model(f"timm:{name}")
    optimized = fastres.optimize(model)
    report = fastres.verify(model, optimized, torch.randn(1, 3, 64, 65), per_layer=True)
    assert report.ok, str(report)
    assert sorted(r.name for r in report.layers) == sorted(optimized.fastres_report.fused)
    assert layer in [r.name for r in report.layers]


def _fused(optimized, name):
    return next(m for m in optimized.modules() if isinstance(m, FusedConvBN) and m.conv_name == name)


def test_verify_runs_the_original_at_the_dtype_optimize_cast_its_copy_to():
    """optimize(model, dtype=...) casts its copy, not `model`: the eager baseline is `model` cast to
    that dtype (a bfloat16 error, not float32's), and `model` itself stays float32."""
    model = named_model("resnet18")
    optimized = fastres.optimize(model, dtype=torch.bfloat16)
    report = fastres.verify(model, optimized, torch.randn(2, 3, 32, 32, dtype=torch.bfloat16), per_layer=True)
    assert report.ok and report.dtype == torch.bfloat16, str(report)
    assert report.model[0].name == "eager (original as bfloat16)" and report.model[0].rel_norm > 1e-3, str(report)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_verify_catches_a_wrong_kernel_result():
    model = named_model("resnet18")
    optimized = fastres.optimize(model)
    _fused(optimized, "layer3.0.conv1").register_forward_hook(lambda m, args, out: out + 1e-3)
    report = fastres.verify(model, optimized, torch.randn(2, 3, 32, 32), per_layer=True)
    assert not report.ok
    assert [r.name for r in report.layers if not r.ok] == ["layer3.0.conv1"]
    assert "FAIL" in str(report)


def test_verify_catches_a_wrong_rewrite():
    model = named_model("resnet18")
    optimized = fastres.optimize(model)
    _fused(optimized, "layer3.0.conv1").act = "none"  # as if the converter had dropped a ReLU
    report = fastres.verify(model, optimized, torch.randn(2, 3, 32, 32))
    assert not report.ok and not report.model[1].ok


def test_verify_catches_a_wrong_final_output():
    model = named_model("resnet18")
    optimized = fastres.optimize(model)
    with torch.no_grad():
        optimized.fc.bias.add_(0.5)
    report = fastres.verify(model, optimized, torch.randn(2, 3, 32, 32))
    assert not report.ok and not report.model[1].ok


@pytest.mark.parametrize("source", ["torch", "own", "python", "numpy"])
def test_verify_judges_a_model_that_draws_random_numbers_against_eager_on_the_same_draws(source):
    """A model that samples in eval has no float64 ground truth (a float64 copy draws other numbers,
    and the optimized model would pass at any error under twice the eager one's against it): eager
    and optimized draw the same numbers, from the caller's random state, left as it was, and must
    agree within the tolerance. A generator the model holds is part of that state: the optimized
    copy's starts from the eager model's, which has moved on since the copy. Each fused layer is
    still checked against float64 on its inputs."""
    model = randomize_batchnorm_(SamplesInEval(source)).eval()
    optimized = fastres.optimize(model)
    x = torch.randn(2, 3, 8, 8)
    model(x)
    before = model.random_state(), optimized.random_state()
    report = fastres.verify(model, optimized, x, per_layer=True)
    assert (model.random_state(), optimized.random_state()) == before
    assert report.ok and "on the same random draws" in str(report), str(report)
    assert report.model[1].rel_norm <= tolerance(torch.float32).rel_norm and len(report.layers) == 1
    _fused(optimized, "body.0").register_forward_hook(lambda m, args, out: out * 1.01)
    report = fastres.verify(model, optimized, x)
    assert not report.ok and not report.model[1].ok


def test_verify_fails_a_model_whose_draws_it_cannot_repeat():
    """Noise from a global torch.Generator object is out of verify's reach: eager and optimized
    draw different numbers, the eager model's error against float64 is the noise, and twice that
    would pass anything. The eager model run again from the same state answers otherwise, so the
    report fails and says why, rather than passing on a bound that means nothing."""
    model = randomize_batchnorm_(SamplesInEval("global")).eval()
    report = fastres.verify(model, fastres.optimize(model), torch.randn(2, 3, 8, 8))
    assert not report.ok and "answers otherwise when run again" in report.model[1].note, str(report)


@pytest.mark.parametrize("fallback_random", [False, True], ids=["inductor-random", "eager-random"])
def test_verify_says_why_a_compiled_model_that_draws_random_numbers_fails(fallback_random):
    """torch.compile's generated random ops draw other numbers than eager's from the same state: the
    failure names the switch that draws eager's, with which the model verifies."""
    import torch._inductor.config

    model = randomize_batchnorm_(SamplesInEval()).eval()
    with torch._inductor.config.patch(fallback_random=fallback_random):
        report = fastres.verify(model, torch.compile(fastres.optimize(model)), torch.randn(2, 3, 8, 8))
    assert report.ok == fallback_random, str(report)
    assert ("fallback_random = True" in report.model[1].note) != fallback_random


_REF = torch.linspace(-4.0, 4.0, 64, dtype=torch.float64).view(1, 4, 4, 4)


@pytest.mark.parametrize("fused_err, eager_err, fused_inf, eager_inf, ok", [
    (1e-3, 1e-3, (), (), True),         # fp16 as eager: within the tolerance
    (2e-3, 3e-3, (), (), True),         # over the tolerance, but no worse than twice eager's error
    (7e-3, 3e-3, (), (), False),        # more than twice eager's error
    (1e-4, 1e-4, (1,), (1,), True),     # Inf where the eager model overflows too
    (1e-4, 1e-4, (1,), (), False),      # Inf where neither eager nor float64 has one
    (1e-4, 1e-4, (), (1,), True),       # finite, as float64, where eager overflows (one rounding, after BN)
    (1e-4, 1e-4, (1,), (1, 2), True),   # Inf at some of eager's
    (1e-4, 1e-4, (1, 2), (1,), False),  # Inf at eager's and beyond
], ids=["within-tolerance", "within-twice-eager", "over-twice-eager", "inf-as-eager", "inf-alone",
        "finite-where-eager-overflows", "inf-at-part-of-eagers", "inf-beyond-eagers"])
def test_the_whole_model_rule(fused_err, eager_err, fused_inf, eager_inf, ok):
    def off(err: float, columns: tuple[int, ...]) -> torch.Tensor:
        inf = torch.zeros_like(_REF).index_fill_(3, torch.tensor(columns, dtype=torch.long), float("inf"))
        return (_REF * (1 + err) + inf).half()

    j = judge(off(fused_err, fused_inf), off(eager_err, eager_inf), _REF, tolerance(torch.float16))
    assert j.ok == ok
    assert j.bound == pytest.approx(max(1e-3, 2 * j.eager.rel_norm))


@pytest.mark.gpu
def test_gpu_verify_an_fp16_model_on_the_gpu():
    model = named_model("resnet18").cuda().half()
    report = fastres.verify(model, fastres.optimize(model), torch.randn(2, 3, 64, 64).cuda().half(), per_layer=True)
    assert report.ok, str(report)


@pytest.mark.gpu
def test_gpu_verify_a_model_that_draws_random_numbers_on_the_gpu():
    """Its draws come from the CUDA generator, which verify forks and watches as it does the CPU's."""
    model = randomize_batchnorm_(SamplesInEval()).cuda().half().eval()
    report = fastres.verify(model, fastres.optimize(model), torch.randn(2, 3, 16, 16).cuda().half())
    assert report.ok and "on the same random draws" in str(report), str(report)


def test_verify_zoo_model_against_torchvision():
    theirs = named_model("resnet50")
    ours = fastres.models.resnet50(weights=theirs.state_dict()).eval()
    assert fastres.verify(theirs, ours, torch.randn(1, 3, 32, 32)).ok


@pytest.mark.parametrize("options,checked_at", [(["--dtype", "fp32"], "float32"),
                                               (["--dtype", "bf16", "--autocast"], "bfloat16")], ids=["fp32", "autocast"])
def test_verify_command_line(options, checked_at):
    out = subprocess.run(
        [sys.executable, "-m", "fastres", "verify", "resnet18", *options, "--batch", "1", "--image", "32",
         "--backend", "reference", "--per-layer"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"fastres.verify ({checked_at}): PASS" in out.stdout
    assert "20 of 20 convs fused" in out.stdout
    assert ("under torch.autocast" in out.stdout) == ("--autocast" in options)


@pytest.mark.parametrize("options,why", [
    (["--dtype", "fp32", "--autocast"], "--autocast runs at fp16 or bf16, not fp32"),
    (["--batch", "0"], "argument --batch: must be at least 1, got 0"),  # an empty output checks nothing
    (["--image", "x"], "argument --image: expected a whole number, got 'x'"),
    (["--device", "cdua"], "argument --device: Expected one of cpu, cuda"),
    (["--device", "meta"], "runs on a cpu or cuda device, not meta"),
    (["--device", "cuda:99"], "fastres verify: "),  # no driver, or no such GPU: torch's words, no traceback
    (["--weights", "IMAGENET1K_V9"], "'IMAGENET1K_V9': no such file, nor a name of torchvision's ResNet18_Weights"),
    (["--weights", "/no/such/file.pt"], "'/no/such/file.pt': no such file"),
])
def test_verify_command_line_refuses_what_it_cannot_check(options, why):
    out = subprocess.run([sys.executable, "-m", "fastres", "verify", "resnet18", *options],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and why in out.stderr and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("container", Features.CONTAINERS)
def test_verify_judges_every_floating_output_and_names_what_it_cannot(container):
    """A backbone's maps, in any container (pytree's own, or a dict subclass or dataclass it takes
    for a leaf): each floating output gets its rows, the integer label is named as not compared, and
    a wrong last stage fails at its own output while the first stage's still passes."""
    model = Features(container).eval()
    optimized = fastres.optimize(model)
    x = torch.randn(2, 3, 32, 32)
    report = fastres.verify(model, optimized, x)
    assert report.ok, str(report)
    shallow, deep, label = {"tuple": ("[0]", "[1]", "[2]"),
                            "dataclass": (".shallow", ".deep", ".label")}.get(container, ("['shallow']", "['deep']",
                                                                                       "['label']"))
    assert [r.name for r in report.model] == [f"{who} {where}" for where in (shallow, deep)
                                              for who in ("eager (original)", "fastres (optimized)")]
    assert report.unchecked == [f"{label} (not floating point)"] and f"not compared: {label}" in str(report)
    _fused(optimized, "net.layer4.1.conv2").register_forward_hook(lambda m, args, out: out * 1.01)
    report = fastres.verify(model, optimized, x)
    assert not report.ok and [r.name for r in report.model if not r.ok] == [f"fastres (optimized) {deep}"], str(report)


@pytest.mark.parametrize("which", ["model", "optimized"])
def test_verify_refuses_a_model_in_train_mode_and_leaves_its_statistics_alone(which):
    """In train mode a BatchNorm normalizes by the batch and moves its running statistics: verify
    failed with a large error and had changed your model's BN."""
    model = named_model("resnet18")
    models = {"model": model, "optimized": fastres.optimize(model)}
    models[which].train()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match=f"eval mode, but {which} is in train mode .* call {which}.eval"):
        fastres.verify(models["model"], models["optimized"], torch.randn(2, 3, 32, 32))
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())


def test_verify_command_line_takes_torchvision_weights_by_name(hub_cache):
    """`--weights IMAGENET1K_V1` builds the model as torchvision builds it with those weights (here
    a random state put in the hub cache as their file: no download) and verifies it."""
    state = randomize_batchnorm_(torchvision.models.resnet18()).state_dict()
    hub_cache(torchvision.models.ResNet18_Weights.IMAGENET1K_V1, state)
    model = named_model("resnet18", weights="IMAGENET1K_V1")
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
    out = subprocess.run([sys.executable, "-m", "fastres", "verify", "resnet18", "--weights", "IMAGENET1K_V1",
                          "--batch", "1", "--image", "32", "--dtype", "fp32", "--backend", "reference"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "fastres.verify (float32): PASS" in out.stdout, out.stdout + out.stderr
    assert "resnet18 (torchvision's IMAGENET1K_V1 weights) on cpu" in out.stdout
    hub_cache(torchvision.models.ResNet18_Weights.IMAGENET1K_V1, torchvision.models.resnet34().state_dict())
    out = subprocess.run([sys.executable, "-m", "fastres", "verify", "resnet18", "--weights", "DEFAULT"],
                         capture_output=True, text=True, timeout=300)  # the file is read: another model's keys
    assert out.returncode == 2 and "fastres verify: --weights: Error(s) in loading state_dict" in out.stderr


def test_demo_refuses_a_model_the_zoo_lacks():
    """The demo runs the zoo's model next to torchvision's: another name failed after optimizing."""
    out = subprocess.run([sys.executable, "-m", "fastres", "demo", "--model", "vgg11"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--model is one of the zoo's (resnet18, " in out.stderr
    assert "not 'vgg11'" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_verify_fails_an_empty_output_it_cannot_judge():
    """A batch of no images gives an output with no values: errors of 0 that prove nothing."""
    model = named_model("resnet18")
    report = fastres.verify(model, fastres.optimize(model), torch.randn(0, 3, 32, 32))
    assert not report.ok and report.unchecked == ["the output (empty)"], str(report)
    assert "no floating-point output with values to judge" in str(report)


def test_verify_passes_an_fp16_overflow_no_worse_than_eagers_and_counts_it():
    """An fp16 model that overflows where float64 does not: the optimized model passes with Inf
    where eager has Inf, or a finite value there (it rounds once, after BN's scale, so it can
    overflow less), and each row says how many values its errors, taken over finite ones, leave
    out."""
    model, x = overflowing_fp16_model()
    optimized = fastres.optimize(model)
    report = fastres.verify(model, optimized, x)
    with torch.no_grad():
        finite = copy.deepcopy(model).double()(x.double()).isfinite()
        overflowed = [int((~out.isfinite() & finite).sum()) for out in (model(x), optimized(x))]
    assert 0 < min(overflowed) and max(overflowed) < x.numel(), "the case must overflow in part"
    notes = [f"Inf or NaN at {count} of {x.numel()} values where the reference is finite" for count in overflowed]
    assert report.ok and [note in r.note for note, r in zip(notes, report.model)] == [True, True], str(report)


def test_verify_fails_an_optimized_model_that_returns_its_outputs_otherwise():
    model = Features("dict").eval()
    optimized = fastres.optimize(model)
    optimized.forward = lambda x: tuple(model(x).values())
    report = fastres.verify(model, optimized, torch.randn(1, 3, 32, 32))
    assert not report.ok and "returns a tuple holding its tensors otherwise than the eager model's dict" in str(report)


class CropsEachImage(nn.Module):
    """A detector's calling convention: a list of images of different sizes, after an integer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, channels: torch.Tensor, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.body(image)[:, :channels] for image in images]


def test_verify_takes_inputs_in_lists_after_an_integer_argument():
    """The dtype checked at is the first floating input's, and the float64 reference gets every
    floating input in float64, inside the list too; each image's output is judged."""
    model = randomize_batchnorm_(CropsEachImage()).eval()
    optimized = fastres.optimize(model)
    inputs = (torch.tensor(6), [torch.randn(1, 3, 8, 8), torch.randn(2, 3, 5, 7)])
    report = fastres.verify(model, optimized, inputs)
    assert report.ok and report.dtype == torch.float32, str(report)
    assert [r.name for r in report.model] == ["eager (original) [0]", "fastres (optimized) [0]",
                                              "eager (original) [1]", "fastres (optimized) [1]"]
    _fused(optimized, "body.0").register_forward_hook(lambda m, args, out: out * 1.01)
    assert not fastres.verify(model, optimized, inputs).ok
    with pytest.raises(TypeError, match="expected inputs to hold a floating-point tensor"):
        fastres.verify(model, optimized, (torch.tensor(6), []))
