"""Triton split-K sparse GQA decode attention over a paged KV cache (docs/variants.md, "msa").

Query t of Q new tokens sits at position len - Q + t and attends, exactly, to the tokens s <= pos(t)
of its selected blocks (selection int32 [B, Hkv, Q, k], -1 padded), read through the page table.

1. `_attn_split_kernel`, grid (B * Hkv * Q, n_splits): one program serves all G query heads of a KV
   group for one query, so each selected K/V page is loaded once per group; it covers a slice of the
   selected blocks and writes a normalised partial output and its LSE.
2. `_attn_merge_kernel`, grid (B * Hkv * Q, head groups): LSE-merges the splits into the output (and the
   LSE), every split of a group of heads loaded at once.

Non-finite values (sparsezoo/kernels/nonfinite.py): a program's rows attend to every key it loads (keys past the
query's position are never loaded), so a row is NaN (output and LSE) iff its q, one of its scores or its
accumulator is non-finite; a poisoned split poisons the merged row. Cost: one [G, PAGE] check per block.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparsezoo.kernels.nonfinite import nonfinite_rows, poison, poison_rows, saw_nonfinite
from sparsezoo.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_launch

_LOG2E = 1.4426950408889634
# partial-output elements one merge program loads at once (fp32, 32 per thread at 4 warps): the heads per
# program follow from it and the split count
MERGE_ELEMENTS = 4096


@triton.jit
def _attn_split_kernel(
    q_ptr, k_ptr, v_ptr, pt_ptr, lens_ptr, sel_ptr, po_ptr, plse_ptr,
    stride_qb, stride_qh, stride_qt,
    stride_kp, stride_kh, stride_kt,
    stride_ptb,
    stride_sb, stride_sh, stride_st,
    topk, blocks_per_split, n_splits, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, Q: tl.constexpr, D: tl.constexpr,
    PAGE: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = False,
):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    t = pid % Q
    g = (pid // Q) % HKV
    b = pid // (Q * HKV)
    pos = tl.load(lens_ptr + b) - Q + t

    r = tl.arange(0, BLOCK_G)
    r_ok = r < G
    d = tl.arange(0, D)
    tok = tl.arange(0, PAGE)
    q = tl.load(q_ptr + b * stride_qb + (g * G + r)[:, None] * stride_qh + t * stride_qt + d[None, :],
                mask=r_ok[:, None], other=0.0)
    if PDL:  # q and the lengths are inputs of the step; the selection is the indexer's output
        gdc_wait()
        gdc_launch_dependents()

    bad = nonfinite_rows(q)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    sel_row = sel_ptr + b * stride_sb + g * stride_sh + t * stride_st
    start = s * blocks_per_split
    end = tl.minimum(start + blocks_per_split, topk)
    for i in range(start, end):
        blk = tl.load(sel_row + i)
        valid = blk >= 0
        page = tl.load(pt_ptr + b * stride_ptb + tl.maximum(blk, 0), mask=valid, other=0).to(tl.int64)
        kv_off = page * stride_kp + g * stride_kh + tok[:, None] * stride_kt + d[None, :]
        tok_pos = blk * PAGE + tok  # negative for -1 padding
        ld_ok = (tok_pos <= pos) & (tok_pos >= 0)
        kv_ok = ld_ok[:, None] & (d[None, :] < D)
        k = tl.load(k_ptr + kv_off, mask=kv_ok, other=0.0)
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        bad = bad | saw_nonfinite(qk, ld_ok[None, :])
        qk = tl.where(ld_ok[None, :], qk * qk_scale, float("-inf"))  # log2 domain
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vv = tl.load(v_ptr + kv_off, mask=kv_ok, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
        m_i = m_new

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    bad = bad | nonfinite_rows(o)
    o = poison_rows(o, bad)
    lse2 = poison(tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i))), bad)
    base = (pid * n_splits + s) * BLOCK_G
    tl.store(po_ptr + (base + r)[:, None] * D + d[None, :], o)
    tl.store(plse_ptr + base + r, lse2)


@triton.jit
def _attn_merge_kernel(
    po_ptr, plse_ptr, out_ptr, lse_ptr,
    stride_ob, stride_oh, stride_ot,
    n_splits,
    HKV: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr, Q: tl.constexpr, D: tl.constexpr,
    HM: tl.constexpr, NSP: tl.constexpr, WRITE_LSE: tl.constexpr, PDL: tl.constexpr = False,
):
    """Heads HM * pid(1) + [0, HM) of row pid(0): every split's LSE and partial output in one load round
    ([NSP, HM, D]), so the merge costs one memory latency, not one per split."""
    if PDL:
        gdc_wait()
    pid = tl.program_id(0)
    t = pid % Q
    g = (pid // Q) % HKV
    b = pid // (Q * HKV)
    r = tl.program_id(1) * HM + tl.arange(0, HM)
    sp = tl.arange(0, NSP)
    d = tl.arange(0, D)
    live = sp < n_splits
    at = (pid * n_splits + sp)[:, None] * BLOCK_G + r[None, :]  # [NSP, HM]
    lse_s = tl.load(plse_ptr + at, mask=live[:, None], other=float("-inf"))
    o_s = tl.load(po_ptr + at[:, :, None] * D + d[None, None, :], mask=live[:, None, None], other=0.0)
    bad = tl.max((lse_s != lse_s).to(tl.int32), axis=0) > 0  # a split poisoned the row
    m = tl.max(tl.where(lse_s != lse_s, float("-inf"), lse_s), axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(live[:, None], tl.exp2(lse_s - m_safe[None, :]), 0.0)  # [NSP, HM]
    l = tl.sum(w, axis=0)
    acc = tl.sum(w[:, :, None] * o_s, axis=0)  # [HM, D]
    empty = l == 0.0
    o = poison_rows(acc / tl.where(empty, 1.0, l)[:, None], bad)
    r_ok = r < G
    dst = out_ptr + b * stride_ob + (g * G + r)[:, None] * stride_oh + t * stride_ot + d[None, :]
    tl.store(dst, o.to(out_ptr.dtype.element_ty), mask=r_ok[:, None])
    if WRITE_LSE:
        lse = poison(tl.where(empty, float("-inf"), (m + tl.log2(tl.where(empty, 1.0, l))) / 1.4426950408889634), bad)
        tl.store(lse_ptr + ((b * HKV + g) * G + r) * Q + t, lse, mask=r_ok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def plan_splits(rows: int, topk: int, num_sms: int, programs_per_sm: int = 2) -> tuple[int, int]:
    """(blocks_per_split, n_splits) for `rows` = B * Hkv * Q programs of G heads each."""
    per = max(1, math.ceil(rows * topk / (num_sms * programs_per_sm)))
    per = min(topk, _next_pow2(per))
    return per, math.ceil(topk / per)


def attention_workspace(batch: int, hkv: int, q_len: int, group: int, head_dim: int, n_splits: int, device):
    """Partial outputs and log2-LSEs of the split kernel (fp32)."""
    bg = max(16, _next_pow2(group))
    rows = batch * hkv * q_len
    return (torch.empty((rows, n_splits, bg, head_dim), dtype=torch.float32, device=device),
            torch.empty((rows, n_splits, bg), dtype=torch.float32, device=device))


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                     seq_lens: torch.Tensor, selection: torch.Tensor, *, scale: float, blocks_per_split: int,
                     n_splits: int, out: torch.Tensor, workspace: tuple[torch.Tensor, torch.Tensor],
                     lse: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """q [B, Hq, Q, D]; k/v cache [P, Hkv, page, D]; page_table int32 [B, n_pages]; seq_lens int32 [B]
    (including the Q new tokens); selection int32 [B, Hkv, Q, k]. Writes out [B, Hq, Q, D] (and lse
    [B, Hq, Q], natural log, when given). pdl: both launches are programmatic dependent launches
    (`sparsezoo/kernels/pdl.py`): each may start while the kernel before it runs, and waits for it before reading
    its output. No host syncs: capturable in a CUDA graph."""
    B, Hq, Q, D = q.shape
    _, Hkv, page, _ = k_cache.shape
    G = Hq // Hkv
    topk = selection.shape[-1]
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q and the K/V caches need a unit stride on the last dim")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("the K and V caches must share one layout (strides)")
    if D < 16 or D & (D - 1) or page < 16 or page & (page - 1):
        raise ValueError(f"head dim ({D}) and page size ({page}) must be powers of two >= 16")
    po, plse = workspace
    bg = max(16, _next_pow2(G))
    grid_rows = B * Hkv * Q
    _attn_split_kernel[(grid_rows, n_splits)](
        q, k_cache, v_cache, page_table, seq_lens, selection, po, plse,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        page_table.stride(0),
        selection.stride(0), selection.stride(1), selection.stride(2),
        topk, blocks_per_split, n_splits, scale * _LOG2E,
        HKV=Hkv, G=G, BLOCK_G=bg, Q=Q, D=D, PAGE=page, IEEE=q.dtype == torch.float32,
        num_warps=4, num_stages=2, **pdl_launch(pdl, q.device),
    )
    nsp = _next_pow2(n_splits)
    hm = max(1, min(bg, MERGE_ELEMENTS // (nsp * D)))  # heads per merge program
    _attn_merge_kernel[(grid_rows, bg // hm)](
        po, plse, out, lse if lse is not None else plse,
        out.stride(0), out.stride(1), out.stride(2),
        n_splits,
        HKV=Hkv, G=G, BLOCK_G=bg, Q=Q, D=D, HM=hm, NSP=nsp, WRITE_LSE=lse is not None, num_warps=4,
        **pdl_launch(pdl, q.device),
    )
    return out
