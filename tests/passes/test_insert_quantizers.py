import pytest
import torch
from qcompile.passes import AssignPrecision, FoldBatchNorm, InsertQuantizers
from qcompile.passes.insert_quantizers import activation_quantizers, is_add
from torch.nn.utils import parametrize

from qcompile import Pipeline, get_recipe
from qcompile.errors import PipelineError
from qcompile.frontend.graph import compute_nodes
from qcompile.models import resnet20_cifar
from qcompile.quantization.quantizer import ActivationQuantizer
from qcompile.quantization.recipes import parse_set
from qcompile.quantization.spec import Calibrator, get_annotation


def _insert(model, recipe, sets=(), shape=(1, 3, 32, 32)):
    return Pipeline([FoldBatchNorm(), AssignPrecision(), InsertQuantizers()]).run(
        model.eval(), torch.randn(shape), recipe=get_recipe(recipe), overrides=parse_set(sets)).graph_module


def test_every_layer_and_residual_add_is_quantized():
    gm = _insert(resnet20_cifar(), "mostly4bit")
    for n in compute_nodes(gm):
        m = gm.get_submodule(n.target)
        assert parametrize.is_parametrized(m, "weight"), n.target
        src = gm.get_submodule(n.args[0].target)
        assert src.spec == get_annotation(n).input_act  # the layer's input passes its own quantizer
    adds = [n for n in gm.graph.nodes if is_add(n)]
    assert len(adds) == 9
    residuals = 0
    for add in adds:
        (relu,) = add.users  # the residual is quantized after the ReLU: unsigned, 8 bits
        readers = [gm.get_submodule(u.target) for u in relu.users]
        assert all(isinstance(q, ActivationQuantizer) for q in readers)  # each reads the float sum once
        if any(q.spec.bits == 8 and not q.spec.signed for q in readers):
            residuals += 1
            assert get_annotation(add).output_act.bits == 8 and not get_annotation(add).output_act.signed
    assert residuals == 7  # the sums entering the two downsampling blocks are read by 4-bit layers only


def test_int8_residual_and_next_layer_input_share_one_quantizer():
    gm = _insert(resnet20_cifar(), "int8")
    for add in [n for n in gm.graph.nodes if is_add(n)]:
        (relu,) = add.users
        assert len(relu.users) == 1, [u.name for u in relu.users]


def test_quantizers_are_shared_per_tensor_and_spec():
    gm = _insert(resnet20_cifar(), "int8")
    stem_relu = next(n for n in gm.graph.nodes if n.op == "call_function" and n.name == "relu")
    quantizers = [u for u in stem_relu.users]
    assert len(quantizers) == 1  # block conv input and identity input agree (u8): one quantizer


class SharedMLP(torch.nn.Module):
    """CBAM's channel gate: one MLP (with biases) on the average- and on the max-pooled features."""

    def __init__(self, signed_max: bool = False) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.mlp = torch.nn.Linear(8, 8)
        self.signed_max = signed_max

    def forward(self, x):
        x = torch.relu(self.conv(x))
        peak = x.amax((2, 3)) - 1.0 if self.signed_max else torch.max(x.flatten(2), 2).values
        return self.mlp(x.mean((2, 3))) + self.mlp(peak)


@pytest.mark.parametrize("signed_max", [False, True])
def test_a_biased_layer_called_on_two_inputs_quantizes_both_with_one_quantizer(signed_max):
    """One module called at both sites, so that the int32 bias has one scale (the calls stay two nodes); signed
    when one of the inputs is."""
    gm = _insert(SharedMLP(signed_max), "int8", shape=(1, 3, 8, 8))
    sites = [n for n in compute_nodes(gm) if n.target == "mlp"]
    assert len(sites) == 2 and sites[0].args[0] is not sites[1].args[0]
    [target] = {n.args[0].target for n in sites}
    assert gm.get_submodule(target).spec.signed == signed_max


def test_a_biased_layer_called_at_two_precisions_is_refused():
    with pytest.raises(PipelineError, match="mlp has a bias and is called on inputs that quantize differently"):
        _insert(SharedMLP(), "int8", sets=["mlp@1=w8a4"], shape=(1, 3, 8, 8))


def test_bf16_inserts_nothing():
    gm = _insert(resnet20_cifar(), "bf16")
    assert not activation_quantizers(gm)
    assert not any(parametrize.is_parametrized(m) for m in gm.modules())


def test_per_layer_calibrator_override():
    gm = _insert(resnet20_cifar(), "int8", ["layer3.*=mse"])
    cals = {q.spec.calibrator for q in activation_quantizers(gm).values()}
    assert cals == {Calibrator.EMA_MAX, Calibrator.MSE}


def test_fake_quant_graph_still_runs_and_keeps_shapes():
    gm = _insert(resnet20_cifar(), "int4")
    assert tuple(gm(torch.randn(2, 3, 32, 32)).shape) == (2, 10)
    with pytest.raises(StopIteration):
        next(n for n in gm.graph.nodes if n.op != "output" and "tensor_meta" not in n.meta)


class TwoWidthsReadAProduct(torch.nn.Module):
    """A scaled activation (not a residual sum) read by an 8-bit and a 4-bit layer: the 4-bit quantizer
    requantizes the 8-bit one's codes, and must come after it in the graph (NF-ResNet's ``act(x) * beta``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.wide = torch.nn.Conv2d(8, 8, 1)
        self.narrow = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        v = torch.relu(self.stem(x)) * 1.5
        return self.fc((self.narrow(v) + self.wide(v)).mean((2, 3)))


class WideReadFirst(TwoWidthsReadAProduct):
    def forward(self, x):
        v = torch.relu(self.stem(x)) * 1.5
        return self.fc((self.wide(v) + self.narrow(v)).mean((2, 3)))


@pytest.mark.parametrize("model", [TwoWidthsReadAProduct, WideReadFirst])
@pytest.mark.parametrize(("recipe", "sets"), [("int8", ["narrow=4"]), ("mostly4bit", ["wide=8"])])
def test_a_narrower_quantizer_of_a_value_follows_the_widest_it_reads(model, recipe, sets):
    gm = _insert(model(), recipe, sets)
    gm.graph.lint()
    quantizers = [n for n in gm.graph.nodes if n.op == "call_module" and n.name.startswith("mul_aq_")]
    assert len(quantizers) == 2 and quantizers[1].args[0] is quantizers[0]
