"""Sliding-window attention through FlexAttention: a BlockMask from per-tile key ranges."""

from __future__ import annotations

import torch

from ..dispatch import needs_grad
from ..flex_utils import Q_TILE, range_block_mask, run_flex, tile_last_positions


def supports(req) -> str | None:
    return None


def window_mask_mod(window: int, offset: int):
    """attn-gym's sliding window (lookback window - 1, causal), aligned bottom-right."""
    from attn_gym.masks import generate_sliding_window

    inner = generate_sliding_window(window - 1)

    def window_bottom_right(b, h, q_idx, kv_idx):
        return inner(b, h, q_idx + offset, kv_idx)

    return window_bottom_right


def window_attention_flex(q, k, v, window: int, scale: float):
    T, S = q.shape[2], k.shape[2]
    first, last = tile_last_positions(T, S, q.device)
    lo = torch.clamp(first - window + 1, min=0) // Q_TILE
    hi = last // Q_TILE + 1
    mask = range_block_mask(lo, hi, T, S, window_mask_mod(window, S - T), needs_grad(q, k, v))
    return run_flex(q, k, v, mask, scale, False, enable_gqa=q.shape[1] != k.shape[1])


run = window_attention_flex
