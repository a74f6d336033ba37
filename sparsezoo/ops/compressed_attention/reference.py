"""Plain-PyTorch compressed attention (the oracle), chunked over queries."""

from __future__ import annotations

import torch

from ..common import chunk_len, masked_softmax_lse, query_positions, run_chunk, upcast_grouped
from .api import compressed_visible


def supports(req) -> str | None:
    return None


def _chunk(qg, kf, vf, ok, scale: float):
    p, _ = masked_softmax_lse(torch.einsum("bhgtd,bhsd->bhgts", qg, kf) * scale, ok)
    return torch.einsum("bhgts,bhsd->bhgtd", p, vf)


def compressed_attention_reference(q, kc, vc, S: int, block_len: int, stride: int, scale: float,
                                   return_lse: bool = False):
    B, Hq, T, D = q.shape
    Sc = kc.shape[2]
    qg, kf, vf = upcast_grouped(q, kc, vc)
    outs, lses = [], []
    step = chunk_len(B * Hq * Sc, T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        ok = compressed_visible(query_positions(T, S, t0, t1, q.device), Sc, block_len, stride)
        outs.append(run_chunk(_chunk, qg[:, :, :, t0:t1], kf, vf, ok, scale))
        if return_lse:
            with torch.no_grad():
                s = torch.einsum("bhgtd,bhsd->bhgts", qg[:, :, :, t0:t1].detach(), kf.detach()) * scale
                lses.append(masked_softmax_lse(s, ok)[1])
    out = torch.cat(outs, dim=3).reshape(B, Hq, T, D).to(q.dtype)
    if return_lse:
        return out, torch.cat(lses, dim=3).reshape(B, Hq, T).float()
    return out


run = compressed_attention_reference
