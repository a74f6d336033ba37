"""Lightning indexer top-k through the Triton kernels: sparsezoo.kernels.indexer_decode_triton for few
queries (decode), else sparsezoo.kernels.indexer_triton."""

from __future__ import annotations

import importlib.util


def supports(req) -> str | None:
    if importlib.util.find_spec("sparsezoo.kernels.indexer_triton") is None:
        return "the Triton indexer kernel is not built into this install"
    return None


def run(q_i, w, k_i, key_end, S: int, topk: int, scale: float):
    from sparsezoo.kernels import indexer_decode_triton, indexer_triton

    B, Hs, T, J, _ = q_i.shape
    if indexer_decode_triton.decode_applies(B, Hs, T, J, k_i.shape[1]):
        return indexer_decode_triton.indexer_topk_decode_triton(q_i, w, k_i, key_end, S, topk, scale)
    return indexer_triton.indexer_topk_triton(q_i, w, k_i, key_end, S, topk, scale)
