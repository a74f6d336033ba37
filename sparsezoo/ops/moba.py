"""MoBA ops: parameter-free block gating. Block j's score for a query head is <q, mean key of block j>
(its KV head's keys); each query head keeps its top k-1 earlier blocks plus its own (local) block,
which attention reads causally. Selections are per query head: int32 [B, Hq, T, k].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import checks
from .dispatch import record
from .reference import _chunk_len, _compute_dtype, query_positions, select_from_block_scores


def block_mean_keys(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """k [B, Hkv, S, D] -> [B, Hkv, n_blocks, D]; a trailing partial block averages its own keys."""
    B, H, S, D = k.shape
    n_blocks = math.ceil(S / block_size)
    kp = F.pad(k, (0, 0, 0, n_blocks * block_size - S)).view(B, H, n_blocks, block_size, D)
    counts = torch.clamp(S - torch.arange(n_blocks, device=k.device) * block_size, max=block_size)
    return kp.sum(3) / counts.to(kp.dtype)[:, None]


@torch.no_grad()
def moba_select(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int) -> torch.Tensor:
    """q [B, Hq, T, D] (last T of S), k [B, Hkv, S, D] -> int32 [B, Hq, T, topk] per query head."""
    B, Hq, Hkv, T, S, D = checks.check_qkv(q, k, k)
    checks.check_positive_int("block_size", block_size)
    checks.check_positive_int("topk", topk)
    G = Hq // Hkv
    dt = _compute_dtype(q)
    means = block_mean_keys(k.to(dt), block_size)  # [B, Hkv, n_blocks, D]
    qg = q.to(dt).view(B, Hkv, G, T, D)
    out = torch.empty((B, Hq, T, topk), dtype=torch.int32, device=q.device)
    step = _chunk_len(B * Hq * means.shape[2], T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        pos = query_positions(T, S, t0, t1, q.device)
        b = torch.einsum("bhgtd,bhnd->bhgtn", qg[:, :, :, t0:t1], means).reshape(B, Hq, t1 - t0, -1)
        out[:, :, t0:t1] = select_from_block_scores(b, pos, block_size, topk)
    record("moba_select", "reference")
    return out
