"""compressed_attention: validation and dispatch, and the compressed-entry geometry."""

from __future__ import annotations

import torch

from .. import checks
from ..dispatch import Op, Request, needs_grad
from ..nonfinite import nonfinite_rows, poison_rows

OP = Op("compressed_attention", __package__, ("flex", "reference"))


def n_compressed(S: int, block_len: int, stride: int) -> int:
    """Compressed entries of S tokens: one per complete block of length block_len at stride."""
    return 0 if S < block_len else (S - block_len) // stride + 1


def compressed_visible(pos: torch.Tensor, n: int, block_len: int, stride: int) -> torch.Tensor:
    """bool [Tc, n]: compressed entry i ends at or before the query position."""
    ends = torch.arange(n, device=pos.device) * stride + block_len - 1
    return ends[None, :] <= pos[:, None]


def compressed_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, *, S: int, block_len: int,
                         stride: int, scale: float, backend: str = "auto") -> torch.Tensor:
    """Softmax attention of q [B, Hq, T, D] (the last T of S positions) over the visible compressed
    entries kc, vc [B, Hkv, Sc, D] of S tokens. A query that sees no entry yet gets output 0 (NaN if its
    q is not finite: docs/ops.md, non-finite values)."""
    checks.check_keys(q, kc, vc)
    for name, value in (("S", S), ("block_len", block_len), ("stride", stride)):
        checks.check_positive_int(name, value)
    req = Request.of(q, needs_grad(q, kc, vc))
    if kc.shape[2] == 0:
        OP.choose(backend, req)  # still validate the request
        return poison_rows(q * 0, nonfinite_rows(q))  # nothing compressed yet; stays in the autograd graph
    return OP.run(backend, req, q, kc, vc, S, block_len, stride, scale)
