import pytest
import torch
from torch import nn

from qcompile import capture
from qcompile.errors import CaptureError
from qcompile.graph import compute_nodes
from qcompile.models import resnet18
from qcompile.spec import LayerRole, annotate, get_annotation


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
