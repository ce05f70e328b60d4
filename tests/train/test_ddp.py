"""Two gloo processes under DistributedDataParallel train the same model as one process on the whole batch."""

import os
import socket

import numpy as np
import torch
import torch.multiprocessing as mp
from qcompile.passes.insert_quantizers import activation_quantizers
from torch import nn

from qcompile.data import ImageSet
from qcompile.quantization.recipes import get_recipe
from qcompile.train.data import DeviceData
from qcompile.train.distributed import init_from_env
from qcompile.train.qat import prepare_qat, qat_recipe
from qcompile.train.trainer import TrainConfig, train

CFG = TrainConfig(epochs=2, batch_size=16, lr=0.05, progress=False, observe_fraction=0.25)


class NoBNNet(nn.Module):
    """Per-process BatchNorm statistics would differ from the whole batch's by design; without BN, data
    parallelism must reproduce single-process training up to float summation order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _data() -> DeviceData:
    rng = np.random.default_rng(0)
    return DeviceData.from_imageset(ImageSet(rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8),
                                             rng.integers(0, 4, 64), tuple("abcd")))


def _train_once() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    qm = prepare_qat(NoBNNet(), (torch.randn(1, 3, 8, 8),), qat_recipe(get_recipe("mostly4bit")))
    dist = init_from_env("cpu")
    train(qm.graph, _data(), CFG, dist)
    return {k: v.detach().clone() for k, v in qm.graph.state_dict().items()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    state = _train_once()
    if rank == 0:
        torch.save(state, out)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    single = _train_once()
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    double = torch.load(out, weights_only=True)
    assert single.keys() == double.keys()
    torch.manual_seed(0)
    start = prepare_qat(NoBNNet(), (torch.randn(1, 3, 8, 8),), qat_recipe(get_recipe("mostly4bit"))).graph
    moved = False
    for k, v in single.items():
        assert torch.allclose(v, double[k], rtol=1e-4, atol=1e-5), k
        moved |= not torch.equal(v, start.state_dict()[k])
    assert moved  # training changed the weights, so agreement is not trivial
    assert any(k.endswith(".scale") for k in single)  # the frozen activation bounds agree too
    assert len(activation_quantizers(start)) > 0
