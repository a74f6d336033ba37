"""DSA/CSA lightning-indexer top-k (Triton): index logits by tensor-core tiles, then a row-wise top-k.

Semantics (sparsezoo.ops.dsa.indexer_topk): q_i [B, Hs, T, J, D_i], w [B, Hs, T, J], k_i [B, N, D_i],
key_end [N] non-decreasing; query t sits at p = S - T + t and sees key n iff key_end[n] <= p, so its
visible keys are the prefix [0, nvis(t)) with nvis = searchsorted(key_end, p, right=True).
I[t, n] = scale * sum_j w[t, j] * relu(<q_i[t, j], k_i[n]>). Output int32 [B, Hs, T, topk]: the topk
visible keys with the largest logits, valid ids in ASCENDING id order, then -1 padding (rows with
fewer than topk visible keys hold all of them). Not differentiable.

Pipeline, per chunk of queries (a bounded fp32 buffer [Tc, B*Hs, N] of at most `buffer_bytes`,
1 GiB by default; nothing of size T x N is ever held):

1. `_logits_kernel`, grid (key tiles, query tiles, B*Hs), key tiles fastest so that the programs
   in flight share one query tile's q_i in L2. A program owns a [TM, BN] tile of I: it loads its
   k_i tile once, then for each group of JG index heads does one tl.dot of the [TM*JG, D_i] query
   rows against k_i^T, relu, times w, summed over the heads (JG = 1 in prefill; in decode, where
   TM is 1..4, JG heads fill the dot's rows). Invisible keys get -inf. Tiles whose keys are all
   invisible to the whole query tile are skipped (causality halves the work), and so are tiles
   whose queries all see <= topk keys (those rows select all visible keys without logits). In
   'triton' top-k mode it also folds per-row min/max of the logits (order-preserving int32 keys)
   into a stats buffer with atomics, for the select's first pass.
2. Row-wise top-k, config["topk_mode"]:
   'triton' (default) `_select_kernel`, one program per row, passes over the visible prefix only:
     a. a 64-bin histogram of the logits, binned linearly between the row's min and max; suffix
        counts give the bin holding the topk-th largest logit (above it: selected for sure);
     b. only while that bin holds more than CAP (4096) keys: one pass for its exact key range, then
        passes that histogram its members by their order-preserving int32 key, 6 bits at a time
        (integer arithmetic: at most 6 passes, down to a single value);
     c. a gather pass: the bin's members (<= CAP) go to a scratch list, in id order;
     d. in registers: the threshold key t by bisection over the candidates (it stops as soon as
        exactly the needed number are >= t), and for ties at t the largest id still taken (ties go
        to the smaller id; a single-valued bin of any size needs only its need-th member's id);
     e. a write pass: ids with key > t, or key == t and id <= that cut, in ascending id order.
     Typical rows (smooth logit distributions) read the row three times (a, c, e); the histogram
     pass is the compute-heavy one (~1.5 warp instructions per element for 64 bins).
     With few rows (decode: B*Hs*T below the SM count) each row is split into segments: stage A
     selects the top-k of each segment (same kernel), stage B the top-k of their union (same
     kernel, reading ids indirectly; stage A's ascending output keeps ties by position = by id).
     Segments ~ sqrt(N / topk) balance the two stages.
   'torch': torch.topk on the chunk (-inf past the visible prefix), then ids sorted ascending.
     The selected scores are exact, but torch.topk does not promise ties to the smaller id: only
     tied ids at the boundary may differ from the reference.
   Why 'triton' by default: torch.topk reads the whole [rows, N] row (2x the causal prefix, plus
   the -inf fill of skipped tiles) and its large-k radix select makes several passes per row; the
   Triton select reads only the visible prefix, ~3 times, skips nothing-to-do rows, keeps the exact
   tie rule and gives sorted ids without a separate sort.

Non-finite values (docs/ops.md): the relu keeps a NaN (a max that propagates it) and a visible NaN
logit is stored as +inf, so it ranks first (ties to the smaller id); a row whose index query is NaN
ranks every visible key first and takes the smallest ids. An infinite logit makes the row's min/max
spread infinite: the row falls into one histogram bin and the key radix passes resolve it.

No host syncs on the hot path (shapes decide the chunking and the split), so the launcher can be
CUDA-graph captured.

Cost at T = S = 128k, J = 64, D_i = 128, bf16: the logits are ~1.4e14 FLOPs causal (~200 ms at
700 TFLOP/s). A [TM, BN] program loads J query tiles and one key tile, so the q_i traffic from L2 is
J * D_i * T * N / BN bytes (bf16, causal), ~0.5 TiB at 128k with BN = 256: ~2.7 TB/s at 200 ms,
within L2 bandwidth (BN = 128 would double it).
The relu/weight/accumulate epilogue (3 fp32 ops per element per head) runs between dots and is what
keeps the kernel from the MMA peak (expect ~50-60%). The select reads the causal logits (~32 GiB per
pass at 128k) three times, expected ~30-40 ms in all (HBM-bound, the histogram pass near
compute-bound), on top of the 32 GiB write of the logits by the logits kernel (~10 ms).
fp32 inputs use IEEE dots by default (config["fp32_ieee"]); fp64 is not supported.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparsezoo.kernels.sizes import pow2 as _pow2

# GPU tiling and select knobs (the lead tunes these on the H200).
CONFIG = {
    "topk_mode": "triton",     # 'triton' (radix/threshold select) or 'torch' (torch.topk)
    "TM": 128,                 # queries per logits tile (prefill; 128 x 128 measured fastest on an H200)
    "BN": 128,                 # keys per logits tile
    "BM": 128,                 # rows per dot (TM x JG heads) when T is small (decode)
    "num_warps": 8,
    "num_stages": 3,
    "buffer_bytes": 1 << 30,   # bound of the fp32 logits buffer per chunk of queries
    "select_block": 1024,      # elements per step of a select pass
    "select_bins": 64,         # histogram bins per pass (power of two, >= 32 on the GPU)
    "select_cap": 4096,        # candidates resolved in registers (power of two)
    "select_warps": 8,
    "split": None,             # segments per row for few rows; None = automatic
    "fp32_ieee": True,         # fp32 inputs: IEEE dots (else tf32)
}

# Interpreter (CPU) tiles: tiny, so the tests stay quick.
_INTERPRETER_CONFIG = {"TM": 16, "BN": 32, "BM": 16, "select_block": 128, "num_warps": 4, "num_stages": 1}

_INT32_MIN, _INT32_MAX = -(2 ** 31), 2 ** 31 - 1


# ----------------------------------------------------------------------------- shared helpers

@triton.jit
def _ordered_key(x):
    """fp32 -> int32 key with the same order (signed compare); -0.0 and +0.0 share the key 0."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


