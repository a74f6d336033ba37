"""branch_sum: validation and dispatch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..dispatch import Op, Request, compiling, needs_grad

OP = Op("branch_sum", __package__, ("triton", "reference"))
MAX_BRANCHES = 4


def branch_sum(outs: Sequence[torch.Tensor], gates: torch.Tensor | None = None, *,
               backend: str = "auto") -> torch.Tensor:
    """sum_i gates[i] * outs[i]: outs are 1 to 4 tensors [B, H, T, D] of one shape and dtype; gates [N, B, H, T]
    (one gate per branch and row, any float dtype and strides) or None for unit gates. The result has the outs'
    dtype. Differentiable w.r.t. outs and gates."""
    outs = list(outs)
    if not 1 <= len(outs) <= MAX_BRANCHES:
        raise ValueError(f"branch_sum takes 1 to {MAX_BRANCHES} branch outputs, got {len(outs)}")
    first = outs[0]
    if first.dim() != 4 or not first.is_floating_point():
        raise ValueError(f"branch outputs must be float [B, H, T, D] tensors, got {tuple(first.shape)} {first.dtype}")
    for i, o in enumerate(outs[1:], 1):
        if o.shape != first.shape or o.dtype != first.dtype or o.device != first.device:
            raise ValueError(f"branch output {i} is {tuple(o.shape)} {o.dtype} on {o.device}; branch 0 is "
                             f"{tuple(first.shape)} {first.dtype} on {first.device}")
    if gates is not None and (tuple(gates.shape) != (len(outs), *first.shape[:3]) or not gates.is_floating_point()
                              or gates.device != first.device):
        raise ValueError(f"gates must be a float [N, B, H, T] = {(len(outs), *first.shape[:3])} tensor on "
                         f"{first.device}, got {tuple(gates.shape)} {gates.dtype} on {gates.device}")
    req = Request.of(first, needs_grad(*outs, gates), contiguous=all(o.is_contiguous() for o in outs),
                     compiling=compiling())
    return OP.run(backend, req, outs, gates)
