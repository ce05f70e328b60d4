import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcompile import capture
from qcompile.frontend.graph import compute_nodes, layer_names
from qcompile.reporting.verify import verify_reference
from tests.passes.test_lower_integer import _lowered


class FunctionalNet(nn.Module):
    """Parameters on the root, used through F.conv2d / F.linear (one conv weight used twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) / math.sqrt(27))
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = nn.Parameter(torch.randn(8, 8, 3, 3) / math.sqrt(72))
        self.register_buffer("fw", torch.randn(10, 8) / math.sqrt(8))  # a buffer, not a Parameter
        self.fb = nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        x = F.relu(F.conv2d(x, self.w2, stride=1, padding=1))
        x = F.relu(F.conv2d(x, self.w2, stride=1, padding=1))  # the same layer again: one module, two call sites
        x = F.relu(F.conv2d(x, self.w2, stride=2, padding=1))  # same weight, another stride: another layer
        return F.linear(x.mean((2, 3)), self.fw, bias=self.fb)


class Conv2dStaticSamePadding(nn.Conv2d):
    """EfficientNet-PyTorch's TF-"SAME" conv: a ZeroPad2d sized for the image, then F.conv2d on its own weight."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, image_size: int) -> None:
        super().__init__(cin, cout, k, stride, bias=False)
        pad = max((math.ceil(image_size / stride) - 1) * stride + k - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StandardizedConv(nn.Conv2d):
    """Weight standardisation: the weight is computed, so the call is not a plain layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self.weight.mean((1, 2, 3), keepdim=True), self.weight.std((1, 2, 3), keepdim=True)
        return F.conv2d(x, (self.weight - mean) / (std + 1e-5), self.bias, self.stride, self.padding)


class SameNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv2dStaticSamePadding(3, 8, 3, stride=2, image_size=9)
        self.pad = nn.ConstantPad2d(1, -0.5)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(nn.functional.relu(self.bn(self.stem(x))), 3, 1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.pad(x), 1), 1))


def _calls(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]


def test_functional_convs_and_linears_become_modules_sharing_the_parameters():
    torch.manual_seed(0)
    model = FunctionalNet().eval()
    gm = capture(model, torch.randn(2, 3, 8, 8))
    assert _calls(gm) == ["w1_conv", "w2_conv", "w2_conv", "w2_conv_1", "fw_fc"]
    assert gm.w1_conv.weight is not model.w1  # capture works on a copy ...
    assert gm.w2_conv.weight is gm.w2_conv_1.weight  # ... and a layer shares its parameter objects
    assert isinstance(gm.w2_conv_1, nn.Conv2d) and gm.w2_conv_1.stride == (2, 2) and gm.w2_conv.bias is None
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"]
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(gm(x), model(x))
    names = layer_names(gm)
    assert [names[n] for n in compute_nodes(gm)] == ["w1_conv", "w2_conv@0", "w2_conv@1", "w2_conv_1", "fw_fc"]


def test_a_conv_subclass_calling_f_conv2d_keeps_its_name_and_pad_modules_are_f_pad():
    torch.manual_seed(0)
    model = SameNet().eval()
    gm = capture(model, torch.randn(1, 3, 9, 9))
    assert _calls(gm) == ["stem", "bn", "fc"] and type(gm.stem) is nn.Conv2d
    pads = [(n.args[1], n.kwargs) for n in gm.graph.nodes if n.target is F.pad]
    assert pads == [([1, 1, 1, 1], {}), ([1, 1, 1, 1], {"value": -0.5})]
    assert not any(isinstance(m, nn.ZeroPad2d | nn.ConstantPad2d) for m in gm.modules())
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(gm(x), model(x))


def test_a_computed_weight_is_a_layer_in_eval_mode_and_stays_computed_for_training():
    model = StandardizedConv(3, 4, 3).eval()
    gm = capture(model, torch.randn(1, 3, 8, 8))
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"] and len(compute_nodes(gm)) == 1
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x), model(x))
    trained = capture(model.train(), torch.randn(2, 3, 8, 8))
    assert [n.target for n in trained.graph.nodes if n.op == "call_function"][-1] is F.conv2d
    assert not compute_nodes(trained)


def test_a_weight_folded_from_a_parameter_trains_and_a_buffer_used_as_one_does_not():
    """Quantization-aware training of an eval-mode capture (as ``build_model()`` returns most models) trains the
    folded weights that come from parameters (BiT's standardised convs were frozen, all 53 of them), not those
    computed from buffers."""
    from qcompile.train.qat import prepare_qat

    from qcompile import get_recipe

    gm = capture(StandardizedConv(3, 4, 3).eval(), torch.randn(1, 3, 8, 8))
    assert all(p.requires_grad for p in gm.parameters())
    fixed = FunctionalNet().eval()
    assert not capture(fixed, torch.randn(1, 3, 8, 8)).get_submodule("fw_fc").weight.requires_grad  # fw: a buffer
    qat = prepare_qat(standardized_net().eval(), (torch.randn(1, 3, 9, 9),), get_recipe("mostly4bit"))
    assert all(p.requires_grad for p in qat.graph.parameters())


def test_a_number_computed_from_a_parameter_is_a_constant():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor([2.0, 3.0]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale.view(1, -1, 1, 1) + self.scale.numel()

    model = Net().eval()
    gm = capture(model, torch.randn(1, 2, 3, 3))
    assert [n.target for n in gm.graph.nodes if n.op == "get_attr"] == ["scale_folded"]
    assert gm.scale_folded.shape == (1, 2, 1, 1) and "+ 2" in gm.code
    x = torch.randn(2, 2, 3, 3)
    assert torch.equal(gm(x), model(x))


def test_casts_that_change_nothing_go_and_a_real_cast_stays():
    class Casts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x.float().to(torch.float32).cpu()).detach().type_as(x)
            return y.to(torch.float16).float()

    gm = capture(Casts().eval(), torch.randn(1, 3, 8, 8))
    assert [n.target for n in gm.graph.nodes if n.op == "call_method"] == ["to", "float"]
    assert gm.graph.find_nodes(op="call_method", target="to")[0].args[1] is torch.float16


class ECA(nn.Module):
    """ECA-Net's channel attention (BangguWu/ECANet): a 1-d conv across the channels, ``expand_as`` before the
    product; and an expand that broadcasting does not make redundant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3)
        self.conv = nn.Conv1d(1, 1, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv0(x)
        y = F.adaptive_avg_pool2d(x, 1)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        x = x * torch.sigmoid(y).expand_as(x)
        return y.expand(-1, -1, 6, 6) + x.mean((2, 3), keepdim=True)


def test_a_1d_conv_is_a_2d_conv_of_height_one_and_a_redundant_expand_goes():
    torch.manual_seed(0)
    model = ECA().eval()
    gm = capture(model, torch.randn(1, 3, 8, 8))
    assert type(gm.conv) is nn.Conv2d and gm.conv.kernel_size == (1, 3) and gm.conv.padding == (0, 1)
    assert torch.equal(gm.conv.weight[:, :, 0], model.conv.weight)
    assert [n.target for n in gm.graph.nodes if n.op == "call_method" and "expand" in str(n.target)] == ["expand"]
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x), model(x))


