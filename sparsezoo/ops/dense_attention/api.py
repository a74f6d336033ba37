"""dense_attention: validation and dispatch."""

from __future__ import annotations

import math

import torch

from .. import checks
from ..dispatch import Op, Request, needs_grad

OP = Op("dense_attention", __package__, ("sdpa", "flex", "reference"))


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    backend: str = "auto", return_lse: bool = False):
    """Causal GQA attention of q [B, Hq, T, D] over k, v [B, Hkv, S, D], queries the last T of S.

    Backends: sdpa (PyTorch's fused kernels, no LSE), flex, reference. Returns [B, Hq, T, D] (and the
    natural-log LSE [B, Hq, T] when return_lse).
    """
    B, Hq, Hkv, T, S, D = checks.check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    req = Request.of(q, needs_grad(q, k, v), return_lse=return_lse)
    return OP.run(backend, req, q, k, v, scale, return_lse)
