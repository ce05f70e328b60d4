"""PyTorch's attention layers (``nn.MultiheadAttention``, ``F.multi_head_attention_forward``,
``nn.TransformerEncoder``) capture as the products, dense layers and softmax they compute; what does not lower is
refused in one line."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcompile import capture
from qcompile.errors import CaptureError
from tests.frontend.test_attention import _moves_batch


def _layers(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.Linear)}


class Tokens(nn.Module):
    """Self- or cross-attention over tokens in either layout, a residual and a layer norm."""

    def __init__(self, batch_first: bool, cross: bool = False, kdim: int | None = None, **kwargs) -> None:
        super().__init__()
        self.batch_first, self.cross = batch_first, cross
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, **kwargs)
        self.memory = nn.Linear(8, kdim or 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        t = x if self.batch_first else x.transpose(0, 1)
        memory = self.memory(t) if self.cross else t
        a, _ = self.attn(t, memory, memory)
        t = self.norm(t + a)
        return t if self.batch_first else t.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cross, kdim", [(False, None), (True, None), (True, 6)])
def test_multihead_attention_is_its_products_batch_first(batch_first, cross, kdim):
    model = Tokens(batch_first, cross, kdim).eval()
    gm = capture(model, torch.randn(1, 5, 8))
    assert not gm.graph.find_nodes(op="call_module", target="attn")
    assert not _moves_batch(gm)
    assert {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"} <= _layers(gm)
    assert len(gm.graph.find_nodes(op="call_method", target="matmul")) == 2
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_training_capture_drops_attention_as_the_module_does():
    model = Tokens(True, dropout=0.5).train()
    gm = capture(model, torch.randn(1, 5, 8))
    dropouts = [n for n in gm.graph.nodes
                if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.Dropout)]
    assert len(dropouts) == 1
    gm.eval(), model.eval()
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


class AttentionPool(nn.Module):
    """CLIP's ``AttentionPool2d``: ``(HW)NC`` tokens and a mean token, a positional embedding, and
    ``F.multi_head_attention_forward`` with the separate projections' weights and their biases concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(5, 8) / 8 ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.c_proj = nn.Linear(8, 4)

    def forward(self, x):
        x = x.flatten(start_dim=2).permute(2, 0, 1)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        x = x + self.positional_embedding[:, None, :].to(x.dtype)
        x, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=2,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=self.training,
            need_weights=False)
        return x.squeeze(0)


def test_clip_attention_pooling_keeps_its_projections_as_layers():
    model = AttentionPool().eval()
    gm = capture(model, torch.randn(1, 8, 2, 2))
    assert not _moves_batch(gm)
    assert {"q_proj", "k_proj", "v_proj", "c_proj"} <= _layers(gm)
    x = torch.randn(3, 8, 2, 2)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu", nn.SiLU()])
def test_transformer_encoders_are_their_blocks(norm_first, activation):
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, norm_first=norm_first, activation=activation)
    model = nn.Sequential(nn.Linear(8, 8), nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8),
                                                                 enable_nested_tensor=False)).eval()
    gm = capture(model, torch.randn(1, 5, 8))
    assert {"1.layers.0.linear1", "1.layers.1.self_attn.q_proj", "1.layers.1.linear2"} <= _layers(gm)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


class Refused(nn.Module):
    def __init__(self, case: str) -> None:
        super().__init__()
        self.case = case
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=case == "bias_kv")

    def forward(self, x):
        if self.case == "mask":
            return self.attn(x, x, x, attn_mask=torch.zeros(5, 5))[0]
        out, weights = self.attn(x, x, x)
        return out + weights.sum() if self.case == "weights" else out


@pytest.mark.parametrize("case, says", [("mask", "is given attn_mask"), ("bias_kv", "add_bias_kv"),
                                        ("weights", "need_weights=False")])
def test_what_does_not_lower_is_one_line(case, says):
    with pytest.raises(CaptureError, match=says) as info:
        capture(Refused(case).eval(), torch.randn(1, 5, 8))
    assert "\n" not in str(info.value) and "test_multihead_attention.py" in str(info.value)
