"""MSA index-branch sparse KL (Triton): loss and its gradients w.r.t. q_idx and k_idx.

Same semantics as the reference in sparsezoo.ops.index_kl.msa_reference. Teacher P = group-mean main
attention over the selected tokens M (detached, from the main LSE); student Q = softmax over M of
z = index_scale / temperature * q_idx.k_idx. d loss / d z = coeff * (Q - P) / (B * H_i * T).

Two kernels on the attention's tiling (TM <= 16 tokens x G heads per tile, so the token bitmasks of the union):
- query-major: pass 1 computes the index LSE over M, pass 2 the loss and dq_idx;
- key-major (per key block, the tiles that chose it): dk_idx, one fp32 atomic add per segment.
The teacher needs the main scores per (token, head) row, as in the attention, and its group mean is a
reshape-sum in registers; everything of the student (index logits, its softmax, the loss, dz) is per
token: the tile's TM tokens sit at rows 0, R, 2R, ... of a TI = max(TM, 16)-row index tile (R = TI / TM;
the rows between are 0), so the index dots are TI rows instead of TM * G, and the exponentials and logs
of the student and the loss run once per token instead of G times. Memory: O(inputs), never O(T*S).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsezoo.kernels import sparse_attention_triton as sat


@triton.jit
def _per_token(x, TM: tl.constexpr, R: tl.constexpr, N: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """[TM * R, N] -> [TM, N] (TRANSPOSED: [N, TM * R] -> [N, TM]): the sum over each token's R rows (the
    G heads of the teacher's rows; or the R rows of an index tile, where only the lead row is not 0)."""
    if R == 1:
        return x
    elif TRANSPOSED:
        return tl.sum(tl.reshape(x, [N, TM, R]), axis=2)
    else:
        return tl.sum(tl.reshape(x, [TM, R, N]), axis=1)


@triton.jit
def _lead_rows(x, TM: tl.constexpr, R: tl.constexpr, N: tl.constexpr):
    """[TM, N] -> [TM * R, N]: each token's values on its lead row, 0 on the others."""
    if R == 1:
        return x
    else:
        lead = (tl.arange(0, R) == 0)[None, :, None]
        return tl.reshape(tl.where(lead, tl.broadcast_to(x[:, None, :], [TM, R, N]), 0.0), [TM * R, N])


@triton.jit
def _every_row_t(xt, TM: tl.constexpr, R: tl.constexpr, N: tl.constexpr):
    """[N, TM] -> [N, TM * R], each token's column repeated on its R rows (for a dot with the index
    rows, whose non-lead rows are 0)."""
    if R == 1:
        return xt
    else:
        return tl.reshape(tl.broadcast_to(xt[:, :, None], [N, TM, R]), [N, TM * R])


