"""timm's attention forms: the permutation that moves the batch before ``unbind(0)`` and
``F.scaled_dot_product_attention`` become what the passes know, computing the same."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcompile import capture
from qcompile.frontend.graph import permutation, tensor_rank


class Attention(nn.Module):
    """q, k, v picked from a permuted ``qkv`` (by ``unbind(0)`` or indexing), and attention over them fused or
    written out."""

    def __init__(self, pick: str, **sdpa) -> None:
        super().__init__()
        self.pick, self.sdpa = pick, sdpa

    def forward(self, x):
        B, N, C = x.shape
        qkv = (x * 1.0).reshape(B, N, 3, 2, C // 6).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0) if self.pick == "unbind" else (qkv[0], qkv[-2], qkv[2])
        return F.scaled_dot_product_attention(q, k, v, **self.sdpa).transpose(1, 2).reshape(B, N, -1)


def _moves_batch(gm) -> bool:
    return any((p := permutation(n, tensor_rank(n))) is not None and p[0] != 0 for n in gm.graph.nodes)


@pytest.mark.parametrize("pick", ["unbind", "index"])
@pytest.mark.parametrize("sdpa", [{}, {"scale": 0.3}, {"dropout_p": 0.0, "is_causal": False}])
def test_picks_from_a_permuted_qkv_keep_the_batch_first_and_sdpa_is_its_products(pick, sdpa):
    model = Attention(pick, **sdpa).eval()
    gm = capture(model, torch.randn(1, 5, 12))
    assert not _moves_batch(gm)
    assert not gm.graph.find_nodes(op="call_function", target=F.scaled_dot_product_attention)
    assert len(gm.graph.find_nodes(op="call_method", target="matmul")) == 2
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


class Biased(nn.Module):
    """Attention with a relative-position bias as its float mask (MaxViT), a boolean mask, or causality."""

    def __init__(self, mask: str) -> None:
        super().__init__()
        self.mask = mask
        self.bias = nn.Parameter(torch.randn(1, 2, 4, 4))
        self.register_buffer("allowed", torch.rand(4, 4) > 0.3)

    def forward(self, q):
        k, v = q * 2.0, q * 3.0
        if self.mask == "bias":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        if self.mask == "boolean":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("mask, fused", [("bias", 0), ("boolean", 1), ("causal", 1)])
def test_a_float_mask_is_added_and_other_masks_stay_fused(mask, fused):
    model = Biased(mask).eval()
    gm = capture(model, torch.randn(1, 2, 4, 6))
    assert len(gm.graph.find_nodes(op="call_function", target=F.scaled_dot_product_attention)) == fused
    x = torch.randn(3, 2, 4, 6)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-6)


def test_a_permutation_read_otherwise_stays():
    class Kept(nn.Module):
        def forward(self, x):
            y = (x * 1.0).permute(1, 0, 2)
            return y[0] + y.reshape(3, 2, 4).sum(0)

    model = Kept()
    gm = capture(model, torch.randn(2, 3, 4))
    assert _moves_batch(gm)
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(gm(x), model(x))
