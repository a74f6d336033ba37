"""DSA/CSA indexer KL over gathered tokens (Triton): the loss and its gradients w.r.t. q_i, w and k_i.

Same semantics as sparsezoo.ops.index_kl.dsa_reference. For each (batch, selection head s, query t) and its
key set M (the ids idx[b, s, t] >= 0; with idx None every key n with key_end[n] <= the query's position):
- teacher P over M: the main attention softmax(scale * q_h . k_n) of each query head h that shares s (head
  h reads KV head h // (Hq / Hkv)), averaged over those heads (detached);
- student Q over M: softmax of z_n = z_scale * sum_j w_j relu(q_i[j] . k_i[n]), z_scale = index_scale / T;
- loss = coeff * mean over (b, s, t) of KL(P || Q); a query with an empty M adds nothing.
d loss / d z_n = coeff / (B * Hs * T) * (Q_n * sum(P) - P_n).

One program per (query, selection head, batch), two passes over M in tiles of BN ids: pass 1 finds each
teacher row's and the student's max and normaliser (online, base 2), pass 2 the loss and, with WITH_GRAD,
the gradients: dq_i and dw accumulate in registers and are stored once; dk_i is scattered into an fp32
[B, N, D_i] buffer with one atomic add per gathered row element (run-to-run nondeterministic in the last
bits). Rows of the teacher tile are the Gs = Hq / Hs query heads of the selection head, padded to BM >= 16;
with one selection head for several KV heads, each tile's scores are computed once per KV head and each row
keeps its own. Ids outside [0, N) are masked (never read). Memory: O(inputs); nothing of size T x N.
Non-finite values: a query whose attended teacher scores or student logits hold a NaN/inf makes the loss
NaN, as the reference's does (a max on the GPU may drop a NaN: the relu keeps it, and the kernel checks the scores before any max);
keys no query attends to change nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsezoo.kernels.sizes import pow2 as _pow2

LOG2E = 1.4426950408889634
CONFIG = {"BN": 32, "num_warps": 4, "num_stages": 2}


@triton.jit
def _slot_ids(IDX, KEY_END, idx_base, sik, n0, pos, N, K, BN: tl.constexpr, DENSE: tl.constexpr):
    """The tile's key ids and which of them count (masked ids are clamped to 0 and never used)."""
    slot = n0 + tl.arange(0, BN)
    if DENSE:
        ids = slot
        ok = slot < N
        ok = ok & (tl.load(KEY_END + ids, mask=ok, other=0) <= pos)
    else:
        ids = tl.load(IDX + idx_base + slot * sik, mask=slot < K, other=-1)
        ok = (ids >= 0) & (ids < N)
    return tl.where(ok, ids, 0), ok


@triton.jit
def _teacher_scores(Q_rows, KP, k_base, skh, skn, skd, ids, ok, row_kv, kv0, d, D: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, KV_PER_SEL: tl.constexpr, PREC: tl.constexpr):
    """[BM, BN] scores q_h . k[kv(h), id] (unscaled) for the tile's ids."""
    s = tl.zeros([BM, BN], tl.float32)
    for c in tl.static_range(KV_PER_SEL):
        kt = tl.load(KP + k_base + (kv0 + c) * skh + ids[None, :] * skn + d[:, None] * skd,
                     mask=ok[None, :] & (d[:, None] < D), other=0.0)  # [BD, BN]
        sc = tl.dot(Q_rows, kt, input_precision=PREC)
        s = tl.where(row_kv[:, None] == c, sc, s)
    return s


@triton.jit
def _student_dots(QI_rows, KIP, ki_base, skin, skid, ids, ok, di, DI: tl.constexpr, PREC: tl.constexpr):
    """[BJ, BN] dots q_i[j] . k_i[id], and the gathered k_i tile [BN, BDI]."""
    ki = tl.load(KIP + ki_base + ids[:, None] * skin + di[None, :] * skid,
                 mask=ok[:, None] & (di[None, :] < DI), other=0.0)
    return tl.dot(QI_rows, tl.trans(ki), input_precision=PREC), ki


