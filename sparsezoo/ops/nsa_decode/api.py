"""nsa_decode: validation and dispatch, and the branch ops it composes where the fused kernels cannot run."""

from __future__ import annotations

import math

import torch

from .. import checks
from ..block_sparse_attention import block_sparse_attention
from ..branch_sum import branch_sum
from ..compressed_attention import compressed_attention
from ..dispatch import Op, Request, needs_grad, record
from ..nsa_select import nsa_select
from ..window_attention import window_attention

OP = Op("nsa_decode", __package__, ("triton", "reference"))
DECODE_T = 4  # the NSA module sends its cached steps of at most this many new queries per request here


def nsa_decode(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               k_win: torch.Tensor, v_win: torch.Tensor, *, block_len: int, stride: int, sel_block: int, topk: int,
               window: int, scale: float | None = None, gates: torch.Tensor | None = None, backend: str = "auto"):
    """NSA's attention of q [B, Hq, T, D] (the last T of S = k.shape[2] positions), as the NSA module computes
    it: compressed_attention over kc, vc [B, Hkv, Sc, D] (with its LSE), nsa_select from it, block_sparse_attention
    over the selected blocks of k, v [B, Hkv, S, D] and window_attention over k_win, v_win [B, Hkv, S, D], summed
    with gates [3, B, Hq, T] (compressed, selected, window; None: unit gates).

    Returns (out [B, Hq, T, D], selection int32 [B, Hkv, T, topk] in the selection format).
    auto: the fused Triton decode kernels (CUDA, T <= DECODE_T, no gradient: decode is inference-only), else
    the four branch ops one after another, each under auto; reference: the branch ops' references."""
    B, Hq, Hkv, T, S, D = checks.check_qkv(q, k, v)
    checks.check_qkv(q, k_win, v_win)
    checks.check_keys(q, kc, vc)
    if k_win.shape != k.shape or kc.shape[1] != Hkv:
        raise ValueError(f"k_win, v_win must match k {tuple(k.shape)} and kc, vc have Hkv={Hkv} heads; got "
                         f"{tuple(k_win.shape)} and {tuple(kc.shape)}")
    for name, value in (("block_len", block_len), ("stride", stride), ("sel_block", sel_block), ("topk", topk),
                        ("window", window)):
        checks.check_positive_int(name, value)
    if gates is not None and (gates.shape != (3, B, Hq, T) or not gates.is_floating_point() or gates.device != q.device):
        raise ValueError(f"gates must be a float [3, B, Hq, T] = {(3, B, Hq, T)} tensor on {q.device}, got "
                         f"{tuple(gates.shape)} {gates.dtype} on {gates.device}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    req = Request.of(q, needs_grad(q, kc, vc, k, v, k_win, v_win, gates), queries=T, block_len=block_len,
                     stride=stride, sel_block=sel_block, topk=topk, window=window, group=Hq // Hkv, head_dim=D)
    args = (q, kc, vc, k, v, k_win, v_win, block_len, stride, sel_block, topk, window, scale, gates)
    impl = OP.choose(backend, req)
    if backend == "auto" and impl == "reference":  # the fused kernels cannot run: the branch ops' fast paths
        record(OP.name, "branch_ops")  # each branch op records its own implementation too
        return branch_ops(*args, backend="auto")
    return OP.run(impl, req, *args)


def branch_ops(q, kc, vc, k, v, k_win, v_win, block_len: int, stride: int, sel_block: int, topk: int, window: int,
               scale: float, gates, backend: str):
    """The four branch ops, each under `backend` ('auto' or 'reference'); the selection reuses the compressed
    branch's LSE."""
    S = k.shape[2]
    o_cmp, lse = compressed_attention(q, kc, vc, S=S, block_len=block_len, stride=stride, scale=scale,
                                      return_lse=True, backend=backend)
    sel = nsa_select(q.detach(), kc.detach(), S=S, block_len=block_len, stride=stride, sel_block=sel_block,
                     topk=topk, scale=scale, lse=lse, backend=backend)
    o_slc = block_sparse_attention(q, k, v, sel, block_size=sel_block, scale=scale, backend=backend)
    o_win = window_attention(q, k_win, v_win, window=window, scale=scale, backend=backend)
    return branch_sum([o_cmp, o_slc, o_win], gates, backend=backend), sel
