"""window_attention: validation and dispatch."""

from __future__ import annotations

import math

import torch

from .. import checks
from ..dispatch import Op, Request, needs_grad

OP = Op("window_attention", __package__, ("flex", "reference"))


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, scale: float | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Causal attention of q [B, Hq, T, D] (the last T of S positions) over the last `window` keys of
    k, v [B, Hkv, S, D]: a query at p sees positions p - window + 1 .. p."""
    checks.check_qkv(q, k, v)
    checks.check_positive_int("window", window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    req = Request.of(q, needs_grad(q, k, v), window=window)
    return OP.run(backend, req, q, k, v, window, scale)
