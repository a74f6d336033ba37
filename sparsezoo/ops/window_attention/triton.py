"""Sliding-window attention through the block-sparse Triton kernels (sparsezoo.kernels.sparse_attention_triton).

Every query selects the key blocks its window touches (WINDOW_BLOCK keys each; one selection per KV group, so a
tile packs the group's query heads of consecutive tokens, as NSA's selected branch does), and the kernels drop
the keys before the window inside them (their `window` option). Forward and backward are the block-sparse
kernels', and so is the non-finite rule (docs/ops.md). The backward is slower than flex's at NSA's window, so
`auto` takes this path for calls without gradients only (the op's grad_order).
"""

from __future__ import annotations

import torch

from ..block_sparse_attention import triton as block_sparse_triton
from ..dispatch import Request, compiling

WINDOW_BLOCK = 64  # keys per selected block: a window of w keys touches ceil((w - 1) / 64) + 1 of them


def supports(req) -> str | None:
    """The block-sparse kernels' own rule, for blocks of WINDOW_BLOCK keys (a group not known yet passes)."""
    params = {**req.params, "block_size": WINDOW_BLOCK, "group": req.get("group") or 1}
    return block_sparse_triton.supports(Request(req.device, req.dtype, req.needs_grad, params))


def window_blocks(B: int, H: int, T: int, S: int, window: int, device) -> torch.Tensor:
    """int32 [B, H, T, n]: the WINDOW_BLOCK-key blocks that query t (position S - T + t) reads, -1 for those
    before position 0; the same for every batch item and head (an expanded view)."""
    n = -(-(window - 1) // WINDOW_BLOCK) + 1
    pos = torch.arange(S - T, S, device=device)
    last = pos // WINDOW_BLOCK
    first = torch.clamp(pos - window + 1, min=0) // WINDOW_BLOCK
    ids = last[:, None] - n + 1 + torch.arange(n, device=device)
    ids = torch.where(ids >= first[:, None], ids, -1).to(torch.int32)
    return ids.view(1, 1, T, n).expand(B, H, T, n)


def run(q, k, v, window: int, scale: float):
    from sparsezoo.kernels import sparse_attention_triton

    B, T, (Hkv, S) = q.shape[0], q.shape[2], k.shape[1:3]
    block_idx = window_blocks(B, Hkv, T, S, window, q.device)
    if compiling():
        return torch.ops.sparsezoo.block_sparse_attention_triton(q, k, v, block_idx, WINDOW_BLOCK, float(scale),
                                                                 window)[0]
    return sparse_attention_triton.block_sparse_attention_triton(q, k, v, block_idx, WINDOW_BLOCK, scale,
                                                                 window=window)
