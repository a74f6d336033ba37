"""MSA index-branch sparse KL with the key-major schedule (Triton): loss and its gradients w.r.t. q_idx and
k_idx, the same contract as `index_kl_triton.index_kl_forward`.

Semantics (oracle: sparsezoo.ops.index_kl.msa_reference): teacher P = the group-mean main attention over
the selected tokens M (from the main LSE), student Q = softmax over M of z = index_scale / temperature *
q_idx.k_idx, loss = coeff * mean over (b, g, t) of KL(P || Q), d loss / d z = coeff * (Q - P) / (B * H_i * T).

Why a second schedule: the query-major kernels visit the union of a tile's blocks (at 128k about 47 blocks
for 4 tokens that chose 16 each) and recompute the teacher for dk_idx in a third pass. Here one program
runs one key sub-tile of one column (batch, selection head, key block) over exactly the entries that chose
it (`sparse_attention_keys.column_lists`), with the block's k and k_idx loaded once:
1. `_student_lse_kernel`: each entry's index LSE over each key sub-tile; `_lse_merge_kernel` folds a
   token's into its LSE over M.
2. `_kl_kernel`: teacher (EPT = BM // G entries x their G heads, one dot, the group mean a reshape-sum),
   student (keys x entries: the sub-tile's keys on the dots' long side, k_idx in shared memory), the loss,
   dz; each entry's dq_idx partial (fp32, per sub-tile) is stored and `_dq_merge_kernel` sums a token's;
   dk_idx accumulates over the program's tiles and is added once per program (fp32 atomics).
Memory: per query chunk E * sub-tiles * 4 * (D_i + 1) bytes for E = B * H_i * T * k entries, bounded by
CHUNK_BYTES.
Nothing is [T, S].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsezoo.kernels.sizes import key_tile, with_overrides
from sparsezoo.kernels.sizes import pow2 as _pow2
from sparsezoo.kernels.sparse_attention_keys import (
    _column,
    _entries,
    block_sparse_attention_keys,
    column_lists,
    column_programs,
    query_chunk,
)
from sparsezoo.kernels.sparse_attention_triton import _load_rows

LOG2E = 1.4426950408889634

# BM teacher rows per tile (EPT = BM // G entries x G heads; the interpreter runs 16), TI columns of the
# student's keys x entries dots (>= 16 and >= EPT; the EPT entries on every (TI // EPT)-th), R tiles per
# program, BN keys per sub-tile, EI entries per tile of the student-LSE pass, LIST_IDS ids per list
# program, MERGE_TOKENS tokens per merge program, CHUNK_BYTES of per-entry buffers per query chunk.
# num_warps / LSE_WARPS: warps of the KL / student-LSE programs. Tuned on an H200 at 128k (m3 heads,
# benchmarks/msa_kl.py --tune): BM 128 with 8 warps 62 ms (with 4 warps 58 ms); BM 64 with 8 warps 98 ms;
# R 4 or 32, TI 32, BN 64, EI 32 or 128 were slower or within 3 ms. Not 4 warps: with D_i = 64 Triton 3.6
# miscompiles the dq_idx dot there (compute-sanitizer: an out-of-bounds shared-memory read at BM 128;
# NaN gradients at BM 64), where 8 warps are exact (scripts/probes/kl_keys_config.py).
KL_KEYS_CONFIG = {"BM": 128, "TI": 16, "R": 16, "BN": 128, "EI": 64, "num_warps": 8, "LSE_WARPS": 4,
                  "num_stages": 1, "LIST_IDS": 4096, "MERGE_TOKENS": 32, "CHUNK_BYTES": 4 << 30}
_INTERPRET_BM = 16


def resolve_config(config: dict | None = None) -> dict:
    """KL_KEYS_CONFIG with `config`'s overrides; unknown keys raise, naming the valid ones."""
    return with_overrides(KL_KEYS_CONFIG, config, "key-major KL")


@triton.jit
def _entry_cols(QI, ORDER, start, ei, n_e, NK, T, pos0, b, s, sib, sih, sit, sid, di, DI: tl.constexpr):
    """(valid, flat entry id, token, position, q_idx^T [BDI, entries]) of list slots ei of a column: the
    entries as columns, for the keys x entries dots."""
    ok, e, t, pos = _entries(ORDER, start, ei, n_e, NK, T, pos0)
    qi_t = tl.load(QI + (b * sib + s * sih + t.to(tl.int64) * sit)[None, :] + di[:, None] * sid,
                   mask=ok[None, :] & (di[:, None] < DI), other=0.0)
    return ok, e, t, pos, qi_t


