"""MoBA selection through the Triton kernel (sparsezoo.kernels.moba_select_triton)."""

from __future__ import annotations

import importlib.util


def supports(req) -> str | None:
    if importlib.util.find_spec("sparsezoo.kernels.moba_select_triton") is None:
        return "the Triton MoBA selection kernel is not built into this install"
    return None  # any block size, GQA group and head dim


def run(q, k, block_size: int, topk: int, means=None):
    from sparsezoo.kernels import moba_select_triton

    if means is None:
        return moba_select_triton.moba_select_triton(q, k, block_size, topk)
    return moba_select_triton.moba_select_from_means(q, means, k.shape[2], block_size, topk)
