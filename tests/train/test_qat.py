"""QAT: BN-fold invariance of per-channel weight codes, the observe → freeze schedule, lowering of a trained
graph, and exact checkpoint resume."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from qcompile.passes.insert_quantizers import activation_quantizers, weight_quantizers
from torch.nn.utils.fusion import fuse_conv_bn_weights

from qcompile.data import ImageSet
from qcompile.errors import CheckpointError
from qcompile.quantization.quantizer import QuantizerState, WeightQuantizer, quantize
from qcompile.quantization.recipes import get_recipe
from qcompile.quantization.spec import Calibrator, Granularity, QuantSpec
from qcompile.reporting.verify import verify_reference
from qcompile.train import trainer
from qcompile.train.data import DeviceData, augment
from qcompile.train.qat import ActivationSchedule, lower_trained, prepare_qat, qat_recipe
from qcompile.train.trainer import TrainConfig, train
from tests.conftest import TinyNet, randomize_bn, train_steps


def _codes(w: torch.Tensor, bits: int) -> torch.Tensor:
    wq = WeightQuantizer(QuantSpec(bits, True, Granularity.PER_CHANNEL, Calibrator.MAX))
    return quantize(w, wq.scale_for(w), wq.spec.qmin, wq.spec.qmax)


@pytest.mark.parametrize("bits", [4, 8])
def test_per_channel_weight_codes_survive_bn_folding(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(32, 16, 3, 3, generator=g)
    gamma = torch.randn(32, generator=g)  # negative gammas included: the codes flip sign
    beta, mean = torch.randn(32, generator=g), torch.randn(32, generator=g)
    var = torch.rand(32, generator=g) + 0.1
    w_folded, b_folded = fuse_conv_bn_weights(w, None, mean, var, 1e-5, gamma, beta)
    sign = torch.sign(gamma).view(-1, 1, 1, 1)
    assert torch.equal(_codes(w_folded, bits), _codes(w, bits) * sign)
    assert b_folded is not None and not torch.allclose(b_folded, torch.zeros(32))  # the bias absorbed the shift


def _qat_tiny(seed: int = 0, recipe: str = "mostly4bit"):
    torch.manual_seed(seed)
    model = randomize_bn(TinyNet())
    return prepare_qat(model, (torch.randn(1, 3, 8, 8),), qat_recipe(get_recipe(recipe)))


def test_schedule_observes_then_freezes_once_at_the_fraction():
    qm = _qat_tiny()
    gm = qm.graph.train()
    sched = ActivationSchedule(gm, total_steps=10, fraction=0.3)
    assert sched.freeze_step == 3
    acts = activation_quantizers(gm)
    first = acts["x_aq_s8_ema_max"]  # reads the image itself
    seen = []
    first.register_forward_hook(lambda m, inp, out: seen.append((inp[0], out)))
    g = torch.Generator().manual_seed(0)
    maxima = []
    for step in range(6):
        froze = sched.before_step(step)
        assert froze == (step == 3)
        x = torch.randn(8, 3, 8, 8, generator=g) * (1 + step)
        before = float(first.ema_max)
        with torch.no_grad():
            gm(x)
        inp, out = seen[-1]
        if step < 3:
            assert all(q.state is QuantizerState.OBSERVING for q in acts.values())
            assert torch.equal(out, inp)  # observing: values pass through
            maxima.append(float(x.abs().max()))
        else:
            assert all(q.state is QuantizerState.FROZEN for q in acts.values())
            codes = out / first.scale
            on_grid = torch.allclose(codes, codes.round(), atol=1e-4)
            assert on_grid and -128 - 1e-4 <= float(codes.min()) and float(codes.max()) <= 127 + 1e-4  # s8 grid
            assert not torch.equal(out, inp)
            assert float(first.ema_max) == before  # frozen: no more observing
    ema = maxima[0]
    for m in maxima[1:]:
        ema = 0.9 * ema + 0.1 * m
    assert float(first.scale) == pytest.approx(ema / 127, rel=1e-6)
    assert first.batches == 3


def test_lowered_model_keeps_the_trained_weight_codes_and_matches_the_reference():
    qm = _qat_tiny()
    gm = train_steps(qm.graph)
    g = torch.Generator().manual_seed(2)
    lowered, ctx = lower_trained(qm)
    assert ctx.ir is not None and ctx.cost is not None
    trained_w = weight_quantizers(gm)
    for name, wq in weight_quantizers(lowered).items():
        w_qat = getattr(gm, name).parametrizations.weight.original
        bn = getattr(gm, f"{name}_bn", None)
        sign = torch.sign(bn.weight).view(-1, 1, 1, 1) if bn is not None else 1
        w_low = getattr(lowered, name).parametrizations.weight.original
        codes_qat = quantize(w_qat, trained_w[name].scale_for(w_qat), wq.spec.qmin, wq.spec.qmax) * sign
        assert torch.equal(quantize(w_low, wq.scale_for(w_low), wq.spec.qmin, wq.spec.qmax), codes_qat), name
    # the trained activation bounds were carried over, not recalibrated
    trained_scales = sorted(float(q.scale) for q in activation_quantizers(gm).values())
    lowered_scales = sorted(float(q.scale) for q in activation_quantizers(lowered).values())
    assert lowered_scales == trained_scales
    x = torch.randn(32, 3, 8, 8, generator=g)
    summary = verify_reference(lowered, ctx.ir, [(x, torch.zeros(32, dtype=torch.long))]).summary()
    assert summary["top1_agreement"] == 1.0 and summary["max_lsb_diff"] <= 1
    with torch.no_grad():  # folding changes only rounding details: the deployed model computes what QAT trained
        assert torch.allclose(lowered(x), gm(x), atol=0.05)


class ChannelsLastNorm(torch.nn.Module):
    """ConvNeXt V2's own ``LayerNorm`` (``F.layer_norm`` on its attributes) on a channels-last map before a
    4-bit dense, and timm's ``GroupNormAct`` (``F.group_norm``)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.weight, self.bias = torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.zeros(8))
        self.pw = torch.nn.Linear(8, 8)
        self.gn_weight, self.gn_bias = torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.zeros(8))
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = self.conv(x).permute(0, 2, 3, 1)
        x = self.pw(F.layer_norm(x, (8,), self.weight, self.bias, 1e-6)).permute(0, 3, 1, 2)
        x = F.relu(F.group_norm(x, 2, self.gn_weight, self.gn_bias))
        return self.fc(x.mean((2, 3)))


