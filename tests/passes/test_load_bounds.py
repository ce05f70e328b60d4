"""load_bounds: trained activation bounds carried from a graph with BatchNorm to its folded form."""

import pytest
import torch
from qcompile.passes.insert_quantizers import activation_quantizers
from qcompile.passes.load_bounds import LoadBounds, activation_bounds

from qcompile.errors import PipelineError
from qcompile.quantization.quantizer import QuantizerState
from qcompile.quantization.recipes import get_recipe
from qcompile.train.qat import ActivationSchedule, prepare_qat, qat_recipe
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
