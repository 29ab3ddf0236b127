"""Fused modules: eval = fused op, train = eager chain; the BN fold never goes stale."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
import torchvision
from torch.fx.experimental.proxy_tensor import make_fx

import fastres
from fastres.numerics import fold_bn
from fastres.problem import ACTIVATIONS
from fastres.nn import ConvBNAct, bn_scale_shift, conv_bn_fold, eager_conv_bn, fused_conv_bn, set_backend
from fastres.shapes import ConvCallRecorder, ProjectionCase, randomize_batchnorm_
from helpers import INTERPRETER


def _conv_bn(c=8, k=16, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, k, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(k)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.1, 3.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.5)
    return conv, bn


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_convbnact_eval_matches_the_eager_chain(act):
    conv, bn = _conv_bn()
    module = ConvBNAct(conv, bn, act=act).eval()
    x, residual = torch.randn(2, 8, 7, 7), torch.randn(2, 16, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(module(x, residual), eager_conv_bn(conv, bn, x, residual, act), rtol=1e-5, atol=1e-5)


def test_convbnact_leaky_relu_uses_its_slope_fused_and_eager():
    conv, bn = _conv_bn()
    module = ConvBNAct(conv, bn, act="leaky_relu", negative_slope=0.25)
    x = torch.randn(2, 8, 7, 7)
    expected = F.leaky_relu(bn.eval()(conv(x)), 0.25)
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module.train()(x), F.leaky_relu(bn(conv(x)), 0.25))
    assert "leaky_relu(0.25)" in repr(module)
    with pytest.raises(ValueError, match=r"negative_slope=0.25 is only used by act='leaky_relu', but act='relu'"):
        ConvBNAct(conv, bn, negative_slope=0.25)


@pytest.mark.parametrize("norm,fused", [
    (lambda: nn.BatchNorm2d(16), True),
    (lambda: torchvision.ops.FrozenBatchNorm2d(16), True),
    (lambda: pytest.importorskip("timm.layers").BatchNormAct2d(16, apply_act=False), True),  # its BN part
    (lambda: nn.GroupNorm(4, 16), False),
    (lambda: nn.BatchNorm2d(16, track_running_stats=False), False),
], ids=["BatchNorm2d", "FrozenBatchNorm2d", "timm-BatchNormAct2d", "GroupNorm", "BatchNorm2d-untracked"])
def test_convbnact_folds_batchnorms_and_runs_other_norms_as_modules(norm, fused):
    conv, bn = nn.Conv2d(8, 16, 3, padding=1), randomize_batchnorm_(nn.Sequential(norm()))[0]
    module = ConvBNAct(conv, bn).eval()
    x = torch.randn(2, 8, 7, 7)
    with ConvCallRecorder() as calls, torch.no_grad():
        torch.testing.assert_close(module(x), torch.relu(bn(conv(x))), rtol=1e-5, atol=1e-5)
    assert len(calls.calls) == fused


def test_convbnact_train_mode_is_eager_and_updates_statistics():
    conv, bn = _conv_bn()
    module = ConvBNAct(conv, bn).train()
    twin_conv, twin_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    x = torch.randn(4, 8, 6, 6)
    torch.testing.assert_close(module(x), torch.relu(twin_bn(twin_conv(x))))
    torch.testing.assert_close(bn.running_mean, twin_bn.running_mean)


def test_convbnact_rejects_unknown_activation():
    with pytest.raises(ValueError, match="act must be one of"):
        ConvBNAct(*_conv_bn(), act="elu")


@pytest.mark.parametrize("change", ["inplace", "load_state_dict", "to_float64", "optimizer_step", "new_tensor"])
def test_bn_fold_is_recomputed_when_anything_changes(change):
    conv, bn = _conv_bn()
    module = ConvBNAct(conv, bn).eval()
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        before = module(x)
    if change == "inplace":
        with torch.no_grad():
            bn.running_var.mul_(4.0)
    elif change == "load_state_dict":
        state = copy.deepcopy(module.state_dict())
        state["bn.weight"] = state["bn.weight"] * 2
        module.load_state_dict(state)
    elif change == "to_float64":
        module.double()
        x = x.double()
        with torch.no_grad():
            bn.running_mean.add_(1.0)
    elif change == "optimizer_step":
        optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
        module.train()
        module(torch.randn(4, 8, 5, 5)).sum().backward()
        optimizer.step()
        module.eval()
    elif change == "new_tensor":
        bn.running_mean = bn.running_mean + 1.0
    with torch.no_grad():
        after = module(x)
        expected = eager_conv_bn(conv, bn, x, None, "relu")
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after.float(), before.float())


def test_bn_fold_is_cached_while_nothing_changes():
    conv, bn = _conv_bn()
    with torch.no_grad():
        assert bn_scale_shift(bn)[0] is bn_scale_shift(bn)[0]


class _FakeCuda:
    """CPU tensors standing in for CUDA ones in the fold cache: whether a capture is on, and how
    often a stream synchronized."""

    def __init__(self, monkeypatch):
        self.capturing, self.syncs = False, 0
        monkeypatch.setattr(fastres.nn, "_cuda_device", lambda tensors: torch.device("cuda"))
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: self.capturing)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: self)

    def synchronize(self):
        self.syncs += 1


@pytest.mark.parametrize("capturing", [False, True], ids=["eager", "cuda-graph-capture"])
def test_a_cuda_fold_is_written_before_it_is_cached_and_never_cached_inside_a_capture(monkeypatch, capturing):
    """Another thread's stream may read a cached fold at once, so a CUDA fold's stream is synchronized
    before the fold is cached (once, not on a hit); inside a CUDA graph capture the fold's kernels are
    only recorded, so it is computed afresh and never cached."""
    cuda = _FakeCuda(monkeypatch)
    cuda.capturing = capturing
    _, bn = _conv_bn()
    with torch.no_grad():
        first, second = bn_scale_shift(bn)[0], bn_scale_shift(bn)[0]
    assert (first is not second) == capturing
    assert cuda.syncs == (0 if capturing else 1)


def test_a_capture_after_a_warm_up_reads_the_cached_fold(monkeypatch):
    """Warmed up, a CUDA graph holds no fold kernels: the capture reads the fold cached before it."""
    cuda = _FakeCuda(monkeypatch)
    _, bn = _conv_bn()
    with torch.no_grad():
        warm = bn_scale_shift(bn)[0]
        cuda.capturing = True
        assert bn_scale_shift(bn)[0] is warm
    assert cuda.syncs == 1


class _Halved(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / 2


@pytest.mark.parametrize("kind", ["affine", "not-affine", "frozen", "parametrized-weight"])
def test_the_fold_reads_each_kind_of_batchnorm_as_its_forward_does(kind):
    """The fold reads BN's tensors from its parameter and buffer tables where they are, and falls back
    to attribute access (a parametrization's property) where they are not."""
    _, bn = _conv_bn()
    if kind == "not-affine":
        bn = nn.BatchNorm2d(16, affine=False)
        bn.load_state_dict(_conv_bn()[1].state_dict(), strict=False)
    elif kind == "frozen":
        frozen = torchvision.ops.FrozenBatchNorm2d(16)
        frozen.load_state_dict(bn.state_dict())
        bn = frozen
    elif kind == "parametrized-weight":
        torch.nn.utils.parametrize.register_parametrization(bn, "weight", _Halved())
    bn.eval()
    x = torch.randn(2, 16, 3, 3)
    with torch.no_grad():
        scale, shift = bn_scale_shift(bn)
        torch.testing.assert_close(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(x))


@pytest.mark.parametrize("captured", [False, True], ids=["eager-only", "read-by-a-capture"])
def test_a_fold_a_cuda_graph_read_outlives_its_refold_and_no_other_does(monkeypatch, captured):
    """A CUDA graph holds the address of the fold it was captured reading, not a reference: after BN
    changes and an eager call refolds, that fold stays alive with capture time's values, so a replay
    never reads freed memory. A fold no capture read is freed (training loops do not grow memory)."""
    cuda = _FakeCuda(monkeypatch)
    _, bn = _conv_bn()
    with torch.no_grad():
        bn_scale_shift(bn)
        cuda.capturing = captured
        old = weakref.ref(bn_scale_shift(bn)[0])
        values = old().clone()
        cuda.capturing = False
        bn.running_var.mul_(4.0)
        assert bn_scale_shift(bn)[0] is not old()
    gc.collect()
    assert (old() is not None) == captured
    if captured:
        torch.testing.assert_close(old(), values)


@pytest.mark.parametrize("with_bn", [True, False], ids=["bn", "bias-only"])
def test_with_autograd_on_the_fold_carries_gradients_when_computed_cached_and_refolded(with_bn):
    """A fold cached without its autograd graph would cut the gradients of BN's weight and bias (or
    the conv's bias) off: the first call (computed), the second (cached) and one after an in-place
    change (refolded) all give eager's gradients."""
    conv, bn = _conv_bn()
    if not with_bn:
        conv, bn = nn.Conv2d(8, 16, 3), None
    params = [p for m in (conv, bn) if m is not None for p in m.parameters()]
    x = torch.randn(2, 8, 5, 5)
    for call in ("computed", "cached", "refolded"):
        if call == "refolded":
            with torch.no_grad():
                params[-1].mul_(-2.0)
        folded = conv_bn_fold(conv, bn)
        assert all(t.requires_grad for t in folded if t is not None)
        out = ConvBNAct(conv, bn).eval()(x) if with_bn else fused_conv_bn(conv, None, x)
        got = torch.autograd.grad(out.square().sum(), params)
        want = torch.autograd.grad(eager_conv_bn(conv, bn, x).square().sum(), params)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_second_derivatives_through_the_cached_fold_are_eagers():
    """backward(create_graph=True) through the fold: the gradient of BN's weight stays differentiable
    (a Hessian-vector product over BN's parameters), as eager's."""
    conv, bn = (m.double() for m in _conv_bn())
    conv.bias = nn.Parameter(torch.randn(16, dtype=torch.float64))  # its fold is bilinear in it and BN's weight
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)

    def second(forward):
        grad, = torch.autograd.grad(forward(x).square().sum(), bn.weight, create_graph=True)
        return torch.autograd.grad(grad.square().sum(), [bn.weight, bn.bias, conv.bias])

    module = ConvBNAct(conv, bn, act="none").eval()
    module(x)  # the fold is cached
    for got, want in zip(second(module), second(lambda x: eager_conv_bn(conv, bn, x, act="none"))):
        torch.testing.assert_close(got, want)


