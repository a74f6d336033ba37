"""Lightning indexer top-k through the Triton kernels (sparsezoo.kernels.indexer_triton)."""

from __future__ import annotations

import importlib.util


def supports(req) -> str | None:
    if importlib.util.find_spec("sparsezoo.kernels.indexer_triton") is None:
        return "the Triton indexer kernel is not built into this install"
    return None


def run(q_i, w, k_i, key_end, S: int, topk: int, scale: float):
    from sparsezoo.kernels import indexer_triton

    return indexer_triton.indexer_topk_triton(q_i, w, k_i, key_end, S, topk, scale)
