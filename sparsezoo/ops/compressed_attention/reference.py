"""Plain-PyTorch compressed attention (the oracle), chunked over queries."""

from __future__ import annotations

import torch

from ..common import chunk_len, clean_grouped, masked_softmax_lse, query_positions, run_chunk, seen_bad
from .api import compressed_visible


def supports(req) -> str | None:
    return None


def _chunk(qg, kf, vf, q_bad, kv_bad, ok, scale: float):
    p, lse = masked_softmax_lse(torch.einsum("bhgtd,bhsd->bhgts", qg, kf) * scale, ok)
    return seen_bad(torch.einsum("bhgts,bhsd->bhgtd", p, vf), lse, q_bad, ok, kv_bad[:, :, None])[0]


def compressed_attention_reference(q, kc, vc, S: int, block_len: int, stride: int, scale: float,
                                   return_lse: bool = False):
    B, Hq, T, D = q.shape
    Sc = kc.shape[2]
    qg, kf, vf, q_bad, kv_bad = clean_grouped(q, kc, vc)
    outs, lses = [], []
    step = chunk_len(B * Hq * Sc, T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        ok = compressed_visible(query_positions(T, S, t0, t1, q.device), Sc, block_len, stride)
        outs.append(run_chunk(_chunk, qg[:, :, :, t0:t1], kf, vf, q_bad[..., t0:t1], kv_bad, ok, scale))
        if return_lse:
            with torch.no_grad():
                s = torch.einsum("bhgtd,bhsd->bhgts", qg[:, :, :, t0:t1].detach(), kf.detach()) * scale
                p, lse = masked_softmax_lse(s, ok)
                lses.append(seen_bad(p[..., :1], lse, q_bad[..., t0:t1], ok, kv_bad[:, :, None])[1])
    out = torch.cat(outs, dim=3).reshape(B, Hq, T, D).to(q.dtype)
    if return_lse:
        return out, torch.cat(lses, dim=3).reshape(B, Hq, T).float()
    return out


run = compressed_attention_reference
