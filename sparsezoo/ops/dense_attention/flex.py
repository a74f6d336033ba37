"""Dense causal attention through FlexAttention, with an analytic BlockMask (no T x S mask).

Non-finite values: the O(S) pre-pass of sparsezoo.ops.nonfinite, as the SDPA path (docs/ops.md)."""

from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..dispatch import needs_grad
from ..flex_utils import causal_mask_mod, run_flex
from ..nonfinite import clean_qkv, finish, rows_seeing_key_ranges


def supports(req) -> str | None:
    return None


def dense_causal_block_mask(T: int, S: int, device, q_block: int = 128, kv_block: int = 128) -> BlockMask:
    """Causal BlockMask built analytically (no T x S mask), with fully visible blocks marked full."""
    offset = S - T
    n_q, n_kv = math.ceil(T / q_block), math.ceil(S / kv_block)
    tiles = torch.arange(n_q, device=device)
    first = offset + tiles * q_block
    last = offset + torch.clamp((tiles + 1) * q_block, max=T) - 1
    n_visible = last // kv_block + 1
    n_full = torch.clamp((first + 1) // kv_block, max=S // kv_block)
    cols = torch.arange(n_kv, device=device)
    full_idx = cols.expand(n_q, n_kv)
    part_idx = torch.clamp(n_full[:, None] + cols[None, :], max=n_kv - 1)
    view = lambda x: x.to(torch.int32).view(1, 1, *x.shape).contiguous()
    return BlockMask.from_kv_blocks(
        view(n_visible - n_full), view(part_idx), view(n_full), view(full_idx),
        BLOCK_SIZE=(q_block, kv_block), mask_mod=causal_mask_mod(offset), seq_lengths=(T, S))


def dense_attention_flex(q, k, v, scale: float, return_lse: bool = False):
    Hq, T, S = q.shape[1], q.shape[2], k.shape[2]
    q, k, v, q_bad, kv_bad = clean_qkv(q, k, v, zero_kv=T > 1 or needs_grad(q, k, v))
    mask = dense_causal_block_mask(T, S, q.device)
    res = run_flex(q, k, v, mask, scale, return_lse, enable_gqa=Hq != k.shape[1])
    pos = torch.arange(S - T, S, device=q.device)
    bad = q_bad | rows_seeing_key_ranges(kv_bad, torch.zeros_like(pos), pos + 1, Hq)
    return finish(res[0], bad, lse=res[1]) if return_lse else finish(res, bad)


run = dense_attention_flex
