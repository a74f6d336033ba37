"""nsa_decode through the branch ops' plain-PyTorch references (the oracle): any T, fp64, autograd."""

from __future__ import annotations

from .api import branch_ops


def supports(req) -> str | None:
    return None


def run(q, kc, vc, k, v, k_win, v_win, block_len: int, stride: int, sel_block: int, topk: int, window: int,
        scale: float, gates=None):
    return branch_ops(q, kc, vc, k, v, k_win, v_win, block_len, stride, sel_block, topk, window, scale, gates,
                      backend="reference")
