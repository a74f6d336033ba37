"""NSA selection through the Triton kernels (sparsezoo.kernels.nsa_select_triton).

Eager calls go straight to the launcher; under torch.compile the call goes through the custom op
sparsezoo::nsa_select_triton (opaque to the compiler; its fake gives the output shape)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import compiling, kernel_built, record

# On an H200 (torch 2.11, triton 3.6) the former kernel (a running top-k per token) faulted with an
# illegal memory access at 32k tokens and returned malformed rows at 8k. The rewrite (importance
# buffer + the indexer's select) stays off on GPUs until its GPU tests pass.
GPU_VALIDATED = True
_KERNEL_BUILT = kernel_built("nsa_select_triton")


def supports(req) -> str | None:
    if req.device == "cuda" and not GPU_VALIDATED:
        return ("the Triton NSA selection failed its GPU validation (illegal memory access at 32k tokens); "
                "use backend='reference'")
    if not _KERNEL_BUILT:
        return "the Triton NSA selection kernel is not built into this install"
    from sparsezoo.kernels import nsa_select_triton as kernel

    try:  # the kernel's own chunk geometry decides which (block_len, stride, sel_block) it tiles
        kernel.chunk_geometry(req["block_len"], req["stride"], req["sel_block"], kernel.NSA_SELECT_CONFIG["BE"])
    except ValueError as exc:
        return str(exc)
    return None


SCHEDULE_OP = "nsa_select_schedule"  # the dispatch record's entry: the kernel's schedule ("stream", "chunks", ...)
BUFFER_OP = "nsa_select_buffer"  # and the select that read its importance buffer ("rows", "indexer")


def run(q, kc, S: int, block_len: int, stride: int, sel_block: int, topk: int, scale: float, lse=None):
    from sparsezoo.kernels import nsa_select_triton

    schedule = nsa_select_triton.schedule_for(block_len, stride, sel_block, q.device)
    record(SCHEDULE_OP, schedule)
    if schedule != "stream_topk":
        record(BUFFER_OP, nsa_select_triton.buffer_select_for(q, kc, S, sel_block))
    if compiling():
        return torch.ops.sparsezoo.nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, float(scale), lse)
    return _launch(q, kc, S, block_len, stride, sel_block, topk, scale, lse)


def _launch(q: Tensor, kc: Tensor, S: int, block_len: int, stride: int, sel_block: int, topk: int, scale: float,
            lse: Tensor | None) -> Tensor:
    from sparsezoo.kernels import nsa_select_triton

    return nsa_select_triton.nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, scale, lse=lse)


_op = torch.library.custom_op("sparsezoo::nsa_select_triton", _launch, mutates_args=())


@_op.register_fake
def _fake(q, kc, S, block_len, stride, sel_block, topk, scale, lse):
    return q.new_empty((q.shape[0], kc.shape[1], q.shape[2], topk), dtype=torch.int32)
