"""Decode-specialised DSA/CSA lightning-indexer top-k (Triton): stream the index keys once at HBM
bandwidth, then an exact row top-k built for few rows.

Same contract as indexer_triton.indexer_topk_triton (see its module docstring): q_i [B, Hs, T, J, D_i],
w [B, Hs, T, J], k_i [B, N, D_i], key_end [N] non-decreasing; query t (position S - T + t) sees key n
iff key_end[n] <= S - T + t; I[t, n] = scale * sum_j w[t, j] * relu(<q_i[t, j], k_i[n]>). Output int32
[B, Hs, T, topk]: the topk visible keys with the largest logits, ids ascending, ties to the smaller
id, then -1 padding. Built for decode: few query rows (T <= 4), so rows = B * Hs * T is small and the
fp32 logits [T, B * Hs, N] (rows x N x 4 B) are a few MB that stay in L2 for the select.

Launches (no host syncs; CUDA-graph capturable):
0. one memset of an int32 workspace, per row: [min code, max code, visible count, done, candidates,
   threshold key, tie cut, hist[NB]].
1. `_logits_kernel`, grid (B * unit groups, splits), sized to CONFIG["programs_per_sm"] programs per
   SM. A unit is one (selection head h, query t) pair; a program holds UG units x J index heads
   (>= 16 rows, padded) of q_i and w resident and streams one contiguous key range of request b in
   BN-key tiles (num_stages-deep software pipeline): one tensor-core dot per tile, keys x rows
   (CONFIG["key_major"]: the sum over the index heads then stays within thread groups; rows x keys
   sums across warps through shared memory and ran at half the HBM rate), relu * w summed over the
   heads, logits (-inf where not visible) stored to the buffer. Visibility is
   tested per key (key_end <= position), so no searchsorted runs first: each program adds its
   visible-key count per row to the workspace and folds the row's min/max logit into it, one
   atomic per row per program. The min/max are kept as "codes" (order-preserving int keys halved
   and shifted into [0, 2^31)), so the zero-filled workspace is their identity and the bounds they
   give are exact to one ulp (enough: the select only needs a monotone binning).
2. `_hist_kernel`, grid (rows, segments): a NB-bin histogram of each row's logits, binned linearly
   between the row's min and max (indexer_triton's _float_bin), added to the row's workspace.
3. `_partition_kernel`, grid (rows, segments): from the histogram, the bin `best` holding the
   topk-th largest logit (indexer_triton's _pick_bin); every logit in a higher bin is selected for
   sure, those in `best` are candidates. Each segment writes its sure ids and (flagged) candidate
   ids, in id order, into its own slice of a [rows, N] list, with its entry and candidate counts, and
   appends its candidate ids to the row's CAP slots (one atomic per block reserves them). The last
   program of a row to finish (an acq_rel counter in the workspace) ends the row:
   a. typically (<= CAP candidates): one bitonic sort of the candidates by (logit desc, id asc) gives
      the threshold (key t, tie cut: a candidate is taken iff its key > t, or = t and id <= cut), and
      from the taken candidates per segment each segment's first output slot;
   b. rarely (more candidates: ties, outliers stretching the min/max), the serial finish
      (`_finish_row`): radix passes over the list narrow the candidates' keys until <= CAP remain or
      one key value is left, a gather pass puts them in id order, a register radix narrowing finds the
      threshold, and a write pass writes the taken ids in ascending order.
   CONFIG["finish"] = "kernel" runs this end as its own launch (grid (rows,)).
4. `_write_kernel`, grid (rows, segments): each segment writes its taken ids from its slot on, so the
   output is in ascending id order (rows that took (b) are already written).
   Typical rows: the histogram bin holds ~0.3% of the row (336-440 of 131,072 keys on the H200
   benchmark's DSA rows), so (a) sorts a few hundred keys (CAP follows N, see _cap).
Non-finite values: the logits epilogue is indexer_triton's (a NaN logit ranks as +inf); an infinite
min/max code decodes to a NaN bound, so the row's bins collapse into one: the whole row is candidates,
sorted in (a) where it fits CAP, else resolved by (b)'s radix passes.
CONFIG["select"] = "rows" swaps 2-4 for indexer_triton's row select (`_select_triton`, whose split
path handles few rows), fed with the same logits and min/max bounds.

Cost (H200, B = 8, J = 64, D_i = 128, bf16, T = 1; benchmarks/indexer_decode_profile.py): the logits kernel
reads the index keys once (N x 256 B per request; 67 MB for CSA at N = 32k, 268 MB for DSA at N = 128k):
~70 us for DSA (~75 us on 64-key tiles in two waves, 76% of the HBM rate by ncu; rows x keys took 121 us) and
~21 us for CSA, with 128-key tiles in one wave of 2 programs per SM. The select is
latency-bound (the logits are in L2): with a separate end launch, DSA's histogram took ~7 us, the
partition ~12 us (~7 us without the candidate appends), the end (a sort of 512 slots) ~6 us and the
write ~4 us, where the serial finish took ~24 us; CSA's 4, 6, 4 (128 slots) and 3 us. Whole op,
CUDA-graph timed: 0.110 ms (DSA) and 0.048 ms (CSA), from 0.161 and 0.067 ms before the key-major dot, the
parallel write and the one-wave grid.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .indexer_triton import _check_inputs, _dot, _float_bin, _key_float, _ordered_key, _pick_bin, _ranked_logits, _relu
from .indexer_triton import _resolve_config as _rows_config
from .indexer_triton import _select_triton
from sparsezoo.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_launch, resolve_pdl
from sparsezoo.kernels.sizes import fit_tiles
from sparsezoo.kernels.sizes import pow2 as _pow2

# GPU tiling and select knobs (the lead tunes these on the H200).
CONFIG = {
    "BN": 128,                 # keys per logits tile
    "num_warps": 4,            # logits kernel, <= 64 dot rows (T * Hs = 1 at J = 64)
    "num_warps_wide": 8,       # logits kernel, more dot rows (its per-column accumulators would spill at 4)
    "num_stages": 3,           # logits kernel: key tiles in flight per program (fewer where they would not fit)
    "programs_per_sm": 2,      # logits programs per SM (splits of each request's key range)
    "whole_wave": True,        # logits grid: at most programs_per_sm per SM (one wave; rounds the splits down)
    "key_major": True,         # logits dot as keys x rows (the head sum within thread groups), else rows x keys
    "max_rows": 256,           # most dot rows (units x padded index heads) per logits program
    "max_T": 4,                # decode_applies: at most this many new queries per request
    "select": "decode",        # 'decode' (histogram + partition + finish) or 'rows' (indexer_triton's)
    "finish": "fused",         # 'fused' (last partition program of a row) or 'kernel' (own launch)
    "hist_bins": 128,          # linear bins of the first select pass (power of two, >= 32 on the GPU)
    "radix_bins": 64,          # bins per radix digit of the finish (power of two, >= 32 on the GPU)
    "block": 2048,             # logits per step of the histogram and partition passes
    "finish_block": 2048,      # list entries per step of the finish
    "write_block": 1024,       # list entries per step of the parallel write
    "cap": 0,                  # candidates resolved in registers (power of two); 0: from N (see _cap)
    "segments_per_sm": 2,      # select programs per SM (segments of each row)
    "max_segments": 64,        # most segments per row
    "select_warps": 8,
    "splits": None,            # logits programs per unit group; None = from programs_per_sm
    "segments": None,          # select segments per row; None = from segments_per_sm
    "rows_select": None,       # 'rows' select: config overrides for indexer_triton
    "buffer_bytes": 1 << 30,   # decode_applies: bound of the logits buffer + the select list
    "fp32_ieee": True,         # fp32 inputs: IEEE dots (else tf32)
    "pdl": None,               # decode select: logits, histogram, partition and write as programmatic dependent
                               # launches (sparsezoo/kernels/pdl.py); None: at batch 1 where the GPU supports them (H200,
                               # 128k, with the gather attention after it: CSA 37.7 against 40.1 us at b=1,
                               # 62.9 against 61.2 us at b=8; DSA 64.9 / 65.4 and 136.4 / 130.6 us)
}

# The logits grid in one wave of 2 programs per SM with 128-key tiles, 3 in flight (from 33 splits per request of
# 64-key tiles, 4 in flight): H200, 128k, B = 8, bf16, logits 21.4 against 22.7 us (CSA) and 69.7 against 75.0 us
# (DSA); one program per SM, 6-8 stages and 8 warps were slower (scripts/probes/indexer_decode_grid.py;
# examples/results/h200_2026-12-03/indexer_decode_grid_h200.log).

SELECTS = ("decode", "rows")

# Interpreter (CPU) tiles: tiny, so the tests stay quick.
_INTERPRETER_CONFIG = {"BN": 128, "num_warps": 4, "num_stages": 1, "block": 256, "finish_block": 256, "cap": 64,
                       "write_block": 256}
_INTERPRETER_SMS = 4  # stands in for the SM count on the CPU, so the default grids split rows too

# Workspace fields per row (int32, zero-filled): min / max logit codes, visible keys, finished
# partition programs, candidates appended, the threshold's key and tie cut, then the histogram.
_WS_MIN, _WS_MAX, _WS_NVIS, _WS_DONE, _WS_NCAND, _WS_TKEY, _WS_TCUT, _WS_HIST = (tl.constexpr(i) for i in range(8))


# ----------------------------------------------------------------------------- logits

@triton.jit
def _code(key):
    """int32 key -> [0, 2^31) code, monotone (non-strict): 0 is the identity of atomic_max."""
    return (key >> 1) + (1 << 30)


@triton.jit
def _logits_kernel(QI, W, KI, KEND, BUF, WS, N, S, T, U, BH, Hs, n_groups, split_len, scale,
                   sqb, sqh, sqt, sqj, sqd, swb, swh, swt, swj, skb, skn, skd, sen,
                   J: tl.constexpr, UG: tl.constexpr, JP: tl.constexpr, BN: tl.constexpr,
                   D: tl.constexpr, BD: tl.constexpr, WSR: tl.constexpr, IEEE: tl.constexpr,
                   KEY_MAJOR: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # the workspace it adds to is zeroed by the launch before it
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0)
    b = (pid // n_groups).to(tl.int64)
    g = pid % n_groups
    lo = tl.program_id(1) * split_len
    hi = tl.minimum(lo + split_len, N)
    # dot rows: unit g*UG + r // JP (unit = h * T + t), index head r % JP
    r = tl.arange(0, UG * JP)
    ru = g * UG + r // JP
    j = r % JP
    r_ok = (ru < U) & (j < J)
    d = tl.arange(0, BD)
    d_ok = d < D
    q_rows = QI + b * sqb + (ru // T).to(tl.int64) * sqh + (ru % T).to(tl.int64) * sqt + j.to(tl.int64) * sqj
    if KEY_MAJOR:  # q^T [BD, rows]: the dot gives keys x rows, summed over the rows within each thread group
        q = tl.load(q_rows[None, :] + d[:, None] * sqd, mask=r_ok[None, :] & d_ok[:, None], other=0.0)
    else:
        q = tl.load(q_rows[:, None] + d[None, :] * sqd, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    w_rows = W + b * swb + (ru // T).to(tl.int64) * swh + (ru % T).to(tl.int64) * swt + j * swj
    wr = tl.load(w_rows, mask=r_ok, other=0.0).to(tl.float32)
    # the program's units: buffer / workspace rows t * BH + b * Hs + h
    u = g * UG + tl.arange(0, UG)
    u_ok = u < U
    pos = S - T + u % T
    row = (u % T).to(tl.int64) * BH + b * Hs + u // T
    kmin = tl.full([UG, BN], 2147483647, tl.int32)  # per column: reduced once, after the loop
    kmax = tl.full([UG, BN], -2147483648, tl.int32)
    n_vis = tl.zeros([UG, BN], tl.int32)
    for n0 in range(lo, hi, BN):
        cols = n0 + tl.arange(0, BN)
        c_ok = cols < hi
        k = tl.load(KI + b * skb + cols[:, None].to(tl.int64) * skn + d[None, :] * skd,
                    mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        ends = tl.load(KEND + cols.to(tl.int64) * sen, mask=c_ok, other=0)
        if KEY_MAJOR:
            s = _relu(_dot(k.to(q.dtype), q, IEEE)) * wr[None, :]
            if UG == 1:
                z = tl.sum(s, axis=1)[None, :]
            else:
                z = tl.trans(tl.sum(tl.reshape(s, [BN, UG, JP]), axis=2))
        else:
            s = _relu(_dot(q, tl.trans(k.to(q.dtype)), IEEE)) * wr[:, None]
            if UG == 1:
                z = tl.sum(s, axis=0)[None, :]
            else:
                z = tl.sum(tl.reshape(s, [UG, JP, BN]), axis=1)
        visible = c_ok[None, :] & (ends[None, :] <= pos[:, None])
        z = _ranked_logits(z * scale, visible)
        tl.store(BUF + row[:, None] * N + cols[None, :], z, mask=u_ok[:, None] & c_ok[None, :])
        key = _ordered_key(z)
        kmin = tl.minimum(kmin, tl.where(visible, key, 2147483647))
        kmax = tl.maximum(kmax, tl.where(visible, key, -2147483648))
        n_vis += visible.to(tl.int32)
    count = tl.sum(n_vis, axis=1)
    seen = u_ok & (count > 0)
    ws = WS + row * WSR
    tl.atomic_add(ws + _WS_NVIS, count, mask=seen)
    tl.atomic_max(ws + _WS_MIN, _code(~tl.min(kmin, axis=1)), mask=seen)  # the largest code of ~key: smallest key
    tl.atomic_max(ws + _WS_MAX, _code(tl.max(kmax, axis=1)), mask=seen)


# ----------------------------------------------------------------------------- select

@triton.jit
def _bin_scale(ws, NB: tl.constexpr):
    """(fmin, inv) of the row's linear bins, from its min/max codes (bounds within one ulp)."""
    kmin = ~(((tl.load(ws + _WS_MIN) - (1 << 30)) << 1) | 1)
    kmax = ((tl.load(ws + _WS_MAX) - (1 << 30)) << 1) | 1
    fmin = _key_float(kmin)
    span = _key_float(kmax) - fmin
    spread = (span > 1e-30) & (span < float("inf"))  # else one bin (NB / span could overflow)
    return fmin, tl.where(spread, NB / tl.where(spread, span, 1.0), 0.0)


