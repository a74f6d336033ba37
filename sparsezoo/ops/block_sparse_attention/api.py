"""block_sparse_attention: validation and dispatch."""

from __future__ import annotations

import math

import torch

from .. import checks
from ..dispatch import Op, Request, needs_grad

OP = Op("block_sparse_attention", __package__, ("triton", "flex", "reference"))


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor, *,
                           block_size: int, scale: float | None = None, backend: str = "auto",
                           return_lse: bool = False, check: bool = False):
    """Exact softmax attention of q [B, Hq, T, D] over the selected blocks of k, v [B, Hkv, S, D].

    block_idx is int32 [B, Hs, T, k] in the selection format of `sparsezoo.ops`, with Hs = Hkv
    selection heads (each shared by its G = Hq / Hkv query heads, as MSA and NSA select) or Hs = Hq
    (one selection per query head, as MoBA selects). Causal, queries the last T of S positions.
    Returns [B, Hq, T, D] (and the natural-log LSE [B, Hq, T] when return_lse). A query with no
    visible selected key gets output 0 and LSE -inf. Ids outside [-1, n_blocks) are rejected when
    `check=True` (which also rejects NaN/Inf inputs); without it they are never acted on.
    """
    B, Hq, Hkv, T, S, D = checks.check_qkv(q, k, v)
    checks.check_positive_int("block_size", block_size)
    checks.check_block_idx(block_idx, B, (Hkv, Hq), T, S, block_size, values=check)
    if check:
        for name, t in (("q", q), ("k", k), ("v", v)):
            checks.check_finite(name, t)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    block_idx = checks.drop_out_of_range(block_idx, math.ceil(S / block_size))
    req = Request.of(q, needs_grad(q, k, v), block_size=block_size, group=Hq // block_idx.shape[1],
                     selection_heads=block_idx.shape[1], n_kv_heads=Hkv, head_dim=D, return_lse=return_lse)
    return OP.run(backend, req, q, k, v, block_idx, block_size, scale, return_lse)