@triton.jit
def _student_lse_kernel(QI, KI, PLQ, ORDER, CNT, START, GROUPS, GROUP_END, PCOL, T, S, pos0, NK, HS, n_blocks,
                        n_cols, z_scale, sib, sih, sit, sid, sjb, sjs, sjd,
                        BLOCK: tl.constexpr, BN: tl.constexpr, DI: tl.constexpr, BDI: tl.constexpr,
                        EI: tl.constexpr, R: tl.constexpr):
    """Key sub-tile pid(1) of one column, R tiles of EI entries: each entry's index LSE (natural log) over
    the sub-tile's visible keys, at PLQ[entry * sub-tiles + pid(1)]. The dot is keys x entries: the
    sub-tile's keys fill the tensor-core tile, k_idx stays in shared memory."""
    if tl.load(PCOL + tl.program_id(0)) < n_cols:
        col, group, b, s, blk, n_e, start = _column(PCOL, GROUPS, GROUP_END, CNT, START, n_blocks, HS)
        di = tl.arange(0, BDI)
        keys = blk * BLOCK + tl.program_id(1) * BN + tl.arange(0, BN)
        kmask = keys < S
        ki = _load_rows(KI, b * sjb + keys * sjs, di, sjd, kmask, DI)
        for i in range(tl.minimum(R, tl.cdiv(n_e, EI) - group * R)):
            ok, e, t, pos, qi_t = _entry_cols(QI, ORDER, start, (group * R + i) * EI + tl.arange(0, EI), n_e, NK, T,
                                              pos0, b, s, sib, sih, sit, sid, di, DI)
            z = tl.dot(ki, qi_t) * z_scale  # [keys, entries]
            z = tl.where((keys[:, None] <= pos[None, :]) & kmask[:, None], z, float("-inf"))
            m = tl.max(z, axis=0)
            m_use = tl.where(m == float("-inf"), 0.0, m)
            l_i = tl.sum(tl.exp(z - m_use[None, :]), axis=0)
            lse = tl.where(l_i > 0, m_use + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(PLQ + e * tl.num_programs(1) + tl.program_id(1), lse, mask=ok)


@triton.jit
def _kl_kernel(Q, K, QI, KI, L, LQ, PDQ, DKI, LOSS, ORDER, CNT, START, GROUPS, GROUP_END, PCOL,
               T, S, pos0, NK, HS, n_blocks, n_cols, qk_scale, z_scale, gscale,
               sqb, sqh, sqt, sqd, skb, skh, sks, skd, sib, sih, sit, sid, sjb, sjs, sjd, slb, slh, slt, sab, sah, sat_,
               G: tl.constexpr, BM: tl.constexpr, TI: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
               BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, DI: tl.constexpr, BDI: tl.constexpr,
               WITH_GRAD: tl.constexpr):
    """Key sub-tile pid(1) of one column over R tiles of its entries: the loss (one partial per program),
    each entry's dq_idx partial, and the sub-tile's dk_idx (one atomic add). The teacher is rows x keys
    (EPT entries x G heads); the student is keys x entries, the EPT entries on every RI-th of TI columns
    (the others 0), so its dots keep the sub-tile's keys on the tensor-core tile's long side."""
    EPT: tl.constexpr = BM // G
    RI: tl.constexpr = TI // EPT
    slot = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    loss = tl.zeros([EPT], tl.float32)
    if tl.load(PCOL + tl.program_id(0)) < n_cols:
        col, group, b, s, blk, n_e, start = _column(PCOL, GROUPS, GROUP_END, CNT, START, n_blocks, HS)
        d = tl.arange(0, BD)
        di = tl.arange(0, BDI)
        r = tl.arange(0, BM)
        ci = tl.arange(0, TI)
        lead = (ci % RI) == 0
        head = (s * G + r % G).to(tl.int64)
        keys = blk * BLOCK + tl.program_id(1) * BN + tl.arange(0, BN)
        kmask = keys < S
        kt = _load_rows(K, b * skb + s * skh + keys * sks, d, skd, kmask, D)
        ki = _load_rows(KI, b * sjb + keys * sjs, di, sjd, kmask, DI)
        dki = tl.zeros([BN, BDI], tl.float32)
        for i in range(tl.minimum(R, tl.cdiv(n_e, EPT) - group * R)):
            base = (group * R + i) * EPT
            # teacher, rows x keys: EPT entries x G heads, then the group mean, as keys x entries
            row_ok, _, t, pos = _entries(ORDER, start, base + r // G, n_e, NK, T, pos0)
            q = _load_rows(Q, b * sqb + head * sqh + t.to(tl.int64) * sqt, d, sqd, row_ok, D)
            lse2 = tl.load(L + b * slb + head * slh + t * slt, mask=row_ok, other=0.0) * 1.4426950408889634
            vis = row_ok[:, None] & (keys[None, :] <= pos[:, None]) & kmask[None, :]
            p = tl.where(vis, tl.exp2(tl.dot(q, tl.trans(kt)) * qk_scale - lse2[:, None]), 0.0)
            p = tl.trans(tl.sum(tl.reshape(p, [EPT, G, BN]), axis=1) / G)  # [keys, entries]
            # student, keys x entries
            c_ok, _, _, _, qi_t = _entry_cols(QI, ORDER, start, base + ci // RI, n_e, NK, T, pos0, b, s,
                                              sib, sih, sit, sid, di, DI)
            qi_t = tl.where(lead[None, :], qi_t, 0.0)
            z = tl.dot(ki, qi_t)  # [keys, TI]
            if RI > 1:
                z = tl.sum(tl.reshape(z, [BN, EPT, RI]), axis=2)
            e_ok, e, te, pose = _entries(ORDER, start, base + tl.arange(0, EPT), n_e, NK, T, pos0)
            lq = tl.load(LQ + b * sab + s * sah + te * sat_, mask=e_ok, other=0.0)
            lq = tl.where(lq == float("-inf"), 0.0, lq)
            ok = e_ok[None, :] & (keys[:, None] <= pose[None, :]) & kmask[:, None]
            log_q = z * z_scale - lq[None, :]
            qq = tl.where(ok, tl.exp(log_q), 0.0)
            loss += tl.sum(tl.where(ok & (p > 0), p * (tl.log(tl.where(p > 0, p, 1.0)) - log_q), 0.0), axis=0)
            if WITH_GRAD:
                dz = (qq - p) * gscale  # [keys, entries]
                if RI > 1:  # onto the lead columns
                    dz_c = tl.reshape(tl.where((tl.arange(0, RI) == 0)[None, None, :],
                                               tl.broadcast_to(dz[:, :, None], [BN, EPT, RI]), 0.0), [BN, TI])
                else:
                    dz_c = dz
                dz_c = dz_c.to(ki.dtype)
                dq = tl.dot(tl.trans(ki), dz_c)  # [BDI, TI]
                if RI > 1:
                    dq = tl.sum(tl.reshape(dq, [BDI, EPT, RI]), axis=2)
                at = (e * tl.num_programs(1) + tl.program_id(1))[None, :] * DI + di[:, None]  # [E, sub-tiles, D_i]
                tl.store(PDQ + at, dq, mask=e_ok[None, :] & (di[:, None] < DI))
                dki += tl.dot(dz_c, tl.trans(qi_t))
        if WITH_GRAD:
            tl.atomic_add(DKI + b * sjb + keys[:, None] * sjs + di[None, :] * sjd, dki,
                          mask=kmask[:, None] & (di[None, :] < DI))
    tl.store(LOSS + slot, tl.sum(loss))


@triton.jit
def _lse_merge_kernel(PLQ, LQ, T, NK, sab, sah, sat_, TT: tl.constexpr, NSUB: tl.constexpr):
    """Tokens TT * pid(0) + [0, TT) of selection head pid(1), batch pid(2): the LSE of their entries'
    per-sub-tile LSEs (one never written holds -inf)."""
    s = tl.program_id(1)
    b = tl.program_id(2)
    t = tl.program_id(0) * TT + tl.arange(0, TT)
    ok = t < T
    e0 = ((b.to(tl.int64) * tl.num_programs(1) + s) * T + t) * NK * NSUB
    m = tl.zeros([TT], tl.float32) + float("-inf")
    for j in range(NK * NSUB):
        m = tl.maximum(m, tl.load(PLQ + e0 + j, mask=ok, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([TT], tl.float32)
    for j in range(NK * NSUB):
        acc += tl.exp(tl.load(PLQ + e0 + j, mask=ok, other=float("-inf")) - m_use)
    lq = tl.where(acc > 0, m_use + tl.log(tl.where(acc > 0, acc, 1.0)), float("-inf"))
    tl.store(LQ + b * sab + s * sah + t * sat_, lq, mask=ok)


@triton.jit
def _dq_merge_kernel(PDQ, PLQ, DQI, T, NK, sib, sih, sit, sid, DI: tl.constexpr, BDI: tl.constexpr,
                     TT: tl.constexpr, NSUB: tl.constexpr):
    """Tokens TT * pid(0) + [0, TT) of selection head pid(1), batch pid(2): the sum of their entries' dq_idx
    partials over the key sub-tiles (a partial counts where its sub-tile's LSE is not -inf: an entry never
    written, or one that sees none of the sub-tile's keys, adds 0)."""
    s = tl.program_id(1)
    b = tl.program_id(2)
    t = tl.program_id(0) * TT + tl.arange(0, TT)
    ok = t < T
    di = tl.arange(0, BDI)
    e0 = ((b.to(tl.int64) * tl.num_programs(1) + s) * T + t) * NK * NSUB
    acc = tl.zeros([TT, BDI], tl.float32)
    for j in range(NK * NSUB):
        live = ok & (tl.load(PLQ + e0 + j, mask=ok, other=float("-inf")) != float("-inf"))
        acc += tl.load(PDQ + (e0 + j)[:, None] * DI + di[None, :], mask=live[:, None] & (di[None, :] < DI),
                       other=0.0)
    tl.store(DQI + b * sib + s * sih + t.to(tl.int64)[:, None] * sit + di[None, :] * sid, acc,
             mask=ok[:, None] & (di[None, :] < DI))


def index_kl_keys_forward(q, k, q_idx, k_idx, block_idx, block_size: int, scale: float, index_scale: float,
                          coeff: float, temperature: float, main_lse=None, with_grad: bool = True,
                          config: dict | None = None):
    """The MSA sparse KL with the key-major schedule -> (loss scalar fp32, index LSE [B, H_i, T] fp32,
    dq_idx fp32 | None, dk_idx fp32 | None), as `index_kl_triton.index_kl_forward`. q [B, Hq, T, D],
    k [B, Hkv, S, D], q_idx [B, Hkv, T, D_i], k_idx [B, S, D_i], block_idx [B, Hkv, T, n] (ids outside
    [0, n_blocks) ignored, a repeated id counts once), main_lse [B, Hq, T] (natural log; None: computed
    by the key-major attention forward). No gradients flow through it: the caller scales the returned ones."""
    if q.dtype == torch.float64:
        raise ValueError("the triton sparse KL runs fp32/fp16/bf16; use the reference for fp64")
    cfg = resolve_config(config)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if G & (G - 1) or Hq % Hkv:
        raise ValueError(f"the key-major KL needs a power-of-two group Hq / Hkv, got {Hq} / {Hkv}")
    if tuple(block_idx.shape[:3]) != (B, Hkv, T):
        raise ValueError(f"block_idx must be [B={B}, Hkv={Hkv}, T={T}, n], got {tuple(block_idx.shape)}")
    NK, DI = block_idx.shape[3], q_idx.shape[3]
    dev = q.device
    q, k = q.detach(), k.detach()
    q_idx, k_idx = q_idx.detach(), k_idx.detach()
    if main_lse is None:
        main_lse = block_sparse_attention_keys(q, k, k, block_idx, block_size, scale, True)[1]
    main_lse = main_lse.detach().float()
    BN = key_tile(block_size, cfg["BN"], "the key-major KL", gpu=q.is_cuda)
    n_sub = block_size // BN
    BM = max(cfg["BM"] if q.is_cuda else _INTERPRET_BM, _pow2(G))
    EPT = BM // G
    TI = max(cfg["TI"], EPT)
    R = cfg["R"]
    EI = cfg["EI"] if q.is_cuda else 16
    BD, BDI = max(_pow2(D), 16), max(_pow2(DI), 16)
    n_blocks = triton.cdiv(S, block_size)
    n_cols = B * Hkv * n_blocks
    z_scale = index_scale / temperature
    gscale = coeff * z_scale / (B * Hkv * T)
    lq = torch.empty((B, Hkv, T), dtype=torch.float32, device=dev)
    dqi = torch.zeros(q_idx.shape, dtype=torch.float32, device=dev) if with_grad else None
    dki = torch.zeros(k_idx.shape, dtype=torch.float32, device=dev) if with_grad else None
    if with_grad and dki.stride() != k_idx.stride():  # dk_idx is written with k_idx's strides
        k_idx = k_idx.contiguous()
    if T == 0 or NK == 0:
        return q.new_zeros((), dtype=torch.float32), lq.fill_(float("-inf")), dqi, dki
    chunk = query_chunk(T, B * Hkv * NK, 4 * n_sub * (DI + 1) if with_grad else 4 * n_sub, cfg["CHUNK_BYTES"])
    E_max = B * Hkv * chunk * NK
    plq = torch.empty(E_max * n_sub, dtype=torch.float32, device=dev)
    pdq = torch.empty(E_max * n_sub * DI if with_grad else 1, dtype=torch.float32, device=dev)
    order = torch.empty(E_max, dtype=torch.int32, device=dev)
    loss_parts = []
    MT = cfg["MERGE_TOKENS"]
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    lse_launch = dict(num_warps=cfg["LSE_WARPS"], num_stages=cfg["num_stages"])
    for t0 in range(0, T, chunk):
        tc = min(chunk, T - t0)
        E = B * Hkv * tc * NK
        sel = block_idx[:, :, t0:t0 + tc]
        qc, qic = q[:, :, t0:t0 + tc], q_idx[:, :, t0:t0 + tc]
        lc, lqc = main_lse[:, :, t0:t0 + tc], lq[:, :, t0:t0 + tc]
        plq[:E * n_sub].fill_(float("-inf"))
        geom = (tc, S, S - T + t0, NK, Hkv, n_blocks, n_cols)
        cnt, start = column_lists(sel, n_blocks, order, cfg["LIST_IDS"])
        groups, group_end, pcol, bound = column_programs(cnt, EI * R, E)
        _student_lse_kernel[(bound, n_sub)](qic, k_idx, plq, order, cnt, start, groups, group_end, pcol, *geom, z_scale,
                                      *qic.stride(), *k_idx.stride(), BLOCK=block_size, BN=BN, DI=DI, BDI=BDI,
                                      EI=EI, R=R, **lse_launch)
        _lse_merge_kernel[(triton.cdiv(tc, MT), Hkv, B)](plq, lqc, tc, NK, *lqc.stride(), TT=MT, NSUB=n_sub)
        groups, group_end, pcol, bound = column_programs(cnt, EPT * R, E)
        parts = torch.empty(bound * n_sub, dtype=torch.float32, device=dev)
        dq_out = pdq if with_grad else plq
        dk_out = dki if with_grad else plq
        _kl_kernel[(bound, n_sub)](qc, k, qic, k_idx, lc, lqc, dq_out, dk_out, parts, order, cnt, start, groups,
                                   group_end, pcol, *geom, scale * LOG2E, z_scale, gscale,
                                   *qc.stride(), *k.stride(), *qic.stride(), *k_idx.stride(), *lc.stride(),
                                   *lqc.stride(), G=G, BM=BM, TI=TI, R=R, BLOCK=block_size, BN=BN, D=D, BD=BD,
                                   DI=DI, BDI=BDI, WITH_GRAD=with_grad, **launch)
        loss_parts.append(parts.sum())
        if with_grad:
            dqc = dqi[:, :, t0:t0 + tc]
            _dq_merge_kernel[(triton.cdiv(tc, MT), Hkv, B)](pdq, plq, dqc, tc, NK, *dqc.stride(), DI=DI, BDI=BDI,
                                                            TT=MT, NSUB=n_sub)
    loss = coeff * torch.stack(loss_parts).sum() / (B * Hkv * T)
    return loss, lq, dqi, dki
