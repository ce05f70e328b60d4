"""load_bounds: trained activation bounds carried from a graph with BatchNorm to its folded form."""

import pytest
import torch
from qcompile.passes.insert_quantizers import activation_quantizers
from qcompile.passes.load_bounds import LoadBounds, activation_bounds

from qcompile.errors import PipelineError
from qcompile.quantization.quantizer import QuantizerState
from qcompile.quantization.recipes import get_recipe
from qcompile.train.qat import ActivationSchedule, lower_trained, prepare_qat, qat_recipe
from tests.conftest import TinyNet, randomize_bn


def _frozen(recipe: str):
    torch.manual_seed(0)
    qm = prepare_qat(randomize_bn(TinyNet()), (torch.randn(1, 3, 8, 8),), qat_recipe(get_recipe(recipe)))
    sched = ActivationSchedule(qm.graph, total_steps=2, fraction=0.5)
    with torch.no_grad():
        qm.graph(torch.randn(4, 3, 8, 8))
    sched.before_step(1)
    return qm


def test_bounds_of_a_bn_output_are_keyed_by_the_conv_folding_hands_them_to():
    bounds = activation_bounds(_frozen("int8").graph)
    names = {name for name, _ in bounds}
    assert "body" in names and "body_bn" not in names  # the residual branch's quantizer reads BN(conv) → conv


def test_unfrozen_quantizers_and_missing_bounds_are_errors():
    qm = _frozen("int8")
    next(iter(activation_quantizers(qm.graph).values())).state = QuantizerState.OBSERVING
    with pytest.raises(PipelineError, match="never frozen"):
        activation_bounds(qm.graph)
    target = _frozen("mostly4bit")
    with pytest.raises(PipelineError, match="no trained bound"):
        LoadBounds(activation_bounds(_frozen("int4").graph)).run(target.graph, target.context)


def test_a_ddp_models_sync_batchnorms_are_seen_through_like_batchnorms():
    """A model converted for DDP (``nn.SyncBatchNorm``, not a ``BatchNorm2d``) keys its bounds as the plain one does,
    so its QAT lowers."""
    torch.manual_seed(0)
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(randomize_bn(TinyNet()))
    qm = prepare_qat(model, (torch.randn(1, 3, 8, 8),), qat_recipe(get_recipe("int8")))
    sched = ActivationSchedule(qm.graph, total_steps=2, fraction=0.5)
    with torch.no_grad():
        qm.graph.eval()(torch.randn(4, 3, 8, 8))
    sched.before_step(1)
    plain = activation_bounds(_frozen("int8").graph)
    assert set(activation_bounds(qm.graph)) == set(plain)


class LinearBottleneck(torch.nn.Module):
    """MobileNetV2 / EfficientNet blocks: a conv+BN output with no activation, read by the 8-bit residual add and
    by the next block's 4-bit conv, so its 4-bit quantizer requantizes the 8-bit one's codes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.project = torch.nn.Conv2d(8, 8, 1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.expand = torch.nn.Conv2d(8, 8, 1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = self.bn(self.project(x))
        y = y + torch.relu(self.expand(y))
        return self.fc(y.mean((2, 3)))


def test_a_chained_quantizer_is_keyed_after_the_one_it_reads_so_a_linear_bottleneck_lowers():
    """The trained graph names the 8-bit quantizer after the BN, the folded one after the conv: a 4-bit quantizer
    reading it was keyed by that name, and QAT of EfficientNet-B0 and MobileNetV3 stopped after training with
    "no trained bound"."""
    torch.manual_seed(0)
    qm = prepare_qat(randomize_bn(LinearBottleneck()), (torch.randn(1, 3, 8, 8),),
                     qat_recipe(get_recipe("mostly4bit")))
    sched = ActivationSchedule(qm.graph, total_steps=2, fraction=0.5)
    with torch.no_grad():
        qm.graph(torch.randn(4, 3, 8, 8))
    sched.before_step(1)
    bounds = activation_bounds(qm.graph)
    assert "project as s8" in {name for name, _ in bounds}  # the 4-bit requantizer of project's 8-bit codes
    gm, ctx = lower_trained(qm)
    assert ctx.ir is not None
