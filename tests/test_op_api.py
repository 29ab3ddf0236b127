"""The op's contract: signature, semantics on the reference path, errors in PyTorch's words,
torch.library registration (opcheck), torch.compile, torch.export, and backend selection."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F

import fastres
from fastres.numerics import activate, reference_conv_bn_act, tolerance
from fastres.problem import ACTIVATIONS
from fastres.shapes import (ODD_CASES, PROJECTION_ODD_CASES, ConvCallRecorder, ConvCase, ConvInputs, ProjectionCase,
                            make_inputs)
from helpers import DEVICE, INTERPRETER, assert_matches, call_op, run_op_case

CASE = ConvCase("api", 2, 8, 6, 6, 16, 3, 3, padding=(1, 1), residual=True)


def test_wrapper_signature_is_the_documented_one():
    sig = inspect.signature(fastres.ops.conv_bn_act)
    assert list(sig.parameters) == [
        "x", "weight", "scale", "shift", "residual",
        "stride", "padding", "dilation", "groups", "act", "backend",
        "residual_weight", "residual_scale", "residual_shift", "residual_stride", "negative_slope",
    ]
    kw_only = [n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert kw_only == ["stride", "padding", "dilation", "groups", "act", "backend",
                       "residual_weight", "residual_scale", "residual_shift", "residual_stride", "negative_slope"]
    defaults = {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    assert defaults == {"scale": None, "shift": None, "residual": None, "stride": 1, "padding": 0,
                        "dilation": 1, "groups": 1, "act": "relu", "backend": "auto", "residual_weight": None,
                        "residual_scale": None, "residual_shift": None, "residual_stride": None, "negative_slope": 0.01}
    assert fastres.conv_bn_act is fastres.ops.conv_bn_act
    assert torch.ops.fastres.conv_bn_act.default is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ODD_CASES, ids=str)
def test_reference_backend_matches_float64(case, dtype):
    run_op_case(case.replace(residual=True), dtype, "reference", torch.device("cpu"))


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activations(act):
    run_op_case(CASE.replace(act=act), torch.float32, "reference", torch.device("cpu"))


def test_optional_epilogue_terms_default_to_identity():
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(6, 4, 3, 3)
    out = fastres.ops.conv_bn_act(x, w, act="none", backend="reference")
    torch.testing.assert_close(out, F.conv2d(x, w), rtol=1.3e-6, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_int_and_pair_arguments_agree():
    inputs = make_inputs(CASE, torch.float32)
    a = fastres.ops.conv_bn_act(*inputs.op_args(), stride=1, padding=1, backend="reference")
    b = fastres.ops.conv_bn_act(*inputs.op_args(), stride=(1, 1), padding=[1, 1], backend="reference")
    assert torch.equal(a, b)


def test_nan_and_inf_propagate_like_eager():
    x = torch.randn(1, 4, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    w = torch.randn(8, 4, 1, 1).abs()
    residual = torch.randn(1, 8, 5, 5)
    residual[0, 3, 4, 4] = float("-inf")
    out = fastres.ops.conv_bn_act(x, w, residual=residual, act="none", backend="reference")
    ref = reference_conv_bn_act(x, w, residual=residual, act="none")
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref)) and torch.isinf(out).any()


def test_empty_batch_gives_empty_output():
    out = fastres.ops.conv_bn_act(torch.randn(0, 4, 5, 5), torch.randn(8, 4, 3, 3), backend="reference")
    assert out.shape == (0, 8, 3, 3)


# --- bad input: error type and PyTorch's wording -------------------------------------------

def _call(**over):
    args = dict(x=torch.randn(2, 4, 8, 8), weight=torch.randn(6, 4, 3, 3), scale=None, shift=None, residual=None)
    kwargs = dict(stride=1, padding=0, dilation=1, groups=1, act="relu", backend="reference")
    for key, value in over.items():
        (args if key in args else kwargs)[key] = value
    return fastres.ops.conv_bn_act(*args.values(), **kwargs)


BAD_INPUTS = [
    ("input of wrong rank", dict(x=torch.randn(2, 4, 8)), RuntimeError,
     r"Expected 4D \(batched\) input to conv_bn_act, but got input of size: \[2, 4, 8\]"),
    ("weight of wrong rank", dict(weight=torch.randn(6, 4, 3)), RuntimeError,
     r"Expected 4D weight .* but got weight of size: \[6, 4, 3\]"),
    ("channel count not matching weight * groups", dict(x=torch.randn(2, 5, 8, 8)), RuntimeError,
     r"Given groups=1, weight of size \[6, 4, 3, 3\], expected input\[2, 5, 8, 8\] to have 4 channels, but got 5"),
    ("groups not dividing out channels", dict(x=torch.randn(2, 6, 8, 8), weight=torch.randn(7, 2, 3, 3), groups=3),
     RuntimeError, r"Given groups=3, expected weight to be divisible by 3 at dimension 0"),
    ("groups not dividing in channels", dict(x=torch.randn(2, 7, 8, 8), weight=torch.randn(6, 2, 3, 3), groups=3),
     RuntimeError, r"Given groups=3, weight of size \[6, 2, 3, 3\], expected input\[2, 7, 8, 8\] to have 6 channels"),
    ("non-positive groups", dict(groups=0), RuntimeError, r"non-positive groups is not supported"),
    ("weight dtype differs", dict(weight=torch.randn(6, 4, 3, 3).half()), RuntimeError,
     r"Input type \(float32\) and weight type \(float16\) should be the same"),
    ("residual dtype differs", dict(residual=torch.randn(2, 6, 6, 6, dtype=torch.float64)), RuntimeError,
     r"Input type \(float32\) and residual type \(float64\) should be the same"),
    ("tensors on different devices", dict(weight=torch.randn(6, 4, 3, 3, device="meta")), RuntimeError,
     r"Expected all tensors to be on the same device, but found at least two devices, cpu and meta!"),
    ("residual of wrong shape", dict(residual=torch.randn(2, 6, 6, 5)), RuntimeError,
     r"Expected residual of size \[2, 6, 6, 6\] \(the output's size\), but got residual of size \[2, 6, 6, 5\]"),
    ("scale of wrong length", dict(scale=torch.ones(5)), RuntimeError,
     r"Given weight of size \[6, 4, 3, 3\], expected scale to be 1-dimensional with 6 elements, but got scale of size \[5\]"),
    ("shift of wrong length", dict(shift=torch.ones(6, 1)), RuntimeError,
     r"expected shift to be 1-dimensional with 6 elements, but got shift of size \[6, 1\]"),
    ("integer scale", dict(scale=torch.ones(6, dtype=torch.int64)), RuntimeError,
     r"expected scale to be a floating-point tensor"),
    ("unsupported dtype int8", dict(x=torch.ones(2, 4, 8, 8, dtype=torch.int8), weight=torch.ones(6, 4, 3, 3, dtype=torch.int8)),
     NotImplementedError, r"\"conv_bn_act\" not implemented for 'int8'"),
    ("non-positive stride", dict(stride=0), RuntimeError, r"non-positive stride is not supported"),
    ("negative padding", dict(padding=-1), RuntimeError, r"negative padding is not supported"),
    ("non-positive dilation", dict(dilation=0), RuntimeError, r"non-positive dilation is not supported"),
    ("kernel larger than input", dict(x=torch.randn(2, 4, 2, 2)), RuntimeError,
     r"Calculated padded input size per channel: \(2 x 2\)\. Kernel size: \(3 x 3\)\. Kernel size can't be greater"),
    ("stride of three values", dict(stride=(1, 1, 1)), RuntimeError,
     r"expected stride to be a single integer value or a list of 2 values"),
    ("unknown activation", dict(act="elu"), ValueError,
     r"act must be one of 'none', 'relu', 'relu6', 'silu', 'hardswish', 'sigmoid', 'hardsigmoid', 'leaky_relu', "
     r"'gelu', 'gelu_tanh', but got 'elu'"),
    ("a slope for another activation", dict(act="relu", negative_slope=0.1), ValueError,
     r"negative_slope=0.1 is only used by act='leaky_relu', but act='relu'"),
    ("unknown backend", dict(backend="tensorrt"), ValueError, r"backend must be one of .* but got 'tensorrt'"),
    # a projected residual: (2, 4, 12, 12) through a stride-2 1x1 conv to the (2, 6, 6, 6) output
    ("residual_weight without a residual", dict(residual_weight=torch.randn(6, 4, 1, 1)), RuntimeError,
     r"residual_weight was given without a residual to project"),
    ("residual_scale without residual_weight", dict(residual=torch.randn(2, 6, 6, 6), residual_scale=torch.ones(6)),
     RuntimeError, r"residual_scale given without residual_weight"),
    ("residual_weight not 1x1", dict(residual=torch.randn(2, 4, 12, 12), residual_weight=torch.randn(6, 4, 3, 3),
                                     residual_stride=2), RuntimeError,
     r"Expected residual_weight of size \[6, 4, 1, 1\] .* but got residual_weight of size \[6, 4, 3, 3\]"),
    ("residual_weight channels not the residual's", dict(residual=torch.randn(2, 5, 12, 12),
                                                         residual_weight=torch.randn(6, 4, 1, 1), residual_stride=2),
     RuntimeError, r"Expected residual_weight of size \[6, 5, 1, 1\]"),
    ("projected residual of wrong size", dict(residual=torch.randn(2, 4, 12, 12), residual_weight=torch.randn(6, 4, 1, 1)),
     RuntimeError, r"Expected the projected residual to have the output's size \[2, 6, 6, 6\], but residual of size "
                   r"\[2, 4, 12, 12\] with residual_stride=\[1, 1\] gives \[2, 6, 12, 12\]"),
    ("residual_weight dtype differs", dict(residual=torch.randn(2, 4, 12, 12), residual_stride=2,
                                           residual_weight=torch.randn(6, 4, 1, 1, dtype=torch.float16)),
     RuntimeError, r"Input type \(float32\) and residual_weight type \(float16\) should be the same"),
    ("residual_scale of wrong length", dict(residual=torch.randn(2, 4, 12, 12), residual_weight=torch.randn(6, 4, 1, 1),
                                            residual_stride=2, residual_scale=torch.ones(4)), RuntimeError,
     r"expected residual_scale to be 1-dimensional with 6 elements, but got residual_scale of size \[4\]"),
    ("non-positive residual_stride", dict(residual=torch.randn(2, 4, 12, 12), residual_weight=torch.randn(6, 4, 1, 1),
                                          residual_stride=0), RuntimeError, r"non-positive residual_stride is not supported"),
]


@pytest.mark.parametrize("what,override,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_a_clear_error(what, override, error, message):
    with pytest.raises(error, match=message):
        _call(**override)


@pytest.mark.parametrize("what,override,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_fake_kernel_raises_the_same_errors(what, override, error, message):
    """The meta/fake kernel (what torch.compile and export run) validates exactly like eager."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(error, match=message):
        _call(**override)


