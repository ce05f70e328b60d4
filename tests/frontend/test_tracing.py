import importlib
import math
import operator
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from qcompile.passes import (
    AlignAddScales,
    AnnotateCost,
    AssignPrecision,
    Calibrate,
    FoldBatchNorm,
    InsertQuantizers,
    LowerInteger,
)
from torch import fx, nn

from qcompile import Pipeline, capture, get_recipe
from qcompile.errors import CaptureError
from qcompile.frontend.graph import compute_nodes
from qcompile.frontend.source_lines import is_model_code, source_location
from qcompile.models import resnet18
from qcompile.quantization.spec import LayerRole, annotate, get_annotation
from qcompile.reporting.verify import verify_reference
from tests.conftest import randomize_bn


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return -x


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.conv(x))


def test_shapes_on_every_node(tiny):
    gm = capture(tiny, torch.randn(2, 3, 8, 8))
    for n in gm.graph.nodes:
        if n.op != "output":
            assert "tensor_meta" in n.meta, n.name
    assert tuple(list(gm.graph.nodes)[-2].meta["tensor_meta"].shape) == (2, 5)


def test_capture_leaves_the_model_untouched(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    gm = capture(tiny, torch.randn(1, 3, 8, 8))
    gm.stem.weight.data.zero_()
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())


def test_untraceable_model_names_module_line_and_leaf_option():
    with pytest.raises(CaptureError) as err:
        capture(GatedNet(), torch.randn(1, 3, 8, 8))
    msg = str(err.value)
    assert "\n" not in msg
    assert "module 'gate' (Gate)" in msg
    assert "test_tracing.py" in msg and "if x.sum() > 0" in msg
    assert "--leaf-module gate" in msg and "leaf_modules=['gate']" in msg


@pytest.mark.parametrize("leaf", ["gate", "Gate", Gate])
def test_leaf_module_makes_it_traceable(leaf):
    gm = capture(GatedNet(), torch.randn(1, 3, 8, 8), leaf_modules=[leaf])
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "gate"]


def test_unknown_leaf_module_is_an_error():
    with pytest.raises(CaptureError, match="'nope' matches no submodule"):
        capture(GatedNet(), torch.randn(1, 3, 8, 8), leaf_modules=["nope"])


def test_bad_example_input_is_one_line():
    with pytest.raises(CaptureError, match="example input does not run") as err:
        capture(resnet18(), torch.randn(1, 5, 32, 32))
    assert "\n" not in str(err.value)


def test_reused_module_is_annotated_per_call_site():
    gm = capture(resnet18(stem="cifar"), torch.randn(1, 3, 32, 32))
    relu_sites = [n for n in gm.graph.nodes if n.target == "layer1.0.relu"]
    assert len(relu_sites) == 2  # torchvision's BasicBlock calls self.relu twice
    assert relu_sites[0].meta["tensor_meta"] is not relu_sites[1].meta["tensor_meta"]
    a, b = annotate(relu_sites[0]), annotate(relu_sites[1])
    a.role = frozenset({LayerRole.FIRST})
    assert a is not b and get_annotation(relu_sites[1]).role == frozenset()
    assert len(compute_nodes(gm)) == 21  # 20 convs (3 projections) + fc


class DirectForwardNet(nn.Module):
    """Research-code style: submodules called through ``.forward`` (prlz77's ResNeXt, among others)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate.forward(F.relu(self.bn.forward(self.conv.forward(x))))


def test_direct_forward_calls_are_module_calls():
    model = DirectForwardNet().eval()
    gm = capture(model, torch.randn(2, 3, 8, 8), leaf_modules=["gate"])
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv", "bn", "gate"]
    assert all("forward" not in vars(m) for m in [*model.modules(), *gm.modules()])
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(gm(x), model(x))
    assert len(compute_nodes(gm)) == 1


class FeaturesOnRequest(nn.Module):
    """Research-code style: ``forward(x, return_features=False, *, scale=None)`` branches on its options."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x, return_features=False, *, scale=None):  # type: ignore[no-untyped-def]
        feats = F.relu(self.conv(x)).mean((2, 3))
        if scale is not None:
            feats = feats * scale
        out = self.fc(feats)
        if return_features:
            return out, feats
        return out


