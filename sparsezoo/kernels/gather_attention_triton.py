"""Token-gather sparse attention (Triton), forward and backward: each query attends, exactly, to the
keys its own id list names (DSA's top-k tokens, CSA's window + compressed entries).

Layout: q [B, Hq, T, D]; k, v [B, Hkv, N, D]; idx int32 [B, Hs, T, K] with Hs in {1, Hkv, Hq}: key ids
into N, -1 = empty slot, in any order (valid ids and -1 may interleave). Query head h reads kv head
h // G (G = Hq / Hkv) and the ids idx[:, h // G] (idx[:, 0] when Hs = 1). Causality is the
selection's job. Ids outside [0, N) are masked (treated as empty): the kernels never read or write
outside the tensors, whatever the caller passes.

Two pools (CSA: raw window tokens + compressed entries): with k2, v2 [B, Hkv, N2, D], ids in [0, N) read
k, v and ids in [N, N + N2) read row id - N of k2, v2, without concatenating them. Each gathered row picks
its pool by a pointer select (one masked load per tile, as with one pool; when the host sees every row on
16 bytes, a tl.multiple_of hint restores the vector loads the select would lose); the backward scatters
dK/dV into one fp32 buffer of N + N2 rows, split at the end. A constexpr flag (TWO) compiles the one-pool
kernels as without it (same sm_90 instructions, checked on the PTX).

Window (CSA): with window = w > 0 each query's first w slots are its last w raw tokens p - w + 1 .. p
(p = N - T + t), computed from the position instead of read, and slot s >= w reads idx[..., s - w]; so
the caller passes the selected entries alone.

Forward, grid (T * splits, P, B): one program owns one query token x the G heads of one KV group
(P = Hkv; with per-query-head ids, Hs = Hq, P = Hq and a program owns one head of kv head h // (Hq / Hkv))
(rows padded to BM = max(16, pow2(G)) so a tile feeds a tensor-core dot). It walks the token's K
slots BN at a time: loads BN ids, gathers the K and V rows by masked pointer loads ([BN, D] tiles,
each row contiguous), and runs an exp2 online softmax over a [BM, BN] score tile. The G heads share
the ids, so each gathered row is loaded once per group, not once per head. With G < 16 the padded
rows are wasted MMA work (tokens do not share keys, so packing several tokens per program would not
share loads either).

Decode / few programs (flash-decoding): when B * Hkv * T programs cannot fill the GPU
(< PROGRAMS_PER_SM * SMs), each query's slots are cut into `splits` ranges of a multiple of BN
slots; each program writes a normalised fp32 partial output and its log2-LSE, and `_merge_kernel`
LSE-merges them into the output and the LSE. The split count depends on shapes only: no host sync,
so the launcher can be captured in a CUDA graph.

Backward, one fused kernel on the forward's grid (without splits): delta = rowsum(dO * O) - dLSE,
then per gathered tile p = exp2(s - lse), dp = dO.V^T, ds = p * (dp - delta); dQ accumulates in
registers (ds.K), and the tile's dK = ds^T.Q and dV = p^T.dO are scattered into fp32 buffers with
one atomic add per gathered row element, then cast. Cost: every (query, slot) pair costs 2 * D fp32
atomics, B * Hkv * T * K * 2D in all (2.7e11 at T = 128k, K = 2048, Hkv = 4, D = 128), and
popular keys (sinks, the local window) serialise at L2; this, not the dots, bounds the backward. The
fp32 atomic sums make dK/dV run-to-run nondeterministic in the last bits. A key-major pass (transpose
the selection, accumulate dK/dV in registers, as sparse_attention_triton does) would remove them.

Shared K = V (DeepSeek-V4's MQA entries; v is k's memory, and v2 is k2's): the kernels gather each row
once and use it as key and value (constexpr SHARED).

GPU bottleneck (forward): gathers. A row of K+V (4 * D bytes in bf16) feeds 4 * G * D flops, G = 16
gives ~16 flop/byte, far below the tensor cores' balance point, so the kernel is bound by L2/HBM
gather bandwidth; neighbouring tokens' programs run together (token is the fastest grid axis) so rows
they share tend to hit L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsezoo.kernels.nonfinite import nonfinite_rows, poison, poison_rows, saw_nonfinite
from sparsezoo.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_launch, resolve_pdl
from sparsezoo.kernels.sparse_attention_triton import _load_rows as _load_tile
from sparsezoo.kernels.sparse_attention_triton import backward_delta
from sparsezoo.kernels.sizes import fit_tiles
from sparsezoo.kernels.sizes import pow2 as _pow2

LOG2E = 1.4426950408889634  # host side: the kernels write log2(e) and ln(2) as literals (@jit reads no plain globals)

# GPU tiling, an untimed first guess for the H200 (m3, bf16, D = 128, sm_90 builds with triton 3.9: forward
# ~105 registers and 39 KB shared memory, backward ~100 registers with 8 warps, no spills). BN / bwd_BN:
# gathered keys per tile; SPLITS: 0 = choose from the program count (flash-decoding), n >= 1 = force n.
# BN_SHARED: BN when v is k (one gather per tile): measured on an H200 at CSA's 128k prefill (Hq 64, Hkv 4,
# 640 keys per query), 23.7 ms at 128 against 36.7 ms at 64 (with separate K and V, 128 took 59 ms).
# NF_CHECK, how the forward spots a non-finite score: "sum" adds each row's raw scores (one add per score; a
# row whose finite scores sum past the fp32 range counts as non-finite, as an overflowing score does), "tile"
# tests every attended score (about five operations per score). pdl: the split (decode) path's two kernels as
# programmatic dependent launches (sparsezoo/kernels/pdl.py), each waiting for the launch before it before reading
# anything; None: at batch 1 where the GPU supports them (as the decode indexer before it: faster at b=1,
# slower at b=8 on the H200), True / False: always / never.
GATHER_CONFIG = {"BN": 64, "BN_SHARED": 128, "num_warps": 4, "num_stages": 3, "bwd_BN": 32, "bwd_warps": 8,
                 "bwd_stages": 2, "SPLITS": 0, "PROGRAMS_PER_SM": 2, "merge_warps": 4, "NF_CHECK": "sum", "pdl": None}
_INTERPRET_CONFIG = {"BN": 16, "BN_SHARED": 16, "bwd_BN": 16}  # small tiles for the CPU interpreter


def split_plan(programs: int, K: int, BN: int, splits: int, n_sms: int, per_sm: int) -> tuple[int, int]:
    """(slots per split, split count) for `programs` = B * Hkv * T query programs of K slots.
    splits >= 1 forces that many (at most one per BN slots); 0 picks enough to give every SM per_sm
    programs. Slots per split are a multiple of BN, and no split is empty."""
    want = splits if splits > 0 else triton.cdiv(per_sm * n_sms, max(programs, 1))
    per = BN * max(1, triton.cdiv(triton.cdiv(K, max(want, 1)), BN))
    return per, max(1, triton.cdiv(K, per))


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _gather_rows(P1, P2, ids, ok, N, s1n, s2n, d, s_d, D: tl.constexpr, TWO: tl.constexpr,
                 ALIGNED: tl.constexpr):
    """Rows ids [BN] x d of pool P1 (row stride s1n), or with TWO of pool P1 for ids < N and P2 (row
    stride s2n) at ids - N for the rest; both pools share the column stride s_d. 0 where not ok.
    ALIGNED: every row starts on 16 bytes (the host checked), a hint the pointer select would lose and
    without which the rows are loaded element by element."""
    if TWO:
        rows = tl.where(ids < N, P1 + ids * s1n, P2 + (ids - N) * s2n)
        if ALIGNED:
            rows = tl.multiple_of(rows, 16)
        return tl.load(rows[:, None] + d[None, :] * s_d, mask=ok[:, None] & (d[None, :] < D), other=0.0)
    else:
        return _load_tile(P1, ids * s1n, d, s_d, ok, D)


@triton.jit
def _key_ids(IDX_ROW, slots, hi, N, pos, base, WINDOW: tl.constexpr):
    """The ids in slots [BN] (< hi) of one query's list -> (int64 ids, 0 where empty; valid mask).
    With WINDOW > 0 the first WINDOW slots are the query's last raw tokens pos - WINDOW + 1 .. pos
    (computed, not read) and slot s >= WINDOW reads the list's entry s - WINDOW. A listed id >= 0 counts
    from `base` (0, or the first pool's rows when the list names the second pool's rows).
    Empty: -1 padding, slots past hi, and any id outside [0, N) (N: both pools' rows together)."""
    if WINDOW > 0:
        listed = tl.load(IDX_ROW + (slots - WINDOW), mask=(slots >= WINDOW) & (slots < hi), other=-1).to(tl.int64)
        listed = tl.where(listed >= 0, listed + base, listed)
        ids = tl.where(slots < WINDOW, pos - (WINDOW - 1) + slots, listed)
        ok = (ids >= 0) & (ids < N) & (slots < hi)
    else:
        ids = tl.load(IDX_ROW + slots, mask=slots < hi, other=-1).to(tl.int64)
        ids = tl.where(ids >= 0, ids + base, ids)
        ok = (ids >= 0) & (ids < N)
    return tl.where(ok, ids, 0).to(tl.int64), ok


@triton.jit
def _group_rows(G: tl.constexpr, BM: tl.constexpr, KV_DIV: tl.constexpr):
    """Rows of a program: the G query heads of program head g = program_id(1) (a KV group, or one query
    head when the ids are per query head), padded to BM; and the kv head g reads (g // KV_DIV)."""
    r = tl.arange(0, BM)
    g = tl.program_id(1)
    return r < G, (g * G + r).to(tl.int64), g.to(tl.int64), (g // KV_DIV).to(tl.int64)


@triton.jit
def _with_sink(out, lse2, SINK, head, row_ok):
    """A learned logit per query head in the softmax, with a zero value (DeepSeek-V4's attention sink):
    out * sigmoid(lse - sink) and log2-sum-exp2(lse2, sink2): exact, as one more softmax slot whose score
    is the sink (an empty row gets out 0 and the sink as its LSE; a NaN row stays NaN)."""
    s2 = tl.load(SINK + head, mask=row_ok, other=0.0) * 1.4426950408889634
    diff = lse2 - s2
    out = out * (1.0 / (1.0 + tl.exp2(-diff)))[:, None]
    hi = tl.maximum(lse2, s2)
    lse2 = tl.where(hi == float("-inf"), float("-inf"), hi + tl.log2(1.0 + tl.exp2(-tl.abs(diff))))
    return out, lse2


@triton.jit
def _fwd_kernel(Q, K, V, K2, V2, IDX, SINK, O, L, PO, PL, T, N, NK, KS, QOFF, PER, n_splits, qk_scale, BASE,
                sqb, sqh, sqt, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sk2b, sk2h, sk2n, sv2b, sv2h, sv2n,
                sib, sih, sit, sob, soh, sot, sod, slb, slh, slt,
                G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                SPLIT: tl.constexpr, PREC: tl.constexpr, TWO: tl.constexpr, ALIGNED: tl.constexpr,
                KV_DIV: tl.constexpr, WINDOW: tl.constexpr, NF_SUM: tl.constexpr, SHARED: tl.constexpr,
                HAS_SINK: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # a decode step's ids come from the launch before it
        gdc_wait()
        gdc_launch_dependents()
    t = (tl.program_id(0) // n_splits).to(tl.int64)
    sp = tl.program_id(0) % n_splits
    b = tl.program_id(2).to(tl.int64)
    row_ok, head, g, kv = _group_rows(G, BM, KV_DIV)
    d = tl.arange(0, BD)
    q = _load_tile(Q, b * sqb + head * sqh + t * sqt, d, sqd, row_ok, D)
    k_base = K + b * skb + kv * skh
    v_base = V + b * svb + kv * svh
    k2_base = K2 + b * sk2b + kv * sk2h
    v2_base = V2 + b * sv2b + kv * sv2h
    idx_row = IDX + b * sib + g * sih + t * sit
    bad = nonfinite_rows(q)  # rows that saw a NaN/inf (sparsezoo/kernels/nonfinite.py: every row attends every loaded key)
    score_sum = tl.zeros([BM], tl.float32)  # NF_SUM: non-finite iff a score was (empty slots score q.0 = 0)
    m_i = tl.zeros([BM], tl.float32) + float("-inf")
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    lo = sp * PER
    hi = tl.minimum(lo + PER, KS)
    kn = tl.arange(0, BN)
    for start in range(lo, hi, BN):
        ids, ok = _key_ids(idx_row, start + kn, hi, NK, QOFF + t, BASE, WINDOW)
        kt = _gather_rows(k_base, k2_base, ids, ok, N, skn, sk2n, d, skd, D, TWO, ALIGNED)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
        if NF_SUM:
            score_sum += tl.sum(s, axis=1)
        else:
            bad = bad | saw_nonfinite(s, ok[None, :])
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if SHARED:  # one K = V pool: the rows just gathered are the values too
            vt = kt
        else:
            vt = _gather_rows(v_base, v2_base, ids, ok, N, svn, sv2n, d, svd, D, TWO, ALIGNED)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        m_i = m_new
    if NF_SUM:
        bad = bad | ~(tl.abs(score_sum) < float("inf"))
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    bad = bad | nonfinite_rows(out)
    out = poison_rows(out, bad)
    lse2 = poison(tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i))), bad)
    if SPLIT:  # partials [B, Hq, T, splits, D] and log2-LSEs [B, Hq, T, splits], fp32
        prow = ((b * tl.num_programs(1) * G + head) * T + t) * n_splits + sp
        tl.store(PO + prow[:, None] * D + d[None, :], out, mask=row_ok[:, None] & (d[None, :] < D))
        tl.store(PL + prow, lse2, mask=row_ok)
    else:
        if HAS_SINK:
            out, lse2 = _with_sink(out, lse2, SINK, head, row_ok)
        tl.store(O + b * sob + head[:, None] * soh + t * sot + d[None, :] * sod, out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & (d[None, :] < D))
        tl.store(L + b * slb + head * slh + t * slt, lse2 * 0.6931471805599453, mask=row_ok)


@triton.jit
def _merge_kernel(PO, PL, SINK, O, L, T, n_splits, sob, soh, sot, sod, slb, slh, slt,
                  G: tl.constexpr, BM: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, HAS_SINK: tl.constexpr,
                  PDL: tl.constexpr = False):
    if PDL:
        gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    row_ok, head, _, _ = _group_rows(G, BM, 1)
    d = tl.arange(0, BD)
    d_ok = row_ok[:, None] & (d[None, :] < D)
    prow = ((b * tl.num_programs(1) * G + head) * T + t) * n_splits
    m = tl.zeros([BM], tl.float32) + float("-inf")
    l = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    bad = tl.zeros([BM], tl.int1)
    for sp in range(0, n_splits):
        lse_s = tl.load(PL + prow + sp, mask=row_ok, other=float("-inf"))
        bad = bad | (lse_s != lse_s)  # a split poisoned the row
        m_new = tl.maximum(m, lse_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        w = tl.exp2(lse_s - m_use)
        o_s = tl.load(PO + (prow + sp)[:, None] * D + d[None, :], mask=d_ok, other=0.0)
        acc = acc * alpha[:, None] + w[:, None] * o_s
        l = l * alpha + w
        m = m_new
    empty = l == 0.0
    out = poison_rows(acc / tl.where(empty, 1.0, l)[:, None], bad)
    lse2 = poison(tl.where(empty, float("-inf"), m + tl.log2(tl.where(empty, 1.0, l))), bad)
    if HAS_SINK:
        out, lse2 = _with_sink(out, lse2, SINK, head, row_ok)
    tl.store(O + b * sob + head[:, None] * soh + t * sot + d[None, :] * sod, out.to(O.dtype.element_ty), mask=d_ok)
    tl.store(L + b * slb + head * slh + t * slt, lse2 * 0.6931471805599453, mask=row_ok)


@triton.jit
def _bwd_kernel(Q, K, V, K2, V2, DO, DQ, DK, DV, L, DELTA, IDX, N, NK, KS, QOFF, qk_scale, scale, BASE,
                sqb, sqh, sqt, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sk2b, sk2h, sk2n, sv2b, sv2h, sv2n,
                sib, sih, sit, slb, slh, slt, sdb, sdh, sdn, sdd,
                G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                PREC: tl.constexpr, TWO: tl.constexpr, ALIGNED: tl.constexpr, KV_DIV: tl.constexpr,
                WINDOW: tl.constexpr, SHARED: tl.constexpr):
    # q, do, dq share strides (contiguous copies from the wrapper); so do L and DELTA, and DK and DV.
    # N: rows of the first pool, NK: of both. DK, DV hold NK rows: an id addresses its row there, whatever its pool.
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    row_ok, head, g, kv = _group_rows(G, BM, KV_DIV)
    d = tl.arange(0, BD)
    row_off = b * sqb + head * sqh + t * sqt
    l_off = b * slb + head * slh + t * slt
    lse2 = tl.load(L + l_off, mask=row_ok, other=0.0) * 1.4426950408889634
    dead = lse2 != lse2  # a poisoned row (NaN LSE) attends to nothing here: no gradient flows through it
    row_ok = row_ok & ~dead
    q = _load_tile(Q, row_off, d, sqd, row_ok, D)
    do = _load_tile(DO, row_off, d, sqd, row_ok, D)
    delta = tl.load(DELTA + l_off, mask=row_ok, other=0.0)
    k_base = K + b * skb + kv * skh
    v_base = V + b * svb + kv * svh
    k2_base = K2 + b * sk2b + kv * sk2h
    v2_base = V2 + b * sv2b + kv * sv2h
    dkv_off = b * sdb + kv * sdh
    idx_row = IDX + b * sib + g * sih + t * sit
    dq = tl.zeros([BM, BD], tl.float32)
    kn = tl.arange(0, BN)
    for start in range(0, KS, BN):
        ids, ok = _key_ids(idx_row, start + kn, KS, NK, QOFF + t, BASE, WINDOW)
        kt = _gather_rows(k_base, k2_base, ids, ok, N, skn, sk2n, d, skd, D, TWO, ALIGNED)
        if SHARED:
            vt = kt
        else:
            vt = _gather_rows(v_base, v2_base, ids, ok, N, svn, sv2n, d, svd, D, TWO, ALIGNED)
        live = row_ok[:, None] & ok[None, :]
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
        p = tl.where(live, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
        ds = tl.where(live, p * (dp - delta[:, None]), 0.0)
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
        dv_t = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)  # [BN, BD]
        dk_t = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        at = dkv_off + ids[:, None] * sdn + d[None, :] * sdd
        at_ok = ok[:, None] & (d[None, :] < D)
        tl.atomic_add(DK + at, dk_t * scale, mask=at_ok, sem="relaxed")
        tl.atomic_add(DV + at, dv_t, mask=at_ok, sem="relaxed")
    dq = tl.where(dead[:, None], 0.0, dq)  # ds = 0 there, but a NaN key row would make 0 * NaN
    tl.store(DQ + row_off[:, None] + d[None, :] * sqd, (dq * scale).to(DQ.dtype.element_ty),
             mask=(row_ok | dead)[:, None] & (d[None, :] < D))


# ----------------------------------------------------------------------------- launchers

def _group_tiling(q, k, idx):
    """(P program heads, G query heads per program, KV_DIV program heads per kv head, BM, D, BD, dot input
    precision) of a launch: a program serves one KV group, or one query head when the ids are per query
    head (Hs = Hq); exact fp32 dots (no TF32) for fp32 inputs."""
    P = max(idx.shape[1], k.shape[1])
    G, D = q.shape[1] // P, q.shape[3]
    return P, G, P // k.shape[1], max(16, _pow2(G)), D, max(16, _pow2(D)), \
        "ieee" if q.dtype == torch.float32 else "tf32"


def _idx_strides(idx):
    """idx strides (b, selection head, t); the head stride is 0 when all KV groups share one list."""
    return idx.stride(0), (idx.stride(1) if idx.shape[1] > 1 else 0), idx.stride(2)


def _n_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _rows_aligned(*pools) -> bool:
    """Every row of every pool starts on 16 bytes (base pointer and batch / head / row strides)."""
    return all(x.data_ptr() % 16 == 0 and all(st * x.element_size() % 16 == 0 for st in x.stride()[:3])
               for x in pools)


def _same(a, b) -> bool:
    """a and b are one tensor's memory (V4's shared K = V): same storage, offset, shape and strides."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype)


def _pools(k, v, k2, v2):
    """The key pools as kernel arguments: (k, v, k2, v2, N2, k2 and v2 (b, h, n) strides, flags TWO, ALIGNED
    and SHARED). Without a second pool k2, v2 = k, v (never read) and N2 = 0. With one, every pool gets unit
    column stride (the kernels give both pools one column stride; a copy only for an unusual layout).
    SHARED: v is k's memory (and v2 is k2's), one K = V pool as DeepSeek-V4's: each row is gathered once."""
    if k2 is None:
        return k, v, k, v, 0, (0,) * 6, dict(TWO=False, ALIGNED=False, SHARED=_same(k, v))
    shared = _same(k, v) and _same(k2, v2)
    k, v, k2, v2 = (x if x.stride(3) == 1 else x.contiguous() for x in (k, v, k2, v2))
    if shared:  # one copy each, so the kernels may read the values where they read the keys
        v, v2 = k, k2
    flags = dict(TWO=True, ALIGNED=_rows_aligned(k, v, k2, v2), SHARED=shared)
    return k, v, k2, v2, k2.shape[2], (*k2.stride()[:3], *v2.stride()[:3]), flags


def _forward(q, k, v, k2, v2, idx, scale, window, cfg, sink=None, base=0):
    """(out, natural-log LSE); sink: fp32 [Hq] or None; base: added to every listed id >= 0."""
    B, Hq, T, _ = q.shape
    k, v, k2, v2, N2, k2v2_strides, pool_flags = _pools(k, v, k2, v2)
    N, KS = k.shape[2], window + idx.shape[-1]
    P, G, KV_DIV, BM, D, BD, prec = _group_tiling(q, k, idx)
    BN = cfg["BN_SHARED" if pool_flags["SHARED"] else "BN"]  # one gather per tile leaves room for twice the keys
    BN, stages = fit_tiles(BN, cfg["num_stages"], (1 if pool_flags["SHARED"] else 2) * BD * q.element_size())
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device)
    splits = cfg["SPLITS"]
    if not splits and q.device.type != "cuda":
        splits = 1  # the interpreter gains nothing from splitting
    per, n_splits = split_plan(B * P * T, KS, BN, splits, _n_sms(q.device), cfg["PROGRAMS_PER_SM"])
    split = n_splits > 1
    if split:
        po = torch.empty((B, Hq, T, n_splits, D), dtype=torch.float32, device=q.device)
        pl = torch.empty((B, Hq, T, n_splits), dtype=torch.float32, device=q.device)
    else:
        po = pl = lse
    sink_arg = lse if sink is None else sink  # a valid pointer when there is no sink
    chained = pdl_launch(resolve_pdl(cfg["pdl"], q.device, auto=B == 1), q.device) if split else {}
    _fwd_kernel[(T * n_splits, P, B)](
        q, k, v, k2, v2, idx, sink_arg, out, lse, po, pl, T, N, N + N2, KS, N - T, per, n_splits, scale * LOG2E, base,
        *q.stride(), *k.stride(), *v.stride(), *k2v2_strides, *_idx_strides(idx), *out.stride(), *lse.stride(),
        G=G, BM=BM, BN=BN, D=D, BD=BD, SPLIT=split, PREC=prec, **pool_flags, KV_DIV=KV_DIV, WINDOW=window,
        NF_SUM=cfg["NF_CHECK"] == "sum", HAS_SINK=sink is not None, num_warps=cfg["num_warps"],
        num_stages=stages, **chained)
    if split:
        _merge_kernel[(T, P, B)](
            po, pl, sink_arg, out, lse, T, n_splits, *out.stride(), *lse.stride(),
            G=G, BM=BM, D=D, BD=BD, HAS_SINK=sink is not None, num_warps=cfg["merge_warps"], **chained)
    return out, lse