def test_explicit_backend_that_cannot_run_says_why():
    inputs = make_inputs(CASE, torch.float32)
    with pytest.raises(RuntimeError, match=r"fastres backend 'cuda' is unavailable: .*CUDA device"):
        fastres.ops.conv_bn_act(*inputs.op_args(), padding=1, backend="cuda")


@pytest.mark.skipif(not INTERPRETER, reason="CPU tensors reach the Triton kernels only in the interpreter")
def test_explicit_backend_with_unsupported_case_raises_not_implemented():
    inputs = make_inputs(CASE, torch.float64)
    with pytest.raises(NotImplementedError, match=r"backend 'triton' does not support .*float64"):
        fastres.ops.conv_bn_act(*inputs.op_args(), padding=1, backend="triton")


def test_auto_never_raises_for_a_valid_case():
    inputs = make_inputs(CASE, torch.float64, DEVICE)
    out = fastres.ops.conv_bn_act(*inputs.op_args(), padding=1)
    assert out.dtype == torch.float64


def test_backend_status_names_every_backend_and_why():
    status = fastres.backend_status("cpu")
    assert set(status) == {"triton", "cuda", "cudnn", "reference"}
    assert status["reference"] == "available"
    assert status["cuda"].startswith("unavailable: ") and "CUDA device" in status["cuda"]