def test_functional_norms_train_and_their_quantizers_keep_their_names_when_lowered():
    torch.manual_seed(0)
    qm = prepare_qat(ChannelsLastNorm(), (torch.randn(1, 3, 8, 8),), qat_recipe(get_recipe("mostly4bit")))
    norms = [m for m in qm.graph.modules() if isinstance(m, torch.nn.LayerNorm | torch.nn.GroupNorm)]
    assert [n.weight is w for n, w in zip(norms, (qm.graph.weight, qm.graph.gn_weight))] == [True, True]
    before = [n.weight.detach().clone() for n in norms]
    train_steps(qm.graph)
    assert not any(torch.equal(n.weight, b) for n, b in zip(norms, before))  # they trained
    lowered, ctx = lower_trained(qm)  # finds every trained bound, the norm's readers' included
    x = torch.randn(16, 3, 8, 8)
    summary = verify_reference(lowered, ctx.ir, [(x, torch.zeros(16, dtype=torch.long))]).summary()
    assert summary["identical_fraction"] == 1.0


def test_augment_crops_and_flips_per_sample_and_shards_like_the_whole_batch():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) + 1
    out = augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for i in range(2):  # every output row is a (possibly flipped) shifted window of the zero-padded input
        padded = F.pad(x[i], (4, 4, 4, 4))
        windows = [padded[:, dy:dy + 6, dx:dx + 6] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    whole = augment(x, torch.Generator().manual_seed(3))
    second = augment(x[1:], torch.Generator().manual_seed(3), offset=1, total=2)
    assert torch.equal(whole[1:], second)


def _random_split(n: int, seed: int) -> DeviceData:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    return DeviceData.from_imageset(ImageSet(images, rng.integers(0, 5, n), tuple("abcde")))


def test_checkpoint_resume_continues_exactly(tmp_path, monkeypatch):
    data = _random_split(64, 0)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, progress=False)
    straight = _qat_tiny(seed=3).graph
    train(straight, data, cfg)
    ckpt = tmp_path / "ckpt.pt"
    save = trainer.save_checkpoint

    def save_then_interrupt(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(_qat_tiny(seed=3).graph, data, replace(cfg, checkpoint=ckpt))
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    resumed = _qat_tiny(seed=99).graph  # another init: everything must come from the checkpoint
    result = train(resumed, data, replace(cfg, checkpoint=ckpt))
    assert result.resumed_from_epoch == 1
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(q.state is QuantizerState.FROZEN for q in activation_quantizers(resumed).values())


def test_a_checkpoint_of_another_graph_is_refused_in_one_line_naming_the_keys(tmp_path):
    """A resume checkpoint written for another recipe (or by a qcompile whose graph had other quantizers) says
    which keys differ, not only PyTorch's headline."""
    data = _random_split(32, 0)
    ckpt = tmp_path / "ckpt.pt"
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, progress=False, checkpoint=ckpt)
    train(_qat_tiny(recipe="int8").graph, data, cfg)
    with pytest.raises(CheckpointError) as err:
        train(_qat_tiny(recipe="bf16").graph, data, replace(cfg, epochs=2))
    message = str(err.value)
    assert "\n" not in message and "another graph" in message and "missing (" in message
    assert "unexpected (" in message and "delete it" in message


@pytest.mark.parametrize("content, reason", [(b"", "it is empty, truncated or damaged"),
                                             (b"garbage\n", "it is not a checkpoint qcompile wrote"),
                                             (None, "it is empty, truncated or damaged")],
                         ids=["empty", "text", "truncated"])
def test_a_resume_checkpoint_that_cannot_be_read_is_one_line(content, reason, tmp_path):
    """An empty or foreign file where the checkpoint goes was an EOFError or UnpicklingError traceback, a truncated
    one miniz's paragraph."""
    data = _random_split(32, 0)
    ckpt = tmp_path / "ckpt.pt"
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.05, progress=False, checkpoint=ckpt)
    if content is None:
        train(_qat_tiny(recipe="int8").graph, data, cfg)
        content = ckpt.read_bytes()[:1000]
    ckpt.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        train(_qat_tiny(recipe="int8").graph, data, cfg)
    assert str(err.value) == f"cannot resume from {ckpt}: {reason}; delete it to start over"


class _CumSum(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.cumsum(self.conv(x), 1).mean((2, 3))


def test_a_model_that_cannot_lower_stops_before_training():
    """The lowering QAT ends with is tried on the untrained model first: a GPU run must not train for minutes and
    then stop at an operation with no integer form."""
    from qcompile.passes.lower_integer import LoweringError

    with pytest.raises(LoweringError, match=r"^the model would not lower after training, so it is not trained: "
                                            r"cannot lower node cumsum"):
        prepare_qat(_CumSum(), (torch.randn(1, 3, 8, 8),), qat_recipe(get_recipe("int8")))
