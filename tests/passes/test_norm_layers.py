"""norms_as_layers: a BatchNorm that folds into a layer of its own trains as that layer, so QAT's quantizers are
the deployed model's (a pre-activation network's QAT used to stop at lowering: "no trained bound")."""

import pytest
import torch
import torch.nn.functional as F
from qcompile.passes.fold_bn import affine_conv
from qcompile.passes.insert_quantizers import activation_quantizers
from qcompile.passes.norm_layers import NormLayer, NormsAsLayers
from torch import nn

from qcompile import capture
from qcompile.pipeline import PassContext
from qcompile.quantization.recipes import get_recipe
from qcompile.train.qat import lower_trained, prepare_qat, qat_recipe
from tests.conftest import randomize_bn, train_steps


class PreActNet(nn.Module):
    """Stem conv, a pre-activation residual block (BN → ReLU → conv on the stream) and a final BN → ReLU before
    pooling, as in a pre-activation ResNet or a DenseNet: three BatchNorms that follow no layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_final = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        out = self.conv1(F.relu(self.bn1(x)))
        x = x + self.conv2(F.relu(self.bn2(out)))
        x = F.relu(self.bn_final(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_only_batchnorms_that_follow_no_layer_become_norm_layers():
    x = torch.randn(2, 3, 8, 8)
    gm = capture(randomize_bn(PreActNet()).train(), x)
    gm = NormsAsLayers()(gm, PassContext.for_graph(gm))
    kinds = {name: type(m) for name, m in gm.named_children()}
    assert kinds["bn1"] is NormLayer and kinds["bn_final"] is NormLayer
    assert kinds["bn2"] is nn.BatchNorm2d  # follows conv1 alone: it folds into conv1


@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_norm_layer_computes_and_updates_what_its_batchnorm_did(momentum):
    torch.manual_seed(0)
    bn = randomize_bn(nn.BatchNorm2d(6, momentum=momentum))
    layer = NormLayer(bn).train()
    bn.train()
    for _ in range(3):
        x = torch.randn(4, 6, 5, 5) * 3 + 1
        assert torch.equal(layer(x), bn(x))
    assert torch.equal(layer.running_mean, bn.running_mean) and torch.equal(layer.running_var, bn.running_var)
    assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked)
    assert set(layer.state_dict()) == set(bn.state_dict())  # the BatchNorm's names: a checkpoint of either loads
    x = torch.randn(4, 6, 5, 5)
    layer.eval(), bn.eval()
    assert torch.equal(layer(x), bn(x))
    folded, reference = affine_conv(layer), affine_conv(bn)
    assert torch.equal(folded.weight, reference.weight) and torch.equal(folded.bias, reference.bias)


@pytest.mark.parametrize("recipe", ["int8", "mostly4bit"])
def test_qat_of_a_preactivation_net_lowers_with_the_bounds_it_trained(recipe):
    torch.manual_seed(0)
    qm = prepare_qat(randomize_bn(PreActNet()), (torch.randn(1, 3, 8, 8),), qat_recipe(get_recipe(recipe)))
    gm = train_steps(qm.graph)
    g = torch.Generator().manual_seed(2)
    trained_cost = qm.context.cost
    lowered, ctx = lower_trained(qm)
    assert ctx.ir is not None
    # every quantizer of the deployed model is one QAT trained: the same set, the same bounds
    assert sorted(activation_quantizers(lowered)) == sorted(activation_quantizers(gm))
    trained = {name: float(q.scale) for name, q in activation_quantizers(gm).items()}
    assert {name: float(q.scale) for name, q in activation_quantizers(lowered).items()} == trained
    assert ctx.cost.linear == trained_cost.linear and ctx.cost.macs == trained_cost.macs  # the BN layers costed
    x = torch.randn(32, 3, 8, 8, generator=g)
    with torch.no_grad():  # the deployed model computes what QAT trained, up to rounding details (among them
        assert torch.allclose(lowered(x), gm(x), atol=0.05)  # the folded BatchNorm's int32 bias)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's fused norm-activation layer: a BatchNorm2d subclass calling ``F.batch_norm`` itself."""

    def forward(self, x):
        if self.training:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return F.relu(x)


class FrozenBatchNorm2d(nn.Module):
    """detectron2's: statistics and affine parameters are buffers; never trained."""

    def __init__(self, c: int) -> None:
        super().__init__()
        for name, value in (("weight", 1.5), ("bias", 0.1), ("running_mean", 0.2), ("running_var", 2.0)):
            self.register_buffer(name, torch.full((c,), value))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, 1e-5)


class FusedNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = BatchNormAct2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.frozen = FrozenBatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.frozen(self.conv2(self.bn(self.conv(x)))).mean((2, 3)))


@pytest.mark.parametrize("training", [True, False])
def test_a_fused_norm_activation_layer_trains_as_a_batchnorm_in_either_capture_mode(training):
    """``F.batch_norm(..., self.training, ...)`` on a module's own statistics, captured in either mode, becomes a
    BatchNorm sharing those tensors: it normalises with the batch while QAT trains (before, a model captured in
    eval mode trained with its statistics frozen) and lowers folded (before, one captured in training mode
    stopped at lowering). A frozen BatchNorm (buffers, a literal mode) stays as written."""
    torch.manual_seed(0)
    model = randomize_bn(FusedNormNet()).train(training)
    gm = capture(model, torch.randn(2, 3, 8, 8))
    gm = NormsAsLayers()(gm, PassContext.for_graph(gm))
    calls = [n for n in gm.graph.nodes if n.target is F.batch_norm]
    assert len(calls) == 1 and "frozen" in str(calls[0].args[1].target)
    assert isinstance(gm.get_submodule("bn.bn"), nn.BatchNorm2d)
    x = torch.randn(6, 3, 8, 8)
    reference = randomize_bn(FusedNormNet()).train()
    reference.load_state_dict(model.state_dict())
    gm.train()
    assert torch.allclose(gm(x), reference(x), atol=1e-6)  # batch statistics, and the running ones updated alike
    assert torch.equal(gm.get_submodule("bn.bn").running_mean, reference.bn.running_mean)
    gm.eval(), reference.eval()
    assert torch.allclose(gm(x), reference(x), atol=1e-6)


def test_qat_of_a_fused_norm_activation_model_lowers_with_it_folded():
    torch.manual_seed(0)
    qm = prepare_qat(randomize_bn(FusedNormNet()).train(), (torch.randn(1, 3, 8, 8),),
                     qat_recipe(get_recipe("int8")))
    train_steps(qm.graph, steps=2)
    lowered, ctx = lower_trained(qm)
    assert ctx.ir is not None and not any(isinstance(m, nn.BatchNorm2d) for m in lowered.modules())  # folded