# --- torch.library, torch.compile, torch.export ---------------------------------------------

def test_opcheck_passes():
    inputs = make_inputs(CASE, torch.float32)
    projected = make_inputs(PROJECTION_ODD_CASES[0], torch.float32)
    pr = projected.projection
    for args in (
        (*inputs.op_args(), [1, 1], [1, 1], [1, 1], 1, "relu", "reference"),
        (inputs.x, inputs.weight, None, None, None, [2, 2], [1, 1], [1, 1], 1, "none", "reference"),
        (*projected.op_args(), [1, 1], [1, 1], [1, 1], 1, "relu", "reference", pr.weight, pr.scale, pr.shift, [2, 2]),
        (*projected.op_args(), [1, 1], [1, 1], [1, 1], 1, "relu", "reference", pr.weight, None, None, [2, 2]),
        (*inputs.op_args(), [1, 1], [1, 1], [1, 1], 1, "leaky_relu", "reference", None, None, None, None, 0.2),
    ):
        torch.library.opcheck(torch.ops.fastres.conv_bn_act.default, args)
        # again with every tensor requiring grad: the autograd registration, traced by AOTAutograd too
        leaves = tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(torch.ops.fastres.conv_bn_act.default, leaves)


def _spy_direct_calls(monkeypatch) -> list:
    """The calls the wrapper makes to the op's kernel without going through the dispatcher."""
    calls = []
    compute = fastres.ops._compute
    monkeypatch.setattr(fastres.ops, "_compute", lambda *args: calls.append(args) or compute(*args))
    return calls


