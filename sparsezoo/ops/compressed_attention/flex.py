"""Compressed attention through FlexAttention: a causal BlockMask over entries from per-tile ranges, the
entry tiles every query of a tile sees marked full (no mask_mod there).
Non-finite values: the O(Sc) pre-pass of sparsezoo.ops.nonfinite (docs/ops.md)."""

from __future__ import annotations

import torch

from ..dispatch import needs_grad
from ..flex_utils import Q_TILE, range_block_mask, run_flex, tile_last_positions
from ..nonfinite import clean_qkv, finish, rows_seeing_key_ranges
from .api import n_visible


def supports(req) -> str | None:
    return None  # the LSE on the CPU: ops.dispatch.platform_reason


def compressed_attention_flex(q, kc, vc, S: int, block_len: int, stride: int, scale: float, return_lse: bool = False):
    Hq, T, Sc = q.shape[1], q.shape[2], kc.shape[2]
    q, kc, vc, q_bad, kv_bad = clean_qkv(q, kc, vc, zero_q=needs_grad(q, kc, vc))
    offset = S - T

    def compressed_causal(b, h, q_idx, kv_idx):
        return kv_idx * stride + block_len - 1 <= q_idx + offset

    first, last = tile_last_positions(T, S, q.device)

    hi = (n_visible(last, Sc, block_len, stride) + Q_TILE - 1) // Q_TILE
    zero = torch.zeros_like(hi)
    # whole tiles of entries visible to the tile's first query, so to all
    full_hi = n_visible(first, Sc, block_len, stride) // Q_TILE
    mask = range_block_mask(zero, hi, T, Sc, compressed_causal, needs_grad(q, kc, vc), full=(zero, full_hi))
    # TMA loads: 44.6 against 48.0 ms forward at 128k on an H200 (scripts/probes/flex_kernel_options.py; the
    # window branch was slower with them); forward only, as measured
    out = run_flex(q, kc, vc, mask, scale, return_lse, enable_gqa=Hq != kc.shape[1], tma=not needs_grad(q, kc, vc))
    pos = torch.arange(S - T, S, device=q.device)
    bad = q_bad | rows_seeing_key_ranges(kv_bad, torch.zeros_like(pos), n_visible(pos, Sc, block_len, stride), Hq)
    return finish(out[0], bad, lse=out[1]) if return_lse else finish(out, bad)


run = compressed_attention_flex
