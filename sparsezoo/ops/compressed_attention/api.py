"""compressed_attention: validation and dispatch, and the compressed-entry geometry."""

from __future__ import annotations

import torch

from .. import checks
from ..dispatch import Op, Request, needs_grad
from ..nonfinite import nonfinite_rows, poison_rows

OP = Op("compressed_attention", __package__, ("sdpa", "flex", "reference"))


def n_compressed(S: int, block_len: int, stride: int) -> int:
    """Compressed entries of S tokens: one per complete block of length block_len at stride."""
    return 0 if S < block_len else (S - block_len) // stride + 1


def n_visible(pos: torch.Tensor, n: int, block_len: int, stride: int) -> torch.Tensor:
    """How many of the n compressed entries each query position sees (entries 0 .. that count - 1)."""
    return torch.where(pos >= block_len - 1, (pos - block_len + 1) // stride + 1, 0).clamp(max=n)


def compressed_visible(pos: torch.Tensor, n: int, block_len: int, stride: int) -> torch.Tensor:
    """bool [Tc, n]: compressed entry i ends at or before the query position."""
    ends = torch.arange(n, device=pos.device) * stride + block_len - 1
    return ends[None, :] <= pos[:, None]


def compressed_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, *, S: int, block_len: int,
                         stride: int, scale: float, return_lse: bool = False, backend: str = "auto"):
    """Softmax attention of q [B, Hq, T, D] (the last T of S positions) over the visible compressed
    entries kc, vc [B, Hkv, Sc, D] of S tokens. A query that sees no entry yet gets output 0 (NaN if its
    q is not finite: docs/ops.md, non-finite values).

    return_lse: also return the natural-log LSE [B, Hq, T] fp32 of the scaled scores over the visible
    entries (-inf where none is visible, not differentiable); NSA's selection reuses it."""
    checks.check_keys(q, kc, vc)
    for name, value in (("S", S), ("block_len", block_len), ("stride", stride)):
        checks.check_positive_int(name, value)
    req = Request.of(q, needs_grad(q, kc, vc), return_lse=return_lse, T=q.shape[2], S=S, Sc=kc.shape[2],
                     block_len=block_len, stride=stride, head_dim=q.shape[3])
    if kc.shape[2] == 0:
        OP.choose(backend, req)  # still validate the request
        q_bad = nonfinite_rows(q)
        out = poison_rows(q * 0, q_bad)  # nothing compressed yet; stays in the autograd graph
        lse = poison_rows(torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device), q_bad)
        return (out, lse) if return_lse else out
    out = OP.run(backend, req, q, kc, vc, S, block_len, stride, scale, return_lse)
    if return_lse:
        return out[0], out[1].detach().float()
    return out
