"""The gated sum in one pass through sparsezoo.kernels.branch_sum_triton (forward and backward)."""

from __future__ import annotations


def supports(req) -> str | None:  # fp64: the rule shared by every Triton implementation (dispatch.platform_reason)
    if req.get("contiguous") is False:
        return "the Triton kernel reads contiguous branch outputs"
    if req.get("compiling"):
        return "under torch.compile the reference's torch ops fuse into one kernel"
    return None


def run(outs, gates):
    from sparsezoo.kernels import branch_sum_triton

    return branch_sum_triton.branch_sum_triton(outs, gates)
