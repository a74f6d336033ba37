"""Plain-PyTorch lightning indexer and top-k (the oracle): chunked over queries."""

from __future__ import annotations

import torch

from ..common import chunk_len, compute_dtype, nan_first, query_positions


def supports(req) -> str | None:
    return None


def index_logits(q_i: torch.Tensor, w: torch.Tensor, k_i: torch.Tensor, scale: float) -> torch.Tensor:
    """q_i [B, Hs, Tc, J, D_i], w [B, Hs, Tc, J], k_i [B, N, D_i] -> [B, Hs, Tc, N]."""
    dots = torch.einsum("bhtjd,bnd->bhtjn", q_i, k_i)
    return torch.einsum("bhtj,bhtjn->bhtn", w, torch.relu(dots)) * scale


def gathered_index_logits(q_i, w, k_i_rows, scale):
    """As index_logits with per-query keys k_i_rows [B, Hs, Tc, K, D_i] -> [B, Hs, Tc, K]."""
    dots = torch.einsum("bhtjd,bhtkd->bhtjk", q_i, k_i_rows)
    return torch.einsum("bhtj,bhtjk->bhtk", w, torch.relu(dots)) * scale


def indexer_topk_reference(q_i, w, k_i, key_end: torch.Tensor, S: int, topk: int, scale: float) -> torch.Tensor:
    B, Hs, T, J, _ = q_i.shape
    N = k_i.shape[1]
    dt = compute_dtype(q_i)
    qf, wf, kf = q_i.to(dt), w.to(dt), k_i.to(dt)
    out = torch.empty((B, Hs, T, topk), dtype=torch.int32, device=q_i.device)
    n = min(topk, N)
    step = chunk_len(B * Hs * J * max(N, 1), T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        pos = query_positions(T, S, t0, t1, q_i.device)
        ok = key_end[None, :] <= pos[:, None]  # [Tc, N]
        z = nan_first(index_logits(qf[:, :, t0:t1], wf[:, :, t0:t1], kf, scale)).masked_fill(~ok, float("-inf"))
        order = torch.sort(z, dim=-1, descending=True, stable=True).indices[..., :n]
        keep = torch.arange(n, device=z.device)[None, :] < ok.sum(-1)[:, None]
        out[:, :, t0:t1] = -1
        out[:, :, t0:t1, :n] = torch.where(keep, order, -1).to(torch.int32)
    return out


run = indexer_topk_reference