def _backward(q, k, v, k2, v2, idx, out, lse, do, dlse, scale, window, cfg, sink=None, base=0):
    """(dq, dk, dv, dk2, dv2, dsink); dk2, dv2 are None without a second pool, dsink without a sink. With a
    sink, out and lse are the forward's (sink included), so the kernel's p = exp(s - lse) are the sink
    softmax's and dq, dk, dv need nothing else; dsink = -sum over rows of p_sink * delta, p_sink =
    exp(sink - lse)."""
    B, Hq, T, _ = q.shape
    k, v, k2, v2, N2, k2v2_strides, pool_flags = _pools(k, v, k2, v2)
    Hkv, N, KS = k.shape[1], k.shape[2], window + idx.shape[-1]
    P, G, KV_DIV, BM, D, BD, prec = _group_tiling(q, k, idx)
    q, do = q.contiguous(), do.contiguous()
    delta, lse = backward_delta(do, out, lse, dlse)
    dq = torch.empty_like(q)
    dk = torch.zeros((B, Hkv, N + N2, D), dtype=torch.float32, device=q.device)  # rows of both pools
    dv = torch.zeros_like(dk)
    row_bytes = (1 if pool_flags["SHARED"] else 2) * BD * q.element_size()  # K and V rows (one when shared)
    bwd_BN, bwd_stages = fit_tiles(cfg["bwd_BN"], cfg["bwd_stages"], row_bytes)
    _bwd_kernel[(T, P, B)](
        q, k, v, k2, v2, do, dq, dk, dv, lse, delta, idx, N, N + N2, KS, N - T, scale * LOG2E, scale, base,
        *q.stride(), *k.stride(), *v.stride(), *k2v2_strides, *_idx_strides(idx), *lse.stride(), *dk.stride(),
        G=G, BM=BM, BN=bwd_BN, D=D, BD=BD, PREC=prec, **pool_flags, KV_DIV=KV_DIV, WINDOW=window,
        num_warps=cfg["bwd_warps"], num_stages=bwd_stages)
    dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    dsink = None
    if sink is not None:  # a poisoned row (NaN LSE) passes no gradient, to the sink neither
        dsink = -torch.where(torch.isnan(lse), 0.0, torch.exp(sink.view(1, -1, 1) - lse) * delta).sum((0, 2))
    if not pool_flags["TWO"]:
        return dq, dk, dv, None, None, dsink
    return dq, dk[:, :, :N], dv[:, :, :N], dk[:, :, N:], dv[:, :, N:], dsink


