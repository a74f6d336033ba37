"""MSA selection through the fused Triton indexer (sparsezoo.kernels.select_triton)."""

from __future__ import annotations


def supports(req) -> str | None:
    bs = req["block_size"]
    if not (bs & (bs - 1) == 0 or bs % 128 == 0):
        return f"the Triton indexer needs block_size to be a power of two or a multiple of 128, got {bs}"
    if req["scale"] <= 0:
        return f"the Triton indexer needs scale > 0 (max-pooling commutes with it), got {req['scale']}"
    return None


def run(q_idx, k_idx, block_size: int, topk: int, scale: float):
    from sparsezoo.kernels import select_triton

    return select_triton.msa_select_triton(q_idx, k_idx, block_size, topk, scale)
