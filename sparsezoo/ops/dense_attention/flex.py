"""Dense causal attention through FlexAttention, with an analytic BlockMask (no T x S mask)."""

from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..flex_utils import causal_mask_mod, run_flex


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
    T, S = q.shape[2], k.shape[2]
    mask = dense_causal_block_mask(T, S, q.device)
    return run_flex(q, k, v, mask, scale, return_lse, enable_gqa=q.shape[1] != k.shape[1])


run = dense_attention_flex