class _Subclass(torch.Tensor):
    pass


def _watched(name: str, inputs: ConvInputs):
    """A context in which something watches or transforms the op's calls, and the inputs it sees."""
    if name == "autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16), inputs
    if name == "profiler":
        return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]), inputs
    if name == "dispatch mode":
        return ConvCallRecorder(), inputs
    if name == "function mode":
        return torch.device("cpu"), inputs
    if name == "tensor subclass":
        return torch.no_grad(), dataclasses.replace(inputs, x=inputs.x.as_subclass(_Subclass))
    assert name == "meta tensors"
    return torch.no_grad(), make_inputs(CASE, torch.float32, torch.device("meta"))


def test_a_plain_eager_call_runs_the_kernel_without_the_dispatcher(monkeypatch):
    """torch.library's Python layers around a custom op cost a third of a fused call's host time;
    a call nothing watches runs the op's own checks and kernel directly, with the same result."""
    calls = _spy_direct_calls(monkeypatch)
    inputs = make_inputs(CASE, torch.float32)
    with torch.no_grad():
        direct = call_op(CASE, inputs, backend="reference")
        assert len(calls) == 1
        dispatched = torch.ops.fastres.conv_bn_act(*inputs.op_args(), [1, 1], [1, 1], [1, 1], 1, "relu", "reference")
        assert torch.equal(direct, dispatched) and direct.stride() == dispatched.stride()
        with pytest.raises(RuntimeError, match="channels"):  # the same checks
            fastres.ops.conv_bn_act(inputs.x[:, 1:], inputs.weight, padding=1)
        assert len(calls) == 2


@pytest.mark.parametrize("watcher", ["autocast", "profiler", "dispatch mode", "function mode",
                                     "tensor subclass", "meta tensors"])
def test_a_watched_call_goes_through_the_dispatcher(watcher, monkeypatch):
    """What watches or transforms a call (autograd, autocast, the profiler, dispatch and function
    modes, a tensor subclass, meta tensors' fake kernel) sees the op itself."""
    calls = _spy_direct_calls(monkeypatch)
    context, inputs = _watched(watcher, make_inputs(CASE, torch.float32))
    with context as entered:
        out = call_op(CASE, inputs, backend="reference")
    assert calls == [] and out.shape == (CASE.n, CASE.k, *CASE.output_hw)
    if watcher == "profiler":
        assert "fastres::conv_bn_act" in {event.key for event in entered.key_averages()}
    if watcher == "dispatch mode":
        assert len(entered.calls) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("case", PROJECTION_ODD_CASES, ids=str)
def test_projected_residual_is_the_unfused_downsample(case, dtype):
    """residual_weight & co. compute act(bn(conv(x)) + bn_p(conv1x1(residual))), the block with its
    downsample branch, within the same tolerance as a plain call."""
    run_op_case(case, dtype, "reference", torch.device("cpu"))


def test_projection_without_scale_or_shift_is_a_plain_1x1_conv():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    residual, pw = torch.randn(2, 3, 9, 10), torch.randn(6, 3, 1, 1)
    out = fastres.ops.conv_bn_act(x, w, residual=residual, act="none", backend="reference",
                                  residual_weight=pw, residual_stride=(3, 4))
    torch.testing.assert_close(out, F.conv2d(x, w) + F.conv2d(residual, pw, stride=(3, 4)), rtol=1.3e-6, atol=1e-5)


