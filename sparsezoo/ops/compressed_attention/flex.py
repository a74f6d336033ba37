"""Compressed attention through FlexAttention: a causal BlockMask over entries from per-tile ranges."""

from __future__ import annotations

import torch

from ..dispatch import needs_grad
from ..flex_utils import Q_TILE, range_block_mask, run_flex, tile_last_positions


def supports(req) -> str | None:
    return None  # the LSE on the CPU: ops.dispatch.platform_reason


def compressed_attention_flex(q, kc, vc, S: int, block_len: int, stride: int, scale: float, return_lse: bool = False):
    T, Sc = q.shape[2], kc.shape[2]
    offset = S - T

    def compressed_causal(b, h, q_idx, kv_idx):
        return kv_idx * stride + block_len - 1 <= q_idx + offset

    _, last = tile_last_positions(T, S, q.device)
    n_visible = torch.where(last >= block_len - 1, (last - block_len + 1) // stride + 1, 0).clamp(max=Sc)
    hi = (n_visible + Q_TILE - 1) // Q_TILE
    mask = range_block_mask(torch.zeros_like(hi), hi, T, Sc, compressed_causal, needs_grad(q, kc, vc))
    return run_flex(q, kc, vc, mask, scale, return_lse, enable_gqa=q.shape[1] != kc.shape[1])


run = compressed_attention_flex
