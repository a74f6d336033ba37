"""MSA selection through the fused Triton indexer (sparsezoo.kernels.select_triton).

Eager calls go straight to the launcher; under torch.compile the call goes through the custom op
sparsezoo::msa_select_triton (opaque to the compiler; its fake gives the output shape)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import compiling


def supports(req) -> str | None:
    bs = req["block_size"]
    if not (bs & (bs - 1) == 0 or bs % 128 == 0):
        return f"the Triton indexer needs block_size to be a power of two or a multiple of 128, got {bs}"
    if req["scale"] <= 0:
        return f"the Triton indexer needs scale > 0 (max-pooling commutes with it), got {req['scale']}"
    return None


def run(q_idx, k_idx, block_size: int, topk: int, scale: float):
    if compiling():
        return torch.ops.sparsezoo.msa_select_triton(q_idx, k_idx, block_size, topk, float(scale))
    return _launch(q_idx, k_idx, block_size, topk, scale)


def _launch(q_idx: Tensor, k_idx: Tensor, block_size: int, topk: int, scale: float) -> Tensor:
    from sparsezoo.kernels import select_triton

    return select_triton.msa_select_triton(q_idx, k_idx, block_size, topk, scale)


_op = torch.library.custom_op("sparsezoo::msa_select_triton", _launch, mutates_args=())


@_op.register_fake
def _fake(q_idx, k_idx, block_size, topk, scale):
    return q_idx.new_empty((*q_idx.shape[:3], topk), dtype=torch.int32)