def test_with_autograd_on_a_cached_fold_computes_nothing_in_the_forward(monkeypatch):
    """An eval-mode model called without torch.no_grad (as in the README's example) reuses the cached
    fold, its gradient attached: no fold arithmetic per call (about five to nine tiny kernels per BN)."""
    folds = []
    monkeypatch.setattr(fastres.nn, "fold_bn", lambda *args: folds.append(args) or fold_bn(*args))
    conv, bn = _conv_bn()
    module = ConvBNAct(conv, bn).eval()
    x = torch.randn(2, 8, 5, 5)
    module(x)
    assert len(folds) == 1
    assert module(x).requires_grad and len(folds) == 1


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
def test_make_fx_records_the_fold_from_the_parameters(grad):
    """make_fx (a dispatch-mode tracer, as FakeTensorMode and FlopCounterMode are modes) records the
    fold's arithmetic, not a cached fold as a constant: a later in-place change reaches the graph."""
    conv, bn = _conv_bn()
    module = ConvBNAct(conv, bn).eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.set_grad_enabled(grad):
        module(x)  # a cached fold exists
        graph = make_fx(module)(x)
    with torch.no_grad():
        bn.weight.mul_(2.0)
        torch.testing.assert_close(graph(x), eager_conv_bn(conv, bn, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("optimized", [False, True], ids=["zoo", "optimized"])
def test_torch_func_grad_through_a_fused_model_gives_eager_gradients(optimized):
    """torch.func.grad over torch.func.functional_call (per-sample gradients, influence functions):
    BN's fold and the op are computed in standard ops under the transform."""
    torch.manual_seed(0)
    eager = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10)).eval()
    model = fastres.optimize(eager) if optimized else fastres.models.resnet18(num_classes=10).eval()
    model.load_state_dict(eager.state_dict())
    x = torch.randn(2, 3, 32, 32)
    params = dict(model.named_parameters())
    got = torch.func.grad(lambda p: torch.func.functional_call(model, p, (x,)).square().sum())(params)
    names, leaves = zip(*eager.named_parameters())
    want = dict(zip(names, torch.autograd.grad(eager(x).square().sum(), leaves)))
    assert got.keys() == want.keys()
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-4, atol=1e-4, msg=name)


