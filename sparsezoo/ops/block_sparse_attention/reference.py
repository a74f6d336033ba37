"""Plain-PyTorch block-sparse attention: chunked over queries, fp64 capable, autograd."""

from __future__ import annotations

import torch

from ..common import (chunk_len, clean_grouped, gather_flags, gather_rows, gather_selected_tokens, join_chunks,
                      masked_softmax_lse, query_positions, run_chunk, seen_bad)


def supports(req) -> str | None:
    return None


def _chunk(qg, kf, vf, q_bad, kv_bad, sel, pos, block_size: int, S: int, scale: float):
    tok, ok = gather_selected_tokens(sel, pos, block_size, S)
    s = torch.einsum("bhgtd,bhtnd->bhgtn", qg, gather_rows(kf, tok)) * scale
    p, lse = masked_softmax_lse(s, ok[:, :, None])
    out = torch.einsum("bhgtn,bhtnd->bhgtd", p, gather_rows(vf, tok))
    return seen_bad(out, lse, q_bad, ok, gather_flags(kv_bad, tok))


def block_sparse_attention_reference(q, k, v, block_idx, block_size: int, scale: float, return_lse: bool = False):
    """q [B, Hq, T, D], k/v [B, Hkv, S, D], block_idx [B, Hs, T, k] (Hs = Hkv or Hq)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    Hs, K = block_idx.shape[1], block_idx.shape[-1]
    if Hs != Hkv:  # one selection per query head: give each its own copy of its KV head
        k, v = k.repeat_interleave(Hs // Hkv, dim=1), v.repeat_interleave(Hs // Hkv, dim=1)
    G = Hq // Hs
    qg, kf, vf, q_bad, kv_bad = clean_grouped(q, k, v)
    parts = []
    step = chunk_len(B * Hs * K * block_size * max(D, G), T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        pos = query_positions(T, S, t0, t1, q.device)
        parts.append(run_chunk(_chunk, qg[:, :, :, t0:t1], kf, vf, q_bad[..., t0:t1], kv_bad, block_idx[:, :, t0:t1],
                               pos, block_size, S, scale))
    return join_chunks(parts, q, return_lse)


run = block_sparse_attention_reference