# int64 ranking keys of (value, id) pairs, for a top-k by value with ties to the smaller id: the value's
# _ordered_key in the high 32 bits, _LOW_ID - id in the low ones. _KEY_NONE ranks below every such key.
_KEY_NONE = tl.constexpr(-(2 ** 63))
_LOW_ID = tl.constexpr(2 ** 31 - 1)


@triton.jit
def _rank_key(key, ids):
    """int64 ranking keys of int32 order keys `key` (from _ordered_key) and ids `ids` (0 <= id < 2^31)."""
    return (key.to(tl.int64) << 32) + (ids.to(tl.int64) * -1 + _LOW_ID)


@triton.jit
def _key_ids(keys):
    """The ids of ranking keys (their low 32 bits)."""
    return ((keys - ((keys >> 32) << 32)) * -1 + _LOW_ID).to(tl.int32)


@triton.jit
def _relu(s):
    """relu that keeps a NaN (tl.maximum's default drops it on the GPU); one max.NaN instruction on sm_80+."""
    return tl.maximum(s, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b on the tensor cores; IEEE: full fp32 products (fp32 inputs), else the default precision."""
    if IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _ranked_logits(z, visible):
    """The visible logits, a NaN ranked as +inf (docs/ops.md, non-finite values); -inf elsewhere."""
    return tl.where(visible, tl.where(z == z, z, float("inf")), float("-inf"))


@triton.jit
def _key_float(key):
    """Inverse of _ordered_key (int32 key -> fp32)."""
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


# ----------------------------------------------------------------------------- logits

@triton.jit
def _logits_kernel(QI, W, KI, NVIS, BUF, STATS, t0, Tcur, N, J, Hs, scale,
                   sqb, sqh, sqt, sqj, sqd, swb, swh, swt, swj, skb, skn, skd,
                   K: tl.constexpr, TM: tl.constexpr, JG: tl.constexpr, BN: tl.constexpr,
                   D: tl.constexpr, BD: tl.constexpr, FILL: tl.constexpr, STATS_ON: tl.constexpr,
                   IEEE: tl.constexpr):
    kt = tl.program_id(0)
    mt = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // Hs).to(tl.int64)
    h = (bh % Hs).to(tl.int64)
    tt = mt * TM + tl.arange(0, TM)  # query rows within the chunk
    row_ok = tt < Tcur
    nvis = tl.load(NVIS + t0 + tt, mask=row_ok, other=0)
    n_last = tl.max(nvis, axis=0)  # visible keys of the tile's last query (nvis is non-decreasing)
    cols = kt * BN + tl.arange(0, BN)
    row = tt.to(tl.int64) * tl.num_programs(2) + bh  # buffer / stats row
    buf_ptr = BUF + row[:, None] * N + cols[None, :]
    store_ok = row_ok[:, None] & (cols[None, :] < N)
    if (kt * BN < n_last) & (n_last > K):
        d = tl.arange(0, BD)
        kmask = (cols[:, None] < N) & (d[None, :] < D)
        k = tl.load(KI + b * skb + cols[:, None].to(tl.int64) * skn + d[None, :] * skd, mask=kmask, other=0.0)
        r = tl.arange(0, TM * JG)
        rt = (t0 + mt * TM + r // JG).to(tl.int64)
        r_ok = (mt * TM + r // JG) < Tcur
        acc = tl.full([TM, BN], 0.0, tl.float32)
        for j0 in range(0, J, JG):
            j = j0 + r % JG
            qmask = r_ok & (j < J)
            q_rows = QI + b * sqb + h * sqh + rt * sqt + j.to(tl.int64) * sqj
            q = tl.load(q_rows[:, None] + d[None, :] * sqd, mask=qmask[:, None] & (d[None, :] < D), other=0.0)
            wj = tl.load(W + b * swb + h * swh + rt * swt + j * swj, mask=qmask, other=0.0).to(tl.float32)
            s = _relu(_dot(q, tl.trans(k.to(q.dtype)), IEEE)) * wj[:, None]
            if JG == 1:
                acc += s
            else:
                acc += tl.sum(tl.reshape(s, [TM, JG, BN]), axis=1)
        visible = cols[None, :] < nvis[:, None]
        z = _ranked_logits(acc * scale, visible)
        tl.store(buf_ptr, z, mask=store_ok)
        if STATS_ON:
            key = _ordered_key(z)
            seen = row_ok & (nvis > kt * BN)
            tl.atomic_min(STATS + row * 2, tl.min(tl.where(visible, key, 2147483647), axis=1), mask=seen)
            tl.atomic_max(STATS + row * 2 + 1, tl.max(tl.where(visible, key, -2147483648), axis=1), mask=seen)
    elif FILL:
        tl.store(buf_ptr, tl.full([TM, BN], float("-inf"), tl.float32), mask=store_ok)


# ----------------------------------------------------------------------------- select

@triton.jit
def _load_block(VALS, IDS, vals_base, ids_base, pos, limit, INDIRECT: tl.constexpr):
    """Key ids, logits and validity of positions pos of a row (INDIRECT: ids read from IDS, -1 = none)."""
    inb = pos < limit
    if INDIRECT:
        ids = tl.load(IDS + ids_base + pos, mask=inb, other=-1)
        valid = inb & (ids >= 0)
    else:
        ids = pos
        valid = inb
    x = tl.load(VALS + vals_base + ids, mask=valid, other=0.0)
    return ids, x, valid


@triton.jit
def _float_bin(x, fmin, inv, NB: tl.constexpr):
    """Linear bin of x between the row's min and max logits; monotone in x (NaN -> bin 0 on every backend)."""
    u = (x - fmin) * inv
    u = tl.where(u > 0.0, u, 0.0)
    return tl.where(u < NB - 1.0, u, NB - 1.0).to(tl.int32)


@triton.jit
def _pick_bin(hist, need, NB: tl.constexpr):
    """The bin holding the need-th largest element: (bin, count in higher bins, count in the bin)."""
    bins = tl.arange(0, NB)
    at_least = tl.cumsum(hist, axis=0, reverse=True)  # elements in bins >= b
    best = tl.max(tl.where(at_least >= need, bins, -1), axis=0)
    above = tl.sum(tl.where(bins > best, hist, 0), axis=0)
    inside = tl.sum(tl.where(bins == best, hist, 0), axis=0)
    return best, above, inside


@triton.jit
def _select_kernel(VALS, IDS, NVIS, STATS, OUT, SCRATCH, t0, Tcur, BH, N, seg_len, n_cand,
                   so_bh, so_t, so_seg, si_bh, si_t,
                   K: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr,
                   CAP: tl.constexpr, INDIRECT: tl.constexpr):
    r = tl.program_id(0)
    seg = tl.program_id(1)
    bh = r // Tcur
    tt = r % Tcur
    row = tt.to(tl.int64) * BH + bh  # buffer / stats row
    nvis = tl.load(NVIS + t0 + tt)
    vals_base = row * N
    out_ptr = OUT + bh.to(tl.int64) * so_bh + tt.to(tl.int64) * so_t + seg * so_seg
    scr_ptr = SCRATCH + (r * tl.num_programs(1) + seg).to(tl.int64) * CAP
    if INDIRECT:  # stage B: positions index the segments' candidates, ids come from IDS
        ids_base = bh.to(tl.int64) * si_bh + tt.to(tl.int64) * si_t
        lo = 0
        hi = n_cand
        n_short = nvis
        short_base = 0
    else:
        ids_base = 0
        lo = seg * seg_len
        hi = tl.minimum(lo + seg_len, nvis)
        n_short = hi - lo
        short_base = lo
    kk = tl.arange(0, KP)
    if n_short <= K:  # at most K keys: take them all
        tl.store(out_ptr + kk, tl.where(kk < n_short, short_base + kk, -1), mask=kk < K)
    else:
        kmin = tl.load(STATS + row * 2).to(tl.int64)
        kmax = tl.load(STATS + row * 2 + 1).to(tl.int64)
        fmin = _key_float(kmin.to(tl.int32))
        span = _key_float(kmax.to(tl.int32)) - fmin
        spread = (span > 0.0) & (span < float("inf"))
        inv = tl.where(spread, NB / tl.where(spread, span, 1.0), 0.0)
        # a. linear histogram between the row's min and max: the bin of the K-th largest
        hist = tl.full([NB], 0, tl.int32)
        for start in range(lo, hi, BLOCK):
            ids, x, valid = _load_block(VALS, IDS, vals_base, ids_base, start + tl.arange(0, BLOCK), hi, INDIRECT)
            hist += tl.histogram(tl.where(valid, _float_bin(x, fmin, inv, NB), 0), NB, mask=valid)
        best, above, inside = _pick_bin(hist, K, NB)
        # members: elements of bin `best` with a key in [klo, khi] (the bin is a key interval)
        klo = kmin
        khi = kmax
        shifts = tl.arange(0, 64).to(tl.int64)
        if inside > CAP:  # b. rare: the bin's exact key range, then radix passes on the key
            klo = kmax
            khi = kmin
            for start in range(lo, hi, BLOCK):
                ids, x, valid = _load_block(VALS, IDS, vals_base, ids_base, start + tl.arange(0, BLOCK), hi,
                                            INDIRECT)
                member = valid & (_float_bin(x, fmin, inv, NB) == best)
                key = _ordered_key(x).to(tl.int64)
                klo = tl.minimum(klo, tl.min(tl.where(member, key, kmax), axis=0))
                khi = tl.maximum(khi, tl.max(tl.where(member, key, kmin), axis=0))
        while (inside > CAP) & (khi > klo):
            shift = tl.sum(((khi - klo) >> shifts >= NB).to(tl.int64), axis=0)  # (khi - klo) >> shift < NB
            hist = tl.full([NB], 0, tl.int32)
            for start in range(lo, hi, BLOCK):
                ids, x, valid = _load_block(VALS, IDS, vals_base, ids_base, start + tl.arange(0, BLOCK), hi,
                                            INDIRECT)
                key = _ordered_key(x).to(tl.int64)
                member = valid & (key >= klo) & (key <= khi)
                hist += tl.histogram(tl.where(member, (key - klo) >> shift, 0).to(tl.int32), NB, mask=member)
            best_digit, more, inside = _pick_bin(hist, K - above, NB)
            above += more
            khi = tl.minimum(khi, klo + ((best_digit.to(tl.int64) + 1) << shift) - 1)
            klo = klo + (best_digit.to(tl.int64) << shift)
        # c. gather the members (<= CAP) in id order; a single-valued interval needs only the id of
        #    its need-th member (ties go to the smaller id)
        need = K - above
        single = klo == khi
        n_scratch = tl.where(single, 0, CAP)
        cut_rank = tl.where(single, need - 1, -1)
        n_member = 0
        for start in range(lo, hi, BLOCK):
            ids, x, valid = _load_block(VALS, IDS, vals_base, ids_base, start + tl.arange(0, BLOCK), hi, INDIRECT)
            key = _ordered_key(x).to(tl.int64)
            member = valid & (_float_bin(x, fmin, inv, NB) == best) & (key >= klo) & (key <= khi)
            m_rank = n_member + tl.cumsum(member.to(tl.int32), axis=0) - 1
            tl.store(scr_ptr + m_rank, ids, mask=member & (m_rank < n_scratch))
            tl.store(scr_ptr + m_rank * 0, ids, mask=member & (m_rank == cut_rank))
            n_member += tl.sum(member.to(tl.int32), axis=0)
        tl.debug_barrier()
        # d. threshold key t: bisection until exactly `need` candidates are >= t, or t is the need-th
        #    largest key (then ties at t go to the smaller ids, up to the id `cut`)
        ci = tl.arange(0, CAP)
        c_ok = ci < tl.minimum(n_member, n_scratch)
        c_ids = tl.load(scr_ptr + ci, mask=c_ok, other=0)
        c_key = _ordered_key(tl.load(VALS + vals_base + c_ids, mask=c_ok, other=0.0)).to(tl.int64)
        t_lo = tl.where(single, klo, tl.min(tl.where(c_ok, c_key, khi), axis=0))  # >= need keys at or above
        t_hi = khi  # fewer than need keys above
        n_lo = tl.where(single, need, n_member)
        while (t_lo < t_hi) & (n_lo != need):
            mid = (t_lo + t_hi + 1) >> 1
            n_mid = tl.sum((c_ok & (c_key >= mid)).to(tl.int32), axis=0)
            t_lo = tl.where(n_mid >= need, mid, t_lo)
            n_lo = tl.where(n_mid >= need, n_mid, n_lo)
            t_hi = tl.where(n_mid >= need, t_hi, mid - 1)
        greater = c_ok & (c_key > t_lo)
        equal = c_ok & (c_key == t_lo)
        e_rank = tl.cumsum(equal.to(tl.int32), axis=0) - 1
        n_equal = need - tl.sum(greater.to(tl.int32), axis=0)
        cut = tl.max(tl.where(equal & (e_rank < n_equal), c_ids, -1), axis=0)
        cut = tl.where(single, tl.load(scr_ptr), cut)
        # e. write the selection in id order
        n_out = 0
        for start in range(lo, hi, BLOCK):
            ids, x, valid = _load_block(VALS, IDS, vals_base, ids_base, start + tl.arange(0, BLOCK), hi, INDIRECT)
            key = _ordered_key(x).to(tl.int64)
            take = valid & ((key > t_lo) | ((key == t_lo) & (ids <= cut)))
            rank = n_out + tl.cumsum(take.to(tl.int32), axis=0) - 1
            tl.store(out_ptr + rank, ids, mask=take & (rank < K))
            n_out += tl.sum(take.to(tl.int32), axis=0)


# ----------------------------------------------------------------------------- launcher


def _check_inputs(q_i, w, k_i, key_end, topk):
    if q_i.dtype == torch.float64:
        raise ValueError("the triton indexer top-k runs fp32/fp16/bf16; use backend='reference' for fp64")
    if q_i.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the triton indexer top-k needs fp32/fp16/bf16 inputs, got {q_i.dtype}")
    if q_i.dim() != 5 or w.shape != q_i.shape[:4] or k_i.dim() != 3 or k_i.shape[2] != q_i.shape[4] \
            or k_i.shape[0] != q_i.shape[0] or key_end.shape != (k_i.shape[1],):
        raise ValueError(f"indexer inputs must be q_i [B, Hs, T, J, D_i], w [B, Hs, T, J], k_i [B, N, D_i], "
                         f"key_end [N]; got {tuple(q_i.shape)}, {tuple(w.shape)}, {tuple(k_i.shape)}, "
                         f"{tuple(key_end.shape)}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")


def stats_init(device) -> torch.Tensor:
    """The empty (min, max) of a stats row. Fill kernels, not a host-to-device copy, so a launcher that
    builds it can be captured in a CUDA graph."""
    init = torch.full((2,), _INT32_MIN, dtype=torch.int32, device=device)
    init[:1].fill_(_INT32_MAX)
    return init


def _resolve_config(config, device) -> dict:
    cfg = dict(CONFIG)
    if device.type != "cuda":
        cfg.update(_INTERPRETER_CONFIG)
    cfg.update(config or {})
    if cfg["topk_mode"] not in ("triton", "torch"):
        raise ValueError(f"topk_mode must be 'triton' or 'torch', got {cfg['topk_mode']!r}")
    return cfg


def _plan_split(rows: int, N: int, topk: int, cfg: dict, device) -> int:
    """Segments per row: 1 unless the rows cannot fill the GPU; then ~sqrt(N / topk), which balances
    stage A (segment length N / split) against stage B (split * topk candidates)."""
    if cfg["split"] is not None:
        return max(1, int(cfg["split"]))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if rows >= sms:
        return 1
    split = min(int(math.sqrt(N / topk)), max(1, 4 * sms // rows))
    return split if split >= 2 else 1


def _launch_logits(q_i, w, k_i, nvis, buf, stats, t0, Tcur, topk, scale, cfg, fill):
    B, Hs, T, J, D = q_i.shape
    N = k_i.shape[1]
    TM = min(cfg["TM"], _pow2(Tcur))
    JG = min(_pow2(J), max(1, cfg["BM"] // TM))
    while TM * JG < 16:  # tl.dot needs at least 16 rows; extra heads are masked to zero
        JG *= 2
    BN = cfg["BN"]
    grid = (triton.cdiv(N, BN), triton.cdiv(Tcur, TM), B * Hs)
    _logits_kernel[grid](
        q_i, w, k_i, nvis, buf, stats, t0, Tcur, N, J, Hs, float(scale),
        *q_i.stride(), *w.stride(), *k_i.stride(),
        K=topk, TM=TM, JG=JG, BN=BN, D=D, BD=max(16, _pow2(D)), FILL=fill,
        STATS_ON=cfg["topk_mode"] == "triton", IEEE=q_i.dtype == torch.float32 and cfg["fp32_ieee"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _select_triton(buf, nvis, stats, out, t0, Tcur, topk, cfg):
    """Row-wise top-k of the chunk's logits into out[:, :, t0:t0+Tcur] (out viewed [B*Hs, T, topk])."""
    BH, N = buf.shape[1], buf.shape[2]
    rows = BH * Tcur
    block, cap = cfg["select_block"], cfg["select_cap"]
    consts = dict(K=topk, KP=_pow2(topk), NB=cfg["select_bins"], BLOCK=block, CAP=cap,
                  num_warps=cfg["select_warps"])
    split = _plan_split(rows, N, topk, cfg, buf.device)
    seg_len = triton.cdiv(triton.cdiv(N, split), block) * block
    split = triton.cdiv(N, seg_len)
    scratch = torch.empty((rows * split, cap), dtype=torch.int32, device=buf.device)
    final = out[:, t0:]
    if split == 1:
        _select_kernel[(rows, 1)](buf, buf, nvis, stats, final, scratch, t0, Tcur, BH, N, seg_len, 0,
                                  final.stride(0), final.stride(1), 0, 0, 0, INDIRECT=False, **consts)
        return
    cand = torch.empty((BH, Tcur, split, topk), dtype=torch.int32, device=buf.device)
    _select_kernel[(rows, split)](buf, buf, nvis, stats, cand, scratch, t0, Tcur, BH, N, seg_len, 0,
                                  cand.stride(0), cand.stride(1), cand.stride(2), 0, 0, INDIRECT=False, **consts)
    _select_kernel[(rows, 1)](buf, cand, nvis, stats, final, scratch, t0, Tcur, BH, N, seg_len, split * topk,
                              final.stride(0), final.stride(1), 0, cand.stride(0), cand.stride(1),
                              INDIRECT=True, **consts)


def _select_torch(buf, nvis, out, t0, Tcur, topk):
    """torch.topk on the chunk; rows with <= topk visible keys take them all. Ids sorted ascending."""
    n = min(topk, buf.shape[2])
    ids = torch.topk(buf[:Tcur], n, dim=-1, sorted=False).indices.sort(dim=-1).values  # [Tcur, BH, n]
    res = torch.full((buf.shape[1], Tcur, topk), -1, dtype=torch.int64, device=buf.device)
    res[..., :n] = ids.transpose(0, 1)
    nv = nvis[t0:t0 + Tcur].long()[None, :, None]
    slot = torch.arange(topk, device=buf.device)
    everything = torch.where(slot < nv, slot, -1)
    out[:, t0:t0 + Tcur] = torch.where(nv <= topk, everything, res).to(torch.int32)


@torch.no_grad()
def indexer_topk_triton(q_i: torch.Tensor, w: torch.Tensor, k_i: torch.Tensor, key_end: torch.Tensor, S: int,
                        topk: int, scale: float, config: dict | None = None) -> torch.Tensor:
    """Top-k visible keys per query by index logit -> int32 [B, Hs, T, topk]: valid ids ascending,
    then -1 padding. Ties go to the smaller id in 'triton' mode (see the module docstring for 'torch').

    q_i [B, Hs, T, J, D_i], w [B, Hs, T, J], k_i [B, N, D_i] (fp32/fp16/bf16), key_end int [N]
    non-decreasing (key n visible at positions >= key_end[n]); queries are the last T of S positions.
    config overrides CONFIG (tiles, top-k mode, buffer bound)."""
    _check_inputs(q_i, w, k_i, key_end, topk)
    cfg = _resolve_config(config, q_i.device)
    B, Hs, T, J, D = q_i.shape
    N = k_i.shape[1]
    out = torch.empty((B, Hs, T, topk), dtype=torch.int32, device=q_i.device)
    if T == 0 or B * Hs == 0:
        return out
    if N == 0:
        return out.fill_(-1)
    positions = torch.arange(S - T, S, device=q_i.device, dtype=torch.int64)
    nvis = torch.searchsorted(key_end.to(device=q_i.device, dtype=torch.int64).contiguous(), positions,
                              right=True).to(torch.int32)
    Tc = max(1, min(T, cfg["buffer_bytes"] // (4 * B * Hs * N)))
    buf = torch.empty((Tc, B * Hs, N), dtype=torch.float32, device=q_i.device)
    stats = torch.empty((B * Hs * Tc, 2), dtype=torch.int32, device=q_i.device)
    init = stats_init(q_i.device)
    flat = out.view(B * Hs, T, topk)
    triton_mode = cfg["topk_mode"] == "triton"
    for t0 in range(0, T, Tc):
        Tcur = min(Tc, T - t0)
        if triton_mode:
            stats.copy_(init.expand_as(stats))
        _launch_logits(q_i, w, k_i, nvis, buf, stats, t0, Tcur, topk, scale, cfg, fill=not triton_mode)
        if triton_mode:
            _select_triton(buf, nvis, stats, flat, t0, Tcur, topk, cfg)
        else:
            _select_torch(buf, nvis, flat, t0, Tcur, topk)
    return out
