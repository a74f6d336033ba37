"""NSA selection through the Triton kernel (sparsezoo.kernels.nsa_select_triton)."""

from __future__ import annotations

import importlib.util


def supports(req) -> str | None:
    if importlib.util.find_spec("sparsezoo.kernels.nsa_select_triton") is None:
        return "the Triton NSA selection kernel is not built into this install"
    return None


def run(q, kc, S: int, block_len: int, stride: int, sel_block: int, topk: int, scale: float):
    from sparsezoo.kernels import nsa_select_triton

    return nsa_select_triton.nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, scale)
