"""Gather attention through the Triton kernels (sparsezoo.kernels.gather_attention_triton)."""

from __future__ import annotations

import importlib.util


def supports(req) -> str | None:
    if importlib.util.find_spec("sparsezoo.kernels.gather_attention_triton") is None:
        return "the Triton gather-attention kernel is not built into this install"
    if req.get("head_dim", 0) > 256:
        return f"the Triton kernel supports head_dim <= 256, got {req['head_dim']}"
    return None


def run(q, k, v, idx, scale: float, return_lse: bool = False, k_extra=None, v_extra=None, window: int = 0):
    from sparsezoo.kernels import gather_attention_triton

    return gather_attention_triton.gather_attention_triton(q, k, v, idx, scale, return_lse, k2=k_extra, v2=v_extra,
                                                           window=window)
