"""Plain-PyTorch sliding-window attention (the oracle), chunked over queries."""

from __future__ import annotations

import torch

from ..common import chunk_len, clean_grouped, masked_softmax_lse, query_positions, run_chunk, seen_bad


def supports(req) -> str | None:
    return None


def _chunk(qg, kf, vf, q_bad, kv_bad, pos, lo: int, window: int, scale: float):
    keys = torch.arange(lo, lo + kf.shape[2], device=kf.device)
    ok = (keys[None, :] <= pos[:, None]) & (keys[None, :] > pos[:, None] - window)
    p, lse = masked_softmax_lse(torch.einsum("bhgtd,bhsd->bhgts", qg, kf) * scale, ok)
    return seen_bad(torch.einsum("bhgts,bhsd->bhgtd", p, vf), lse, q_bad, ok, kv_bad[:, :, None])[0]


def window_attention_reference(q, k, v, window: int, scale: float):
    B, Hq, T, D = q.shape
    S = k.shape[2]
    qg, kf, vf, q_bad, kv_bad = clean_grouped(q, k, v)
    outs = []
    step = max(1, min(T, chunk_len(B * Hq * window, T), 4096))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        pos = query_positions(T, S, t0, t1, q.device)
        lo = max(0, S - T + t0 - window + 1)  # pos[0] - window + 1, from shapes (no host read: compiles whole)
        hi = S - T + t1  # pos[-1] + 1
        outs.append(run_chunk(_chunk, qg[:, :, :, t0:t1], kf[:, :, lo:hi], vf[:, :, lo:hi], q_bad[..., t0:t1],
                              kv_bad[:, :, lo:hi], pos, lo, window, scale))
    return torch.cat(outs, dim=3).reshape(B, Hq, T, D).to(q.dtype)


run = window_attention_reference
