"""MSA sparse KL through the Triton kernels (sparsezoo.kernels.index_kl_triton)."""

from __future__ import annotations


def supports(req) -> str | None:
    G, bs = req["group"], req["block_size"]
    if G & (G - 1):
        return f"the Triton KL kernels need a power-of-two GQA group, got {G}"
    if not (bs & (bs - 1) == 0 or bs % 128 == 0):
        return f"the Triton KL kernels need block_size to be a power of two or a multiple of 128, got {bs}"
    return None


def run(q, k, q_idx, k_idx, block_idx, block_size: int, scale: float, index_scale: float, coeff: float = 1.0,
        temperature: float = 1.0, main_lse=None):
    from sparsezoo.kernels import index_kl_triton

    return index_kl_triton.msa_index_kl_triton(q, k, q_idx, k_idx, block_idx, block_size, scale, index_scale,
                                               coeff=coeff, temperature=temperature, main_lse=main_lse)