@triton.jit
def _kl_gather_kernel(Q, KP, QI, W, KIP, KEY_END, IDX, LOSS, DQI, DW, DKI,
                      T, S, N, K, qk_scale, z_scale, gscale,
                      sqb, sqh, sqt, sqd, skb, skh, skn, skd,
                      sib, sih, sit, sij, sid, swb, swh, swt, swj, skib, skin, skid,
                      sxb, sxh, sxt, sxk, slb, slh, slt,
                      GS: tl.constexpr, KV_PER_SEL: tl.constexpr, G: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, J: tl.constexpr, BJ: tl.constexpr,
                      DI: tl.constexpr, BDI: tl.constexpr, DENSE: tl.constexpr, WITH_GRAD: tl.constexpr,
                      PREC: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    pos = S - T + t
    r = tl.arange(0, BM)
    row_ok = r < GS
    head = (s * GS + r).to(tl.int64)  # the query heads of selection head s (int64: head * stride may pass 2^31)
    row_kv = (s * GS + r) // G - s * KV_PER_SEL  # each row's KV head, relative to the selection head's first
    kv0 = (s * KV_PER_SEL).to(tl.int64)
    d = tl.arange(0, BD)
    q_rows = tl.load(Q + b * sqb + head[:, None] * sqh + t * sqt + d[None, :] * sqd,
                     mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    j = tl.arange(0, BJ)
    di = tl.arange(0, BDI)
    qi_base = b * sib + s * sih + t * sit
    qi_rows = tl.load(QI + qi_base + j[:, None] * sij + di[None, :] * sid,
                      mask=(j[:, None] < J) & (di[None, :] < DI), other=0.0)
    w_base = b * swb + s * swh + t * swt
    w = tl.load(W + w_base + j * swj, mask=j < J, other=0.0).to(tl.float32)
    k_base = b * skb
    ki_base = b * skib
    idx_base = b * sxb + s * sxh + t * sxt
    n_slots = N if DENSE else K
    # pass 1: per teacher row and for the student, max and normaliser (base 2)
    m_t = tl.zeros([BM], tl.float32) + float("-inf")
    l_t = tl.zeros([BM], tl.float32)
    m_s = tl.full([], float("-inf"), tl.float32)
    l_s = tl.full([], 0.0, tl.float32)
    bad = tl.full([], 0, tl.int32)  # an attended teacher score or student logit is NaN/inf: the loss is NaN
    for n0 in range(0, n_slots, BN):
        ids, ok = _slot_ids(IDX, KEY_END, idx_base, sxk, n0, pos, N, K, BN, DENSE)
        st = _teacher_scores(q_rows, KP, k_base, skh, skn, skd, ids, ok, row_kv, kv0, d, D, BM, BN,
                             KV_PER_SEL, PREC) * qk_scale
        seen = row_ok[:, None] & ok[None, :]
        bad = tl.maximum(bad, tl.max(tl.max((seen & ~(tl.abs(st) < float("inf"))).to(tl.int32), 1), 0))
        st = tl.where(ok[None, :], st, float("-inf"))
        m_new = tl.maximum(m_t, tl.max(st, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_t = l_t * tl.exp2(m_t - m_use) + tl.sum(tl.exp2(st - m_use[:, None]), 1)
        m_t = m_new
        dots, ki = _student_dots(qi_rows, KIP, ki_base, skin, skid, ids, ok, di, DI, PREC)
        z = tl.sum(tl.maximum(dots, 0.0, propagate_nan=tl.PropagateNan.ALL) * w[:, None], 0) * (z_scale * 1.4426950408889634)
        bad = tl.maximum(bad, tl.max((ok & ~(tl.abs(z) < float("inf"))).to(tl.int32), 0))
        z = tl.where(ok, z, float("-inf"))
        ms_new = tl.maximum(m_s, tl.max(z, 0))
        ms_use = tl.where(ms_new == float("-inf"), 0.0, ms_new)
        l_s = l_s * tl.exp2(m_s - ms_use) + tl.sum(tl.exp2(z - ms_use), 0)
        m_s = ms_new
    lse_t = tl.where(l_t > 0, m_t + tl.log2(tl.where(l_t > 0, l_t, 1.0)), 0.0)  # no key: p is 0 below
    lse_s = tl.where(l_s > 0, m_s + tl.log2(tl.where(l_s > 0, l_s, 1.0)), 0.0)
    valid_rows = row_ok & (l_t > 0)
    n_rows = tl.sum(valid_rows.to(tl.float32), 0)
    inv_rows = tl.where(n_rows > 0, 1.0 / tl.maximum(n_rows, 1.0), 0.0)
    # pass 2: teacher p (mean over the rows), student log q, the loss and the gradients
    kl = tl.full([], 0.0, tl.float32)
    dqi = tl.zeros([BJ, BDI], tl.float32)
    dw = tl.zeros([BJ], tl.float32)
    for n0 in range(0, n_slots, BN):
        ids, ok = _slot_ids(IDX, KEY_END, idx_base, sxk, n0, pos, N, K, BN, DENSE)
        st = _teacher_scores(q_rows, KP, k_base, skh, skn, skd, ids, ok, row_kv, kv0, d, D, BM, BN,
                             KV_PER_SEL, PREC) * qk_scale
        pt = tl.where(valid_rows[:, None] & ok[None, :], tl.exp2(st - lse_t[:, None]), 0.0)
        p = tl.sum(pt, 0) * inv_rows  # [BN]
        dots, ki = _student_dots(qi_rows, KIP, ki_base, skin, skid, ids, ok, di, DI, PREC)
        relu = tl.maximum(dots, 0.0, propagate_nan=tl.PropagateNan.ALL)
        z2 = tl.sum(relu * w[:, None], 0) * (z_scale * 1.4426950408889634)
        log_q = (z2 - lse_s) * 0.6931471805599453  # natural log
        log_q = tl.where(ok, log_q, 0.0)
        log_p = tl.log(tl.where(p > 0, p, 1.0))
        kl += tl.sum(tl.where(ok & (p > 0), p * (log_p - log_q), 0.0), 0)
        if WITH_GRAD:
            qn = tl.where(ok, tl.exp(log_q), 0.0)
            g = (qn * (n_rows > 0).to(tl.float32) - p) * gscale  # d loss / d (sum_j w_j relu), per slot
            dw += tl.sum(relu * g[None, :], 1)
            a = tl.where(dots > 0, w[:, None] * g[None, :], 0.0)  # [BJ, BN]
            dqi += tl.dot(a, ki.to(tl.float32), input_precision=PREC)
            dk = tl.dot(tl.trans(a), qi_rows.to(tl.float32), input_precision=PREC)  # [BN, BDI]
            tl.atomic_add(DKI + b * N * DI + ids[:, None] * DI + di[None, :], dk,
                          mask=ok[:, None] & (di[None, :] < DI))
    tl.store(LOSS + b * slb + s * slh + t * slt, tl.where(bad > 0, float("nan"), kl))
    if WITH_GRAD:
        tl.store(DQI + qi_base + j[:, None] * sij + di[None, :] * sid, dqi,
                 mask=(j[:, None] < J) & (di[None, :] < DI))
        tl.store(DW + w_base + j * swj, dw, mask=j < J)


def index_kl_gather_forward(q, k, q_i, w, k_i, key_end, idx, S: int, scale: float, index_scale: float,
                            coeff: float, temperature: float, with_grad: bool, config=None):
    """(loss fp32 scalar, dq_i, dw, dk_i fp32 or None). q [B, Hq, T, D], k [B, Hkv, N, D], q_i
    [B, Hs, T, J, D_i], w [B, Hs, T, J], k_i [B, N, D_i], key_end [N], idx int32 [B, Hs, T, K] or None."""
    cfg = {**CONFIG, **(config or {})}
    B, Hq, T, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    Hs, J, DI = q_i.shape[1], q_i.shape[3], q_i.shape[4]
    if Hq % Hkv or Hs not in (1, Hkv):
        raise ValueError(f"need Hq % Hkv == 0 and Hs in (1, Hkv); got Hq {Hq}, Hkv {Hkv}, Hs {Hs}")
    GS, G = Hq // Hs, Hq // Hkv
    dense = idx is None
    if dense:
        idx = key_end.new_zeros((1, 1, 1, 1), dtype=torch.int32)
    elif idx.dtype != torch.int32:
        raise ValueError(f"idx must be int32, got {idx.dtype}")
    K = 0 if dense else idx.shape[-1]
    key_end = key_end.to(torch.int64).contiguous()
    k_i = k_i.contiguous()
    z_scale = index_scale / temperature
    gscale = coeff * z_scale / (B * Hs * T)  # d loss / d (z / z_scale) per (Q - P)
    loss_parts = torch.empty((B, Hs, T), dtype=torch.float32, device=q.device)
    if with_grad:
        dqi = torch.empty(q_i.shape, dtype=torch.float32, device=q.device)
        dw = torch.empty(w.shape, dtype=torch.float32, device=q.device)
        dki = torch.zeros(k_i.shape, dtype=torch.float32, device=q.device)
        q_i, w = q_i.contiguous(), w.contiguous()
    else:
        dqi = dw = dki = loss_parts
    interpreted = q.device.type == "cpu"
    BM = max(16, _pow2(GS))
    BN = 16 if interpreted else cfg["BN"]
    _kl_gather_kernel[(T, Hs, B)](
        q, k, q_i, w, k_i, key_end, idx, loss_parts, dqi, dw, dki,
        T, S, N, K, scale * LOG2E, z_scale, gscale,
        *q.stride(), *k.stride(), *q_i.stride(), *w.stride(), *k_i.stride(), *idx.stride(),
        *loss_parts.stride(),
        GS=GS, KV_PER_SEL=Hkv // Hs, G=G, BM=BM, BN=BN, D=D, BD=max(16, _pow2(D)), J=J, BJ=max(16, _pow2(J)),
        DI=DI, BDI=max(16, _pow2(DI)), DENSE=dense, WITH_GRAD=with_grad,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",  # exact fp32 dots for fp32 inputs
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    loss = coeff * loss_parts.sum() / (B * Hs * T)
    if not with_grad:
        return loss, None, None, None
    return loss, dqi, dw, dki


class _GatherKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_i, w, k_i, q, k, key_end, idx, S, scale, index_scale, coeff, temperature, config):
        with_grad = any(ctx.needs_input_grad[:3])
        loss, dqi, dw, dki = index_kl_gather_forward(q, k, q_i, w, k_i, key_end, idx, S, scale, index_scale,
                                                     coeff, temperature, with_grad, config)
        if with_grad:
            ctx.save_for_backward(dqi, dw, dki)
        ctx.dtypes = (q_i.dtype, w.dtype, k_i.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        dqi, dw, dki = ctx.saved_tensors
        return ((dqi * grad).to(ctx.dtypes[0]), (dw * grad).to(ctx.dtypes[1]), (dki * grad).to(ctx.dtypes[2]),
                *([None] * 10))


def index_kl_gather_triton(q, k, q_i, w, k_i, key_end, idx, S: int, scale: float, index_scale: float,
                           coeff: float = 1.0, temperature: float = 1.0, config=None):
    """The indexer KL (scalar fp32), differentiable w.r.t. q_i, w and k_i only (q, k: the detached teacher).
    The gradients are computed in the forward pass and scaled by the incoming gradient in the backward."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if q.dtype == torch.float64:
        raise ValueError("the Triton indexer KL runs fp32/fp16/bf16; use the reference for fp64")
    return _GatherKL.apply(q_i, w, k_i, q.detach(), k.detach(), key_end, idx, int(S), float(scale),
                           float(index_scale), float(coeff), float(temperature), config)
