"""Plain-PyTorch NSA selection (the oracle), chunked over queries."""

from __future__ import annotations

import math

import torch

from ..common import chunk_len, compute_dtype, masked_softmax_lse, nan_first, query_positions
from ..compressed_attention import compressed_visible


def supports(req) -> str | None:
    return None


def nsa_select_reference(q, kc, S: int, block_len: int, stride: int, sel_block: int, topk: int,
                         scale: float, lse=None) -> torch.Tensor:
    """The oracle: computes the compressed-attention probabilities itself (a given lse is ignored)."""
    B, Hq, T, D = q.shape
    Hkv, Sc = kc.shape[1], kc.shape[2]
    G = Hq // Hkv
    n_blocks = math.ceil(S / sel_block)
    dt = compute_dtype(q)
    qg, kf = q.to(dt).view(B, Hkv, G, T, D), kc.to(dt)
    out = torch.empty((B, Hkv, T, topk), dtype=torch.int32, device=q.device)
    step = chunk_len(B * Hq * max(Sc, n_blocks), T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        pos = query_positions(T, S, t0, t1, q.device)
        imp = q.new_zeros((B, Hkv, t1 - t0, n_blocks), dtype=dt)
        if Sc:
            ok = compressed_visible(pos, Sc, block_len, stride)
            s = torch.einsum("bhgtd,bhsd->bhgts", qg[:, :, :, t0:t1], kf) * scale
            p = torch.where(ok, masked_softmax_lse(s, ok)[0], 0.0).sum(2)  # [B, Hkv, Tc, Sc], summed over the group
            imp = add_overlaps(imp, p, block_len, stride, sel_block)
        out[:, :, t0:t1] = select_with_forced_blocks(imp, pos, sel_block, topk)
    return out


def add_overlaps(imp: torch.Tensor, p: torch.Tensor, block_len: int, stride: int, sel_block: int) -> torch.Tensor:
    """imp[..., j] += sum of p[..., i] over compressed entries i overlapping selection block j."""
    n_blocks, Sc = imp.shape[-1], p.shape[-1]
    start = torch.arange(Sc, device=p.device) * stride
    first = start // sel_block
    last = (start + block_len - 1) // sel_block
    for o in range((block_len - 1) // sel_block + 2):  # an entry spans at most this many blocks
        j = first + o
        keep = (j <= last) & (j < n_blocks)  # added as 0 where not kept: no boolean indexing (compiles whole)
        imp = imp.index_add(-1, j.clamp(max=n_blocks - 1), p * keep.to(p.dtype))
    return imp


def select_with_forced_blocks(imp: torch.Tensor, pos: torch.Tensor, sel_block: int, topk: int) -> torch.Tensor:
    """imp [..., Tc, n_blocks] -> int32 [..., Tc, topk]: forced blocks first, then by score; -1 pad."""
    n_blocks = imp.shape[-1]
    local = pos // sel_block
    ids = torch.arange(n_blocks, device=imp.device)[None, :]
    forced = (ids == 0) | (ids == local[:, None]) | (ids == local[:, None] - 1)
    # a NaN importance ranks first among the candidates (the forced blocks, at +inf, stay before it)
    imp = nan_first(imp, torch.finfo(imp.dtype).max)
    imp = imp.masked_fill(forced, float("inf")).masked_fill(ids > local[:, None], float("-inf"))
    n = min(topk, n_blocks)
    order = torch.sort(imp, dim=-1, descending=True, stable=True).indices[..., :n]
    n_valid = torch.clamp(local + 1, max=topk)
    keep = torch.arange(n, device=imp.device)[None, :] < n_valid[:, None]
    out = torch.full((*imp.shape[:-1], topk), -1, dtype=torch.int32, device=imp.device)
    out[..., :n] = torch.where(keep, order, -1).to(torch.int32)
    return out


run = nsa_select_reference
