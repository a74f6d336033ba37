"""Plain-PyTorch MoBA gate and top-k (the oracle), chunked over queries."""

from __future__ import annotations

import torch

from ..common import chunk_len, compute_dtype, query_positions, select_from_block_scores
from .api import block_mean_keys


def supports(req) -> str | None:
    return None


def moba_select_reference(q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int,
                          means: torch.Tensor | None = None) -> torch.Tensor:
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    dt = compute_dtype(q)
    n_blocks = -(-S // block_size)
    if means is None:
        means = block_mean_keys(k.to(dt), block_size)  # [B, Hkv, n_blocks, D]
    else:  # the caller's means of the ranked (complete) blocks; the local block is kept without a score
        means = torch.nn.functional.pad(means[:, :, :n_blocks].to(dt), (0, 0, 0, max(0, n_blocks - means.shape[2])))
    qg = q.to(dt).view(B, Hkv, G, T, D)
    out = torch.empty((B, Hq, T, topk), dtype=torch.int32, device=q.device)
    step = chunk_len(B * Hq * means.shape[2], T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        pos = query_positions(T, S, t0, t1, q.device)
        b = torch.einsum("bhgtd,bhnd->bhgtn", qg[:, :, :, t0:t1], means).reshape(B, Hq, t1 - t0, -1)
        out[:, :, t0:t1] = select_from_block_scores(b, pos, block_size, topk)
    return out


run = moba_select_reference
