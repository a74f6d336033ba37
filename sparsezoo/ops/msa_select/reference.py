"""Plain-PyTorch MSA selection (the oracle): chunked over queries, never T x S at once."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..common import chunk_len, compute_dtype, query_positions, select_from_block_scores


def supports(req) -> str | None:
    return None


def block_scores(q_idx: torch.Tensor, k_idx: torch.Tensor, pos: torch.Tensor, block_size: int,
                 scale: float) -> torch.Tensor:
    """Max-pooled index scores b[B, H, Tc, n_blocks]; invisible or padding tokens count as -inf."""
    S = k_idx.shape[1]
    n_blocks = math.ceil(S / block_size)
    z = torch.einsum("bhtd,bsd->bhts", q_idx, k_idx) * scale
    visible = torch.arange(S, device=z.device)[None, :] <= pos[:, None]
    z = z.masked_fill(~visible, float("-inf"))
    z = F.pad(z, (0, n_blocks * block_size - S), value=float("-inf"))
    return z.view(*z.shape[:-1], n_blocks, block_size).amax(-1)


def msa_select_reference(q_idx: torch.Tensor, k_idx: torch.Tensor, block_size: int, topk: int,
                         scale: float) -> torch.Tensor:
    """q_idx [B, H_i, T, D_i], k_idx [B, S, D_i] -> int32 [B, H_i, T, topk]."""
    B, H, T, _ = q_idx.shape
    S = k_idx.shape[1]
    dt = compute_dtype(q_idx)
    kf = k_idx.to(dt)
    out = torch.empty((B, H, T, topk), dtype=torch.int32, device=q_idx.device)
    step = chunk_len(B * H * S, T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        pos = query_positions(T, S, t0, t1, q_idx.device)
        b = block_scores(q_idx[:, :, t0:t1].to(dt), kf, pos, block_size, scale)
        out[:, :, t0:t1] = select_from_block_scores(b, pos, block_size, topk)
    return out



run = msa_select_reference
