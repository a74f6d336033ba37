"""window_attention: validation and dispatch."""

from __future__ import annotations

import math

import torch

from .. import checks
from ..dispatch import Op, Request, needs_grad

# With gradients flex first: the block kernels' backward (dK/dV over per-key-block work lists) took 77.4 ms for
# the forward plus backward of NSA's window at 128k on an H200, flex 45.7 ms (forward: 7.8 against 10.4 ms;
# scripts/probes/window_backends.py)
OP = Op("window_attention", __package__, ("triton", "flex", "reference"), grad_order=("flex", "triton", "reference"))


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, scale: float | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Causal attention of q [B, Hq, T, D] (the last T of S positions) over the last `window` keys of
    k, v [B, Hkv, S, D]: a query at p sees positions p - window + 1 .. p."""
    B, Hq, Hkv, T, S, D = checks.check_qkv(q, k, v)
    checks.check_positive_int("window", window)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    req = Request.of(q, needs_grad(q, k, v), window=window, group=Hq // Hkv, head_dim=D)
    return OP.run(backend, req, q, k, v, window, scale)