class _EagerConvBN(nn.Module):
    """The unfused eager chain under ConvBNAct's child names (for torch.func.functional_call)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.Module):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return eager_conv_bn(self.conv, self.bn, x)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # make_dual's own
def test_forward_mode_ad_through_a_fused_module_gets_eagers_tangent():
    """Dual tensors for the input and BN's weight (a Jacobian-vector product): the fold is computed on
    them, not read from the cache, and the op computes its standard-op form."""
    conv, bn = (m.double() for m in _conv_bn())
    module = ConvBNAct(conv, bn).eval()
    x, dx, dw = (torch.randn(*shape, dtype=torch.float64) for shape in ((2, 8, 5, 5), (2, 8, 5, 5), (16,)))
    module(x)  # the fold is cached

    def tangent(forward) -> torch.Tensor:
        with torch.no_grad(), forward_ad.dual_level():
            weight = forward_ad.make_dual(bn.weight.detach(), dw)
            out = torch.func.functional_call(forward, {"bn.weight": weight}, (forward_ad.make_dual(x, dx),))
            return forward_ad.unpack_dual(out).tangent

    torch.testing.assert_close(tangent(module), tangent(_EagerConvBN(conv, bn)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_a_conv_without_batchnorm_folds_to_its_bias_alone(dtype):
    """No scale, and the bias as the shift in the op's float32 (float64) epilogue precision: cached
    while the bias is unchanged, refolded after an in-place update (an optimizer step)."""
    conv = nn.Conv2d(4, 8, 3).to(dtype)
    with torch.no_grad():
        scale, shift = conv_bn_fold(conv, None)
        assert scale is None and shift.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert conv_bn_fold(conv, None)[1] is shift
        conv.bias.add_(1.0)
        torch.testing.assert_close(conv_bn_fold(conv, None)[1], conv.bias.to(shift.dtype))
    assert conv_bn_fold(nn.Conv2d(4, 8, 3, bias=False), None) == (None, None)


class _OnOneBlock(nn.Module):
    """A parametrization whose output is a new tensor each call on one block of memory, at the same
    version: what the CUDA caching allocator gives when it hands the last output's freed block to the next.
    `made` holds weak references to its outputs."""

    def __init__(self, numel: int):
        super().__init__()
        self.block = torch.empty(numel).untyped_storage()
        self.made: list[weakref.ref] = []

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        out = torch.empty(0).set_(self.block, 0, weight.shape).copy_(weight)
        self.made.append(weakref.ref(out))
        return out


def test_a_bn_tensor_made_anew_at_the_address_and_version_of_the_last_one_is_folded_afresh():
    """The cache asks whether the fold read these very tensors, not only their address and version: a
    parametrized BN weight is a new tensor each call, and the old code served its first fold forever.
    The cache keeps the tensor it read alive, so no later one can take its id either."""
    conv, bn = _conv_bn()
    parametrization = _OnOneBlock(bn.num_features)
    torch.nn.utils.parametrize.register_parametrization(bn, "weight", parametrization)
    module = ConvBNAct(conv, bn).eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        for _ in range(2):
            assert bn.weight.data_ptr() == bn.weight.data_ptr() and bn.weight._version == bn.weight._version
            out = module(x)
            assert parametrization.made[-1]() is not None  # the one the fold read
            torch.testing.assert_close(out, eager_conv_bn(conv, bn, x), rtol=1e-5, atol=1e-5)
            bn.parametrizations.weight.original.mul_(-2.0)


def test_inference_mode_tensors_fold_afresh_and_say_so(monkeypatch):
    """Inference tensors have no version counter, so their fold is computed on every call (an in-place
    change inside inference mode reaches the output), and one warning says so and what to do."""
    monkeypatch.setattr(fastres.nn, "_warned_uncacheable", False)
    folds = []
    monkeypatch.setattr(fastres.nn, "fold_bn", lambda *args: folds.append(args) or fold_bn(*args))
    with torch.inference_mode():
        conv, bn = _conv_bn()
        module = ConvBNAct(conv, bn).eval()
        x = torch.randn(1, 8, 5, 5)
        with pytest.warns(RuntimeWarning, match="inference tensors") as warned:
            torch.testing.assert_close(module(x), eager_conv_bn(conv, bn, x), rtol=1e-5, atol=1e-5)
            module(x)
        assert len(folds) == 2 and sum("inference tensors" in str(w.message) for w in warned) == 1
        bn.running_mean.add_(1.0)
        torch.testing.assert_close(module(x), eager_conv_bn(conv, bn, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("made", ["zoo", "optimized"])
def test_models_made_under_inference_mode_cache_their_folds(made, monkeypatch):
    """Serving code often builds its model inside torch.inference_mode: the zoo and optimize still
    give ordinary tensors, so the folds are cached (no fold work on a repeat call) and no warning."""
    monkeypatch.setattr(fastres.nn, "_warned_uncacheable", False)
    folds = []
    monkeypatch.setattr(fastres.nn, "fold_bn", lambda *args: folds.append(args) or fold_bn(*args))
    eager = torchvision.models.resnet18().eval()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model = (fastres.models.resnet18(weights=eager.state_dict()) if made == "zoo"
                 else fastres.optimize(eager, channels_last=False)).eval()
        assert not any(t.is_inference() for t in (*model.parameters(), *model.buffers()))
        x = torch.randn(1, 3, 32, 32)
        first = model(x)
        assert len(folds) == sum(isinstance(m, nn.BatchNorm2d) for m in eager.modules())  # each BN once
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-4)
        assert len(folds) == sum(isinstance(m, nn.BatchNorm2d) for m in eager.modules())
        torch.testing.assert_close(first, eager(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("made", ["zoo", "optimized"])
def test_folds_cached_under_inference_mode_serve_a_later_call_that_wants_gradients(made, monkeypatch):
    """Evaluated under torch.inference_mode, then differentiated (a saliency map, fine-tuning): the
    folds cached by the first call are ordinary tensors without an autograd graph, so autograd can
    save them, and the input's and parameters' gradients are eager's."""
    torch.manual_seed(0)
    eager = randomize_batchnorm_(torchvision.models.resnet18(num_classes=10)).eval()
    model = (fastres.models.resnet18(weights=eager.state_dict(), num_classes=10).eval() if made == "zoo"
             else fastres.optimize(eager, channels_last=False))
    x = torch.randn(2, 3, 32, 32)
    folds = []
    monkeypatch.setattr(fastres.nn, "fold_bn", lambda *args: folds.append(args) or fold_bn(*args))
    with torch.inference_mode():
        torch.testing.assert_close(model(x), eager(x), rtol=1e-4, atol=1e-4)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        cached = [t for bn in bns for t in bn_scale_shift(bn)]
    assert len(folds) == len(bns) and not any(t.is_inference() or t.requires_grad for t in cached)

    def gradients(forward: nn.Module) -> tuple[torch.Tensor, ...]:
        leaf = x.clone().requires_grad_()
        return torch.autograd.grad(forward(leaf).square().sum(), (leaf, *forward.parameters()))

    for got, want in zip(gradients(model), gradients(eager), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("optimized", [False, True], ids=["zoo", "optimized"])
def test_set_backend_reaches_every_fused_module(optimized):
    model = fastres.optimize(torchvision.models.resnet18().eval()) if optimized else fastres.models.resnet18().eval()
    set_backend(model, "reference")
    assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {"reference"}
    with ConvCallRecorder() as calls, torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert [args[10] for args, _ in calls.calls] == ["reference"] * 17
    with pytest.raises(ValueError, match="backend must be one of"):
        set_backend(model, "tensorrt")


def _resnet_pair(seed=0):
    torch.manual_seed(seed)
    fused = fastres.models.resnet18(num_classes=10)
    eager = copy.deepcopy(fused)
    return fused, eager


def test_train_eval_round_trips_follow_the_updated_parameters():
    """Optimizer steps in train mode between fused evaluations: never a stale fold."""
    fused, twin = _resnet_pair()
    set_backend(fused, "reference")
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    opt_t = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    probe = torch.randn(2, 3, 32, 32, generator=gen)
    outputs = []
    for _ in range(2):
        for model, opt in ((fused, opt_f), (twin, opt_t)):
            model.train()
            batch = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
            loss = model(batch).logsumexp(dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        fused.eval()
        with torch.no_grad():
            expected = _eager_forward(twin.eval(), probe)
            got = fused(probe)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        outputs.append(got)
    assert not torch.allclose(outputs[0], outputs[1])


def _eager_forward(model, x):
    """The fused model's own eager path (train-mode code) with BN in eval: a pure-eager reference."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    blocks = [m for m in model.modules() if hasattr(m, "_conv_bn")]
    for m in blocks:
        m.training = True
    try:
        return model(x)
    finally:
        for m in blocks:
            m.training = False
        assert all(not b.training for b in bns)


@pytest.mark.skipif(not INTERPRETER, reason="CPU runs of the Triton kernels need TRITON_INTERPRET=1")
def test_fused_block_with_the_triton_backend():
    block = fastres.nn.Bottleneck(64, 16).eval()
    set_backend(block, "triton")
    x = torch.randn(1, 64, 6, 6)
    with torch.no_grad():
        expected = _eager_forward(block, x)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_many_threads_share_one_fused_model():
    """A serving process: concurrent eval calls on one model give the serial answers."""
    import threading

    model = set_backend(fastres.models.resnet18(num_classes=10), "reference").eval()
    inputs = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    results: dict[int, list[torch.Tensor]] = {}

    def worker(i):
        with torch.no_grad():
            results[i] = [model(inputs[i]) for _ in range(3)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in results.items():
        for out in outs:
            torch.testing.assert_close(out, expected[i], rtol=0, atol=0)


def _downsampling_block(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "bottleneck":
        down = nn.Sequential(nn.Conv2d(32, 64, 1, stride=2, bias=False), nn.BatchNorm2d(64))
        block = fastres.nn.Bottleneck(32, 16, stride=2, downsample=down)
    else:
        down = nn.Sequential(nn.Conv2d(32, 48, 1, stride=2, bias=False), nn.BatchNorm2d(48))
        block = fastres.nn.BasicBlock(32, 48, stride=2, downsample=down)
    return randomize_batchnorm_(block).eval()


@pytest.mark.parametrize("backend", ["reference", "triton", "cudnn"])
@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_a_downsampling_block_projects_its_residual_in_the_last_op(kind, backend):
    """The downsample branch (1x1 conv + BN) rides in the block's last op: one call fewer, same answer."""
    if backend != "reference" and not INTERPRETER:
        pytest.skip("CPU runs of the Triton kernels need TRITON_INTERPRET=1")
    block = set_backend(_downsampling_block(kind), backend)
    x = torch.randn(2, 32, 9, 9)
    with ConvCallRecorder() as calls, torch.no_grad():
        out = block(x)
    assert len(calls.cases) == (3 if kind == "bottleneck" else 2)
    assert calls.cases[-1].projection == ProjectionCase(32, 9, 9, (2, 2))
    with torch.no_grad():
        torch.testing.assert_close(out, _eager_forward(block, x), rtol=1e-5, atol=1e-5)


def test_a_downsampling_block_trains_its_projection_bn():
    block = _downsampling_block("bottleneck").train()
    before = block.downsample[1].running_mean.clone()
    block(torch.randn(2, 32, 9, 9))
    assert not torch.equal(before, block.downsample[1].running_mean)
