"""MoBA selection through the Triton kernel (sparsezoo.kernels.moba_select_triton).

Eager calls go straight to the launcher; under torch.compile the call goes through the custom op
sparsezoo::moba_select_triton (opaque to the compiler; its fake gives the output shape)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import compiling, kernel_built

_KERNEL_BUILT = kernel_built("moba_select_triton")


def supports(req) -> str | None:
    if not _KERNEL_BUILT:
        return "the Triton MoBA selection kernel is not built into this install"
    return None  # any block size, GQA group and head dim


def run(q, k, block_size: int, topk: int, means=None):
    if compiling():
        return torch.ops.sparsezoo.moba_select_triton(q, k, block_size, topk, means)
    return _launch(q, k, block_size, topk, means)


def _launch(q: Tensor, k: Tensor, block_size: int, topk: int, means: Tensor | None) -> Tensor:
    from sparsezoo.kernels import moba_select_triton

    if means is None:
        return moba_select_triton.moba_select_triton(q, k, block_size, topk)
    return moba_select_triton.moba_select_from_means(q, means, k.shape[2], block_size, topk)


_op = torch.library.custom_op("sparsezoo::moba_select_triton", _launch, mutates_args=())


@_op.register_fake
def _fake(q, k, block_size, topk, means):
    return q.new_empty((*q.shape[:3], topk), dtype=torch.int32)