@triton.jit
def _hist_kernel(BUF, WS, N, seg_len, K: tl.constexpr, NB: tl.constexpr, WSR: tl.constexpr,
                 BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # every input is the kernel before's output
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    ws = WS + row * WSR
    nvis = tl.load(ws + _WS_NVIS)
    lo = tl.program_id(1) * seg_len
    hi = tl.minimum(lo + seg_len, nvis)
    if (nvis > K) & (lo < hi):
        fmin, inv = _bin_scale(ws, NB)
        hist = tl.zeros([NB], tl.int32)
        for start in range(lo, hi, BLOCK):
            ids = start + tl.arange(0, BLOCK)
            ok = ids < hi
            x = tl.load(BUF + row * N + ids, mask=ok, other=0.0)
            hist += tl.histogram(tl.where(ok, _float_bin(x, fmin, inv, NB), 0), NB, mask=ok)
        tl.atomic_add(ws + _WS_HIST + tl.arange(0, NB), hist, mask=hist > 0)


@triton.jit
def _list_block(BUF, LIST, base, p0, n_entries, incl, seg_off, BLOCKF: tl.constexpr, LOGS: tl.constexpr):
    """Entries p0 + [0, BLOCKF) of a row's list: (ids, candidate?, int64 key, valid). Segment s holds its
    entries from s * seg_len on; incl = inclusive entry counts per segment, seg_off = s * seg_len -
    exclusive count."""
    p = p0 + tl.arange(0, BLOCKF)
    ok = p < n_entries
    seg = tl.zeros_like(p)
    for i in tl.static_range(LOGS):  # binary search: the segment holding entry p
        probe = seg + (1 << (LOGS - 1 - i))
        seg = tl.where(tl.gather(incl, probe - 1, axis=0) <= p, probe, seg)
    v = tl.load(LIST + base + p + tl.gather(seg_off, seg, axis=0), mask=ok, other=0, cache_modifier=".cg")
    cand = ok & (v < 0)
    ids = tl.where(v < 0, -v - 1, v)
    x = tl.load(BUF + base + ids, mask=cand, other=0.0)
    return ids, cand, _ordered_key(x).to(tl.int64), ok


@triton.jit
def _narrow(hist, klo, khi, shift, need, NBR: tl.constexpr):
    """Keep the radix digit (of width 2^shift above klo) holding the need-th largest key:
    -> (klo, khi, need within it, keys within it)."""
    digit, above, inside = _pick_bin(hist, need, NBR)
    new_lo = klo + (digit.to(tl.int64) << shift)
    new_hi = tl.minimum(khi, new_lo + (tl.full([], 1, tl.int64) << shift) - 1)
    return new_lo, new_hi, need - above, inside


@triton.jit
def _shift_for(klo, khi, NBR: tl.constexpr):
    """Smallest shift with (khi - klo) >> shift < NBR."""
    bits = tl.arange(0, 64).to(tl.int64)
    return tl.sum((((khi - klo) >> bits) >= NBR).to(tl.int64), axis=0)


@triton.jit
def _finish_row(BUF, WS, LIST, COUNTS, SCRATCH, out_ptr, row, N, seg_len, nseg,
                K: tl.constexpr, NB: tl.constexpr, NBR: tl.constexpr, WSR: tl.constexpr,
                BLOCKF: tl.constexpr, CAP: tl.constexpr, NSEGP: tl.constexpr, LOGS: tl.constexpr):
    """Exact top-K of one row from its list (sure ids, then flagged candidates), written ascending."""
    ws = WS + row * WSR
    base = row * N
    _, above, inside = _pick_bin(tl.load(ws + _WS_HIST + tl.arange(0, NB)), K, NB)
    need = K - above  # candidates to take
    si = tl.arange(0, NSEGP)
    cnt = tl.load(COUNTS + row * nseg + si, mask=si < nseg, other=0, cache_modifier=".cg")
    incl = tl.cumsum(cnt, axis=0)
    seg_off = si * seg_len - (incl - cnt)  # list position - entry position, per segment
    n_entries = tl.sum(cnt, axis=0)
    # a. many candidates (rare): narrow their key interval by radix passes over the list
    klo = tl.full([], -2147483648, tl.int64)
    khi = tl.full([], 2147483647, tl.int64)
    if inside > CAP:  # first the candidates' exact key bounds
        klo = tl.full([], 2147483647, tl.int64)
        khi = tl.full([], -2147483648, tl.int64)
        for p0 in range(0, n_entries, BLOCKF):
            ids, cand, key, ok = _list_block(BUF, LIST, base, p0, n_entries, incl, seg_off, BLOCKF, LOGS)
            klo = tl.minimum(klo, tl.min(tl.where(cand, key, 2147483647), axis=0))
            khi = tl.maximum(khi, tl.max(tl.where(cand, key, -2147483648), axis=0))
    while (inside > CAP) & (khi > klo):
        shift = _shift_for(klo, khi, NBR)
        hist = tl.zeros([NBR], tl.int32)
        for p0 in range(0, n_entries, BLOCKF):
            ids, cand, key, ok = _list_block(BUF, LIST, base, p0, n_entries, incl, seg_off, BLOCKF, LOGS)
            member = cand & (key >= klo) & (key <= khi)
            hist += tl.histogram(tl.where(member, (key - klo) >> shift, 0).to(tl.int32), NBR, mask=member)
        klo, khi, need, inside = _narrow(hist, klo, khi, shift, need, NBR)
    # b. gather the members (<= CAP) in id order; of a single key value only the need-th member matters
    scratch = SCRATCH + row * CAP
    single = klo == khi
    n_scratch = tl.where(single, 0, CAP)
    cut_rank = tl.where(single, need - 1, -1)
    n_member = 0
    for p0 in range(0, n_entries, BLOCKF):
        ids, cand, key, ok = _list_block(BUF, LIST, base, p0, n_entries, incl, seg_off, BLOCKF, LOGS)
        member = cand & (key >= klo) & (key <= khi)
        rank = n_member + tl.cumsum(member.to(tl.int32), axis=0) - 1
        tl.store(scratch + rank, ids, mask=member & (rank < n_scratch))
        tl.store(scratch + rank * 0, ids, mask=member & (rank == cut_rank))
        n_member += tl.sum(member.to(tl.int32), axis=0)
    tl.debug_barrier()
    # c. in registers: narrow to one key value t; ties at t go to the smaller ids, up to `cut`
    ci = tl.arange(0, CAP)
    c_ok = ci < tl.minimum(n_member, n_scratch)
    c_ids = tl.load(scratch + ci, mask=c_ok, other=0)
    c_key = _ordered_key(tl.load(BUF + base + c_ids, mask=c_ok, other=0.0)).to(tl.int64)
    klo = tl.where(single, klo, tl.min(tl.where(c_ok, c_key, 2147483647), axis=0))
    khi = tl.where(single, khi, tl.max(tl.where(c_ok, c_key, -2147483648), axis=0))
    while klo < khi:
        shift = _shift_for(klo, khi, NBR)
        member = c_ok & (c_key >= klo) & (c_key <= khi)
        hist = tl.histogram(tl.where(member, (c_key - klo) >> shift, 0).to(tl.int32), NBR, mask=member)
        klo, khi, need, inside = _narrow(hist, klo, khi, shift, need, NBR)
    equal = c_ok & (c_key == klo)
    e_rank = tl.cumsum(equal.to(tl.int32), axis=0) - 1
    cut = tl.max(tl.where(equal & (e_rank < need), c_ids, -1), axis=0)
    cut = tl.where(single, tl.load(scratch), cut)
    # d. write the taken ids in ascending order
    n_out = 0
    for p0 in range(0, n_entries, BLOCKF):
        ids, cand, key, ok = _list_block(BUF, LIST, base, p0, n_entries, incl, seg_off, BLOCKF, LOGS)
        take = ok & (~cand | (key > klo) | ((key == klo) & (ids <= cut)))
        rank = n_out + tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(out_ptr + rank, ids, mask=take & (rank < K))
        n_out += tl.sum(take.to(tl.int32), axis=0)


@triton.jit
def _threshold_row(BUF, WS, COUNTS, CCOUNTS, CANDS, OFFS, row, N, seg_len, nseg,
                   K: tl.constexpr, NB: tl.constexpr, WSR: tl.constexpr, CAP: tl.constexpr,
                   NSEGP: tl.constexpr):
    """From the row's appended candidates (<= CAP, any order): the threshold (key t, tie cut: candidates
    with key > t, or key == t and id <= cut, are taken) and each segment's first output slot."""
    ws = WS + row * WSR
    _, above, _ = _pick_bin(tl.load(ws + _WS_HIST + tl.arange(0, NB)), K, NB)
    need = K - above
    ci = tl.arange(0, CAP)
    ok = ci < tl.load(ws + _WS_NCAND, cache_modifier=".cg")
    ids = tl.load(CANDS + row * CAP + ci, mask=ok, other=0, cache_modifier=".cg")
    key = _ordered_key(tl.load(BUF + row * N + ids, mask=ok, other=0.0)).to(tl.int64)
    # one key per candidate ordering it by (logit desc, id asc), >= 0; the need-th of them is the threshold
    rank_key = tl.where(ok, ((key + 2147483648) << 31) + (2147483647 - ids), -1)
    t64 = tl.sum(tl.where(ci == need - 1, tl.sort(rank_key, descending=True), 0), axis=0)
    t = (t64 >> 31) - 2147483648
    cut = 2147483647 - (t64 & 2147483647)
    taken = rank_key >= t64  # key > t, or key == t and id <= cut (-1 where not a candidate)
    taken_per_seg = tl.histogram(tl.where(taken, ids // seg_len, 0), NSEGP, mask=taken)
    si = tl.arange(0, NSEGP)
    s_ok = si < nseg
    sure = tl.load(COUNTS + row * nseg + si, mask=s_ok, other=0, cache_modifier=".cg") - \
        tl.load(CCOUNTS + row * nseg + si, mask=s_ok, other=0, cache_modifier=".cg")
    per_seg = sure + taken_per_seg
    tl.store(OFFS + row * nseg + si, tl.cumsum(per_seg, axis=0) - per_seg, mask=s_ok)
    tl.store(ws + _WS_TKEY, t.to(tl.int32))
    tl.store(ws + _WS_TCUT, cut.to(tl.int32))


@triton.jit
def _out_row(OUT, row, T, BH, K: tl.constexpr):
    """Output row of buffer row t * BH + bh in OUT [B * Hs, T, K]."""
    return OUT + ((row % BH) * T + row // BH) * K


@triton.jit
def _finish_or_threshold(BUF, WS, LIST, COUNTS, CCOUNTS, SCRATCH, OFFS, out_ptr, row, N, seg_len, nseg,
                         K: tl.constexpr, NB: tl.constexpr, NBR: tl.constexpr, WSR: tl.constexpr,
                         BLOCKF: tl.constexpr, CAP: tl.constexpr, NSEGP: tl.constexpr, LOGS: tl.constexpr):
    """A row's end of the select: its threshold for the parallel write where its candidates fit CAP,
    else (rare) the whole serial finish."""
    if tl.load(WS + row * WSR + _WS_NCAND, cache_modifier=".cg") <= CAP:
        _threshold_row(BUF, WS, COUNTS, CCOUNTS, SCRATCH, OFFS, row, N, seg_len, nseg, K, NB, WSR, CAP, NSEGP)
    else:
        _finish_row(BUF, WS, LIST, COUNTS, SCRATCH, out_ptr, row, N, seg_len, nseg,
                    K, NB, NBR, WSR, BLOCKF, CAP, NSEGP, LOGS)


@triton.jit
def _partition_kernel(BUF, WS, LIST, COUNTS, CCOUNTS, SCRATCH, OFFS, OUT, N, T, BH, seg_len, nseg,
                      K: tl.constexpr, KP: tl.constexpr, NB: tl.constexpr, NBR: tl.constexpr,
                      WSR: tl.constexpr, BLOCK: tl.constexpr, BLOCKF: tl.constexpr, CAP: tl.constexpr,
                      NSEGP: tl.constexpr, LOGS: tl.constexpr, FUSED: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    ws = WS + row * WSR
    nvis = tl.load(ws + _WS_NVIS)
    out_ptr = _out_row(OUT, row, T, BH, K)
    if nvis <= K:  # at most K visible keys: take them all
        if s == 0:
            kk = tl.arange(0, KP)
            tl.store(out_ptr + kk, tl.where(kk < nvis, kk, -1), mask=kk < K)
    else:
        fmin, inv = _bin_scale(ws, NB)
        best, _, _ = _pick_bin(tl.load(ws + _WS_HIST + tl.arange(0, NB)), K, NB)
        lo = s * seg_len
        hi = tl.minimum(lo + seg_len, nvis)
        base = row * N
        n = 0
        n_cand = 0
        for start in range(lo, hi, BLOCK):
            ids = start + tl.arange(0, BLOCK)
            ok = ids < hi
            bins = _float_bin(tl.load(BUF + base + ids, mask=ok, other=0.0), fmin, inv, NB)
            entry = ok & (bins >= best)
            rank = n + tl.cumsum(entry.to(tl.int32), axis=0) - 1
            tl.store(LIST + base + lo + rank, tl.where(bins > best, ids, -ids - 1), mask=entry)
            n += tl.sum(entry.to(tl.int32), axis=0)
            # the candidates also go to the row's CAP slots, in any order (reserved by one atomic per block)
            cand = ok & (bins == best)
            c_count = tl.sum(cand.to(tl.int32), axis=0)
            if c_count > 0:
                c_rank = tl.atomic_add(ws + _WS_NCAND, c_count) + tl.cumsum(cand.to(tl.int32), axis=0) - 1
                tl.store(SCRATCH + row * CAP + c_rank, ids, mask=cand & (c_rank < CAP))
            n_cand += c_count
        tl.store(COUNTS + row * nseg + s, n)
        tl.store(CCOUNTS + row * nseg + s, n_cand)
        if FUSED:
            tl.debug_barrier()  # every thread's list stores precede the release below
            if tl.atomic_add(ws + _WS_DONE, 1, sem="acq_rel") == nseg - 1:  # the row's last program
                _finish_or_threshold(BUF, WS, LIST, COUNTS, CCOUNTS, SCRATCH, OFFS, out_ptr, row, N, seg_len,
                                     nseg, K, NB, NBR, WSR, BLOCKF, CAP, NSEGP, LOGS)


@triton.jit
def _finish_kernel(BUF, WS, LIST, COUNTS, CCOUNTS, SCRATCH, OFFS, OUT, N, T, BH, seg_len, nseg,
                   K: tl.constexpr, NB: tl.constexpr, NBR: tl.constexpr, WSR: tl.constexpr,
                   BLOCKF: tl.constexpr, CAP: tl.constexpr, NSEGP: tl.constexpr, LOGS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(WS + row * WSR + _WS_NVIS) > K:
        _finish_or_threshold(BUF, WS, LIST, COUNTS, CCOUNTS, SCRATCH, OFFS, _out_row(OUT, row, T, BH, K), row, N,
                             seg_len, nseg, K, NB, NBR, WSR, BLOCKF, CAP, NSEGP, LOGS)


@triton.jit
def _write_kernel(BUF, WS, LIST, COUNTS, OFFS, OUT, N, T, BH, seg_len, nseg,
                  K: tl.constexpr, WSR: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr,
                  PDL: tl.constexpr = False):
    """Each segment writes its taken ids (its sure ones, and its candidates above the row's threshold) from its
    slot on: the output stays in ascending id order."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    ws = WS + row * WSR
    if (tl.load(ws + _WS_NVIS) > K) & (tl.load(ws + _WS_NCAND) <= CAP):
        t = tl.load(ws + _WS_TKEY)
        cut = tl.load(ws + _WS_TCUT)
        n_entries = tl.load(COUNTS + row * nseg + s)
        out_ptr = _out_row(OUT, row, T, BH, K)
        base = row * N + s * seg_len
        n_out = tl.load(OFFS + row * nseg + s)
        for p0 in range(0, n_entries, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            ok = p < n_entries
            v = tl.load(LIST + base + p, mask=ok, other=0)
            cand = ok & (v < 0)
            ids = tl.where(v < 0, -v - 1, v)
            key = _ordered_key(tl.load(BUF + row * N + ids, mask=cand, other=0.0))
            take = ok & (~cand | (key > t) | ((key == t) & (ids <= cut)))
            rank = n_out + tl.cumsum(take.to(tl.int32), axis=0) - 1
            tl.store(out_ptr + rank, ids, mask=take & (rank < K))
            n_out += tl.sum(take.to(tl.int32), axis=0)


# ----------------------------------------------------------------------------- launcher


def _resolve_config(config, device) -> dict:
    cfg = dict(CONFIG)
    if device.type != "cuda":
        cfg.update(_INTERPRETER_CONFIG)
    unknown = sorted(set(config or {}) - set(CONFIG))
    if unknown:
        raise ValueError(f"unknown decode indexer config keys {unknown}; valid keys: {sorted(CONFIG)}")
    cfg.update(config or {})
    if cfg["select"] not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {cfg['select']!r}")
    if cfg["finish"] not in ("fused", "kernel"):
        raise ValueError(f"finish must be 'fused' or 'kernel', got {cfg['finish']!r}")
    return cfg


def _num_sms(device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _unit_tiling(Hs: int, T: int, J: int, max_rows: int) -> tuple[int, int]:
    """(units per program UG, padded heads JP): UG * JP dot rows, >= 16 (tl.dot), <= max_rows when J allows."""
    JP = _pow2(J)
    UG = max(1, min(_pow2(Hs * T), max_rows // JP))
    while UG * JP < 16:  # pad the heads (masked to zero) up to the dot's 16 rows
        JP *= 2
    return UG, JP


def decode_applies(B: int, Hs: int, T: int, J: int, N: int, config: dict | None = None) -> bool:
    """Whether indexer_topk_decode_triton suits these shapes: few new queries per request (T <= max_T),
    the index heads fit one dot (pow2(J) <= max_rows) and the logits + select list (8 B per row and
    key) fit the buffer bound."""
    cfg = {**CONFIG, **(config or {})}
    return 1 <= T <= cfg["max_T"] and _pow2(J) <= cfg["max_rows"] and 8 * B * Hs * T * N <= cfg["buffer_bytes"]


def _splits(n_units: int, length: int, block: int, per_sm: int, fixed, cap: int, device,
            whole_wave: bool = False) -> tuple[int, int]:
    """(pieces, piece length, a multiple of block) cutting `length` so n_units * pieces fill the SMs (whole_wave:
    without passing per_sm programs per SM, at least one piece per unit)."""
    slots = per_sm * _num_sms(device)
    want = fixed if fixed is not None else (max(1, slots // n_units) if whole_wave else triton.cdiv(slots, n_units))
    pieces = max(1, min(int(want), cap, triton.cdiv(length, block)))
    piece = triton.cdiv(triton.cdiv(length, pieces), block) * block
    return triton.cdiv(length, piece), piece


def _launch_logits(q_i, w, k_i, key_end, buf, ws, S, scale, cfg, chained):
    B, Hs, T, J, D = q_i.shape
    N = k_i.shape[1]
    UG, JP = _unit_tiling(Hs, T, J, cfg["max_rows"])
    n_groups = triton.cdiv(Hs * T, UG)
    key_bytes = max(16, _pow2(D)) * max(k_i.element_size(), q_i.element_size())
    BN, stages = fit_tiles(cfg["BN"], cfg["num_stages"], key_bytes)
    splits, split_len = _splits(B * n_groups, N, BN, cfg["programs_per_sm"], cfg["splits"], triton.cdiv(N, BN),
                                q_i.device, cfg["whole_wave"])
    _logits_kernel[(B * n_groups, splits)](
        q_i, w, k_i, key_end, buf, ws, N, S, T, Hs * T, B * Hs, Hs, n_groups, split_len, float(scale),
        *q_i.stride(), *w.stride(), *k_i.stride(), key_end.stride(0),
        J=J, UG=UG, JP=JP, BN=BN, D=D, BD=max(16, _pow2(D)), WSR=ws.shape[1],
        IEEE=q_i.dtype == torch.float32 and cfg["fp32_ieee"], KEY_MAJOR=cfg["key_major"],
        num_warps=cfg["num_warps"] if UG * JP <= 64 else cfg["num_warps_wide"], num_stages=stages, **chained)


def _cap(cfg, N: int) -> int:
    """The candidate slots per row: cfg["cap"], or N / (2 hist_bins) rounded up to a power of two in
    [64, 2048]. Bell-shaped logits put ~0.3 N / hist_bins keys in the boundary bin (336-440 of 131,072 at
    128 bins on the H200 benchmark's DSA rows); a row with more takes the serial finish. Fewer slots make a
    cheaper sort (H200, DSA b8 at 128k: 0.118 ms at 512 slots, 0.122 at 1024, 0.145 at 2048)."""
    return cfg["cap"] or min(2048, max(64, _pow2(triton.cdiv(N, 2 * cfg["hist_bins"]))))


def _select_decode(buf, ws, out, topk, cfg, chained):
    """Histogram, partition (+ finish) of the rows of buf [T, B*Hs, N] into out [B*Hs, T, topk]."""
    T, BH, N = buf.shape
    rows = T * BH
    nseg, seg_len = _splits(rows, N, cfg["block"], cfg["segments_per_sm"], cfg["segments"],
                            cfg["max_segments"], buf.device)
    nsegp = _pow2(nseg)
    nb, cap = cfg["hist_bins"], _cap(cfg, N)
    lists = torch.empty((rows, N), dtype=torch.int32, device=buf.device)
    counts = torch.empty((2, rows, nseg), dtype=torch.int32, device=buf.device)  # entries, candidates
    offsets = torch.empty((rows, nseg), dtype=torch.int32, device=buf.device)
    scratch = torch.empty((rows, cap), dtype=torch.int32, device=buf.device)
    common = dict(K=topk, NB=nb, NBR=cfg["radix_bins"], WSR=ws.shape[1], BLOCKF=cfg["finish_block"], CAP=cap,
                  NSEGP=nsegp, LOGS=nsegp.bit_length() - 1,
                  num_warps=cfg["select_warps"])
    _hist_kernel[(rows, nseg)](buf, ws, N, seg_len, K=topk, NB=nb, WSR=ws.shape[1], BLOCK=cfg["block"],
                               num_warps=cfg["select_warps"], **chained)
    fused = cfg["finish"] == "fused"
    lists_etc = (lists, counts[0], counts[1], scratch, offsets)
    _partition_kernel[(rows, nseg)](buf, ws, *lists_etc, out, N, T, BH, seg_len, nseg,
                                    KP=_pow2(topk), BLOCK=cfg["block"], FUSED=fused, **common, **chained)
    if not fused:  # (a plain launch: the write after it then launches plainly too)
        chained = {}
        _finish_kernel[(rows,)](buf, ws, *lists_etc, out, N, T, BH, seg_len, nseg, **common)
    _write_kernel[(rows, nseg)](buf, ws, lists, counts[0], offsets, out, N, T, BH, seg_len, nseg, K=topk,
                                WSR=ws.shape[1], CAP=cap, BLOCK=cfg["write_block"], num_warps=cfg["select_warps"],
                                **chained)


def _select_rows(buf, ws, key_end, S, out, topk, cfg):
    """indexer_triton's row select on the same logits; its stats are the workspace bounds as int32 keys."""
    T = buf.shape[0]
    positions = torch.arange(S - T, S, device=buf.device, dtype=torch.int64)
    nvis = torch.searchsorted(key_end.to(torch.int64).contiguous(), positions, right=True).to(torch.int32)
    codes = ws[:, _WS_MIN.value:_WS_MAX.value + 1] - (1 << 30)
    bounds = torch.bitwise_or(torch.bitwise_left_shift(codes, 1), 1)
    stats = torch.stack([torch.bitwise_not(bounds[:, 0]), bounds[:, 1]], dim=1).contiguous()
    _select_triton(buf, nvis, stats, out, 0, T, topk, _rows_config(cfg["rows_select"], buf.device))


@torch.no_grad()
def indexer_topk_decode_triton(q_i: torch.Tensor, w: torch.Tensor, k_i: torch.Tensor, key_end: torch.Tensor,
                               S: int, topk: int, scale: float, config: dict | None = None) -> torch.Tensor:
    """Top-k visible keys per query by index logit -> int32 [B, Hs, T, topk]: valid ids ascending,
    then -1 padding; ties go to the smaller id. Same contract as indexer_triton.indexer_topk_triton,
    built for few queries (see decode_applies). q_i [B, Hs, T, J, D_i], w [B, Hs, T, J], k_i [B, N, D_i]
    (fp32/fp16/bf16), key_end int [N] non-decreasing (key n visible at positions >= key_end[n]);
    queries are the last T of S positions. config overrides CONFIG. No host syncs (graph-capturable)."""
    _check_inputs(q_i, w, k_i, key_end, topk)
    cfg = _resolve_config(config, q_i.device)
    B, Hs, T, J, D = q_i.shape
    N = k_i.shape[1]
    out = torch.empty((B, Hs, T, topk), dtype=torch.int32, device=q_i.device)
    if T == 0 or B * Hs == 0:
        return out
    if N == 0:
        return out.fill_(-1)
    key_end = key_end.to(q_i.device)
    rows = T * B * Hs
    buf = torch.empty((T, B * Hs, N), dtype=torch.float32, device=q_i.device)
    ws = torch.zeros((rows, _WS_HIST.value + cfg["hist_bins"]), dtype=torch.int32, device=q_i.device)
    pdl = resolve_pdl(cfg["pdl"], q_i.device, auto=B == 1)
    chained = pdl_launch(pdl, q_i.device) if cfg["select"] != "rows" else {}
    _launch_logits(q_i, w, k_i, key_end, buf, ws, S, scale, cfg, chained)
    flat = out.view(B * Hs, T, topk)
    if cfg["select"] == "rows":
        _select_rows(buf, ws, key_end, S, flat, topk, cfg)
    else:
        _select_decode(buf, ws, flat, topk, cfg, chained)
    return out
