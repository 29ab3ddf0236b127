"""torch.onnx.export of what fastres makes. ONNX has no fastres op, so an export records standard
ops (a fused module: its own conv, BN, add and activation modules; the op called directly: its
arithmetic), and ONNX Runtime runs the exported graph with the model's answers. Both exporters:
torch.export-based (dynamo=True, torch's default) and TorchScript-based (dynamo=False)."""

from __future__ import annotations

import collections
import copy
import dataclasses
import io
import re
import warnings
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torchvision

import fastres
from fastres.shapes import (ODD_CASES, PROJECTION_ODD_CASES, ConvCallRecorder, ConvCase, make_inputs,
                            randomize_batchnorm_)
from helpers import assert_matches, call_op, reference_for

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the dynamo exporter's

EXPORTERS = pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
STANDARD_DOMAINS = {"", "ai.onnx"}


def _export(model: nn.Module, args: tuple, dynamo: bool, dynamic_batch: bool = False) -> onnx.ModelProto:
    """model exported with `args`; dynamic_batch: any batch size (one input), as servers export."""
    buffer = io.BytesIO()
    options = {}
    if dynamic_batch and dynamo:
        options = dict(dynamic_shapes=({0: torch.export.Dim("batch")},))
    elif dynamic_batch:
        # output_names too: without them this exporter fails on any fx GraphModule (reads graph.outputs)
        options = dict(input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's
        exported = torch.onnx.export(model, args, None if dynamo else buffer, dynamo=dynamo, verbose=False, **options)
    return exported.model_proto if dynamo else onnx.load_from_string(buffer.getvalue())


def _run(proto: onnx.ModelProto, args: tuple) -> torch.Tensor:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return torch.from_numpy(session.run(None, feeds)[0])


def _op_types(proto: onnx.ModelProto) -> collections.Counter:
    """Node types by (domain, op_type), functions' bodies included."""
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    calls = {(f.domain, f.name) for f in proto.functions}  # a function's call node: its body counts instead
    return collections.Counter((n.domain, n.op_type) for n in nodes if (n.domain, n.op_type) not in calls)


class _OpCall(nn.Module):
    """A user's module calling fastres.ops.conv_bn_act on one case's inputs (weights as constants)."""

    def __init__(self, case: ConvCase, inputs) -> None:
        super().__init__()
        self.case, self.inputs = case, inputs

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return call_op(self.case, dataclasses.replace(self.inputs, x=x, residual=residual))


OP_CASES = [
    ODD_CASES[1].replace(residual=True),  # 3x3 with a residual
    ODD_CASES[3].replace(act="silu"),  # dilation
    ODD_CASES[7].replace(act="hardswish"),  # grouped
    ODD_CASES[8].replace(act="relu6"),  # depthwise
    ODD_CASES[10].replace(act="sigmoid"),  # rectangular kernel and stride
    ODD_CASES[14].replace(act="hardsigmoid"),  # no BN: a bias
    ODD_CASES[15],  # LeakyReLU(0.1)
    ODD_CASES[2].replace(act="gelu"),  # stride 2
    ODD_CASES[6].replace(act="gelu_tanh"),  # strided 1x1
    *PROJECTION_ODD_CASES,  # a projected residual: two convs
]


@EXPORTERS
@pytest.mark.parametrize("case", OP_CASES, ids=str)
def test_the_op_exports_as_standard_ops_with_its_answers(case, dynamo):
    inputs = make_inputs(case, torch.float32)
    args = (inputs.x,) if inputs.residual is None else (inputs.x, inputs.residual)
    proto = _export(_OpCall(case, inputs).eval(), args, dynamo)
    types = _op_types(proto)
    assert {domain for domain, _ in types} <= STANDARD_DOMAINS, types
    assert types[("", "Conv")] == 1 + (case.projection is not None), types
    assert_matches(_run(proto, args), reference_for(case, inputs, inputs.residual), case, torch.float32, inputs.gain)


@EXPORTERS
def test_exporting_the_op_checks_its_inputs_as_the_op_does(dynamo):
    """Bad input fails the export in the op's own words, not with an ONNX or shape error later
    (the TorchScript exporter traces sizes as tensors: it prints 3 as tensor(3))."""
    case = ODD_CASES[1].replace(residual=True)
    inputs = make_inputs(case, torch.float32)
    short = inputs.residual[:, :-1]
    with pytest.raises(RuntimeError) as eager_error:
        _OpCall(case, inputs)(inputs.x, short)
    with pytest.raises(RuntimeError) as export_error:
        _export(_OpCall(case, inputs).eval(), (inputs.x, short), dynamo)
    assert str(eager_error.value) in re.sub(r"tensor\((\d+)\)", r"\1", str(export_error.value))


def _timm_regnet() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("regnetx_002", num_classes=10)  # timm's BatchNormAct2d, grouped convs


def _zoo_resnet18() -> tuple[nn.Module, nn.Module, nn.Module]:
    model = randomize_batchnorm_(fastres.models.resnet18(num_classes=10)).eval()
    twin = torchvision.models.resnet18(num_classes=10).eval()
    twin.load_state_dict(model.state_dict())
    return model, model, twin


def _optimized(make: Callable[[], nn.Module]) -> Callable[[], tuple[nn.Module, nn.Module, nn.Module]]:
    def build():
        model = randomize_batchnorm_(make()).eval()
        twin = copy.deepcopy(model).to(memory_format=torch.channels_last)  # optimize's weight layout
        return model, fastres.optimize(model), twin
    return build


# name: () -> (the eager model, what fastres makes of it, the eager model it should export as)
MODELS = {
    "zoo-resnet18": _zoo_resnet18,
    "optimized-torchvision-resnet50": _optimized(lambda: torchvision.models.resnet50(num_classes=10)),
    "optimized-timm-regnetx_002": _optimized(_timm_regnet),
}


@EXPORTERS
@pytest.mark.parametrize("name", MODELS)
def test_models_export_as_their_eager_selves_and_stay_fused(name, dynamo):
    """A zoo or optimized model exports the graph its eager self exports (the same ONNX nodes, no
    fastres op), with a dynamic batch size; ONNX Runtime gives eager's answers at another batch
    size, and the model runs fused after the export."""
    model, fused, twin = MODELS[name]()
    x, other_batch = torch.randn(2, 3, 64, 64), torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(other_batch)
        proto = _export(fused, (x,), dynamo, dynamic_batch=True)
        with ConvCallRecorder() as calls:
            again = fused(x)
    assert _op_types(proto) == _op_types(_export(twin, (x,), dynamo, dynamic_batch=True))
    assert {domain for domain, _ in _op_types(proto)} <= STANDARD_DOMAINS
    torch.testing.assert_close(_run(proto, (other_batch,)), expected, rtol=1e-4, atol=1e-4)
    assert calls.calls and torch.equal(again, fused(x))


@pytest.mark.parametrize("name", MODELS)
def test_an_exported_program_holding_the_op_exports_too(name):
    """torch.export first, ONNX second: the ExportedProgram holds fastres::conv_bn_act, which
    torch.onnx.export retraces into standard ops (the op's Autograd kernel records them), with a
    dynamic batch size; torch.export's own default decompositions and Inductor's keep the op."""
    from torch._inductor.decomposition import select_decomp_table

    model, fused, _ = MODELS[name]()
    x, other_batch = torch.randn(2, 3, 64, 64), torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        program = torch.export.export(fused, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        expected = model(other_batch)
    ops = lambda p: sum(n.target == torch.ops.fastres.conv_bn_act.default for n in p.graph.nodes)  # noqa: E731
    assert ops(program) > 0 and ops(program.run_decompositions()) == ops(program)
    assert torch.ops.fastres.conv_bn_act.default not in select_decomp_table()
    proto = torch.onnx.export(program, (x,), dynamo=True, verbose=False).model_proto
    assert {domain for domain, _ in _op_types(proto)} <= STANDARD_DOMAINS
    torch.testing.assert_close(_run(proto, (other_batch,)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_models_on_a_gpu_export_as_on_the_cpu(name):
    """The same export from a model on a GPU, where the fused op would pick a GPU backend; ONNX
    Runtime (CPU) on the exported graph gives the CPU model's answers."""
    model, fused, twin = MODELS[name]()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        proto = _export(fused.cuda(), (x.cuda(),), dynamo=True)
    assert _op_types(proto) == _op_types(_export(twin, (x,), dynamo=True))
    torch.testing.assert_close(_run(proto, (x,)), expected, rtol=1e-4, atol=1e-4)
