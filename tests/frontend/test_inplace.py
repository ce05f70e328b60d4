"""In-place operations become values: the captured graph, read as dataflow, computes the model; what it cannot
follow is refused in one line naming the operation."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from qcompile import capture
from qcompile.errors import CaptureError
from tests.passes.test_lower_constructs import InPlaceStatements


class _AsDataflow(fx.Interpreter):
    """Runs a graph with every operation on copies of its inputs: only the edges carry values, as for a pass."""

    def run_node(self, n: fx.Node) -> object:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        copied = fx.node.map_aggregate((args, kwargs), lambda a: a.clone() if isinstance(a, torch.Tensor) else a)
        with self._set_current_node(n):
            return getattr(self, n.op)(n.target, *copied)


class _OneConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)


class SharedInplaceModule(nn.Module):
    """One in-place ReLU called for its effect at two sites."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv(x)
        self.relu(y)
        z = self.conv(y) - 0.5
        self.relu(z)
        return z


class Chained(_OneConv):
    """The same tensor changed twice, by a function and a method with an out-of-place twin, read in between."""

    def forward(self, x):
        y = self.conv(x)
        before = y * 2
        torch.relu_(y)
        y.mul_(0.5).requires_grad_(False)
        return before + y


@pytest.mark.parametrize("model", [InPlaceStatements, SharedInplaceModule, Chained])
def test_the_graph_read_as_dataflow_computes_the_model(model):
    torch.manual_seed(0)
    m = model().eval()
    gm = capture(m, torch.randn(1, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(_AsDataflow(gm).run(x.clone()), m(x.clone()))
    assert all(n.users for n in gm.graph.nodes if n.op != "output")


class ChangesAView(_OneConv):
    def forward(self, x):
        x = self.conv(x)
        x[:, :2].relu_()
        return x.mean((2, 3))


class AssignsItems(_OneConv):
    def forward(self, x):
        x = self.conv(x)
        out = torch.cat([x, x], 1) * 0
        out[:, :4] = x
        return out.mean((2, 3))


class ZeroesPart(_OneConv):
    def forward(self, x):
        x = self.conv(x)
        x.zero_()
        return x.mean((2, 3))


@pytest.mark.parametrize(("model", "line"), [
    (ChangesAView, r"x.relu_\(...\) at .*test_inplace.py:\d+\) and one of them is also read through a view"),
    (AssignsItems, r"cannot trace the model at .*test_inplace.py:\d+ `out\[:, :4\] = x`: .* item assignment"),
    (ZeroesPart, r"x.zero_\(...\) at .*test_inplace.py:\d+ changes a tensor in place and has no out-of-place form"),
])
def test_what_the_graph_cannot_follow_is_one_line(model, line):
    with pytest.raises(CaptureError, match=line) as info:
        capture(model().eval(), torch.randn(1, 3, 8, 8))
    assert "\n" not in str(info.value)


class DropsPaths(_OneConv):
    """timm's drop_path, as its models run it in training mode."""

    def forward(self, x):
        x = self.conv(x)
        if self.training:
            mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(0.9)
            x = x * mask.div_(0.9)
        return x.mean((2, 3))


def test_stochastic_depth_in_a_training_capture_says_to_capture_in_eval_mode():
    """In eval mode the branch is not traced; in training mode its random draw is one line saying what to do."""
    capture(DropsPaths().eval(), torch.randn(1, 3, 8, 8))
    with pytest.raises(CaptureError, match=r"x.bernoulli_\(...\) at .*test_inplace.py:\d+ draws random numbers in "
                                           r"the model's training mode .* return the model from build_model\(\) in "
                                           r"eval mode \(model.eval\(\)\): QAT then trains without it"):
        capture(DropsPaths().train(), torch.randn(1, 3, 8, 8))


def test_an_inplace_module_used_for_its_value_is_made_out_of_place():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Hardtanh(inplace=True)).eval()
    gm = capture(m, torch.randn(1, 3, 8, 8))
    assert not any(getattr(sub, "inplace", False) for sub in gm.modules())
    assert m[1].inplace  # the user's model is left as it was
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm(x), m(x))


def test_positional_inplace_flags_are_turned_off():
    class Positional(nn.Module):
        def forward(self, x):
            y = x * 1
            F.leaky_relu(y, 0.2, True)
            return y

    gm = capture(Positional().eval(), torch.randn(1, 3, 4, 4))
    leaky = next(n for n in gm.graph.nodes if n.target is F.leaky_relu)
    assert leaky.args[2] is False and list(leaky.users)[0].op == "output"