class PermutedExpands(nn.Module):
    """Expands read through permutations by a sum: the first two broadcast along different axes (timm's relative
    logits), so both go; the last two along the same axis, so the second must stay."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x[:, :1].expand(-1, 4, -1, -1).permute(0, 2, 3, 1)  # (N, 4, 5, 6) → (N, 5, 6, 4)
        b = x[:, :, :1].expand(-1, -1, 5, -1).permute(0, 2, 3, 1)
        c = x[:, :, :, :1].expand(-1, -1, -1, 6).transpose(1, 3).transpose(1, 2)
        d = x[:, :, :, 1:2].expand(-1, -1, -1, 6).permute(0, 2, 3, 1)
        return (a + b) * (c + d)


def test_expands_that_broadcasting_makes_redundant_through_permutations_go_and_the_others_stay():
    model = PermutedExpands()
    gm = capture(model, torch.randn(1, 4, 5, 6))
    assert len([n for n in gm.graph.nodes if n.target == "expand"]) == 1
    x = torch.randn(3, 4, 5, 6)
    assert torch.equal(gm(x), model(x))


class MatmulHead(nn.Module):
    """Heads written as products with parameters: ``torch.mm(x, self.proj.t())`` and ``x @ self.w + self.b``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Parameter(torch.randn(6, 8) / math.sqrt(8))
        self.w = nn.Parameter(torch.randn(6, 10) / math.sqrt(6))
        self.b = nn.Parameter(torch.zeros(10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(torch.mm(F.relu(self.conv(x)).mean((2, 3)), self.proj.t()))
        return x @ self.w + self.b


def test_a_product_with_a_parameter_is_a_dense_layer_in_eval_mode():
    """In an eval capture ``x @ W`` is ``F.linear(x, Wᵀ)`` and so an ``nn.Linear`` (a layer with weights, MACs and
    a precision); a training capture keeps the product, whose weight changes (QAT refuses it in one line)."""
    model = MatmulHead().eval()
    gm = capture(model, torch.randn(1, 3, 8, 8))
    assert [type(gm.get_submodule(str(n.target))).__name__ for n in compute_nodes(gm)] == ["Conv2d", "Linear",
                                                                                            "Linear"]
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(gm(x), model(x))
    assert len(compute_nodes(capture(model.train(), torch.randn(2, 3, 8, 8)))) == 1


def standardized_net() -> nn.Module:
    return nn.Sequential(StandardizedConv(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


@pytest.mark.parametrize("model", [FunctionalNet, SameNet, standardized_net, MatmulHead])
def test_functional_layers_quantize_lower_and_verify(model):
    res = _lowered(model(), "mostly4bit", size=9)
    assert sum(op.kind in ("conv2d", "dense") for op in res.context.ir.ops) == len(compute_nodes(res.graph_module))
    batches = [(torch.randn(6, 3, 9, 9), torch.zeros(6, dtype=torch.long))]
    v = verify_reference(res.graph_module, res.context.ir, batches).summary()
    assert v["top1_agreement"] == 1.0 and v["max_lsb_diff"] == 0


@pytest.mark.parametrize("k, dilation", [(3, 1), (3, 2), (4, 1), (2, 3), ((2, 3), 1)])
def test_same_and_valid_conv_padding_become_numbers(k, dilation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, k, padding="same", dilation=dilation), nn.ReLU(),
                          nn.Conv2d(4, 4, k, padding="valid")).eval()
    gm = capture(model, torch.randn(1, 3, 9, 9))
    assert all(isinstance(m.padding, tuple) for m in gm.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(gm(x), model(x))
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op != "output")


def test_asymmetric_same_padding_pads_every_call_site():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 4, padding="same")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(F.relu(self.conv(x)))

    torch.manual_seed(0)
    model = Twice().eval()
    gm = capture(model, torch.randn(1, 4, 8, 8))
    assert sum(n.target is F.pad for n in gm.graph.nodes) == 2
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(gm(x), model(x))


class Dropouts(nn.Module):
    def __init__(self, always: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop2d = nn.Dropout2d()
        self.alpha = nn.AlphaDropout(0.1)
        self.always = always

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.alpha(self.drop2d(self.conv(x)))
        x = F.dropout2d(x, 0.1, self.training)
        x = F.dropout(x, p=0.2, training=self.training)
        return F.dropout(x, 0.5) if self.always else x  # training=True by default: drops in eval mode too


def test_eval_mode_dropouts_go_and_an_always_on_one_stays():
    gm = capture(Dropouts().eval(), torch.randn(1, 3, 8, 8))
    assert [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    trained = capture(Dropouts().train(), torch.randn(1, 3, 8, 8))
    assert len(trained.graph.nodes) == 7  # in training mode the four dropouts drop, and stay
    always = capture(Dropouts(always=True).eval(), torch.randn(1, 3, 8, 8))
    assert [n.target for n in always.graph.nodes if n.op == "call_function"] == [F.dropout]
