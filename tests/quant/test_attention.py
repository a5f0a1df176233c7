"""Quantized attention processors (dq.quant.attention)."""

import torch
from diffusers.models.embeddings import apply_rotary_emb

from dq.quant.attention import apply_rotary


def test_rotary_embedding_matches_diffusers_bitwise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 8, generator=g)  # [B, L, H, d]
    cos, sin = torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g)
    assert torch.equal(apply_rotary(x, cos, sin), apply_rotary_emb(x, (cos, sin), sequence_dim=1))
