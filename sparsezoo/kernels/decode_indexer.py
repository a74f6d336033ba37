"""Triton MSA decode indexer over a paged index-key cache (docs/variants.md, "msa").

For each request b, index head h and new query t (query t of Q new tokens sits at position
len - Q + t), score the index keys of every full block before the query's local block, max-pool per
block, keep the best k - 1 (ties to the smaller id) and append the local block. Output: int32
[B, H_i, Q, k] in the standard selection format (valid ids first, best score first, then the local
block, then -1 padding).

Two kernels:
1. `_index_split_kernel`, grid (B, n_splits): each program streams a contiguous range of blocks of
   one request, loads every 128-token page of index keys once for all H_i x Q query rows (one
   tensor-core dot), fuses the block max and keeps a running top-(k-1) per row in registers, as
   int64 keys that pack (score, smaller id first) so one reduction ranks. Scores never reach
   memory; each split writes only its (k-1) best keys per row.
   Or `_index_split_deferred_kernel` (decode_select's `scores`): the loop only stores each block's score
   in a per-program scratch and the program ranks them after the loop, so no top-k state holds
   registers through it (at the fp8 64-row dot: 96-128 registers per thread against 203, 4 programs
   per SM instead of 2). With `rank_in_merge` it stops after storing the scores.
2. The merge, grid (B, H_i * Q), picks the global top-(k-1) and writes the final selection:
   `_index_merge_bound_kernel` (the default, one warp) from the candidates of the k-1 splits whose best keys
   rank highest (`_bound_merge`: the global top-(k-1) lies in those splits), or `_index_merge_kernel` from
   all n_splits * (k-1) candidates (`merge="extract"`) or, with `rank_in_merge`, from every block's score.

A NaN score counts as +inf (the block max keeps NaN, then maps it to +inf): its block ranks
first, as in the reference (docs/ops.md, non-finite values). Only full blocks before the query's local
block are read, so a key past the query (or past the sequence) never reaches its selection.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparsezoo.kernels.nonfinite import max_keep_nan
from sparsezoo.kernels.pdl import check_pdl, gdc_launch_dependents, gdc_wait, pdl_launch

FP8_MAX = tl.constexpr(448.0)  # the largest finite e4m3 value

# Index-key scale modes (fp8 caches); 0 = unscaled keys.
SCALE_NONE, SCALE_PAGE, SCALE_TOKEN = 0, 1, 2
# deferred_topk: scores ranked per chunk of at most this many (row, block) pairs.
RANK_ELEMENTS = 4096
# rank_in_merge: the most blocks one merge program ranks (n_splits * blocks_per_split).
MERGE_BLOCKS = 16384
# The merges over per-split candidates (decode_select's `merge`).
MERGES = ("bound", "extract")
_SCALE_MODES = {None: SCALE_NONE, "page": SCALE_PAGE, "token": SCALE_TOKEN}


@triton.jit
def _pack(score, block_id):
    """int64 key ordered by score, then by the *smaller* block id: one max/min reduction ranks."""
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) + (0x7FFFFFFF - block_id)


@triton.jit
def _e4m3_nearest(x):
    """fp32 x (|x| <= 448) -> the nearest e4m3 value as fp32, ties to even (torch's cast): the cast to
    fp8 after it is exact, so the rounding is the same on every backend (the interpreter's own cast
    rounds ties and subnormals otherwise). Exponent and step from the bits; subnormals share 2^-6's step."""
    ax = tl.abs(x)
    e = tl.maximum(((ax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((3 - e + 127) << 23).to(tl.float32, bitcast=True)
    r = ((ax * inv_step + 8388608.0) - 8388608.0) * step  # 2^23: rounds the 3-bit mantissa to even
    return tl.where(x < 0, -r, r)


@triton.jit
def _fp8_rows(q):
    """q [rows, D] -> (e4m3 q scaled so each row's largest magnitude is 448, the per-row unscale)."""
    qf = q.to(tl.float32)
    amax = tl.max(tl.abs(qf), axis=1)
    live = amax > 0
    ones = tl.zeros_like(amax) + 1.0
    inv = tl.where(live, tl.math.div_rn(ones * FP8_MAX, tl.where(live, amax, 1.0)), 1.0)
    unscale = tl.where(live, tl.math.div_rn(amax, ones * FP8_MAX), 1.0)
    return _e4m3_nearest(qf * inv[:, None]).to(tl.float8e4nv), unscale


@triton.jit
def _load_queries(q_ptr, b, stride_qb, stride_qh, stride_qt, rows,
                  H: tl.constexpr, Q: tl.constexpr, D: tl.constexpr, FP8_KEYS: tl.constexpr,
                  FP8_QUERY: tl.constexpr):
    """The H_i x Q index-query rows of request b in the score dot's operand type, the factor that undoes
    the scalar query scaling, and the per-row factor that undoes the fp8 query rounding."""
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + (rows // Q)[:, None] * stride_qh + (rows % Q)[:, None] * stride_qt
                + d[None, :], mask=(rows < H * Q)[:, None], other=0.0)
    q_unscale = 1.0
    row_unscale = tl.full(rows.shape, 1.0, tl.float32)
    if FP8_QUERY:  # an fp8 x fp8 dot (native on sm_90 from 64 rows): the keys stay e4m3, q is rounded per row
        q, row_unscale = _fp8_rows(q)
    elif FP8_KEYS:
        # e4m3 keys convert exactly to fp16; scale q by a power of two into fp16's range (exact).
        amax = tl.max(tl.max(tl.abs(q.to(tl.float32)), axis=1), axis=0)
        q_scale = tl.minimum(tl.exp2(tl.floor(tl.log2(16384.0 / tl.maximum(amax, 1e-30)))), 1.0)
        q = (q.to(tl.float32) * q_scale).to(tl.float16)
        q_unscale = 1.0 / q_scale
    return q, q_unscale, row_unscale


@triton.jit
def _step_maxima(q, kidx_ptr, kscale_ptr, pages, ok, stride_kp, stride_kt, score_scale, row_unscale,
                 D: tl.constexpr, PAGE: tl.constexpr, NB: tl.constexpr, SCALE_MODE: tl.constexpr,
                 IEEE: tl.constexpr, FP8_QUERY: tl.constexpr):
    """Scaled block scores [rows, NB] of NB pages (one tensor-core dot, then the max per page); a NaN
    score ranks first (+inf)."""
    tok = tl.arange(0, PAGE)
    d = tl.arange(0, D)
    offs = pages[:, None, None] * stride_kp + tok[None, :, None] * stride_kt + d[None, None, :]
    k = tl.load(kidx_ptr + offs, mask=ok[:, None, None], other=0.0)
    k = tl.reshape(k, [NB * PAGE, D]).to(q.dtype)
    if IEEE:
        sc = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        sc = tl.dot(q, tl.trans(k))
    if SCALE_MODE == 2:
        tscale = tl.load(kscale_ptr + pages[:, None] * PAGE + tok[None, :], mask=ok[:, None], other=0.0)
        sc = sc * tl.reshape(tscale, [NB * PAGE])[None, :]
    m = tl.reduce(tl.reshape(sc, [q.shape[0], NB, PAGE]), 2, max_keep_nan)  # block max, NaN kept
    if FP8_QUERY:  # a positive per-row factor commutes with the max
        m = m * row_unscale[:, None]
    m = tl.where(m == m, m, float("inf"))  # a NaN score ranks first
    if SCALE_MODE == 1:
        m = m * tl.load(kscale_ptr + pages, mask=ok, other=0.0)[None, :]
    return m * score_scale


@triton.jit
def _split_range(lens_ptr, blocks_per_split, PAGE: tl.constexpr):
    """(b, s, seq_len, start, end): this program's request, split and block range. The candidates are those
    of the last query: every block before its local block (all of them full)."""
    b = tl.program_id(0)
    s = tl.program_id(1)
    seq_len = tl.load(lens_ptr + b)
    start = s * blocks_per_split
    return b, s, seq_len, start, tl.minimum(start + blocks_per_split, (seq_len - 1) // PAGE)


@triton.jit
def _index_split_kernel(
    q_ptr, kidx_ptr, kscale_ptr, pt_ptr, lens_ptr, part_ptr,
    stride_qb, stride_qh, stride_qt,
    stride_kp, stride_kt,
    stride_ptb,
    blocks_per_split, n_splits, sm_scale,
    H: tl.constexpr, Q: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    K1: tl.constexpr, K1P: tl.constexpr, ROWS: tl.constexpr, SCALE_MODE: tl.constexpr,
    IEEE: tl.constexpr, FP8_KEYS: tl.constexpr, FP8_QUERY: tl.constexpr, NB: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # the merge may launch now; it waits for this kernel before reading its candidates
        gdc_launch_dependents()
    b, s, seq_len, start, end = _split_range(lens_ptr, blocks_per_split, PAGE)

    rows = tl.arange(0, ROWS)
    row_ok = rows < H * Q
    local = (seq_len - Q + rows % Q) // PAGE  # local block per query row
    q, q_unscale, row_unscale = _load_queries(q_ptr, b, stride_qb, stride_qh, stride_qt, rows, H, Q, D,
                                              FP8_KEYS, FP8_QUERY)

    # Running top-(k-1) per row as packed keys. Empty slots hold distinct keys below any real one;
    # padding slots (>= K1) hold the largest key so they are never evicted.
    slot = tl.arange(0, K1P)
    empty = tl.where(slot < K1, -9223372036854775807 + slot.to(tl.int64), 9223372036854775807)
    top = empty[None, :] + tl.zeros([ROWS, K1P], tl.int64)
    nb = tl.arange(0, NB)

    for j0 in range(start, end, NB):  # NB pages per step: one [ROWS, NB*PAGE] dot
        jj = j0 + nb
        ok = jj < end
        pages = tl.load(pt_ptr + b * stride_ptb + jj, mask=ok, other=0).to(tl.int64)
        m = _step_maxima(q, kidx_ptr, kscale_ptr, pages, ok, stride_kp, stride_kt, sm_scale * q_unscale,
                         row_unscale, D, PAGE, NB, SCALE_MODE, IEEE, FP8_QUERY)
        keys = _pack(m, jj[None, :])
        takes = ok[None, :] & (jj[None, :] < local[:, None])
        # Most steps improve no row's top-(k-1): once it is full, a block enters only if it beats the
        # row's current worst, which only rises. One test against the worst before the step skips the
        # insertion loop (per-block reductions over [ROWS, K1P] int64 keys), which otherwise bounds
        # the fp8 path once its page reads halve.
        beats = takes & (keys > tl.min(top, axis=1)[:, None])
        if tl.max(tl.max(beats.to(tl.int32), axis=1), axis=0) > 0:
            for i in tl.static_range(NB):  # insert in ascending block order (keeps the tie rule)
                key = tl.max(tl.where(nb[None, :] == i, keys, -9223372036854775807), axis=1)
                take = tl.max(tl.where(nb[None, :] == i, takes.to(tl.int32), 0), axis=1) > 0
                # Evict the smallest key (lowest score; among equal scores the largest id) if beaten.
                worst = tl.min(top, axis=1)
                take = take & (key > worst)
                top = tl.where((top == worst[:, None]) & take[:, None], key[:, None], top)

    _store_candidates(part_ptr, top, b, s, n_splits, rows, row_ok, slot, H, Q, K1)


@triton.jit
def _store_candidates(part_ptr, top, b, s, n_splits, rows, row_ok, slot, H: tl.constexpr, Q: tl.constexpr,
                      K1: tl.constexpr):
    """A split's top-(k-1) keys per row into `part_ptr` [B, n_splits, H * Q, K1 + 1], and in the last
    column the split's best key (what the bound merge ranks the splits by)."""
    at = ((b * n_splits + s) * (H * Q) + rows) * (K1 + 1)
    real = slot[None, :] < K1
    tl.store(part_ptr + at[:, None] + slot[None, :], top, mask=row_ok[:, None] & real)
    tl.store(part_ptr + at + K1, tl.max(tl.where(real, top, -9223372036854775807), axis=1), mask=row_ok)


@triton.jit
def _index_split_deferred_kernel(
    q_ptr, kidx_ptr, kscale_ptr, pt_ptr, lens_ptr, part_ptr, mx_ptr,
    stride_qb, stride_qh, stride_qt,
    stride_kp, stride_kt,
    stride_ptb,
    blocks_per_split, n_splits, sm_scale,
    H: tl.constexpr, Q: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
    K1: tl.constexpr, K1P: tl.constexpr, ROWS: tl.constexpr, SCALE_MODE: tl.constexpr,
    IEEE: tl.constexpr, FP8_KEYS: tl.constexpr, FP8_QUERY: tl.constexpr, NB: tl.constexpr,
    RR: tl.constexpr, CH: tl.constexpr, RANK: tl.constexpr = True, PDL: tl.constexpr = False,
):
    """The split kernel with the top-(k-1) after the page loop: the loop only scores pages and stores
    each block's score (fp32, the real rows only) in this program's slice of `mx_ptr`
    [B, n_splits, H_i * Q, blocks_per_split]; then the program ranks its own scores in chunks of CH
    blocks. No top-k state lives through the loop, so the loop holds only the dot's registers."""
    if PDL:
        gdc_launch_dependents()
    b, s, seq_len, start, end = _split_range(lens_ptr, blocks_per_split, PAGE)

    rows = tl.arange(0, ROWS)
    q, q_unscale, row_unscale = _load_queries(q_ptr, b, stride_qb, stride_qh, stride_qt, rows, H, Q, D,
                                              FP8_KEYS, FP8_QUERY)
    base = mx_ptr + (b * n_splits + s).to(tl.int64) * (H * Q) * blocks_per_split
    nb = tl.arange(0, NB)
    for j0 in range(start, end, NB):
        jj = j0 + nb
        ok = jj < end
        pages = tl.load(pt_ptr + b * stride_ptb + jj, mask=ok, other=0).to(tl.int64)
        m = _step_maxima(q, kidx_ptr, kscale_ptr, pages, ok, stride_kp, stride_kt, sm_scale * q_unscale,
                         row_unscale, D, PAGE, NB, SCALE_MODE, IEEE, FP8_QUERY)
        tl.store(base + rows[:, None] * blocks_per_split + (jj - start)[None, :], m,
                 mask=(rows < H * Q)[:, None] & ok[None, :])
    if RANK:
        _rank_scores(base, part_ptr, b, s, n_splits, start, end, blocks_per_split, seq_len,
                     H, Q, PAGE, K1, K1P, RR, CH)


@triton.jit
def _rank_scores(base, part_ptr, b, s, n_splits, start, end, blocks_per_split, seq_len,
                 H: tl.constexpr, Q: tl.constexpr, PAGE: tl.constexpr, K1: tl.constexpr, K1P: tl.constexpr,
                 RR: tl.constexpr, CH: tl.constexpr):
    """The split's top-(k-1) per row from the block scores its program just stored at `base`."""
    tl.debug_barrier()  # this program's scores, written by all its threads, are visible to all of them

    r = tl.arange(0, RR)
    r_ok = r < H * Q
    local = (seq_len - Q + r % Q) // PAGE
    slot = tl.arange(0, K1P)
    empty = tl.where(slot < K1, -9223372036854775807 + slot.to(tl.int64), 9223372036854775807)
    top = empty[None, :] + tl.zeros([RR, K1P], tl.int64)
    for c0 in range(0, end - start, CH):
        i = c0 + tl.arange(0, CH)
        jj = start + i
        valid = r_ok[:, None] & (jj < end)[None, :] & (jj[None, :] < local[:, None])
        v = tl.load(base + r[:, None] * blocks_per_split + i[None, :], mask=valid, other=0.0)
        cand = tl.where(valid, _pack(v, jj[None, :]), -9223372036854775807)
        for _ in tl.static_range(K1):  # each row's best remaining block replaces its worst if it beats it
            best = tl.max(cand, axis=1)
            worst = tl.min(top, axis=1)
            take = best > worst
            top = tl.where((top == worst[:, None]) & take[:, None], best[:, None], top)
            cand = tl.where(cand == best[:, None], -9223372036854775807, cand)

    _store_candidates(part_ptr, top, b, s, n_splits, r, r_ok, slot, H, Q, K1)


@triton.jit
def _index_merge_kernel(
    part_ptr, lens_ptr, sel_ptr,
    stride_sb, stride_sh, stride_st,
    n_splits,
    H: tl.constexpr, Q: tl.constexpr, PAGE: tl.constexpr, K1: tl.constexpr, KP: tl.constexpr,
    NC: tl.constexpr, SCORES: tl.constexpr = False, blocks_per_split=1, PDL: tl.constexpr = False,
):
    b = tl.program_id(0)
    row = tl.program_id(1)
    h = row // Q
    t = row % Q
    seq_len = tl.load(lens_ptr + b)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    local = (seq_len - Q + t) // PAGE
    n_valid = tl.minimum(local, K1)

    c = tl.arange(0, NC)
    if SCORES:  # part_ptr holds every block's score ([B, n_splits, H * Q, blocks_per_split]): block c
        split = c // blocks_per_split
        ok = c < local
        src = ((b * n_splits + split) * (H * Q) + row).to(tl.int64) * blocks_per_split + c % blocks_per_split
        score = tl.load(part_ptr + src, mask=ok, other=0.0)
        keys = tl.where(ok, _pack(score, c), -9223372036854775807)
    else:
        src = ((b * n_splits + c // K1) * (H * Q) + row) * (K1 + 1) + c % K1
        keys = tl.load(part_ptr + src, mask=c < n_splits * K1, other=-9223372036854775807)

    kk = tl.arange(0, KP)
    out = tl.zeros([KP], tl.int32) - 1
    for r in tl.static_range(K1):
        best = tl.max(keys, axis=0)
        block_id = 0x7FFFFFFF - (best & 0xFFFFFFFF).to(tl.int32)
        out = tl.where((kk == r) & (r < n_valid), block_id, out)
        keys = tl.where(keys == best, -9223372036854775807, keys)
    out = tl.where(kk == n_valid, local, out)
    tl.store(sel_ptr + b * stride_sb + h * stride_sh + t * stride_st + kk, out, mask=kk < K1 + 1)


@triton.jit
def _take_best(score, ident, NONE: tl.constexpr):
    """The best (score, smaller id) of int32 `score` and unique int32 `ident` (two one-warp reductions);
    returns its id and the inputs with it taken out."""
    top = tl.max(score, axis=0)
    win = tl.min(tl.where(score == top, ident, NONE), axis=0)
    return win, tl.where(ident == win, -2147483648, score)


@triton.jit
def _index_merge_bound_kernel(
    part_ptr, lens_ptr, sel_ptr,
    stride_sb, stride_sh, stride_st,
    n_splits,
    H: tl.constexpr, Q: tl.constexpr, PAGE: tl.constexpr, K1: tl.constexpr, K1P: tl.constexpr,
    KP: tl.constexpr, NSP: tl.constexpr, PDL: tl.constexpr = False,
):
    """`_bound_merge` for row pid(1) of request pid(0), written to the selection."""
    b = tl.program_id(0)
    row = tl.program_id(1)
    seq_len = tl.load(lens_ptr + b)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    kk = tl.arange(0, KP)
    sel = _bound_merge(part_ptr, b, row, n_splits, (seq_len - Q + row % Q) // PAGE, H, Q, K1, K1P, KP, NSP)
    tl.store(sel_ptr + b * stride_sb + (row // Q) * stride_sh + (row % Q) * stride_st + kk, sel, mask=kk < K1 + 1)


@triton.jit
def _bound_merge(part_ptr, b, row, n_splits, local, H: tl.constexpr, Q: tl.constexpr, K1: tl.constexpr,
                K1P: tl.constexpr, KP: tl.constexpr, NSP: tl.constexpr):
    """Selection row [KP] (k-1 ranked ids, the local block, -1 padding) of query row `row` (h * Q + t) of
    request b from the split kernels' candidates (`_store_candidates`), looking only at the k-1 best splits.

    Keys are unique up to empty slots, so the global top-(k-1) lies in the k-1 splits whose best keys rank
    highest: a split ranked k-1 or lower has its best below k-1 other splits' bests, so k-1 keys beat each of
    its keys. Takes the k-1 best splits by their best keys, loads only their candidates and takes the k-1
    best of those: 2(k-1) rounds over a few hundred 32-bit keys (a score's order bits, then the smaller id),
    where the extracting merge runs k-1 rounds over every split's candidates. Fastest in one warp (no
    barriers between the rounds)."""
    n_valid = tl.minimum(local, K1)
    base = part_ptr + (b * n_splits * (H * Q) + row).to(tl.int64) * (K1 + 1)
    split_stride = H * Q * (K1 + 1)

    # 1. the k-1 splits with the best best-keys (column K1); an equal score goes to the smaller split, whose
    # blocks are the smaller ids
    i = tl.arange(0, NSP)
    best = tl.load(base + i * split_stride + K1, mask=i < n_splits, other=-9223372036854775807)
    score = tl.where(i < n_splits, (best >> 32).to(tl.int32), -2147483648)
    r = tl.arange(0, K1P)
    top_split = tl.zeros([K1P], tl.int32)
    for k in tl.static_range(K1):
        win, score = _take_best(score, i, NSP)
        top_split = tl.where(r == k, win, top_split)
    # with fewer than k-1 splits holding candidates, the later rounds take taken or empty splits again (all
    # scored as the minimum): their keys are copies or empty, which step 2 never ranks above a real key
    have = (r < K1) & (r < n_splits)

    # 2. their candidates, [K1P, K1P], and the k-1 best of those (an equal score: the smaller block id)
    key = tl.load(base + top_split[:, None] * split_stride + r[None, :],
                  mask=have[:, None] & (r[None, :] < K1), other=-9223372036854775807)
    key = tl.reshape(key, [K1P * K1P])
    c_score = (key >> 32).to(tl.int32)
    c_id = 0x7FFFFFFF - (key & 0xFFFFFFFF).to(tl.int32)
    c_id = tl.where(c_score == -2147483648, 0x7FFFFFFF - tl.arange(0, K1P * K1P), c_id)  # empty: unique ids
    kk = tl.arange(0, KP)
    sel = tl.where(kk == n_valid, local, -1)
    for k in tl.static_range(K1):
        win, c_score = _take_best(c_score, c_id, 0x7FFFFFFF)
        sel = tl.where((kk == k) & (k < n_valid), win, sel)
    return sel


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def plan_splits(batch: int, max_blocks: int, num_sms: int, min_blocks: int = 8,
                programs_per_sm: int = 2) -> tuple[int, int]:
    """(blocks_per_split, n_splits) so the grid fills the card about `programs_per_sm` times."""
    max_blocks = max(1, max_blocks)
    target = max(1, num_sms * programs_per_sm // max(1, batch))
    per = max(min_blocks, math.ceil(max_blocks / target))
    return per, math.ceil(max_blocks / per)


def index_workspace(batch: int, q_len: int, heads: int, topk: int, n_splits: int, device):
    """Scratch for the split kernel: the (k-1) best packed (score, id) keys per split and query row, then
    the best of them."""
    return torch.empty((batch, n_splits, heads * q_len, topk), dtype=torch.int64, device=device)


def score_workspace(batch: int, q_len: int, heads: int, blocks_per_split: int, n_splits: int, device):
    """Scratch for `deferred_topk` and `rank_in_merge`: every candidate block's score (fp32) per split and
    query row."""
    return torch.empty((batch, n_splits, heads * q_len, blocks_per_split), dtype=torch.float32, device=device)


def decode_select(q_idx: torch.Tensor, k_idx_cache: torch.Tensor, k_idx_scale: torch.Tensor | None,
                  scale_mode: str | None, page_table: torch.Tensor, seq_lens: torch.Tensor, *,
                  topk: int, scale: float, blocks_per_split: int, n_splits: int,
                  out: torch.Tensor, workspace: torch.Tensor, num_warps: int = 4,
                  num_stages: int = 3, pages_per_step: int = 2, fp8_queries: bool = False,
                  min_rows: int = 16, merge_warps: int = 0, pdl: bool = False,
                  scores: torch.Tensor | None = None, rank_in_merge: bool = False,
                  merge: str = "bound") -> torch.Tensor:
    """Launch split + merge. q_idx [B, H_i, Q, D_i]; k_idx_cache [P, page, D_i]; page_table int32
    [B, n_pages]; seq_lens int32 [B] (lengths including the Q new tokens); out int32 [B, H_i, Q, k].
    fp8_queries (fp8 keys only): round each query row to e4m3 (scaled to the row's largest magnitude,
    `fp8_query_round_trip`) so the scores are an fp8 x fp8 dot instead of a key conversion to fp16 per
    element. min_rows: the score dot's row count (H_i * Q padded to a power of two,
    at least this). On sm_90 a dot of 16 rows is an mma.sync, which has no e4m3 form there: Triton unpacks
    both fp8 operands to fp16 first. 64 rows make it a warpgroup dot, native in fp8 (an offline sm_90
    compile shows QGMMA), for 16x the rows. merge_warps: warps of the merge program that picks a row's
    top-k (0: one for the bound merge; for the others 4 up to 2,048 candidates, else 8). pdl: the merge is a
    programmatic dependent launch (`sparsezoo/kernels/pdl.py`) that the split kernel lets start at once; it waits
    for the split kernel before reading the candidates. scores (`score_workspace`): rank after the page loop
    (`_index_split_deferred_kernel`) instead of keeping a running top-k in it; rank_in_merge (with scores):
    the split kernel only stores the scores and the merge ranks every block of a row at once (no per-split
    candidates: worth it when splits hold few blocks). merge (per-split candidates): "bound" ranks the splits
    by their best keys and only the k-1 best splits' candidates (`_bound_merge`), "extract" takes k-1 maxima
    over every candidate. No host syncs: capturable in a CUDA graph."""
    B, H, Q, D = q_idx.shape
    page = k_idx_cache.shape[1]
    if topk < 2:
        raise ValueError(f"decode indexer needs topk >= 2 (k-1 ranked blocks + the local one), got {topk}")
    if q_idx.stride(-1) != 1 or k_idx_cache.stride(-1) != 1:
        raise ValueError("q_idx and the index-key cache need a unit stride on the last dim")
    if D < 16 or D & (D - 1) or page < 16 or page & (page - 1):
        raise ValueError(f"index dim ({D}) and page size ({page}) must be powers of two >= 16")
    fp8_keys = k_idx_cache.dtype == torch.float8_e4m3fn
    if fp8_queries and not fp8_keys:
        raise ValueError(f"fp8_queries needs fp8 (e4m3) index keys, got {k_idx_cache.dtype}")
    if fp8_queries and D < 32:
        raise ValueError(f"fp8_queries needs index dim >= 32 (an fp8 tensor-core dot's K), got {D}")
    mode = _SCALE_MODES[scale_mode]
    if mode != SCALE_NONE and k_idx_scale is None:
        raise ValueError(f"scale mode {scale_mode!r} needs k_idx_scale")
    if min_rows < 16 or min_rows & (min_rows - 1):
        raise ValueError(f"min_rows must be a power of two >= 16 (a tensor-core tile), got {min_rows}")
    if merge_warps not in (0, 1, 2, 4, 8, 16, 32):
        raise ValueError(f"merge_warps must be 0 (automatic) or a power of two up to 32, got {merge_warps}")
    if scores is not None and (scores.dtype != torch.float32 or tuple(scores.shape) != (B, n_splits, H * Q,
                                                                                       blocks_per_split)):
        raise ValueError(f"scores must be fp32 {(B, n_splits, H * Q, blocks_per_split)} (score_workspace), got "
                         f"{scores.dtype} {tuple(scores.shape)}")
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
    if tuple(workspace.shape) != (B, n_splits, H * Q, topk) or workspace.dtype != torch.int64:
        raise ValueError(f"workspace must be int64 {(B, n_splits, H * Q, topk)} (index_workspace), got "
                         f"{workspace.dtype} {tuple(workspace.shape)}")
    if rank_in_merge and scores is None:
        raise ValueError("rank_in_merge needs the scores workspace (score_workspace)")
    if rank_in_merge and n_splits * blocks_per_split > MERGE_BLOCKS:
        raise ValueError(f"rank_in_merge ranks at most {MERGE_BLOCKS} blocks per row in one program, got "
                         f"{n_splits * blocks_per_split}; leave it off for this length")
    k1 = topk - 1
    part = workspace
    rows = max(min_rows, _next_pow2(H * Q))
    scale_arg = k_idx_scale if k_idx_scale is not None else q_idx
    args = (q_idx.stride(0), q_idx.stride(1), q_idx.stride(2), k_idx_cache.stride(0), k_idx_cache.stride(1),
            page_table.stride(0), blocks_per_split, n_splits, scale)
    meta = dict(H=H, Q=Q, D=D, PAGE=page, K1=k1, K1P=_next_pow2(k1), ROWS=rows, SCALE_MODE=mode,
                IEEE=q_idx.dtype == torch.float32 and k_idx_cache.dtype == torch.float32,
                FP8_KEYS=fp8_keys, FP8_QUERY=bool(fp8_queries), NB=pages_per_step,
                PDL=check_pdl(pdl, q_idx.device), num_warps=num_warps, num_stages=num_stages)
    if scores is None:
        _index_split_kernel[(B, n_splits)](q_idx, k_idx_cache, scale_arg, page_table, seq_lens, part, *args, **meta)
    else:
        rr = _next_pow2(H * Q)
        ch = max(16, min(_next_pow2(blocks_per_split), RANK_ELEMENTS // rr))
        _index_split_deferred_kernel[(B, n_splits)](q_idx, k_idx_cache, scale_arg, page_table, seq_lens, part,
                                                    scores, *args, RR=rr, CH=ch, RANK=not rank_in_merge, **meta)
    if merge == "bound" and not rank_in_merge:
        k1p = _next_pow2(k1)
        _index_merge_bound_kernel[(B, H * Q)](
            part, seq_lens, out, out.stride(0), out.stride(1), out.stride(2), n_splits,
            H=H, Q=Q, PAGE=page, K1=k1, K1P=k1p, KP=_next_pow2(topk), NSP=_next_pow2(n_splits),
            num_warps=merge_warps or 1, **pdl_launch(pdl, q_idx.device),
        )
        return out
    nc = _next_pow2(n_splits * (blocks_per_split if rank_in_merge else k1))
    _index_merge_kernel[(B, H * Q)](
        scores if rank_in_merge else part, seq_lens, out,
        out.stride(0), out.stride(1), out.stride(2),
        n_splits,
        H=H, Q=Q, PAGE=page, K1=k1, KP=_next_pow2(topk), NC=nc, SCORES=rank_in_merge,
        blocks_per_split=blocks_per_split,
        num_warps=merge_warps or (4 if nc <= 2048 else 8), **pdl_launch(pdl, q_idx.device),
    )
    return out


def fp8_query_round_trip(q_idx: torch.Tensor) -> torch.Tensor:
    """What `fp8_queries` does to the index queries, in torch (the reference): each row [..., D_i] scaled
    so its largest magnitude is 448, rounded to e4m3 (ties to even), scaled back; fp32."""
    q = q_idx.float()
    amax = q.abs().amax(-1, keepdim=True)
    live = amax > 0
    inv = torch.where(live, 448.0 / torch.where(live, amax, 1.0), 1.0)
    return (q * inv).to(torch.float8_e4m3fn).float() * torch.where(live, amax / 448.0, 1.0)
