"""gather_attention: validation and dispatch."""

from __future__ import annotations

import torch

from .. import checks
from ..dispatch import Op, Request, needs_grad

OP = Op("gather_attention", __package__, ("triton", "flex", "reference"))


def gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, *, scale: float,
                     backend: str = "auto", return_lse: bool = False):
    """Exact softmax attention of q [B, Hq, T, D] over the keys idx [B, Hs, T, K] names in k, v
    [B, Hkv, N, D]; Hs is 1 (one list for every KV head) or Hkv. -1 is an empty slot; ids outside
    [0, N) are never read (treated as empty). Causality is the selection's job. A query with no key
    gets output 0 (and LSE -inf). Memory is bounded by chunk x K x D: no T x N tensor."""
    checks.check_keys(q, k, v)
    Hkv, N = k.shape[1], k.shape[2]
    if idx.dim() != 4 or idx.shape[0] != q.shape[0] or idx.shape[2] != q.shape[2] or idx.shape[1] not in (1, Hkv):
        raise ValueError(f"idx must be [B={q.shape[0]}, Hs=1 or {Hkv}, T={q.shape[2]}, K], got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be int32 (or int64), got {idx.dtype}")
    idx = checks.drop_out_of_range(idx, N)
    req = Request.of(q, needs_grad(q, k, v), group=q.shape[1] // Hkv, head_dim=q.shape[3], return_lse=return_lse)
    return OP.run(backend, req, q, k, v, idx, scale, return_lse)