class _GatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, k2, v2, idx, scale, window, cfg, sink, base):
        sink32 = None if sink is None else sink.float().contiguous()
        out, lse = _forward(q, k, v, k2, v2, idx, scale, window, cfg, sink32, base)
        ctx.save_for_backward(q, k, v, k2, v2, idx, out, lse, sink32)
        ctx.scale, ctx.window, ctx.cfg, ctx.base = scale, window, cfg, base
        ctx.sink_dtype = None if sink is None else sink.dtype
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, k2, v2, idx, out, lse, sink = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        *grads, dsink = _backward(q, k, v, k2, v2, idx, out, lse, dout, dlse, ctx.scale, ctx.window, ctx.cfg, sink,
                                  ctx.base)
        return (*grads, None, None, None, None, None if dsink is None else dsink.to(ctx.sink_dtype), None)


def _check(q, k, v, idx):
    if q.dtype == torch.float64:
        raise ValueError("the triton gather attention runs fp32/fp16/bf16; use backend='reference' for fp64")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] \
            or k.shape[3] != q.shape[3] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"need q [B, Hq, T, D], k = v [B, Hkv | Hq, N, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if idx.dim() != 4 or idx.shape[0] != q.shape[0] or idx.shape[1] not in (1, k.shape[1], q.shape[1]) \
            or idx.shape[2] != q.shape[2]:
        raise ValueError(f"idx must be [B={q.shape[0]}, Hs in (1, {k.shape[1]}, {q.shape[1]}), T={q.shape[2]}, K], "
                         f"got {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"idx must hold integer ids, got {idx.dtype}")


def _check_second_pool(k, k2, v2):
    if (k2 is None) != (v2 is None):
        raise ValueError("give k2 and v2 together (or neither)")
    if k2 is None:
        return
    if k2.dtype != k.dtype or v2.dtype != k.dtype or k2.device != k.device or v2.device != k.device:
        raise ValueError(f"k2, v2 must share k's dtype and device ({k.dtype}, {k.device}), got {k2.dtype} on "
                         f"{k2.device} and {v2.dtype} on {v2.device}")
    if k2.dim() != 4 or k2.shape != v2.shape or k2.shape[:2] != k.shape[:2] or k2.shape[3] != k.shape[3]:
        raise ValueError(f"need k2 = v2 [B={k.shape[0]}, Hkv={k.shape[1]}, N2, D={k.shape[3]}]; got "
                         f"{tuple(k2.shape)}, {tuple(v2.shape)}")


def gather_attention_triton(q, k, v, idx, scale: float, return_lse: bool = False, config: dict | None = None,
                            k2=None, v2=None, window: int = 0, sink=None, extra_ids: bool = False):
    """q [B, Hq, T, D], k/v [B, Hkv, N, D], idx int [B, Hs, T, K] (Hs in {1, Hkv, Hq}; -1 or any id
    outside [0, N) = empty slot) -> out [B, Hq, T, D] (and natural-log LSE [B, Hq, T] fp32; a query
    with no key gets out 0, LSE -inf). Differentiable w.r.t. q, k, v (through out and LSE).
    Non-finite values (sparsezoo/kernels/nonfinite.py): a row whose q or one of whose keys' k/v rows holds a NaN/inf
    is NaN (out and LSE) and passes no gradient; the other rows and gradients are unaffected.
    Optional second pool k2/v2 [B, Hkv, N2, D]: ids in [N, N + N2) read k2/v2[:, :, id - N] (as if
    k2 were concatenated after k, without the copy); differentiable w.r.t. k2, v2 too.
    window > 0: each query also attends to its last `window` raw tokens of k, v (positions
    p - window + 1 .. p, p = N - T + t: the queries are the last T of the N raw tokens), listed before
    its ids without being stored (CSA's sliding window); idx then names the other keys only.
    sink [Hq] (optional): a learned logit per query head in every softmax, with a zero value (DeepSeek-V4):
    applied in the kernels' epilogue (out * sigmoid(lse - sink), LSE logaddexp(lse, sink)); differentiable.
    extra_ids: idx names rows of k2/v2 (ids in [0, N2); CSA's selected entries beside its raw window), read as
    ids N + id of the concatenation without rewriting idx (no extra launch)."""
    _check(q, k, v, idx)
    _check_second_pool(k, k2, v2)
    if extra_ids and k2 is None:
        raise ValueError("extra_ids=True names rows of a second pool: pass k2 and v2")
    if window < 0 or (window > 0 and q.shape[2] > k.shape[2]):
        raise ValueError(f"window must be >= 0, and with a window the {q.shape[2]} queries must be the last of "
                         f"the {k.shape[2]} raw tokens; got window {window}")
    cfg = {**GATHER_CONFIG, **(_INTERPRET_CONFIG if q.device.type != "cuda" else {}), **(config or {})}
    N, N2 = k.shape[2], (0 if k2 is None else k2.shape[2])
    window = window if N > 0 else 0  # no raw token: the window is empty
    if q.numel() == 0 or N + N2 == 0 or window + idx.shape[-1] == 0:  # no key anywhere: nothing to launch
        bad = ~torch.isfinite(q).all(-1)  # a non-finite q row still gives a NaN row
        out = torch.where(bad[..., None], float("nan"), q * 0.0)
        lse = torch.where(bad, float("nan"), torch.full(q.shape[:3], float("-inf"), dtype=torch.float32,
                                                              device=q.device))
        if sink is not None:  # every row is the sink alone: out stays 0 (NaN rows NaN), the LSE is the sink
            lse = torch.logaddexp(lse, sink.to(lse.dtype).view(1, -1, 1))
        return (out, lse) if return_lse else out
    base = N if extra_ids else 0  # added in the kernels to every listed id >= 0
    if idx.dtype == torch.int64:  # ids past int32 must not wrap into range: clamp to [-1, N + N2] (masked)
        idx = idx.clamp(-1, N + N2 - base)
    if N == 0:  # only the second pool holds keys: its ids already start at 0 (k, v get no gradient)
        k, v, k2, v2 = k2, v2, None, None
    elif N2 == 0:
        k2 = v2 = None
    if sink is not None and (sink.shape != (q.shape[1],) or not sink.is_floating_point() or sink.device != q.device):
        raise ValueError(f"sink must be a float tensor [Hq={q.shape[1]}] on {q.device}, got "
                         f"{tuple(sink.shape)} {sink.dtype} on {sink.device}")
    out, lse = _GatherAttention.apply(q, k, v, k2, v2, idx.to(torch.int32), float(scale), int(window), cfg, sink,
                                      base)
    return (out, lse) if return_lse else out
