"""Forward + backward of an MSA layer's sparse part at long context, through the Triton paths of
`sparsezoo.ops` (CUDA, or the interpreter), dispatched as the model dispatches them:

    block_idx = msa_select(q_idx, k_idx)                  (no gradient: top-k)
    out, lse  = block_sparse_attention(q, k, v, block_idx)   -> grads to q, k, v
    kl        = msa_index_kl(teacher from q, k, lse; student q_idx, k_idx) -> grads to q_idx, k_idx

`ops.implementations_used()` says which schedules ran. Memory stays O(inputs): the indexer keeps its
top-k in registers, attention and KL walk the selected blocks per key block or per tile; nothing of size
T x S (or T x S / block) is built.
"""

from __future__ import annotations

import torch

from sparsezoo import ops


def msa_sparse_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_idx: torch.Tensor,
                    k_idx: torch.Tensor, *, block_size: int, topk: int, scale: float | None = None,
                    index_scale: float | None = None, coeff: float = 1.0, temperature: float = 1.0,
                    block_idx: torch.Tensor | None = None):
    """Returns (out [B, Hq, T, D], kl_loss scalar, block_idx int32 [B, Hkv, T, topk]).

    out is differentiable w.r.t. q, k, v; kl_loss w.r.t. q_idx, k_idx only (the teacher is
    detached). Pass block_idx to reuse a selection (then topk is ignored).
    """
    if block_idx is None:
        with torch.no_grad():
            block_idx = ops.msa_select(q_idx.detach(), k_idx.detach(), block_size=block_size, topk=topk,
                                       scale=index_scale, backend="triton")
    out, lse = ops.block_sparse_attention(q, k, v, block_idx, block_size=block_size, scale=scale,
                                          backend="triton", return_lse=True)
    kl = ops.msa_index_kl(q, k, q_idx, k_idx, block_idx, block_size=block_size, scale=scale,
                          index_scale=index_scale, coeff=coeff, temperature=temperature, main_lse=lse.detach(),
                          backend="triton")
    return out, kl, block_idx
