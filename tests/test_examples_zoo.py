"""The example model zoo (examples/mobilenet_v2.py ... cbam_resnet.py, antialiased_resnet.py): each file keeps the
model-file contract, runs at 32x32, keeps the original's parameter names and shapes, and costs what it should."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from qcompile.passes import AnnotateCost, AssignPrecision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from qcompile import Pipeline, get_recipe
from qcompile.frontend.model_file import ModelFile, load_model_file
from qcompile.models.init import randomize_batchnorm

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# parameter names of the torchvision / timm / kuangliu originals that the CIFAR builds must keep
KEYS = {
    "mobilenet_v2": [
        "features.0.0.weight", "features.0.1.running_var", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
        "features.1.conv.2.running_mean", "features.2.conv.0.0.weight", "features.2.conv.1.0.weight",
        "features.2.conv.2.weight", "features.2.conv.3.bias", "features.17.conv.2.weight", "features.18.0.weight",
        "features.18.1.bias", "classifier.1.weight", "classifier.1.bias",
    ],
    "mobilenet_v3": [
        "features.0.0.weight", "features.0.1.running_var", "features.1.block.0.0.weight",
        "features.1.block.1.fc1.weight", "features.1.block.1.fc2.bias", "features.1.block.2.1.weight",
        "features.2.block.0.0.weight", "features.4.block.2.fc1.bias", "features.11.block.3.0.weight",
        "features.12.0.weight", "features.12.1.bias", "classifier.0.weight", "classifier.3.bias",
    ],
    "se_resnet": [
        "conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer1.0.bn2.weight",
        "layer1.0.se.fc1.weight", "layer1.0.se.fc1.bias", "layer1.0.se.fc2.weight", "layer1.0.se.fc2.bias",
        "layer2.0.downsample.0.weight", "layer2.0.downsample.1.running_var", "layer4.1.se.fc2.weight",
        "fc.weight", "fc.bias",
    ],
    "efficientnet_b0": [
        "conv_stem.weight", "bn1.running_mean", "blocks.0.0.conv_dw.weight", "blocks.0.0.bn1.weight",
        "blocks.0.0.se.conv_reduce.weight", "blocks.0.0.se.conv_expand.bias", "blocks.0.0.conv_pw.weight",
        "blocks.0.0.bn2.running_var", "blocks.1.0.conv_pw.weight", "blocks.1.0.conv_dw.weight",
        "blocks.1.0.se.conv_reduce.bias", "blocks.1.0.conv_pwl.weight", "blocks.1.0.bn3.weight",
        "blocks.6.0.conv_pwl.weight", "conv_head.weight", "bn2.running_mean", "classifier.weight",
    ],
    "preact_resnet18": [
        "conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn2.running_var",
        "layer1.0.conv2.weight", "layer2.0.shortcut.0.weight", "layer4.1.conv2.weight", "bn.weight",
        "linear.weight", "linear.bias",
    ],
    "shufflenet_v2": [
        "conv1.0.weight", "conv1.1.running_mean", "stage2.0.branch1.0.weight", "stage2.0.branch1.1.weight",
        "stage2.0.branch1.2.weight", "stage2.0.branch1.3.bias", "stage2.0.branch2.0.weight",
        "stage2.0.branch2.3.weight", "stage2.0.branch2.5.weight", "stage2.1.branch2.6.weight",
        "stage4.3.branch2.5.weight", "conv5.0.weight", "conv5.1.running_var", "fc.weight", "fc.bias",
    ],
    "densenet": [
        "features.conv0.weight", "features.norm0.running_mean", "features.denseblock1.denselayer1.norm1.weight",
        "features.denseblock1.denselayer1.conv1.weight", "features.denseblock1.denselayer1.norm2.running_var",
        "features.denseblock1.denselayer1.conv2.weight", "features.transition1.norm.weight",
        "features.transition1.conv.weight", "features.denseblock3.denselayer4.conv2.weight",
        "features.norm5.weight", "classifier.weight", "classifier.bias",
    ],
    "convnext": [
        "features.0.0.weight", "features.0.0.bias", "features.0.1.weight", "features.0.1.bias",
        "features.1.0.layer_scale", "features.1.0.block.0.weight", "features.1.0.block.2.weight",
        "features.1.0.block.3.weight", "features.1.0.block.5.bias", "features.2.0.weight", "features.2.1.weight",
        "features.7.1.layer_scale", "classifier.0.weight", "classifier.2.weight", "classifier.2.bias",
    ],
    "resnext29_cifar": [
        "conv_1_3x3.weight", "bn_1.running_mean", "stage_1.stage_1_bottleneck_0.conv_reduce.weight",
        "stage_1.stage_1_bottleneck_0.bn_reduce.weight", "stage_1.stage_1_bottleneck_0.conv_conv.weight",
        "stage_1.stage_1_bottleneck_0.bn.running_var", "stage_1.stage_1_bottleneck_0.conv_expand.weight",
        "stage_1.stage_1_bottleneck_0.bn_expand.bias", "stage_1.stage_1_bottleneck_0.shortcut.shortcut_conv.weight",
        "stage_1.stage_1_bottleneck_0.shortcut.shortcut_bn.running_mean",
        "stage_3.stage_3_bottleneck_2.conv_expand.weight", "classifier.weight", "classifier.bias",
    ],
    "antialiased_resnet": [
        "conv1.weight", "bn1.running_mean", "maxpool.1.filt", "layer1.0.conv1.weight", "layer1.0.conv2.weight",
        "layer2.0.conv2.0.filt", "layer2.0.conv2.1.weight", "layer2.0.bn2.running_var", "layer2.0.downsample.0.filt",
        "layer2.0.downsample.1.weight", "layer2.0.downsample.2.bias", "layer4.1.conv2.weight", "fc.weight", "fc.bias",
    ],
    "cbam_resnet": [
        "conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer1.0.bn2.bias",
        "layer1.0.cbam.ChannelGate.mlp.1.weight", "layer1.0.cbam.ChannelGate.mlp.1.bias",
        "layer1.0.cbam.ChannelGate.mlp.3.weight", "layer1.0.cbam.SpatialGate.spatial.conv.weight",
        "layer1.0.cbam.SpatialGate.spatial.bn.running_mean", "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.weight", "layer4.1.cbam.ChannelGate.mlp.3.bias", "fc.weight", "fc.bias",
    ],
    "bit_resnetv2": [
        "root.conv.weight", "body.block1.unit01.gn1.weight", "body.block1.unit01.conv1.weight",
        "body.block1.unit01.gn2.bias", "body.block1.unit01.conv2.weight", "body.block1.unit01.gn3.weight",
        "body.block1.unit01.conv3.weight", "body.block1.unit01.downsample.weight", "body.block2.unit04.conv3.weight",
        "body.block4.unit03.gn1.weight", "head.gn.weight", "head.gn.bias", "head.conv.weight", "head.conv.bias",
    ],
}

# the originals' configuration (1000 classes, the original stem) and what torchvision / timm / kuangliu build
ORIGINAL = {
    "mobilenet_v2": (dict(cifar=False), 3_504_872, {"features.18.0.weight": (1280, 320, 1, 1),
                                                   "features.1.conv.0.0.weight": (32, 1, 3, 3)}),
    # torchvision's mobilenet_v3_small
    "mobilenet_v3": (dict(cifar=False), 2_542_856, {"features.1.block.1.fc1.weight": (8, 16, 1, 1),
                                                   "features.5.block.2.fc1.weight": (64, 240, 1, 1),
                                                   "features.12.0.weight": (576, 96, 1, 1),
                                                   "classifier.0.weight": (1024, 576)}),
    "se_resnet": (dict(stem="imagenet"), 11_779_624, {"conv1.weight": (64, 3, 7, 7),
                                                      "layer1.0.se.fc1.weight": (8, 64, 1, 1),
                                                      "layer4.0.se.fc1.weight": (32, 512, 1, 1)}),
    "efficientnet_b0": (dict(cifar=False), 5_288_548, {"blocks.0.0.se.conv_reduce.weight": (8, 32, 1, 1),
                                                       "blocks.1.0.se.conv_reduce.weight": (4, 96, 1, 1),
                                                       "blocks.5.3.conv_dw.weight": (1152, 1, 5, 5),
                                                       "conv_head.weight": (1280, 320, 1, 1)}),
    # kuangliu's PreActResNet18 (10 classes, no final BatchNorm)
    "preact_resnet18": (dict(final_bn=False, num_classes=10), 11_171_146, {"linear.weight": (10, 512)}),
    "shufflenet_v2": (dict(cifar=False), 2_278_604, {"stage2.0.branch1.0.weight": (24, 1, 3, 3),
                                                     "conv5.0.weight": (1024, 464, 1, 1)}),
    "densenet": (dict(stem="imagenet", growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64),
                 7_978_856, {"features.conv0.weight": (64, 3, 7, 7),
                             "features.denseblock1.denselayer1.conv1.weight": (128, 64, 1, 1),
                             "features.transition1.conv.weight": (128, 256, 1, 1),
                             "classifier.weight": (1000, 1024)}),
    "convnext": (dict(cifar=False, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)), 28_589_128,
                 {"features.0.0.weight": (96, 3, 4, 4), "features.1.0.block.3.weight": (384, 96),
                  "features.1.0.layer_scale": (96, 1, 1), "features.6.1.weight": (768, 384, 2, 2),
                  "classifier.2.weight": (1000, 768)}),
    # prlz77's ResNeXt-29 8x64d (10 classes): 34.4M parameters, as in Xie et al.'s Table 7
    "resnext29_cifar": (dict(cardinality=8, base_width=64, num_classes=10), 34_426_698,
                        {"stage_1.stage_1_bottleneck_0.conv_conv.weight": (512, 64, 3, 3),
                         "stage_3.stage_3_bottleneck_2.conv_expand.weight": (1024, 2048, 1, 1),
                         "classifier.weight": (10, 1024)}),
    # adobe/antialiased-cnns' resnet18(filter_size=4): BlurPool holds buffers only, so torchvision ResNet-18's count
    "antialiased_resnet": (dict(cifar=False), 11_689_512, {"conv1.weight": (64, 3, 7, 7),
                                                           "maxpool.1.filt": (64, 1, 4, 4),
                                                           "layer4.0.downsample.0.filt": (256, 1, 4, 4),
                                                           "layer4.0.downsample.1.weight": (512, 256, 1, 1)}),
    # Jongchan/attention-module's ResidualNet("ImageNet", 18, 1000, "CBAM"): the CBAM paper's 11.78M
    "cbam_resnet": (dict(network_type="ImageNet"), 11_779_392, {"conv1.weight": (64, 3, 7, 7),
                                                                 "layer1.0.cbam.ChannelGate.mlp.1.weight": (4, 64),
                                                                 "layer4.1.cbam.ChannelGate.mlp.3.weight": (512, 32),
                                                                 "layer4.1.cbam.SpatialGate.spatial.conv.weight":
                                                                     (1, 2, 7, 7)}),
    # BiT-M-R50x1 (google-research/big_transfer; timm's resnetv2_50x1_bit at 1000 classes: 25.55M)
    "bit_resnetv2": (dict(cifar=False), 25_549_352, {"root.conv.weight": (64, 3, 7, 7),
                                                      "body.block1.unit01.downsample.weight": (256, 64, 1, 1),
                                                      "body.block4.unit01.conv2.weight": (512, 512, 3, 3),
                                                      "head.conv.weight": (1000, 2048, 1, 1)}),
}

# MACs of one 32x32 image through the CIFAR build (convs and dense layers)
MACS = {
    "mobilenet_v2": 87_976_448,
    "mobilenet_v3": 17_507_328,
    "se_resnet": 140_274_688,
    "efficientnet_b0": 31_979_392,
    "preact_resnet18": 555_422_720,
    "shufflenet_v2": 45_002_112,
    "densenet": 43_740_036,
    "convnext": 44_657_280,
    "resnext29_cifar": 493_561_856,
    "bit_resnetv2": 333_664_256,
    "cbam_resnet": 555_863_360,
    "antialiased_resnet": 183_260_160,
}

NAMES = sorted(KEYS)


@pytest.fixture(scope="module", params=NAMES)
def example(request: pytest.FixtureRequest) -> tuple[str, ModelFile, nn.Module]:
    mf = load_model_file(EXAMPLES / f"{request.param}.py")
    return request.param, mf, mf.build()


def test_forward_at_32x32(example):
    name, mf, model = example
    assert not model.training
    assert tuple(mf.example_input()[0].shape) == (1, 3, 32, 32)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    assert (logits[0] - logits[1]).abs().max() > 1e-4, "the logits should depend on the input"


def test_original_parameter_names(example):
    name, _, model = example
    keys = set(model.state_dict())
    missing = [k for k in KEYS[name] if k not in keys]
    assert not missing, f"{name} lacks {missing}"


def test_module_docstring(example):
    _, mf, _ = example
    assert mf.module.__doc__ and len(mf.module.__doc__) > 200


def test_data_hooks(example):
    _, mf, _ = example
    for hook in ("calibration_data", "eval_data"):
        x, y = next(iter(mf.data(hook)))
        assert x.shape[1:] == (3, 32, 32) and len(y) == len(x)


def test_norms_are_not_trivial(example):
    _, _, model = example
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.LayerNorm | nn.GroupNorm)]
    assert norms
    for m in norms:
        assert not torch.allclose(m.weight, torch.ones_like(m.weight))
        assert not torch.allclose(m.bias, torch.zeros_like(m.bias))
        if isinstance(m, nn.BatchNorm2d):
            assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))
            assert not torch.allclose(m.running_mean, torch.zeros_like(m.running_mean))


def test_macs(example):
    """qcompile.quantization.cost's MACs equal PyTorch's own count (half the conv and matmul FLOPs of
    ``FlopCounterMode``: forward hooks would miss ResNeXt's ``self.conv.forward(x)`` calls), and the pinned
    figure."""
    name, mf, model = example
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        model(mf.example_input()[0])
    res = Pipeline([AssignPrecision(), AnnotateCost()]).run(model, mf.example_input(), recipe=get_recipe("bf16"))
    assert res.context.cost.macs == flops.get_total_flops() // 2 == MACS[name]


@pytest.mark.parametrize("name", NAMES)
def test_original_configuration(name):
    """In the original's configuration the build has exactly the original's parameter count and shapes."""
    kwargs, params, shapes = ORIGINAL[name]
    model = load_model_file(EXAMPLES / f"{name}.py").build(**{"num_classes": 1000, **kwargs})
    assert sum(p.numel() for p in model.parameters()) == params
    state = model.state_dict()
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key


@pytest.mark.parametrize("name", ["mobilenet_v2", "densenet", "convnext"])
def test_seeded(name):
    mf = load_model_file(EXAMPLES / f"{name}.py")
    rng = torch.get_rng_state()
    a, b, c = mf.build(), mf.build(), mf.build(seed=1)
    assert torch.equal(torch.get_rng_state(), rng), "building must not move the global RNG"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0", "shufflenet_v2", "se_resnet", "convnext"])
def test_width(name):
    mf = load_model_file(EXAMPLES / f"{name}.py")
    half = mf.build(width=0.5)
    full_params = sum(p.numel() for p in mf.build().parameters())
    assert sum(p.numel() for p in half.parameters()) < full_params
    with torch.no_grad():
        assert half(mf.example_input()[0]).shape == (1, 10)


def test_randomize_batchnorm_ranges():
    bn = nn.BatchNorm2d(4096)
    randomize_batchnorm(bn, seed=3)
    assert 0.5 <= bn.weight.min() and bn.weight.max() <= 1.5
    assert 0.5 <= bn.running_var.min() and bn.running_var.max() <= 2.0
    assert abs(bn.bias.std().item() - 0.1) < 0.01 and abs(bn.running_mean.std().item() - 0.1) < 0.01
    again = randomize_batchnorm(nn.BatchNorm2d(4096), seed=3)
    assert torch.equal(again.running_var, bn.running_var)


def test_randomize_batchnorm_measures_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    x = torch.randn(16, 3, 8, 8) * 3 + 1
    randomize_batchnorm(model, seed=0, data=[x[:8], x[8:]])
    assert not model.training and model[1].momentum == 0.1
    with torch.no_grad():
        halves = [model[0](x[:8]), model[0](x[8:])]
    # the cumulative average of the per-batch statistics (PyTorch keeps the unbiased variance)
    mean = sum(h.mean((0, 2, 3)) for h in halves) / 2
    var = sum(h.var((0, 2, 3)) for h in halves) / 2
    torch.testing.assert_close(model[1].running_mean, mean)
    torch.testing.assert_close(model[1].running_var, var)


def _zoo():
    sys.path.insert(0, str(EXAMPLES.parent / "benchmarks"))
    try:
        import zoo
    finally:
        sys.path.pop(0)
    return zoo


def test_zoo_table_from_reports():
    zoo = _zoo()
    agree = {"images": 8, "identical_fraction": 1.0, "top1_agreement": 1.0, "max_lsb_diff": 0}
    report = {"total": {"macs": 87_976_448, "params": 2_202_560, "linear_vs_bf16": 0.25263},
              "artifacts": {"tvm_cpu": "x"},
              "measured": {"batches": {"1": {"artifact_ms": 0.6127, "float_ms": 1.2141, "ratio": 0.5053}}},
              "verification": {"reference_vs_fakequant": agree,
                               "onnx_vs_reference": {"serving": {**agree, "identical_fraction": 0.5,
                                                                 "max_lsb_diff": 7}}}}
    ok = zoo.row_of("mobilenet_v2", "mostly4bit", 0, "", report, report["total"], 12.0)
    failed = zoo.row_of("densenet", "int8", 2, "onnxruntime (serving) disagrees | x", None, None, 3.0)
    table = zoo.markdown([ok, failed])
    lines = table.splitlines()
    assert lines[0].startswith("| model | recipe | compiles |")
    assert "| mobilenet_v2 | mostly4bit | yes | 100.00% · 100.0% | 50.00% · 100.0% (max 7 LSB) | — | " \
           "built, not verified | 87.98M | 2.20M | 0.2526 | 0.61 (0.51×) at batch 1 | 12 |" in lines
    assert "| densenet | int8 | onnxruntime (serving) disagrees \\| x | — |" in table


def test_zoo_reports_a_failure_in_one_line(tmp_path):
    zoo = _zoo()
    rc, error = zoo.run_cli([str(tmp_path / "missing.py"), "--quiet", "--out", str(tmp_path / "out")])
    assert rc == 2 and error == f"model file {tmp_path / 'missing.py'} does not exist"
    rc, error = zoo.run_cli([str(EXAMPLES / "densenet.py"), "--recipe", "nope", "--out", str(tmp_path / "o")])
    assert rc == 2 and error.startswith("unknown recipe 'nope'")
