"""Block-sparse attention through FlexAttention, exact per query.

The G query heads sharing a selection fold into the query axis (sparsezoo.ops.flex_utils). The
BlockMask is compact: each 128-row tile lists only the union of its tokens' blocks (width <= tokens
per tile x k), never [n_q_tiles, n_kv_blocks]; a k-compare mask_mod keeps every query to its own
blocks and to causality. Selection blocks smaller than 128 are grouped into 128-token BlockMask
blocks (the mask_mod stays exact). Non-finite values: the O(S) pre-pass of sparsezoo.ops.nonfinite,
plus an O(T * k) gather of its counts at the selected blocks (docs/ops.md).
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..common import query_positions
from ..dispatch import needs_grad
from ..flex_utils import (Q_TILE, block_size_reason, fold_heads, mask_kv_block, run_flex, tile_block_union,
                          transpose_compact, unfold_heads)
from ..nonfinite import clean_qkv, finish, per_query_head, rows_seeing_selected_blocks


def supports(req) -> str | None:
    return block_size_reason(req["block_size"])


def msa_mask_mod(block_idx: torch.Tensor, G: int, offset: int, block_size: int):
    """Exact per-query mask on folded rows: key s is visible to row r when s's block is one of
    token r // G's selected blocks and s <= its position."""
    T, K = block_idx.shape[2], block_idx.shape[3]

    def msa_selected(b, h, q_idx, kv_idx):
        t = torch.clamp(q_idx // G, max=T - 1)
        blk = kv_idx // block_size
        hit = block_idx[b, h, t, 0] == blk
        for j in range(1, K):
            hit = hit | (block_idx[b, h, t, j] == blk)
        return hit & (kv_idx <= t + offset)

    return msa_selected


def msa_block_mask(block_idx: torch.Tensor, n_q_heads: int, S: int, block_size: int,
                   with_backward: bool, q_tile: int = Q_TILE) -> BlockMask:
    """Compact BlockMask on folded rows for the selections block_idx [B, Hs, T, k]."""
    B, Hs, T, K = block_idx.shape
    G = n_q_heads // Hs
    kv_block = mask_kv_block(block_size)
    counts, ids = tile_block_union(block_idx, G, q_tile, coarsen=kv_block // block_size)
    n_kv = math.ceil(S / kv_block)
    if ids.device.type == "cpu" and ids.shape[-1] < n_kv:
        # the CPU flex template reads the KV length off kv_indices' width; the GPU one does not
        ids = torch.nn.functional.pad(ids, (0, n_kv - ids.shape[-1]))
    mask = BlockMask.from_kv_blocks(
        counts, ids, BLOCK_SIZE=(q_tile, kv_block),
        mask_mod=msa_mask_mod(block_idx.to(torch.int32).contiguous(), G, S - T, block_size),
        seq_lengths=(T * G, S), compute_q_blocks=False)
    if with_backward:
        mask.q_num_blocks, mask.q_indices = transpose_compact(counts, ids, n_kv)
    return mask


def block_sparse_attention_flex(q, k, v, block_idx, block_size: int, scale: float, return_lse: bool = False):
    """Selections shared by G = Hq / Hs heads fold those heads into the query axis; with one selection
    per query head (Hs = Hq > Hkv) flex's GQA maps each head to its KV head."""
    Hq, Hkv, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    Hs = block_idx.shape[1]
    mask = msa_block_mask(block_idx, Hq, S, block_size, with_backward=needs_grad(q, k, v))
    q, k, v, q_bad, kv_bad = clean_qkv(q, k, v)
    res = run_flex(fold_heads(q, Hs), k, v, mask, scale, return_lse, enable_gqa=Hs != Hkv)
    seen = rows_seeing_selected_blocks(kv_bad, block_idx, query_positions(T, S, 0, T, q.device), block_size)
    bad = q_bad | per_query_head(seen, Hq)
    if return_lse:
        out, lse = res
        return finish(unfold_heads(out, Hq), bad, lse=unfold_heads(lse, Hq))
    return finish(unfold_heads(res, Hq), bad)


run = block_sparse_attention_flex
