"""nsa_select: validation and dispatch."""

from __future__ import annotations

import torch

from .. import checks
from ..dispatch import Op, Request

OP = Op("nsa_select", __package__, ("triton", "reference"))


@torch.no_grad()
def nsa_select(q: torch.Tensor, kc: torch.Tensor, *, S: int, block_len: int, stride: int, sel_block: int,
               topk: int, scale: float, lse: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """NSA block selection, int32 [B, Hkv, T, topk] in the sparsezoo selection format.

    q [B, Hq, T, D] are the last T of S positions; kc [B, Hkv, Sc, D] the compressed keys (entry i
    covers tokens [i*stride, i*stride + block_len)). Block j's importance is the sum of the
    compression-attention probabilities of the entries that overlap it, summed over the G heads of a
    GQA group (the group shares the selection). Block 0 and the two local blocks (the query's own and
    the one before) are always kept; the rest are the best-scoring earlier blocks (ties to the
    smaller id).

    lse: optionally the compressed attention's LSE over the same q, kc and scale
    (`compressed_attention(..., return_lse=True)`), [B, Hq, T]; the Triton path then skips its own
    LSE pass. The reference recomputes it (it is the oracle).
    """
    checks.check_keys(q, kc, kc)
    for name, value in (("S", S), ("block_len", block_len), ("stride", stride), ("sel_block", sel_block),
                        ("topk", topk)):
        checks.check_positive_int(name, value)
    if q.shape[2] > S:
        raise ValueError(f"queries are the last T of S positions, so T ({q.shape[2]}) must be <= S ({S})")
    req = Request.of(q, block_len=block_len, stride=stride, sel_block=sel_block, topk=topk,
                     group=q.shape[1] // kc.shape[1], head_dim=q.shape[-1])
    if lse is not None and (lse.shape != q.shape[:3] or not lse.is_floating_point() or lse.device != q.device):
        raise ValueError(f"lse must be the compressed attention's float LSE [B, Hq, T] = {tuple(q.shape[:3])} on "
                         f"{q.device}, got {tuple(lse.shape)} {lse.dtype} on {lse.device}")
    return OP.run(backend, req, q, kc, S, block_len, stride, sel_block, topk, scale, lse)
