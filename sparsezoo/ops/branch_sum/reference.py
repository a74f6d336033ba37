"""The gated sum as torch ops (the oracle): accumulated in fp32 (fp64 for fp64 inputs), as the kernel does."""

from __future__ import annotations

import torch


def supports(req) -> str | None:
    return None


def run(outs, gates):
    acc_dtype = torch.promote_types(outs[0].dtype, torch.float32)
    acc = None
    for i, o in enumerate(outs):
        term = o.to(acc_dtype) if gates is None else gates[i, ..., None].to(acc_dtype) * o.to(acc_dtype)
        acc = term if acc is None else acc + term
    return acc.to(outs[0].dtype)