def test_forward_options_are_traced_at_their_defaults():
    model = FeaturesOnRequest().eval()
    gm = capture(model, torch.randn(1, 3, 8, 8))
    assert [n.op for n in gm.graph.nodes].count("placeholder") == 1
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "assert" in str(n.target)]
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(gm(x), model(x))


def _same_padding(size: int, k: int, s: int, d: int) -> int:
    return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)


class TimmConv2dSame(nn.Conv2d):
    """timm's ``Conv2dSame``: TensorFlow's "SAME" padding computed from the input's size at every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.size()[-2:]
        pad_h = _same_padding(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = _same_padding(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class DynamicSamePadding(nn.Conv2d):
    """EfficientNet-PyTorch's ``Conv2dDynamicSamePadding``, which reads the kernel size off the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        pad_h = max((oh - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((ow - 1) * sw + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DynamicSameNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = TimmConv2dSame(3, 8, 3, stride=2, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv = DynamicSamePadding(8, 8, 5, stride=2, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv_stem(x)))
        x = F.relu(self.bn2(self.conv(x)))
        return self.fc(x.view(x.size(0), -1, x.size(2) * x.size(3)).mean(2))


def test_dynamic_same_padding_is_traced_with_the_example_shapes():
    model = randomize_bn(DynamicSameNet()).eval()
    gm = capture(model, torch.randn(1, 3, 16, 16))
    pads = [n.args[1] for n in gm.graph.nodes if n.target is F.pad]
    assert pads == [[0, 1, 0, 1], [1, 2, 1, 2]]  # asymmetric: TensorFlow pads the extra row and column after
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv_stem", "bn1", "conv", "bn2", "fc"]
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(gm(x), model(x))  # the batch size stays a node


def test_tracing_with_shapes_leaves_a_training_model_s_statistics():
    model = DynamicSameNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = capture(model, torch.randn(2, 3, 16, 16))
    assert gm.training
    for k, v in gm.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_data_dependent_control_flow_still_names_the_line_with_shapes_known():
    class Both(DynamicSameNet):
        def __init__(self) -> None:
            super().__init__()
            self.gate = Gate()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gate(super().forward(x))

    with pytest.raises(CaptureError, match=r"module 'gate' \(Gate\) at .*test_tracing.py:\d+ `if x.sum\(\) > 0"):
        capture(Both().eval(), torch.randn(1, 3, 16, 16))


class Stem(nn.Module):
    """conv-bn-relu, then ``tail``: one shape-arithmetic pattern from model files in the wild."""

    def __init__(self, tail) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self, F.relu(self.bn(self.conv(x))))


def _channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)


