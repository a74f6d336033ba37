"""Forward + backward of an MSA layer's sparse part at long context (Triton, CUDA or interpreter).

    block_idx = indexer(q_idx, k_idx)                    (no gradient: top-k)
    out, lse  = block_sparse_attention(q, k, v, block_idx)   -> grads to q, k, v
    kl        = sparse KL(teacher from q, k, lse; student q_idx, k_idx) -> grads to q_idx, k_idx

Memory stays O(inputs): the indexer keeps its top-k in registers, attention and KL walk per-tile
unions of selected blocks; nothing of size T x S (or T x S / block) is built.
"""

from __future__ import annotations

import math

import torch

from sparsezoo.ops.dispatch import record


def msa_sparse_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_idx: torch.Tensor,
                    k_idx: torch.Tensor, *, block_size: int, topk: int, scale: float | None = None,
                    index_scale: float | None = None, coeff: float = 1.0, temperature: float = 1.0,
                    block_idx: torch.Tensor | None = None):
    """Returns (out [B, Hq, T, D], kl_loss scalar, block_idx int32 [B, Hkv, T, topk]).

    out is differentiable w.r.t. q, k, v; kl_loss w.r.t. q_idx, k_idx only (the teacher is
    detached). Pass block_idx to reuse a selection (then topk is ignored).
    """
    from sparsezoo.kernels.index_kl_triton import msa_index_kl_triton
    from sparsezoo.kernels.select_triton import msa_select_triton
    from sparsezoo.kernels.sparse_attention_triton import block_sparse_attention_triton

    D, Di = q.shape[-1], q_idx.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    index_scale = 1.0 / math.sqrt(Di) if index_scale is None else index_scale
    if block_idx is None:
        with torch.no_grad():
            block_idx = msa_select_triton(q_idx.detach(), k_idx.detach(), block_size, topk, index_scale)
    out, lse = block_sparse_attention_triton(q, k, v, block_idx, block_size, scale, return_lse=True)
    kl = msa_index_kl_triton(q, k, q_idx, k_idx, block_idx, block_size, scale, index_scale, coeff,
                             temperature, main_lse=lse.detach())
    record("msa_sparse_step", "triton")
    return out, kl, block_idx
