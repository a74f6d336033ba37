"""Plain-PyTorch causal GQA attention in query chunks (fp64 capable, autograd)."""

from __future__ import annotations

import torch

from ..common import chunk_len, clean_grouped, join_chunks, masked_softmax_lse, query_positions, run_chunk, seen_bad


def supports(req) -> str | None:
    return None


def _chunk(qg, kf, vf, q_bad, kv_bad, pos, scale: float):
    s = torch.einsum("bhgtd,bhsd->bhgts", qg, kf) * scale
    ok = torch.arange(kf.shape[2], device=kf.device)[None, :] <= pos[:, None]
    p, lse = masked_softmax_lse(s, ok)
    return seen_bad(torch.einsum("bhgts,bhsd->bhgtd", p, vf), lse, q_bad, ok, kv_bad[:, :, None])


def dense_attention_reference(q, k, v, scale: float, return_lse: bool = False):
    """Causal GQA softmax attention (queries are the last T of S), in query chunks."""
    B, Hq, T, D = q.shape
    S = k.shape[2]
    qg, kf, vf, q_bad, kv_bad = clean_grouped(q, k, v)
    parts = []
    step = chunk_len(B * Hq * S, T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        parts.append(run_chunk(_chunk, qg[:, :, :, t0:t1], kf, vf, q_bad[..., t0:t1], kv_bad,
                               query_positions(T, S, t0, t1, q.device), scale))
    return join_chunks(parts, q, return_lse)


run = dense_attention_reference
