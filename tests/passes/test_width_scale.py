import pytest
import torch
from qcompile.passes import WidthScale

from qcompile import capture
from qcompile.errors import PipelineError
from qcompile.frontend.graph import compute_nodes
from qcompile.models import resnet20_cifar, resnet50
from qcompile.pipeline import PassContext

PAPER_PARAMS = {1.0: 25.5e6, 2.0: 97.8e6}


def _scaled(model, width, shape):
    gm = capture(model, torch.randn(shape))
    ctx = PassContext.for_graph(gm)
    return WidthScale(width)(gm, ctx), ctx


@pytest.mark.parametrize("width", [0.5, 1.0, 2.0])
def test_resnet50_param_counts(width):
    gm, ctx = _scaled(resnet50().eval(), width, (1, 3, 64, 64))
    params = sum(p.numel() for p in gm.parameters())
    if width in PAPER_PARAMS:
        assert abs(params - PAPER_PARAMS[width]) / PAPER_PARAMS[width] < 0.02
    else:
        assert params < PAPER_PARAMS[1.0] / 3
    assert ctx.width == width and ctx.width_reference is not None
    for n in compute_nodes(gm):
        m = gm.get_submodule(n.target)
        if isinstance(m, torch.nn.Conv2d):
            assert m.out_channels % 8 == 0
    assert gm.fc.out_features == 1000 and gm.conv1.in_channels == 3
    assert tuple(gm(torch.randn(2, 3, 64, 64)).shape) == (2, 1000)


def test_width_matches_the_models_own_width_argument():
    gm, _ = _scaled(resnet20_cifar().eval(), 0.5, (1, 3, 32, 32))
    ref = resnet20_cifar(width=0.5)
    assert {k: tuple(v.shape) for k, v in gm.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_parameterised_module_it_cannot_scale():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.GroupNorm(2, 8))
    gm = capture(model, torch.randn(1, 3, 4, 4))
    with pytest.raises(PipelineError, match="cannot resize 1 \\(GroupNorm\\)"):
        WidthScale(2.0)(gm)


def test_bad_width():
    with pytest.raises(PipelineError):
        WidthScale(0.0)


def test_a_ddp_models_sync_batchnorms_are_resized_like_batchnorms():
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(resnet20_cifar()).eval()
    gm, _ = _scaled(model, 0.5, (1, 3, 32, 32))
    assert gm.get_submodule("bn1").num_features == 8 and isinstance(gm.get_submodule("bn1"), torch.nn.SyncBatchNorm)
    assert tuple(gm(torch.randn(2, 3, 32, 32)).shape) == (2, 10)
