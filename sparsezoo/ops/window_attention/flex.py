"""Sliding-window attention through FlexAttention: a BlockMask from per-tile key ranges, the key tiles inside
every query's window marked full (no mask_mod there). Non-finite values: the O(S) pre-pass of
sparsezoo.ops.nonfinite (docs/ops.md)."""

from __future__ import annotations

import torch

from ..dispatch import needs_grad
from ..flex_utils import Q_TILE, range_block_mask, run_flex, tile_last_positions
from ..nonfinite import clean_qkv, finish, rows_seeing_key_ranges


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
    Hq, T, S = q.shape[1], q.shape[2], k.shape[2]
    start = max(0, S - T - window + 1)  # no query reads a key before this: decode touches window + T keys only
    k, v, S = k[:, :, start:], v[:, :, start:], S - start
    q, k, v, q_bad, kv_bad = clean_qkv(q, k, v, zero_q=needs_grad(q, k, v))
    first, last = tile_last_positions(T, S, q.device)
    lo = torch.clamp(first - window + 1, min=0) // Q_TILE
    hi = last // Q_TILE + 1
    # whole key tiles inside every query's window: from last - window + 1 (rounded up) to first (rounded down)
    full = (torch.clamp(last - window + 1 + Q_TILE - 1, min=0) // Q_TILE, (first + 1) // Q_TILE)
    mask = range_block_mask(lo, hi, T, S, window_mask_mod(window, S - T), needs_grad(q, k, v), full=full)
    out = run_flex(q, k, v, mask, scale, False, enable_gqa=Hq != k.shape[1])
    pos = torch.arange(S - T, S, device=q.device)
    return finish(out, q_bad | rows_seeing_key_ranges(kv_bad, pos - window + 1, pos + 1, Hq))


run = window_attention_flex
