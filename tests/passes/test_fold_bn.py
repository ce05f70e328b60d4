import pytest
import torch
import torch.nn.functional as F
from qcompile.passes import fold_bn
from torch import fx, nn

from qcompile import capture
from qcompile.models import resnet18, resnet20_cifar, resnet50
from tests.conftest import randomize_bn


def _bn_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.BatchNorm2d)]


@pytest.mark.parametrize(
    ("build", "size", "dtype", "tol"),
    [
        (resnet20_cifar, 32, torch.float32, 1e-5),
        (resnet18, 64, torch.float32, 2e-5),  # 1.1e-5 on an AVX2 CPU: oneDNN sums in another order there
        # float64 shows the fold is exact; ResNet-50 in float32 differs by ~1e-4 from accumulation order alone
        (resnet20_cifar, 32, torch.float64, 1e-10),
        (resnet18, 64, torch.float64, 1e-10),
        (resnet50, 64, torch.float64, 1e-10),
    ],
)
def test_fold_is_exact_on_random_data(build, size, dtype, tol):
    torch.manual_seed(0)
    x = torch.randn(4, 3, size, size, dtype=dtype)
    model = randomize_bn(build().to(dtype), data=torch.randn(16, 3, size, size, dtype=dtype))
    gm = fold_bn.fold_bn(capture(model, x))
    assert not _bn_nodes(gm)
    with torch.no_grad():
        ref, out = model(x), gm(x)
    assert (ref - out).abs().max().item() < tol


class PreAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.conv(torch.relu(self.bn(x)))
        return F.batch_norm(x, self.bn2.running_mean, self.bn2.running_var, self.bn2.weight, self.bn2.bias, False)


def test_unfoldable_bn_becomes_a_depthwise_conv_and_is_reported():
    from qcompile.passes import FoldBatchNorm

    from qcompile.pipeline import PassContext

    model = randomize_bn(PreAct()).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = capture(model, x)
    ctx = PassContext.for_graph(gm)
    gm = FoldBatchNorm()(gm, ctx)
    assert not _bn_nodes(gm)
    bn = gm.get_submodule("bn")
    assert isinstance(bn, nn.Conv2d) and bn.groups == 3 and bn.kernel_size == (1, 1)
    assert any("bn follows no single-use conv" in w and "depthwise" in w for w in ctx.warnings)
    assert not any(n.op == "call_function" for n in gm.graph.nodes if "batch_norm" in n.name)  # folded into conv
    assert (gm(x) - model(x)).abs().max().item() < 1e-5


def test_functional_batch_norm_on_attributes_folds_into_its_conv():
    model = randomize_bn(PreAct()).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = fold_bn.fold_bn(capture(model, x))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["bn", "conv"]
    assert (gm(x) - model(x)).abs().max().item() < 1e-5


def test_dense_followed_by_batchnorm1d_folds():
    model = randomize_bn(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))).eval()
    x = torch.randn(3, 6)
    gm = fold_bn.fold_bn(capture(model, x))
    assert [n.op for n in gm.graph.nodes].count("call_module") == 1
    assert (gm(x) - model(x)).abs().max().item() < 1e-5


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d (detection backbones; detectron2's is the same): statistics and
    affine parameters as buffers, applied as ``x * scale + bias``."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        g = torch.Generator().manual_seed(num_features)
        self.register_buffer("weight", torch.rand(num_features, generator=g) + 0.5)
        self.register_buffer("bias", torch.randn(num_features, generator=g) * 0.1)
        self.register_buffer("running_mean", torch.randn(num_features, generator=g) * 0.1)
        self.register_buffer("running_var", torch.rand(num_features, generator=g) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


@pytest.mark.parametrize("norm", ["frozen", "sync"])
def test_frozen_and_synchronised_batch_norms_fold_into_their_conv(norm):
    """A conv without bias gets one from the frozen norm's shift; a DDP model's SyncBatchNorms (as
    ``convert_sync_batchnorm`` makes them) fold like the BatchNorms they were."""
    torch.manual_seed(0)
    kind = FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), kind(8), nn.ReLU(), nn.Conv2d(8, 4, 1), kind(4)).eval()
    if norm == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(randomize_bn(model)).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = fold_bn.fold_bn(capture(model, x))
    assert [type(m) for m in gm.modules() if not isinstance(m, fx.GraphModule)] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    assert [n.op for n in gm.graph.nodes] == ["placeholder", *["call_module"] * 3, "output"]
    with torch.no_grad():
        assert (model(x) - gm(x)).abs().max().item() < 1e-5


def test_instance_norms_become_the_norms_they_compute():
    """IBN-Net's instance norms: with running statistics (eval) a BatchNorm that folds into the conv before it,
    without them a GroupNorm of one channel per group; the model computes the same."""
    from tests.passes.test_lower_constructs import InstanceBatchNorm

    torch.manual_seed(0)
    model = randomize_bn(InstanceBatchNorm()).eval()
    x = torch.randn(4, 3, 16, 16)
    gm = fold_bn.fold_bn(capture(model, x[:1]))
    kinds = {name: type(m) for name, m in gm.named_modules()}
    assert "tracked" not in kinds and not any(isinstance(m, nn.InstanceNorm2d) for m in gm.modules())
    assert kinds["IN"] is nn.GroupNorm and gm.IN.num_groups == gm.IN.num_channels == 4
    assert kinds["out_in"] is nn.GroupNorm and gm.out_in.weight is None
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_layer_and_its_batchnorm_called_at_two_sites_fold_once():
    """One body run on an image and on its mirror image (test-time augmentation): each call of the conv is read by
    a call of the same BatchNorm, so the pair folds, once; a BatchNorm called after two different layers does not."""
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model = randomize_bn(nn.ModuleDict({"body": body})).eval()

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model["body"]

        def forward(self, x):
            return self.body(x) + self.body(torch.flip(x, dims=[3]))

    twice = Twice().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = fold_bn.fold_bn(capture(twice, x))
    assert not _bn_nodes(gm)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["body.0", "body.0"]
    assert (gm(x) - twice(x)).abs().max().item() < 1e-5


def test_a_batchnorm_left_unfolded_says_why_and_lowering_points_at_it():
    """One BatchNorm called after two different convs neither folds nor becomes a layer of its own."""
    from qcompile.passes import FoldBatchNorm

    from qcompile.pipeline import PassContext

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.a(x)) + self.bn(self.b(x))

    gm = capture(randomize_bn(Shared()).eval(), torch.randn(2, 3, 8, 8))
    ctx = PassContext.for_graph(gm)
    FoldBatchNorm()(gm, ctx)
    assert "fold_bn: bn follows no single-use conv/dense and it is called at 2 sites; left unfolded" in ctx.warnings