TAILS = {  # name: (tail, number of values left in the graph: the batch size's, and numbers computed from it)
    "avg_pool2d_size": (lambda m, x: m.fc(F.avg_pool2d(x, x.size()[3]).flatten(1)), 0),
    "view_size0": (lambda m, x: m.fc(F.adaptive_avg_pool2d(x, 1).view(x.size(0), -1)), 1),
    "reshape_shape0": (lambda m, x: m.fc(F.adaptive_avg_pool2d(x, 1).reshape(x.shape[0], -1)), 2),
    "flatten": (lambda m, x: m.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)), 0),
    "mean_keepdim": (lambda m, x: m.fc(x.mean((2, 3), keepdim=True).flatten(x.dim() - 3)), 0),
    "numel": (lambda m, x: m.fc(x.mean((2, 3)).reshape(-1, x.numel() // x.size(0) // 64)), 4),
    "channel_shuffle": (lambda m, x: m.fc(_channel_shuffle(x).mean((2, 3))), 2),
    "squeeze_casts": (lambda m, x: m.fc(F.adaptive_avg_pool2d(x.float(), 1).squeeze(-1).unsqueeze(1).squeeze(1)
                                        .squeeze(-1).to(torch.float32)).type_as(x), 0),
}


def _values_left(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes computing Python values rather than tensors."""
    return [n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and "tensor_meta" not in n.meta]


def _changes_with_batch(gm: fx.GraphModule, node: fx.Node) -> bool:
    seen = []
    for batch in (1, 5):
        interp = fx.Interpreter(gm, garbage_collect_values=False)
        interp.run(torch.randn(batch, 3, 8, 8))
        seen.append(interp.env[node])
    return seen[0] != seen[1]


@pytest.mark.parametrize("example_batch", [1, 3])
@pytest.mark.parametrize("name", list(TAILS))
def test_shape_arithmetic_is_folded_except_the_batch(name, example_batch):
    tail, left = TAILS[name]
    torch.manual_seed(0)
    model = Stem(tail).eval()
    gm = capture(model, torch.randn(example_batch, 3, 8, 8))
    for batch in (1, 5):
        x = torch.randn(batch, 3, 8, 8)
        torch.testing.assert_close(gm(x), model(x))
    values = _values_left(gm)
    assert len(values) == left
    assert all(_changes_with_batch(gm, n) or set(n.all_input_nodes) & set(values) for n in values)


def test_pooling_kernel_from_size_becomes_an_int():
    gm = capture(Stem(TAILS["avg_pool2d_size"][0]), torch.randn(1, 3, 8, 8))
    pool = next(n for n in gm.graph.nodes if n.target is F.avg_pool2d)
    assert pool.args[1] == 8 and type(pool.args[1]) is int


def test_view_keeps_the_batch_size_a_node():
    gm = capture(Stem(TAILS["view_size0"][0]), torch.randn(1, 3, 8, 8))
    view = next(n for n in gm.graph.nodes if n.target == "view")
    assert view.args[1].target == "size" and view.args[1].args[1:] == (0,) and view.args[2] == -1


def test_channel_shuffle_folds_channels_and_spatial_sizes():
    gm = capture(Stem(TAILS["channel_shuffle"][0]), torch.randn(2, 3, 8, 8))
    first, second = [n for n in gm.graph.nodes if n.target == "view"]
    assert first.args[2:] == (2, 4, 8, 8) and second.args[2:] == (-1, 8, 8)
    assert first.args[1] is second.args[1] and first.args[1].target is operator.getitem


def test_model_that_runs_at_one_batch_size_only_is_left_as_traced():
    class FixedBatch(nn.Module):
        def forward(self, x):
            return x.view(2, 12)[:, : x.size(1)]

    gm = capture(FixedBatch(), torch.randn(2, 3, 4))
    assert [n.target for n in _values_left(gm)] == ["size"]


@pytest.mark.parametrize("name", ["avg_pool2d_size", "view_size0", "reshape_shape0", "flatten", "mean_keepdim",
                                  "squeeze_casts", "dynamic_same_padding"])
def test_shape_arithmetic_lowers_and_verifies(name):
    torch.manual_seed(0)
    model = DynamicSameNet() if name == "dynamic_same_padding" else Stem(TAILS[name][0])
    model = randomize_bn(model, data=torch.randn(16, 3, 8, 8))
    calib = [(torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    passes = [FoldBatchNorm(), AssignPrecision(), AnnotateCost(), InsertQuantizers(), Calibrate(), AlignAddScales(),
              LowerInteger()]
    res = Pipeline(passes).run(model, torch.randn(1, 3, 8, 8), recipe=get_recipe("int8"), calibration_data=calib)
    batches = [(torch.randn(6, 3, 8, 8), torch.zeros(6, dtype=torch.long))]
    v = verify_reference(res.graph_module, res.context.ir, batches).summary()
    assert v["top1_agreement"] == 1.0 and v["max_lsb_diff"] == 0


ZOO = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).relu()


class Gated(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x
'''


def test_locations_in_an_installed_package(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "qc_zoo"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(ZOO)
    monkeypatch.syspath_prepend(str(tmp_path / "site-packages"))
    nets = importlib.import_module("qc_zoo.nets")
    for name in ("qc_zoo", "qc_zoo.nets"):
        monkeypatch.setitem(sys.modules, name, sys.modules[name])  # removed again afterwards
    gm = capture(nets.Net(), torch.randn(1, 3, 8, 8))
    conv = next(n for n in gm.graph.nodes if n.target == "conv")
    assert source_location(conv) == f"{package / 'nets.py'}:12"
    with pytest.raises(CaptureError) as err:
        capture(nets.Gated(), torch.randn(1, 3, 8, 8))
    assert f"at {package / 'nets.py'}:17 `if x.sum() > 0:`" in str(err.value)


def test_packages_named_torch_something_are_model_code():
    site = os.path.dirname(os.path.dirname(torch.__file__))
    assert is_model_code(os.path.join(site, "torchvision", "models", "resnet.py"))
    assert not is_model_code(os.path.join(site, "torch", "nn", "modules", "conv.py"))


def test_qcompiles_own_code_is_not_model_code_but_its_bundled_models_are():
    """Its passes, backends and pipeline are never the line a message blames (the check once looked at
    qcompile/frontend/ alone); the models it ships are model code like any other."""
    import qcompile.backends.onnx
    import qcompile.models.resnet
    import qcompile.passes.calibrate
    import qcompile.pipeline

    for module in (qcompile.pipeline, qcompile.passes.calibrate, qcompile.backends.onnx):
        assert not is_model_code(os.path.abspath(module.__file__)), module.__name__
    assert is_model_code(os.path.abspath(qcompile.models.resnet.__file__))


def test_a_model_made_of_torch_modules_is_located_in_torch():
    gm = capture(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(1, 3, 8, 8))
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    path, _, line = source_location(conv).rpartition(":")
    assert path == os.path.join(os.path.dirname(torch.__file__), "nn", "modules", "container.py") and line.isdigit()


@torch.jit.script
def _scripted_swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ScriptedActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return _scripted_swish(self.conv(x)).mean((2, 3))


def test_torchscript_functions_are_traced_through_their_python_originals():
    model = ScriptedActivation().eval()
    gm = capture(model, torch.randn(1, 3, 8, 8))
    assert {n.target for n in gm.graph.nodes if n.op == "call_function"} >= {torch.sigmoid, operator.mul}
    assert globals()["_scripted_swish"].__class__ is torch.jit.ScriptFunction  # restored after tracing
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(gm(x), model(x))


@pytest.mark.parametrize("wrap", [nn.DataParallel, torch.compile, lambda m: torch.compile(nn.DataParallel(m))])
def test_training_wrappers_are_taken_off(wrap):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten()).eval()
    gm = capture(wrap(model), torch.randn(1, 3, 8, 8))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]


class _Variadic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)


class StarInputs(_Variadic):
    def forward(self, *inputs, **kwargs):
        return self.conv(inputs[0]).mean((2, 3))


class ExtraArgs(_Variadic):
    def forward(self, x, *args, **kwargs):
        return self.conv(x).mean((2, 3))


@pytest.mark.parametrize("model", [StarInputs, ExtraArgs])
def test_variadic_forward_parameters_take_the_example_and_nothing_else(model):
    m = model().eval()
    gm = capture(m, torch.randn(1, 3, 8, 8))
    assert len([n for n in gm.graph.nodes if n.op == "placeholder"]) == 1
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x), m(x))


class _SqueezedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.squeeze(F.adaptive_avg_pool2d(self.conv(x), 1)))


def test_a_squeeze_without_dims_keeps_the_batch_of_a_batch_of_one():
    """``pool(x).squeeze()`` drops the batch too when it is 1, as the example's is: the graph squeezes the other
    size-1 dimensions, as the model does at every other batch size, so the compiled model keeps its batch."""
    model = _SqueezedHead().eval()
    gm = capture(model, torch.randn(1, 3, 8, 8))
    assert tuple(gm(torch.randn(1, 3, 8, 8)).shape) == (1, 4)
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(gm(x), model(x))


class _DropsInTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.conv(x), inplace=True)
        return self.fc(F.dropout(x.mean((2, 3)), 0.5, self.training))


def test_a_training_capture_makes_functional_dropout_follow_the_graphs_mode():
    """``F.dropout(x, p, self.training)`` traced in training mode is a dropout module: the QAT graph drops, the graph
    lowered in eval mode does not. The in-place check compares graph and model in training mode (same draws)."""
    model = _DropsInTraining().train()
    gm = capture(model, torch.randn(2, 3, 8, 8))
    assert [type(m) for m in gm.modules() if isinstance(m, nn.Dropout)] == [nn.Dropout]
    x = torch.randn(5, 3, 8, 8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        trained = gm(x)
        torch.manual_seed(1)
        assert torch.equal(trained, model(x))
    assert torch.equal(gm.eval()(x), model.eval()(x))
