"""indexer_topk: validation and dispatch.

Shapes: index queries q_i [B, Hs, T, J, D_i] (Hs selection heads: 1 for a layer-shared selection or
Hkv for one per KV group, J index heads each), per-head weights w [B, Hs, T, J], one shared index
key k_i [B, N, D_i]. Key n "ends" at position key_end[n] (the token itself, or the last token of a
compressed entry; non-decreasing) and is visible to a query at position p when key_end[n] <= p.
Index logits: I[t, n] = scale * sum_j w[t, j] * relu(<q_i[t, j], k_i[n]>).
"""

from __future__ import annotations

import torch

from .. import checks
from ..dispatch import Op, Request

OP = Op("indexer_topk", __package__, ("triton", "reference"))


@torch.no_grad()
def indexer_topk(q_i: torch.Tensor, w: torch.Tensor, k_i: torch.Tensor, key_end: torch.Tensor, *, S: int,
                 topk: int, scale: float, backend: str = "auto") -> torch.Tensor:
    """The topk visible keys per query by index logit (ties to the smaller id) -> int32
    [B, Hs, T, topk]: valid ids first (best first for the reference), -1 padding when fewer than topk
    keys are visible. Queries are the last T of S positions."""
    checks.check_indexer(q_i, w, k_i, key_end)
    checks.check_positive_int("topk", topk)
    checks.check_positive_int("S", S)
    if q_i.shape[2] > S:
        raise ValueError(f"queries are the last T of S positions, so T ({q_i.shape[2]}) must be <= S ({S})")
    req = Request.of(q_i, topk=topk, index_dim=q_i.shape[-1], index_heads=q_i.shape[3])
    return OP.run(backend, req, q_i, w, k_i, key_end, S, topk, scale)