@triton.jit
def _index_rows(TOK, QI, tok_base, b, g, T, sib, sih, sit, sid, di, DI: tl.constexpr, TM: tl.constexpr,
                TI: tl.constexpr):
    """The tile's index queries for the tensor cores: token i of the tile at row i * (TI // TM) of a TI-row
    tile (TI >= 16, what a dot needs), the other rows 0, so a dot's row sums per token are exact."""
    R: tl.constexpr = TI // TM
    ri = tl.arange(0, TI)
    lead = (ri % R) == 0
    t = tl.load(TOK + tok_base + ri // R, mask=lead, other=T)
    return sat._load_rows(QI, b * sib + g * sih + t.to(tl.int64) * sit, di, sid, lead & (t < T), DI)


@triton.jit
def _tile_tokens(TOK, tok_base, T, S, TM: tl.constexpr):
    """(token slot, token, valid, position) of the tile's TM tokens."""
    tt = tl.arange(0, TM)
    t = tl.load(TOK + tok_base + tt)
    return tt, t.to(tl.int64), t < T, S - T + t


@triton.jit
def _kl_query_kernel(Q, K, QI, KI, L, LQ, DQI, LOSS, TOK, CNT, IDS, BITS, T, S, qk_scale, z_scale, gscale,
                     sqb, sqh, sqt, sqd, skb, skh, sks, skd, sib, sih, sit, sid, sjb, sjs, sjd,
                     slb, slh, slt, sab, sah, sat_, scb, sch, sct,
                     TM: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr,
                     BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, DI: tl.constexpr,
                     BDI: tl.constexpr, TI: tl.constexpr, WITH_GRAD: tl.constexpr):
    """The teacher (main attention) per (token, head) row; the student and the loss per token."""
    R: tl.constexpr = TI // TM
    n_tiles = tl.num_programs(0)
    tile = n_tiles - 1 - tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2)
    bg = b * tl.num_programs(1) + g
    tok_base = (bg * n_tiles + tile) * TM
    tl_tok, head, t, row_ok, pos = sat._row_setup(TOK, bg, n_tiles, tile, g, T, S, TM, G, BM)
    tt, t_tok, tok_ok, pos_tok = _tile_tokens(TOK, tok_base, T, S, TM)
    d = tl.arange(0, BD)
    di = tl.arange(0, BDI)
    q = sat._load_rows(Q, b * sqb + head * sqh + t * sqt, d, sqd, row_ok, D)
    qi = _index_rows(TOK, QI, tok_base, b, g, T, sib, sih, sit, sid, di, DI, TM, TI)
    lse2 = tl.load(L + b * slb + head * slh + t * slt, mask=row_ok, other=0.0) * 1.4426950408889634
    u_base = b * scb + g * sch + tile * sct
    n_u = tl.load(CNT + bg * n_tiles + tile)
    kn = tl.arange(0, BN)
    # pass 1: index LSE over M (natural log), per token
    m_i = tl.zeros([TM], tl.float32) + float("-inf")
    l_i = tl.zeros([TM], tl.float32)
    for i in range(0, n_u):
        u = tl.load(IDS + u_base + i)
        chose = sat._chose(BITS, u_base + i, tt)
        for sub in tl.static_range(BLOCK // BN):
            keys = u * BLOCK + sub * BN + kn
            kmask = keys < S
            ki = sat._load_rows(KI, b * sjb + keys * sjs, di, sjd, kmask, DI)
            z = _per_token(tl.dot(qi, tl.trans(ki)), TM, R, BN) * z_scale
            z = tl.where(sat._visible(chose, tok_ok, pos_tok, keys, kmask), z, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(z, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(z - m_use[:, None]), axis=1)
            m_i = m_new
    lq = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(LQ + b * sab + g * sah + t_tok * sat_, lq, mask=tok_ok)
    lq_use = tl.where(l_i > 0, lq, 0.0)
    # pass 2: loss and dq_idx
    loss = tl.zeros([TM], tl.float32)
    dqi = tl.zeros([TI, BDI], tl.float32)
    for i in range(0, n_u):
        u = tl.load(IDS + u_base + i)
        member = sat._chose(BITS, u_base + i, tl_tok)
        chose = sat._chose(BITS, u_base + i, tt)
        for sub in tl.static_range(BLOCK // BN):
            keys = u * BLOCK + sub * BN + kn
            kmask = keys < S
            kt = sat._load_rows(K, b * skb + g * skh + keys * sks, d, skd, kmask, D)
            ki = sat._load_rows(KI, b * sjb + keys * sjs, di, sjd, kmask, DI)
            p = tl.where(sat._visible(member, row_ok, pos, keys, kmask),
                         tl.exp2(tl.dot(q, tl.trans(kt)) * qk_scale - lse2[:, None]), 0.0)
            p = _per_token(p, TM, G, BN) / G  # the group mean
            ok = sat._visible(chose, tok_ok, pos_tok, keys, kmask)
            log_q = _per_token(tl.dot(qi, tl.trans(ki)), TM, R, BN) * z_scale - lq_use[:, None]
            qq = tl.where(ok, tl.exp(log_q), 0.0)
            loss += tl.sum(tl.where(ok & (p > 0), p * (tl.log(tl.where(p > 0, p, 1.0)) - log_q), 0.0), axis=1)
            if WITH_GRAD:
                dqi += tl.dot(_lead_rows((qq - p) * gscale, TM, R, BN).to(ki.dtype), ki)
    tl.store(LOSS + bg * n_tiles + tile, tl.sum(loss))
    if WITH_GRAD:
        dqi_tok = _per_token(dqi, TM, R, BDI)  # [TM, BDI]
        tl.store(DQI + b * sib + g * sih + t_tok[:, None] * sit + di[None, :] * sid, dqi_tok,
                 mask=tok_ok[:, None] & (di[None, :] < DI))


@triton.jit
def _kl_key_kernel(Q, K, QI, KI, L, LQ, DKI, TOK, ITEMS, ILEN, ETILE, EBITS, T, S, HKV, NT, qk_scale, z_scale, gscale,
                   sqb, sqh, sqt, sqd, skb, skh, sks, skd, sib, sih, sit, sid, sjb, sjs, sjd,
                   slb, slh, slt, sab, sah, sat_,
                   TM: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr,
                   BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, DI: tl.constexpr,
                   BDI: tl.constexpr, TI: tl.constexpr):
    R: tl.constexpr = TI // TM
    bh, u, start, n, b, g = sat._key_item(ITEMS, ILEN, HKV)
    sub = tl.program_id(1)
    d = tl.arange(0, BD)
    di = tl.arange(0, BDI)
    keys = u * BLOCK + sub * BN + tl.arange(0, BN)
    kmask = keys < S
    kt = sat._load_rows(K, b * skb + g * skh + keys * sks, d, skd, kmask, D)
    ki = sat._load_rows(KI, b * sjb + keys * sjs, di, sjd, kmask, DI)
    dki = tl.zeros([BN, BDI], tl.float32)
    for i in range(0, n):
        tile = tl.load(ETILE + start + i)
        tok_base = (bh * NT + tile) * TM
        tl_tok, head, t, row_ok, pos = sat._row_setup(TOK, bh, NT, tile, g, T, S, TM, G, BM)
        tt, t_tok, tok_ok, pos_tok = _tile_tokens(TOK, tok_base, T, S, TM)
        q = sat._load_rows(Q, b * sqb + head * sqh + t * sqt, d, sqd, row_ok, D)
        qi = _index_rows(TOK, QI, tok_base, b, g, T, sib, sih, sit, sid, di, DI, TM, TI)
        lse2 = tl.load(L + b * slb + head * slh + t * slt, mask=row_ok, other=0.0) * 1.4426950408889634
        lq = tl.load(LQ + b * sab + g * sah + t_tok * sat_, mask=tok_ok, other=0.0)
        pt = tl.where(sat._visible_t(sat._chose(EBITS, start + i, tl_tok), row_ok, pos, keys, kmask),
                      tl.exp2(tl.dot(kt, tl.trans(q)) * qk_scale - lse2[None, :]), 0.0)
        pt = _per_token(pt, TM, G, BN, TRANSPOSED=True) / G
        ok = sat._visible_t(sat._chose(EBITS, start + i, tt), tok_ok, pos_tok, keys, kmask)
        zt = _per_token(tl.dot(ki, tl.trans(qi)), TM, R, BN, TRANSPOSED=True) * z_scale
        qt = tl.where(ok, tl.exp(zt - lq[None, :]), 0.0)
        dki += tl.dot(_every_row_t((qt - pt) * gscale, TM, R, BN).to(qi.dtype), qi)
    tl.atomic_add(DKI + b * sjb + keys[:, None] * sjs + di[None, :] * sjd, dki,
                  mask=kmask[:, None] & (di[None, :] < DI))


def _check_group(G: int) -> None:
    if G & (G - 1):
        raise ValueError(f"the triton sparse KL needs a power-of-two group size Hq/Hkv, got {G}; "
                         f"use sparsezoo.ops.msa_index_kl (reference)")


def index_kl_forward(q, k, q_idx, k_idx, block_idx, block_size, scale, index_scale, coeff, temperature,
                     main_lse=None, with_grad=True, config=None):
    """Returns (loss scalar fp32, index LSE [B, H_i, T], dq_idx fp32 | None, dk_idx fp32 | None)."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    DI = q_idx.shape[-1]
    _check_group(G)
    cfg = sat.resolve_config(G, config)
    TM, BM, BN = sat._tiling(G, block_size, q.device, cfg, max_tokens=sat.BITS_MAX_TM)  # token bitmasks
    TM = BM // G  # the group means reshape the rows [TM, G]: a small TM fills the dot's 16 rows with tokens
    plan = sat.tile_plan(block_idx, TM, cfg["WINDOW"], triton.cdiv(S, block_size), cfg["UNION"])
    if main_lse is None:
        main_lse = sat._forward(q, k, k, block_idx, block_size, scale, True, cfg, plan)[1]
    tok, cnt, ids, bits = plan
    NT = cnt.shape[-1]
    z_scale = index_scale / temperature
    gscale = coeff * z_scale / (B * Hkv * T)
    lq = torch.empty((B, Hkv, T), dtype=torch.float32, device=q.device)
    loss_parts = torch.empty((B, Hkv, NT), dtype=torch.float32, device=q.device)
    dqi = torch.empty(q_idx.shape, dtype=torch.float32, device=q.device) if with_grad else lq
    qi_strides = q_idx.stride()
    if with_grad and dqi.stride() != qi_strides:
        q_idx = q_idx.contiguous()
        qi_strides = q_idx.stride()
    BD, BDI = max(sat._pow2(D), 16), max(sat._pow2(DI), 16)
    common = dict(TM=TM, G=G, BM=BM, BLOCK=block_size, BN=BN, D=D, BD=BD, DI=DI, BDI=BDI, TI=max(TM, 16))
    _kl_query_kernel[(NT, Hkv, B)](
        q, k, q_idx, k_idx, main_lse, lq, dqi, loss_parts, tok, cnt, ids, bits, T, S,
        scale * sat.LOG2E, z_scale, gscale,
        *q.stride(), *k.stride(), *qi_strides, *k_idx.stride(), *main_lse.stride(), *lq.stride(),
        *ids.stride()[:3], WITH_GRAD=with_grad, **common,
        num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"])
    loss = coeff * loss_parts.sum() / (B * Hkv * T)
    if not with_grad:
        return loss, lq, None, None
    items, ilen, etile, ebits = sat.key_block_lists(cnt, ids, bits, triton.cdiv(S, block_size), cfg["SEG"])
    dki = torch.zeros(k_idx.shape, dtype=torch.float32, device=q.device)
    if dki.stride() != k_idx.stride():
        k_idx = k_idx.contiguous()
    if items.shape[0] > 0:
        _kl_key_kernel[(items.shape[0], block_size // BN)](
            q, k, q_idx, k_idx, main_lse, lq, dki, tok, items, ilen, etile, ebits, T, S, Hkv, NT,
            scale * sat.LOG2E, z_scale, gscale,
            *q.stride(), *k.stride(), *q_idx.stride(), *k_idx.stride(), *main_lse.stride(),
            *lq.stride(), **common,
            num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"])
    return loss, lq, dqi, dki


class _IndexKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_idx, k_idx, q, k, block_idx, main_lse, block_size, scale, index_scale, coeff,
                temperature, config, forward):
        with_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        loss, _, dqi, dki = (forward or index_kl_forward)(q, k, q_idx, k_idx, block_idx, block_size, scale,
                                                          index_scale, coeff, temperature, main_lse, with_grad,
                                                          config)
        if with_grad:
            ctx.save_for_backward(dqi, dki)
        ctx.dtypes = (q_idx.dtype, k_idx.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad):
        dqi, dki = ctx.saved_tensors
        return ((dqi * grad).to(ctx.dtypes[0]), (dki * grad).to(ctx.dtypes[1]),
                None, None, None, None, None, None, None, None, None, None, None)


def _every_visible_block(B: int, H: int, T: int, S: int, block_size: int, device) -> torch.Tensor:
    """int32 [B, H, T, n_blocks]: blocks 0 .. local for each query (the last T of S), then -1."""
    local = (S - T + torch.arange(T, device=device)) // block_size
    ids = torch.arange(triton.cdiv(S, block_size), device=device)
    sel = torch.where(ids[None, :] <= local[:, None], ids[None, :], -1).to(torch.int32)
    return sel.expand(B, H, T, ids.numel()).contiguous()


def msa_index_kl_triton(q, k, q_idx, k_idx, block_idx, block_size: int, scale: float, index_scale: float,
                        coeff: float = 1.0, temperature: float = 1.0, main_lse=None, config=None, forward=None):
    """Sparse KL loss (scalar fp32), differentiable w.r.t. q_idx and k_idx only.

    q [B, Hq, T, D], k [B, Hkv, S, D] (detached: teacher), q_idx [B, H_i=Hkv, T, D_i],
    k_idx [B, S, D_i], block_idx int32 [B, Hkv, T, k] (None: every visible
    block, the dense warm-up). main_lse [B, Hq, T] (natural log, from the
    attention forward) skips recomputing the teacher's normaliser. The gradients are computed in the
    forward pass and scaled in the backward. forward: a function with `index_kl_forward`'s contract run
    instead of it (`index_kl_keys.index_kl_keys_forward`, the key-major schedule); config goes to it.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if q.dtype == torch.float64:
        raise ValueError("the triton sparse KL runs fp32/fp16/bf16; use the reference for fp64")
    if block_idx is None:  # dense warm-up: every visible block
        block_idx = _every_visible_block(q_idx.shape[0], q_idx.shape[1], q_idx.shape[2], k.shape[2], block_size,
                                         q.device)
    q, k = q.detach(), k.detach()
    if main_lse is not None:
        main_lse = main_lse.detach().float()
    return _IndexKL.apply(q_idx, k_idx, q, k, block_idx, main_lse, block_size, float(scale),
                          float(index_scale), float(coeff), float(temperature), config, forward)