# --- gradients: the unfused chain's, for every tensor argument ---------------------------------

GRAD_CASES = (
    ConvCase("grad:grouped-strided", 2, 4, 5, 6, 6, 3, 3, stride=(2, 2), padding=(1, 1), groups=2, residual=True),
    ConvCase("grad:projected", 2, 4, 5, 6, 6, 3, 3, stride=(2, 2), padding=(1, 1), groups=2, residual=True,
             projection=ProjectionCase(3, 5, 6, (2, 2))),
)


def _leaves(inputs: ConvInputs, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The op's tensor arguments, by keyword, as fresh leaves that require grad (cast to dtype)."""
    pr = inputs.projection
    tensors = dict(x=inputs.x, weight=inputs.weight, scale=inputs.scale, shift=inputs.shift, residual=inputs.residual,
                   residual_weight=pr and pr.weight, residual_scale=pr and pr.scale, residual_shift=pr and pr.shift)
    return {n: t.detach().to(dtype or t.dtype).requires_grad_() for n, t in tensors.items() if t is not None}


def _fused(case: ConvCase, t: dict[str, torch.Tensor]) -> torch.Tensor:
    return fastres.ops.conv_bn_act(
        **t, stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups, **case.act_kwargs,
        backend="reference", residual_stride=None if case.projection is None else case.projection.stride)


def _raw_op(case: ConvCase, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """torch.ops.fastres.conv_bn_act called directly, as an exported or traced graph calls it."""
    projection = case.projection
    return torch.ops.fastres.conv_bn_act(
        t["x"], t["weight"], t.get("scale"), t.get("shift"), t.get("residual"), list(case.stride),
        list(case.padding), list(case.dilation), case.groups, case.act, "reference", t.get("residual_weight"),
        t.get("residual_scale"), t.get("residual_shift"), None if projection is None else list(projection.stride),
        case.negative_slope)


ENTRIES = (_fused, _raw_op)  # the wrapper, and the op itself


def _eager(case: ConvCase, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unfused chain in torch ops, in x's dtype (scale and shift cast to it, as a model's BN's)."""
    def affine(y: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
        y = y if scale is None else y * scale.to(y.dtype).view(1, -1, 1, 1)
        return y if shift is None else y + shift.to(y.dtype).view(1, -1, 1, 1)

    conv = F.conv2d(t["x"], t["weight"], None, case.stride, case.padding, case.dilation, case.groups)
    y = affine(conv, t.get("scale"), t.get("shift"))
    if "residual_weight" in t:
        projected = F.conv2d(t["residual"], t["residual_weight"], None, case.projection.stride)
        y = y + affine(projected, t.get("residual_scale"), t.get("residual_shift"))
    elif "residual" in t:
        y = y + t["residual"]
    return activate(y, case.act, case.negative_slope)


def _gradients(forward, case: ConvCase, t: dict[str, torch.Tensor], grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    out = forward(case, t)
    return dict(zip(t, torch.autograd.grad(out, list(t.values()), grad_out.to(out.dtype))))


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_gradients_are_exact_in_float64(case, act):
    """torch.autograd.gradcheck: the backward against finite differences, every tensor argument."""
    case = case.replace(act=act)
    t = _leaves(make_inputs(case, torch.float64))
    assert torch.autograd.gradcheck(lambda *values: _fused(case, dict(zip(t, values))), tuple(t.values()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", ODD_CASES + PROJECTION_ODD_CASES, ids=str)
def test_gradients_match_eager_autograd(case, dtype):
    """Every argument's gradient against float64 autograd of the unfused chain: within the dtype's
    norm-wise tolerance, or no further off than eager autograd in the same dtype (an fp16
    pre-activation may land on the other side of a ReLU's kink in either)."""
    case = case.replace(residual=True)
    inputs = make_inputs(case, dtype)
    grad_out = torch.randn(case.n, case.k, *case.output_hw, generator=torch.Generator().manual_seed(1))
    exact = _gradients(_eager, case, _leaves(inputs, torch.float64), grad_out)
    leaves = _leaves(inputs)
    fused = _gradients(_fused, case, leaves, grad_out)
    eager = _gradients(_eager, case, _leaves(inputs), grad_out)
    bound = tolerance(dtype, case.accumulated).rel_norm

    def error(got: torch.Tensor, name: str) -> float:
        return float(torch.linalg.vector_norm(got.double() - exact[name]) / torch.linalg.vector_norm(exact[name]))

    assert set(fused) == set(exact)
    for name, grad in fused.items():
        assert grad.dtype == leaves[name].dtype and grad.shape == leaves[name].shape
        assert error(grad, name) <= max(bound, 2 * error(eager[name], name)), (
            f"{name}: {error(grad, name):.3g} vs eager {error(eager[name], name):.3g}")


def test_a_plain_eager_call_that_needs_a_gradient_records_the_ops_backward(monkeypatch):
    """With a tensor that requires grad, the wrapper records the op's autograd formula around the
    direct kernel call: the dispatcher's output and gradients, for each operand."""
    calls = _spy_direct_calls(monkeypatch)
    case = GRAD_CASES[1]
    leaves = _leaves(make_inputs(case, torch.float64))
    direct = _fused(case, leaves)
    assert len(calls) == 1 and direct.grad_fn is not None
    grads = torch.autograd.grad(direct.square().sum(), list(leaves.values()))
    copies = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    dispatched = _raw_op(case, copies)
    assert len(calls) == 1 and torch.equal(direct, dispatched)
    for name, got, want in zip(leaves, grads, torch.autograd.grad(dispatched.square().sum(), list(copies.values()))):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
def test_torch_func_grad_and_vmap_run_the_ops_standard_form(case, entry):
    """torch.func's transforms have no rules for a torch.library op's autograd formula (torch raises
    "must override the setup_context staticmethod"): under one, the op computes its standard-op form,
    the same arithmetic, so torch.func.grad and jacrev give eager's gradients and vmap (per-sample
    work) runs, called through the wrapper or directly."""
    t = _leaves(make_inputs(case, torch.float64))
    names = list(t)
    grad_out = torch.randn(case.n, case.k, *case.output_hw, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1))
    got = torch.func.grad(lambda *values: (entry(case, dict(zip(names, values))) * grad_out).sum(),
                          argnums=tuple(range(len(names))))(*t.values())
    want = _gradients(_eager, case, t, grad_out)
    for name, grad in zip(names, got):
        torch.testing.assert_close(grad, want[name], rtol=1e-9, atol=1e-9)
    jacobian = torch.func.jacrev(lambda x: entry(case, {**t, "x": x}))(t["x"])
    assert jacobian.shape == (*grad_out.shape, *t["x"].shape)
    torch.testing.assert_close(torch.einsum("nkpq,nkpq...->...", grad_out, jacobian), want["x"], rtol=1e-9, atol=1e-9)
    per_sample = torch.func.vmap(lambda x, residual: entry(case, {**t, "x": x[None], "residual": residual[None]})[0])
    torch.testing.assert_close(per_sample(t["x"], t["residual"]), _fused(case, t))


@pytest.mark.parametrize("batched", [("x",), ("residual",), ("x", "residual"), ("weight",), ("x", "scale")],
                         ids="+".join)
@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
@pytest.mark.filterwarnings("error:There is a performance drop")  # torch's loop over the batch, without a vmap rule
def test_vmap_over_the_op_equals_a_loop_over_its_samples(case, batched, monkeypatch):
    """The op's vmap rule: a batch of images (x, residual) is one call over them all, a batch of
    weights or BN terms (an ensemble) one call per sample; either way each sample's result is the
    op's own on that sample."""
    from fastres import backends

    t = {name: v.detach() for name, v in _leaves(make_inputs(case, torch.float64)).items()}
    generator = torch.Generator().manual_seed(2)
    stacks = {name: torch.randn(3, *t[name].shape, dtype=t[name].dtype, generator=generator) for name in batched}
    calls = []
    run = backends.run
    monkeypatch.setattr(backends, "run", lambda *args: calls.append(args[1].n) or run(*args))
    got = torch.func.vmap(lambda given: _raw_op(case, {**t, **given}))(stacks)
    assert calls == ([3 * case.n] if set(batched) <= {"x", "residual"} else [case.n] * 3)
    want = torch.stack([_raw_op(case, {**t, **{name: v[i] for name, v in stacks.items()}}) for i in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # make_dual's own
def test_forward_mode_ad_gets_the_ops_tangent(case, entry):
    """Forward-mode AD (dual tensors, torch.func.jvp) has no rule in a custom op's autograd formula,
    and the op gave a zero tangent without a word: under it the op computes its standard-op form."""
    torch.manual_seed(0)
    t = {name: v.detach() for name, v in _leaves(make_inputs(case, torch.float64)).items()}
    tangents = {name: torch.randn_like(v) for name, v in t.items()}

    def tangent(forward) -> torch.Tensor:
        with forward_ad.dual_level():
            out = forward(case, {name: forward_ad.make_dual(v, tangents[name]) for name, v in t.items()})
            return forward_ad.unpack_dual(out).tangent

    want = tangent(_eager)
    torch.testing.assert_close(tangent(entry), want)
    names = list(t)
    _, jvp = torch.func.jvp(lambda *values: entry(case, dict(zip(names, values))), tuple(t.values()),
                            tuple(tangents.values()))
    torch.testing.assert_close(jvp, want)


class _TinyBlock(torch.nn.Module):
    """conv-bn-relu, conv-bn-add-relu, then conv-bn-add-relu with a projected residual, through the op."""

    def __init__(self):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)
        self.w2 = torch.nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)
        self.wp = torch.nn.Parameter(torch.randn(8, 8, 1, 1) * 0.3)
        self.register_buffer("scale", torch.rand(8) + 0.5)
        self.register_buffer("shift", torch.randn(8))

    def forward(self, x):
        y = fastres.ops.conv_bn_act(x, self.w1, self.scale, self.shift, padding=1, backend="reference")
        y = fastres.ops.conv_bn_act(y, self.w2, self.scale, self.shift, x, padding=1, backend="reference")
        return fastres.ops.conv_bn_act(y, self.w2, self.scale, self.shift, x, padding=1, backend="reference",
                                       residual_weight=self.wp, residual_scale=self.scale, residual_stride=1)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = _TinyBlock().eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager)


def test_torch_compile_works_where_the_environment_sets_ci(monkeypatch):
    """CI runners (GitHub Actions, GitLab CI) set CI, and with it set Inductor refuses to fall back
    to an op listed in torch._decomp's table ("a decomposition exists, we should switch to it"):
    every compile of a fused model failed there. Inductor's fallback for the op, if an earlier test
    made one, is dropped here so that this compile makes it again."""
    import torch._inductor.config as inductor_config
    from torch._inductor import lowering

    monkeypatch.setenv("CI", "true")
    monkeypatch.delitem(lowering.lowerings, torch.ops.fastres.conv_bn_act.default, raising=False)
    torch._dynamo.reset()
    model = _TinyBlock().eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad(), inductor_config.patch(fx_graph_cache=False):  # compiled here, not loaded
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


@pytest.mark.parametrize("kernel", [1, 3])
def test_torch_compile_with_dynamic_shapes_gives_the_ops_strides(kernel):
    """With symbolic sizes the fake kernel must still give the op's channels_last strides, also for
    an NCHW x and a 1x1 weight (conv2d's output would be NCHW), or the compiled code's stride checks
    fail (they did while a torch._decomp entry stood in for the fake kernel there)."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    weight = torch.randn(8, 4, kernel, kernel)

    def layer(x):
        return fastres.ops.conv_bn_act(x, weight, padding=kernel // 2, backend="reference")

    compiled = torch.compile(layer, dynamic=True, fullgraph=True)
    for size in [(5, 6), (7, 3)]:
        x = torch.randn(2, 4, *size)
        with torch.no_grad(), inductor_config.patch(fx_graph_cache=False):  # compiled here, not loaded
            got, expected = compiled(x), layer(x)
        torch.testing.assert_close(got, expected)
        assert got.stride() == expected.stride()


def test_torch_export_keeps_the_op():
    model = _TinyBlock().eval()
    x = torch.randn(2, 8, 6, 6)
    exported = torch.export.export(model, (x,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.fastres.conv_bn_act.default) == 3
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


def test_an_aotinductor_package_calls_the_op(tmp_path, monkeypatch):
    """AOTInductor (a serving path: a compiled .pt2 package) keeps the op as a call through the
    dispatcher, with a dynamic batch; built where the environment sets CI, as CI runners do."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("CI", "true")
    model = _TinyBlock().eval()
    x, other_batch = torch.randn(2, 8, 6, 6), torch.randn(3, 8, 6, 6)
    with torch.no_grad(), inductor_config.patch(fx_graph_cache=False):
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
        runner = torch._inductor.aoti_load_package(package)
        with ConvCallRecorder() as calls:
            got = runner(other_batch)
        torch.testing.assert_close(got, model(other_batch))
    assert len(calls.calls) == 3


# --- torch.autocast ---------------------------------------------------------------------------

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("case", [CASE, PROJECTION_ODD_CASES[0]], ids=str)
def test_autocast_casts_the_conv_operands_as_conv2d_and_keeps_scale_and_shift(case, dtype):
    """Inside torch.autocast the op takes float32 x, weight, residual and residual weight in
    autocast's dtype and returns that dtype, as conv2d does; scale and shift stay float32. Same
    answer as the op on inputs cast by hand."""
    inputs = make_inputs(case, torch.float32, DEVICE)
    with torch.autocast(DEVICE.type, dtype=dtype), ConvCallRecorder() as calls:
        out = call_op(case, inputs)
    (args, kwargs), = calls.calls
    operands = [args[0], args[1], args[4], *(args[11:12] or [kwargs.get("residual_weight")])]
    assert [t.dtype for t in operands if t is not None] == [dtype] * (3 + (case.projection is not None))
    assert [t.dtype for t in (args[2], args[3])] == [torch.float32, torch.float32]
    projection = inputs.projection and dataclasses.replace(inputs.projection, weight=inputs.projection.weight.to(dtype))
    cast = dataclasses.replace(inputs, x=inputs.x.to(dtype), weight=inputs.weight.to(dtype),
                               residual=inputs.residual.to(dtype), projection=projection)
    assert out.dtype == dtype
    torch.testing.assert_close(out, call_op(case, cast), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_autocast_leaves_float64_and_other_devices_alone_and_is_off_when_disabled(dtype):
    """As conv2d: float64 is not cast, nor is anything with autocast disabled, nor CUDA tensors
    under the CPU's autocast (that last check needs a CUDA device)."""
    inputs = make_inputs(CASE, torch.float64, DEVICE)
    with torch.autocast(DEVICE.type, dtype=dtype):
        assert call_op(CASE, inputs).dtype == torch.float64
        with torch.autocast(DEVICE.type, enabled=False):
            assert call_op(CASE, make_inputs(CASE, torch.float32, DEVICE)).dtype == torch.float32
    if DEVICE.type == "cuda":  # autocast for the CPU leaves CUDA tensors alone
        with torch.autocast("cpu", dtype=dtype):
            assert call_op(CASE, make_inputs(CASE, torch.float32, DEVICE)).dtype == torch.float32


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_autocast_gradients_reach_the_float32_leaves(dtype):
    """The casts are autograd's: the float32 weight gets a float32 gradient, the one the op
    gives through casts made by hand."""
    inputs = make_inputs(CASE, torch.float32, DEVICE)
    probe = torch.randn(2, 16, 6, 6, device=DEVICE)
    grads = []
    for autocast in (True, False):
        x, weight = inputs.x.clone().requires_grad_(), inputs.weight.clone().requires_grad_()
        with torch.autocast(DEVICE.type, dtype=dtype, enabled=autocast):
            args = (x, weight) if autocast else (x.to(dtype), weight.to(dtype))
            out = fastres.ops.conv_bn_act(*args, inputs.scale, inputs.shift, inputs.residual.to(dtype), padding=1)
        (out.float() * probe).sum().backward()
        grads.append((x.grad, weight.grad))
    assert [g.dtype for g in grads[0]] == [torch.float32, torch.float32]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_torch_compile_under_autocast_matches_eager_autocast():
    torch._dynamo.reset()
    model = _TinyBlock().eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert compiled.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager)


def test_auto_on_cpu_is_the_reference():
    inputs = make_inputs(CASE, torch.float32)
    auto = fastres.ops.conv_bn_act(*inputs.op_args(), padding=1)
    ref = fastres.ops.conv_bn_act(*inputs.op_args(), padding=1, backend="reference")
    assert torch.equal(auto, ref)
    assert_matches(auto, reference_conv_bn_act(inputs.x, inputs.weight, bn=inputs.bn, residual=inputs.residual, padding=1),
                   CASE, torch.float32, inputs.scale)
