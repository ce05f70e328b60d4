"""The CUDA-graph training step, checked where no GPU is: its SGD update is torch's, and a whole QAT step
(observing and frozen) reads nothing back to the host, which is what recording a graph needs (run on the meta
device, where any such read fails). The deadline stops training at an epoch boundary and a rerun resumes."""

import copy
import time
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from qcompile.passes.insert_quantizers import activation_quantizers
from qcompile.quantization import quantizer
from qcompile.quantization.quantizer import QuantizerState
from qcompile.train.graphed import init_momentum, sgd_step
from qcompile.train.qat import ActivationSchedule
from qcompile.train.trainer import TrainConfig, optimizer_for, train
from tests.train.test_qat import _qat_tiny, _random_split


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_step_is_torch_sgd(nesterov):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    ours = copy.deepcopy(model)
    cfg = TrainConfig(lr=0.3, momentum=0.9 if nesterov else 0.5, weight_decay=0.01)
    ref_opt, our_opt = optimizer_for(model, cfg), optimizer_for(ours, cfg)
    for group in ref_opt.param_groups + our_opt.param_groups:
        group["nesterov"] = nesterov
    init_momentum(our_opt)
    lr = torch.tensor(0.0)
    for step in range(4):
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        for m, opt in ((model, ref_opt), (ours, our_opt)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
        ref_opt.step()
        lr.fill_(ref_opt.param_groups[0]["lr"])
        sgd_step(our_opt, lr)
    for a, b in zip(model.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ref_bufs = [ref_opt.state[p]["momentum_buffer"] for p in model.parameters()]
    our_bufs = [our_opt.state[p]["momentum_buffer"] for p in ours.parameters()]
    for a, b in zip(ref_bufs, our_bufs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frozen", [False, True])
def test_a_qat_step_reads_nothing_back_to_the_host(frozen, monkeypatch):
    gm = _qat_tiny().graph.train()
    x = torch.randn(4, 3, 8, 8)
    gm(x)  # the first batch starts the EMAs (an eager warm-up step does it on the GPU)
    if frozen:
        ActivationSchedule(gm, total_steps=1, fraction=1.0).freeze()
    monkeypatch.setattr(quantizer, "capturing", lambda: True)  # as while recording a graph
    meta = copy.deepcopy(gm).to("meta")
    assert all((q.state is QuantizerState.FROZEN) == frozen for q in activation_quantizers(meta).values())
    opt = optimizer_for(meta, TrainConfig(lr=0.1))
    init_momentum(opt)
    loss = F.cross_entropy(meta(x.to("meta")), torch.zeros(4, dtype=torch.long, device="meta"))
    loss.backward()  # a .item(), bool() or .cpu() of a meta tensor would raise here
    sgd_step(opt, torch.tensor(0.1, device="meta"))
    assert loss.device.type == "meta"


def test_the_deadline_stops_at_an_epoch_and_a_rerun_resumes(tmp_path):
    data = _random_split(64, 0)
    ckpt = tmp_path / "ckpt.pt"
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, progress=False, checkpoint=ckpt)
    stopped = train(_qat_tiny(seed=3).graph, data, replace(cfg, deadline=time.time() - 1))
    assert not stopped.completed and torch.load(ckpt, weights_only=True)["epoch"] == 1
    resumed = train(_qat_tiny(seed=3).graph, data, cfg)
    assert resumed.completed and resumed.resumed_from_epoch == 1
    state = torch.load(ckpt, weights_only=True)
    del state["opt"]  # a finished run's checkpoint may drop the optimiser state
    torch.save(state, ckpt)
    again = train(_qat_tiny(seed=3).graph, data, cfg)
    assert again.resumed_from_epoch == 3
    state["epoch"] = 2
    torch.save(state, ckpt)
    with pytest.raises(Exception, match="cannot resume"):
        train(_qat_tiny(seed=3).graph, data, cfg)
