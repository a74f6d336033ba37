"""The gated sum in one pass through sparsezoo.kernels.branch_sum_triton (forward and backward)."""

from __future__ import annotations

import torch


def supports(req) -> str | None:
    if req.dtype == torch.float64:
        return "the Triton kernel runs fp32/fp16/bf16; use backend='reference' for fp64"
    if req.get("contiguous") is False:
        return "the Triton kernel reads contiguous branch outputs"
    if req.get("compiling"):
        return "under torch.compile the reference's torch ops fuse into one kernel"
    return None


def run(outs, gates):
    from sparsezoo.kernels import branch_sum_triton

    return branch_sum_triton.branch_sum_triton(outs, gates)
