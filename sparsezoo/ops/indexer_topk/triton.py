"""Lightning indexer top-k through the Triton kernels: sparsezoo.kernels.indexer_decode_triton for few
queries (decode), else sparsezoo.kernels.indexer_triton.

Eager calls go straight to the launchers; under torch.compile the call goes through the custom op
sparsezoo::indexer_topk_triton (opaque to the compiler; its fake gives the output shape)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import compiling, kernel_built

_KERNEL_BUILT = kernel_built("indexer_triton")


def supports(req) -> str | None:
    if not _KERNEL_BUILT:
        return "the Triton indexer kernel is not built into this install"
    return None


def run(q_i, w, k_i, key_end, S: int, topk: int, scale: float):
    if compiling():
        return torch.ops.sparsezoo.indexer_topk_triton(q_i, w, k_i, key_end, S, topk, float(scale))
    return _launch(q_i, w, k_i, key_end, S, topk, scale)


def _launch(q_i: Tensor, w: Tensor, k_i: Tensor, key_end: Tensor, S: int, topk: int, scale: float) -> Tensor:
    from sparsezoo.kernels import indexer_decode_triton, indexer_triton

    B, Hs, T, J, _ = q_i.shape
    if indexer_decode_triton.decode_applies(B, Hs, T, J, k_i.shape[1]):
        return indexer_decode_triton.indexer_topk_decode_triton(q_i, w, k_i, key_end, S, topk, scale)
    return indexer_triton.indexer_topk_triton(q_i, w, k_i, key_end, S, topk, scale)


_op = torch.library.custom_op("sparsezoo::indexer_topk_triton", _launch, mutates_args=())


@_op.register_fake
def _fake(q_i, w, k_i, key_end, S, topk, scale):
    return q_i.new_empty((*q_i.shape[:3], topk), dtype=torch.int32)
