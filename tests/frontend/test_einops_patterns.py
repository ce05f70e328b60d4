"""einops' rearrange and reduce, functions and layers: recorded as calls by capture, then the reshapes, permutes
and reductions their patterns spell, computing what einops computes at any batch size, and lowering."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcompile import capture
from qcompile.frontend.einops_patterns import Pattern, parse_pattern
from qcompile.passes.lower_integer import LoweringError
from qcompile.reporting.verify import verify_reference
from tests.passes.test_lower_integer import _lowered

einops = pytest.importorskip("einops")
from einops.layers.torch import Rearrange, Reduce  # noqa: E402


@pytest.mark.parametrize("pattern, rank, expected", [
    ("b c h w -> b (h w) c", 4, Pattern((("b",), ("c",), ("h",), ("w",)), (("b",), ("h", "w"), ("c",)))),
    ("b (h d) n -> b h n d", 3, Pattern((("b",), ("h", "d"), ("n",)), (("b",), ("h",), ("n",), ("d",)))),
    ("b ... -> b (...)", 4, Pattern((("b",), (".0",), (".1",), (".2",)), (("b",), (".0", ".1", ".2")))),
    ("b c 1 1 -> b c", 4, Pattern((("b",), ("c",), (), ()), (("b",), ("c",)))),
    ("b c -> b c () ()", 2, Pattern((("b",), ("c",)), (("b",), ("c",), (), ()))),
])
def test_patterns_parse_into_groups_of_elementary_axes(pattern, rank, expected):
    assert parse_pattern(pattern, rank) == expected


@pytest.mark.parametrize("pattern, rank", [("b c h w -> b (h w) c", 3), ("b c c -> b c", 3), ("b (c -> b c", 2),
                                           ("b c -> b c d", 2), ("b (c ...) -> b c", 2)])
def test_patterns_that_are_no_plain_rearrangement_do_not_parse(pattern, rank):
    assert parse_pattern(pattern, rank) is None


class Rearranged(nn.Module):
    """``op(x * 1, pattern, **lengths)``: a function of einops, or its layer."""

    def __init__(self, pattern: str, reduction: str | None = None, layer: bool = False, **lengths: int) -> None:
        super().__init__()
        self.pattern, self.reduction, self.lengths = pattern, reduction, lengths
        self.layer = None if not layer else (Reduce(pattern, reduction, **lengths) if reduction
                                             else Rearrange(pattern, **lengths))

    def forward(self, x):
        x = x * 1.0
        if self.layer is not None:
            return self.layer(x)
        if self.reduction:
            return einops.reduce(x, self.pattern, self.reduction, **self.lengths)
        return einops.rearrange(x, self.pattern, **self.lengths)


CASES = [
    ("b c h w -> b (h w) c", None, {}),
    ("b (h d) x y -> b h (x y) d", None, {"h": 2}),
    ("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", None, {"p1": 2, "p2": 2}),
    ("b ... -> b (...)", None, {}),
    ("b c h w -> b c", "mean", {}),
    ("b (g c) h w -> b c h w", "max", {"g": 2}),
    ("b c h w -> b w c", "sum", {}),
]


@pytest.mark.parametrize("layer", [False, True])
@pytest.mark.parametrize("pattern, reduction, lengths", CASES)
def test_rearrangements_are_reshapes_and_permutes_computing_what_einops_does(pattern, reduction, lengths, layer):
    model = Rearranged(pattern, reduction, layer, **lengths)
    gm = capture(model, torch.randn(1, 4, 6, 8))
    assert not [n for n in gm.graph.nodes if "einops" in str(n.target) or n.op == "call_module"]
    for batch in (1, 3):
        x = torch.randn(batch, 4, 6, 8)
        assert torch.equal(gm(x), model(x))


def test_a_rearrangement_that_moves_the_batch_stays_and_is_refused_in_one_line():
    class Moves(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return einops.rearrange(self.conv(x), "b c h w -> c b h w").mean((2, 3))

    with pytest.raises(LoweringError, match=r"node rearrange \(call_function rearrange\) at .*test_einops_patterns"):
        _lowered(Moves(), "int8")


class PatchMixer(nn.Module):
    """A patch-mixing block as lucidrains' repositories write it: ``Rearrange`` to patches, a dense layer across
    them, ``rearrange`` back with named lengths, an einops ``Reduce`` pooling head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.to_patches = Rearrange("b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=2, p2=2)
        self.mix = nn.Linear(32, 32)
        self.pool = Reduce("b c h w -> b c", "mean")
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.conv(x))
        y = F.relu(self.mix(self.to_patches(x)))
        x = x + einops.rearrange(y, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=8, p1=2, p2=2)
        return self.fc(self.pool(x))


@pytest.mark.parametrize("recipe", ["int8", "mostly4bit"])
def test_an_einops_model_lowers_and_the_reference_equals_fake_quant(recipe):
    res = _lowered(PatchMixer(), recipe)
    x = torch.randn(32, 3, 16, 16)
    summary = verify_reference(res.graph_module, res.context.ir, [(x, torch.zeros(32, dtype=torch.long))]).summary()
    assert summary["identical_fraction"] == 1.0
