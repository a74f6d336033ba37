"""Plain-PyTorch gather attention (the oracle): chunked over queries, fp64 capable, autograd. The sink is
one more logit in each softmax, with a zero value."""

from __future__ import annotations

import torch

from .api import explicit_keys
from ..common import (chunk_len, clean_grouped, expand_selection, gather_flags, gather_rows, join_chunks,
                      masked_softmax_lse, run_chunk, seen_bad)


def supports(req) -> str | None:
    return None


def _chunk(qg, kf, vf, q_bad, kv_bad, sel, scale: float, sink):
    sel = sel.long()
    tok, ok = sel.clamp_min(0), sel >= 0
    s = torch.einsum("bhgtd,bhtnd->bhgtn", qg, gather_rows(kf, tok)) * scale
    B, H, G, Tc, K = s.shape
    allowed = ok[:, :, None].expand(B, H, G, Tc, K)
    if sink is not None:  # the sink: a logit per query head whose value is 0
        s = torch.cat([s, sink.to(s.dtype).view(1, H, G, 1, 1).expand(B, H, G, Tc, 1)], dim=-1)
        allowed = torch.cat([allowed, allowed.new_ones(B, H, G, Tc, 1)], dim=-1)
    p, lse = masked_softmax_lse(s, allowed)
    out = torch.einsum("bhgtn,bhtnd->bhgtd", p[..., :K], gather_rows(vf, tok))
    return seen_bad(out, lse, q_bad, ok, gather_flags(kv_bad, tok))


def gather_attention_reference(q, k, v, idx, scale: float, return_lse: bool = False, k_extra=None, v_extra=None,
                               window: int = 0, sink=None, extra_ids: bool = False):
    """k_extra, v_extra (optional): a second pool, read as if concatenated after k, v (here it is)."""
    idx, k, v = explicit_keys(idx, k, v, k_extra, v_extra, window, extra_ids)
    B, Hq, T, D = q.shape
    Hkv, K = k.shape[1], idx.shape[-1]
    G = Hq // Hkv
    idx = expand_selection(idx, Hkv)
    qg, kf, vf, q_bad, kv_bad = clean_grouped(q, k, v)
    parts = []
    step = chunk_len(B * Hkv * (K + 1) * max(D, G), T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        parts.append(run_chunk(_chunk, qg[:, :, :, t0:t1], kf, vf, q_bad[..., t0:t1], kv_bad, idx[:, :, t0:t1], scale,
                               sink))
    return join_chunks(parts, q, return_lse)


run = gather_attention_reference
