"""msa_select: validation and dispatch."""

from __future__ import annotations

import math

import torch

from .. import checks
from ..dispatch import Op, Request

OP = Op("msa_select", __package__, ("triton", "reference"))


@torch.no_grad()
def msa_select(q_idx: torch.Tensor, k_idx: torch.Tensor, *, block_size: int, topk: int,
               scale: float | None = None, backend: str = "auto", check: bool = False) -> torch.Tensor:
    """MSA index-branch selection (docs/msa.md).

    q_idx [B, H_i, T, D_i] (one index head per KV group), k_idx [B, S, D_i] (one shared index-key
    head); queries are the last T of S positions. Returns int32 [B, H_i, T, topk]: the best
    topk - 1 blocks before the local block by max-pooled score (ties to the smaller id), then the
    local block, then -1 padding. `check=True` also rejects NaN/Inf inputs.
    """
    checks.check_rank("q_idx", q_idx, 4, "[B, H_i, T, D_i]")
    checks.check_rank("k_idx", k_idx, 3, "[B, S, D_i]")
    checks.check_float("q_idx", q_idx)
    checks.check_same("q_idx", q_idx, "k_idx", k_idx)
    checks.check_positive_int("block_size", block_size)
    checks.check_positive_int("topk", topk)
    B, H, T, Di = q_idx.shape
    if k_idx.shape[0] != B or k_idx.shape[2] != Di:
        raise ValueError(f"k_idx must be [B={B}, S, D_i={Di}], got {tuple(k_idx.shape)}")
    S = k_idx.shape[1]
    if T > S:
        raise ValueError(f"queries are the last T of S positions, so T ({T}) must be <= S ({S})")
    if check:
        checks.check_finite("q_idx", q_idx)
        checks.check_finite("k_idx", k_idx)
    scale = 1.0 / math.sqrt(Di) if scale is None else scale
    req = Request.of(q_idx, block_size=block_size, scale=scale, index_dim=Di)
    return OP.run(backend, req, q_idx, k_idx, block_size, topk, scale)
