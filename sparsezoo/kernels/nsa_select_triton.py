"""NSA block selection (Triton): compressed-attention probabilities -> block importance -> top-n
with forced blocks.

Semantics (sparsezoo.ops.nsa_select): q [B, Hq, T, D] are the last T of S positions, kc
[B, Hkv, Sc, D] compressed keys; entry i covers tokens [i*stride, i*stride + block_len) and is
visible to position p iff it ends at or before p. p[h, t, i] = softmax over the visible entries of
scale * q.kc; importance[g, t, j] = sum over the G heads of group g and over the entries overlapping
selection block j of p. Query t (position S - T + t, local block L = position // sel_block) sees
blocks 0..L; block 0 and the local blocks L - 1, L are forced, the other slots take the best blocks
(ties to the smaller id). Output int32 [B, Hkv, T, topk]: exactly min(topk, L + 1) valid ids in
ASCENDING id order, then -1 (the selection format of sparsezoo.ops: a set, any order).

Tiling: importance programs own TM consecutive tokens x the G heads of one KV group, BM = TM * GP
score rows (row r = token r // GP, head r % GP; GP = G rounded up to a power of two, padding heads
masked). The group shares kc and the selection, so each kc tile feeds one [BM, BE] tensor-core dot.

1. `_lse_kernel` (skipped when the caller passes the compressed attention's natural-log LSE):
   online log-sum-exp (base 2) of the scores over the visible entries, BE_LSE entries per step.
   When tiles x groups x batch do not fill the GPU (decode), the entry axis is split over
   `lse_splits` programs writing partial LSEs, merged by whoever reads them.
2. Per chunk of Tc queries, a bounded fp32 buffer [Tc, B*Hkv, n_blocks] (the indexer's layout;
   buffer + the histogram select's scratch <= buffer_bytes, `buffer_plan`):
   a. `_importance_kernel`, grid (token tiles, chunk ranges, B*Hkv): a program recomputes the
      scores of CHUNKS consecutive chunks. A chunk is NB blocks [jb, jb + NB) plus a halo of HALO =
      ceil((block_len - 1) / sel_block) blocks before them: it loads every entry starting in
      [(jb - HALO) * sel_block, (jb + NB) * sel_block) (at most BE entries), so its NB blocks see
      every entry that overlaps them. p = exp2(s - lse) (<= 1) * 2^15 goes through an fp16 hi/lo
      split and two tensor-core dots with the 0/1 overlap matrix [BE, NBX] (about 21 mantissa
      bits); the GP heads of each token are summed. It writes blocks 0..L of each row: the forced
      ones get G + 1, above any importance (<= G: importances are clamped there, a no-op for a
      consistent LSE), the others their importance; and it folds each row's min/max
      (order-preserving int32 keys) into the select's stats with atomics. Tiles whose rows all see
      <= topk blocks, and ranges past a tile's last block, do nothing (the select takes all).
   a'. or, with config schedule='stream', `_importance_stream_kernel`, grid (token tiles, B*Hkv):
      one program per tile walks the entries from 0 like a flash-attention forward (STREAM_BE per
      step, software-pipelined loads), so q and the LSE are loaded once and no halo is recomputed.
      It needs sel_block to be a power-of-two multiple of stride: a step's entries then start in exactly
      NBS whole blocks, and their shares of the SPILL blocks after the step (exact fp32 row sums) are
      carried in registers into the next step. It owns its rows' whole range, so it stores their stats.
      The steps whose entries every row of the tile sees run unmasked (config stream_diag; H200, 128k:
      see the config note below).
   a''. or, with config schedule='stream_topk', the same walk over all T queries in one launch keeps each
      row's best pow2(topk) blocks as ranking keys (the value's order-preserving bits, then the complemented
      id) in registers, merged with each step's blocks by tl.topk, and writes the selection itself: no
      buffer, no (b).
   b. An exact row-wise select with nvis = L + 1, ties to the smaller id, ascending ids then -1;
      rows with <= topk visible blocks take them all. Many rows (prefill): `_row_topk_kernel`,
      topk rounds of max extraction per row. Few rows (decode): the indexer's histogram/radix
      select (indexer_triton._select_triton), whose rows split into segments. The forced
      value makes blocks 0, L - 1, L the largest of their row (with topk < 3 the ties among them
      go to the smaller ids: 0, then L - 1, as the reference's stable sort).
Non-finite values (docs/ops.md; the reference, sparsezoo.ops.nsa_select): a query head whose LSE is NaN (its q
or a visible compressed key holds a NaN, or a visible score is +inf; a given LSE of a poisoned row is NaN)
makes the importance of every block a visible entry overlaps NaN, for the whole group. NaN ranks after the
forced blocks and before every finite importance (the reference's finfo.max; ties to the smaller id): it is
written as G + 1/2, between the clamp G and the forced G + 1. Both LSE passes keep a NaN (the GPU's max would
drop it and leave -inf), and a poisoned head's p is 1 (chunks) or +inf (the stream walk, whose importances are then
NaN) on its visible entries, which marks those blocks.
No loop depends on the data: trip counts follow from shapes and positions only.

Memory: buffer + scratch <= buffer_bytes (1 GiB: at T = 128k, Hkv = 4, 2048 blocks, chunks of 32k
queries with the row select, 16k with the histogram select's scratch); partial LSEs fp32
[lse_splits, B, Hq, T]. No host syncs: capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsezoo.kernels.indexer_triton import _KEY_NONE, _key_ids, _ordered_key, _rank_key, _select_triton, stats_init
from sparsezoo.kernels.sizes import pow2 as _pow2
from sparsezoo.kernels.sizes import with_overrides

LOG2E = 1.4426950408889634
MAX_ENTRY_TILE = 256  # largest BE the chunking may need (sel_block >> stride needs big chunks)

# GPU tiling (to be tuned on H200). ROWS = tokens per tile x GP; BE entries per importance chunk,
# CHUNKS chunks per program (fewer when the grid would not fill the GPU); BE_LSE entries per LSE
# step; the LSE pass splits its entry axis when tiles x groups x batch give fewer than `waves`
# programs per SM, each split covering at least `lse_min_tiles` steps (lse_splits forces a count).
# buffer_bytes bounds the importance buffer plus the select's scratch; select_* and split are the
# indexer select's knobs (sparsezoo/kernels/indexer_triton.py; split = segments per row, None: automatic).
# schedule: 'chunks' (programs over token tiles x chunk ranges, BE entries per chunk with a halo) or
# 'stream' (one program per token tile walks every entry, STREAM_BE at a time, the spill carried in
# registers; it needs sel_block to be a power-of-two multiple of stride and says so otherwise); both write the
# same buffer. stream_diag: the walk's steps that every row of a tile sees whole run without the visibility mask.
# stream_maxnreg caps the walk's registers per thread (None: no cap): Triton 3.6 gives the two-loop walk 132, so
# only one 8-warp program fits an SM; capped at 128, two fit, without spills (scripts/sm90_report.py).
# 'auto': stream where the geometry allows it, else chunks. H200, 128k, the paper's config with the LSE
# given (scripts/probes/nsa_select_schedules.py, examples/results/h200_2026-12-03/nsa_walk_open_steps_h200.log):
# the stream walk 31.8 ms (36.6 with every step masked, 48.4 uncapped; 29.9 without the clamp per score,
# nsa_walk_unclamped_h200.log); STREAM_BE 128, STREAM_ROWS 64 / 256,
# 4 warps, 3 stages and a cap of 96 tied or slower. Chunks: 70.2 ms for the whole selection against the
# stream's 57.8 then (zoo.py --tune --tune-parts nsa).
# 'stream_topk' (asked for only): the stream walk keeps each row's best blocks itself, merging each step's
# blocks into a running top-k (int64 ranking keys, bitonic), and writes the selection: no buffer and no
# select. It needs the stream geometry and pow2(topk) <= the step's padded block count. Same selection, but
# slower where it matters (H200, scripts/probes/nsa_select_schedules.py): 69.9 ms against stream's 57.6 ms at
# 128k (its merges double the walk: 69 ms against 37 + 19), 5.0 against 5.2 ms at 32k; STREAM_ROWS 64 / 256
# and 4 warps slower still. So `auto` keeps 'stream'.
# select: how (b) picks from the buffer. 'rows': `_row_topk_kernel`, one row per program, ROW_BLK blocks of
# a row per step, topk rounds of max extraction over the blocks of the topk groups of ROW_GROUP blocks with the
# largest maxima (0: over every block); 'indexer': the indexer's histogram select (its segment split suits few
# long rows); 'auto': rows where the buffer holds at least `row_min_rows` rows, else indexer. H200, 128k
# (scripts/probes/nsa_select_schedules.py, examples/results/h200_2026-12-03/nsa_select_rows_h200.log): 6.3 ms
# at 1 warp with groups of 8 (6.8 with 16, 21.9 without; an earlier kernel: 2 and 4 warps slower), the
# indexer's select 19.3 ms; later (nsa_row_select_h200.log) 5.05 ms with groups of 4 against 5.94 with 8, 5.42 with
# groups of 8 over ROW_BLK 1024, 6.3 over 512, 8.0-8.9 on 2 warps; with groups of 4, 4.82 ms over ROW_BLK 1024
# (8.51 with groups of 2): the defaults.
NSA_SELECT_CONFIG = {"schedule": "auto", "ROWS": 64, "BE": 64, "STREAM_ROWS": 128, "STREAM_BE": 64,
                     "stream_warps": 8, "stream_stages": 2, "BE_LSE": 128, "CHUNKS": 8, "num_warps": 4,
                     "num_stages": 2, "waves": 2, "lse_min_tiles": 4, "lse_splits": None, "buffer_bytes": 1 << 30,
                     "stream_diag": True, "stream_maxnreg": 128,
                     "select": "auto", "ROW_BLK": 1024, "ROW_GROUP": 4, "row_warps": 1,
                     "row_min_rows": 4096,
                     "select_block": 1024, "select_bins": 64, "select_cap": 4096, "select_warps": 8, "split": None}
SCHEDULES = ("auto", "chunks", "stream", "stream_topk")
SELECTS = ("auto", "rows", "indexer")
# interpreter: few programs, many chunk and range edges
_INTERPRET_CONFIG = {"ROWS": 64, "BE": 16, "STREAM_ROWS": 64, "STREAM_BE": 16, "BE_LSE": 64, "CHUNKS": 2,
                     "select_block": 64, "ROW_BLK": 32, "ROW_GROUP": 2, "row_min_rows": 1}
_INTERPRET_SMS = 4
_POW2_KEYS = ("ROWS", "BE", "STREAM_ROWS", "STREAM_BE", "BE_LSE", "select_block", "select_bins", "select_cap",
              "ROW_BLK")

_P_SCALE = tl.constexpr(15.0)  # log2 of the factor on p before the fp16 split (p <= 1 stays finite)
_P_UNSCALE = tl.constexpr(2.0 ** -15)
_INT32_MIN, _INT32_MAX = -(2 ** 31), 2 ** 31 - 1
_KEY_LOW = tl.constexpr(_INT32_MIN)  # below every int32 key
_KEY_HIGH = tl.constexpr(_INT32_MAX)
_ID_PAD = tl.constexpr(_INT32_MAX)  # sorts after every id


# ----------------------------------------------------------------------------- helpers

@triton.jit
def _rows(tile, g, t0, Tcur, T, S, G: tl.constexpr, GP: tl.constexpr, TM: tl.constexpr):
    """Score rows of a tile of queries t0 + tile*TM + [0, TM): (head, query, valid, position);
    row r = query r // GP x head r % GP."""
    r = tl.arange(0, TM * GP)
    tt = tile * TM + r // GP
    hh = r % GP
    t = t0 + tt
    return (g * G + hh).to(tl.int64), t, (hh < G) & (tt < Tcur), S - T + t


@triton.jit
def _load_q(Q, b, head, t, row_ok, sqb, sqh, sqt, sqd, D: tl.constexpr, BD: tl.constexpr):
    d = tl.arange(0, BD)
    return tl.load(Q + b * sqb + head[:, None] * sqh + t[:, None].to(tl.int64) * sqt + d[None, :] * sqd,
                   mask=row_ok[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def _scores(q, KC_G, i, i_ok, sks, skd, qk2, D: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr,
            MASKED: tl.constexpr = True):
    """[rows, entries] base-2 logits qk2 * q.kc[i] (kc rows i of one group; MASKED=False: every i exists)."""
    d = tl.arange(0, BD)
    ptrs = KC_G + i[:, None].to(tl.int64) * sks + d[None, :] * skd
    if MASKED or BD != D:
        kt = tl.load(ptrs, mask=i_ok[:, None] & (d[None, :] < D), other=0.0)
    else:
        kt = tl.load(ptrs)
    if IEEE:
        s = tl.dot(q, tl.trans(kt), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(kt))
    return s * qk2


@triton.jit
def _visible(i, i_ok, pos, row_ok, BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr):
    """[rows, entries]: entry i ends at or before the row's position."""
    return row_ok[:, None] & i_ok[None, :] & (i[None, :] * STRIDE + BLOCK_LEN - 1 <= pos[:, None])


@triton.jit
def _n_visible(pos, Sc, BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr):
    """Entries visible to position pos (a scalar)."""
    n = tl.where(pos >= BLOCK_LEN - 1, (pos - BLOCK_LEN + 1) // STRIDE + 1, 0)
    return tl.minimum(n, Sc)


@triton.jit
def _merged_lse(LSE, b, head, t, row_ok, n_splits, lse_factor, sls, slb, slh, slt):
    """Base-2 LSE of the rows: lse_factor * LSE, log2-sum-exp2 over the n_splits partials
    (-inf: the row sees no entry; NaN: a partial is NaN, which the max below would drop)."""
    ptr = LSE + b * slb + head * slh + t.to(tl.int64) * slt
    m = tl.zeros(t.shape, tl.float32) + float("-inf")
    acc = tl.zeros(t.shape, tl.float32)
    for _ in range(0, n_splits):
        v = tl.load(ptr, mask=row_ok, other=float("-inf")).to(tl.float32) * lse_factor
        ptr += sls  # pointer steps: no split * stride product to overflow
        m_new = tl.maximum(m, v)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp2(m - m_use) + tl.exp2(v - m_use)
        m = m_new
    lse = tl.where(acc > 0, m + tl.log2(tl.where(acc > 0, acc, 1.0)), float("-inf"))
    return tl.where(acc == acc, lse, float("nan"))


@triton.jit
def _chunk_importance(q, KC_G, lse2, pos, row_ok, jb, Sc, qk2, sks, skd,
                      TM: tl.constexpr, GP: tl.constexpr, BE: tl.constexpr, NB: tl.constexpr,
                      HALO: tl.constexpr, NBX: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                      BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr, IEEE: tl.constexpr):
    """[TM, NBX] importance of blocks jb - HALO + c; columns HALO .. HALO + NB - 1 are complete."""
    base = jb - HALO
    i_lo = (tl.maximum(base, 0) * SEL + STRIDE - 1) // STRIDE  # first entry starting at or after block base
    i_hi = ((jb + NB) * SEL + STRIDE - 1) // STRIDE  # first entry starting at or after block jb + NB
    i = i_lo + tl.arange(0, BE)
    i_ok = (i < i_hi) & (i < Sc)
    s = _scores(q, KC_G, i, i_ok, sks, skd, qk2, D, BD, IEEE)
    log_p = tl.minimum(s - lse2[:, None], 0.0)  # p <= 1 (the fp16 split below needs p * 2^15 finite); a
    # poisoned row (lse2 = -inf) gets 0 here, a NaN included (tl.minimum drops it): p = 1 on its visible entries
    p = tl.where(_visible(i, i_ok, pos, row_ok, BLOCK_LEN, STRIDE), tl.exp2(log_p + _P_SCALE), 0.0)
    first = (i * STRIDE) // SEL - base
    last = (i * STRIDE + BLOCK_LEN - 1) // SEL - base
    c = tl.arange(0, NBX)[None, :]
    overlap = ((first[:, None] <= c) & (c <= last[:, None])).to(tl.float16)
    p_hi = p.to(tl.float16)
    p_lo = (p - p_hi.to(tl.float32)).to(tl.float16)
    imp_rows = tl.dot(p_hi, overlap) + tl.dot(p_lo, overlap)
    return tl.sum(tl.reshape(imp_rows, [TM, GP, NBX]), axis=1) * _P_UNSCALE


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _lse_kernel(Q, KC, LSE, T, S, Sc, Hkv, qk2, tiles_per_split,
                sqb, sqh, sqt, sqd, skb, skh, sks, skd, sls, slb, slh, slt,
                G: tl.constexpr, GP: tl.constexpr, TM: tl.constexpr, BE: tl.constexpr,
                D: tl.constexpr, BD: tl.constexpr, BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr,
                IEEE: tl.constexpr):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    b = (tl.program_id(2) // Hkv).to(tl.int64)
    g = tl.program_id(2) % Hkv
    head, t, row_ok, pos = _rows(tile, g, 0, T, T, S, G, GP, TM)
    q = _load_q(Q, b, head, t, row_ok, sqb, sqh, sqt, sqd, D, BD)
    KC_G = KC + b * skb + g.to(tl.int64) * skh
    pos_last = S - T + tl.minimum(tile * TM + TM, T) - 1
    lo = split * tiles_per_split
    hi = tl.minimum(lo + tiles_per_split, tl.cdiv(_n_visible(pos_last, Sc, BLOCK_LEN, STRIDE), BE))
    e = tl.arange(0, BE)
    m_i = tl.zeros([TM * GP], tl.float32) + float("-inf")
    l_i = tl.zeros([TM * GP], tl.float32)
    for et in range(lo, hi):
        i = et * BE + e
        i_ok = i < Sc
        s = _scores(q, KC_G, i, i_ok, sks, skd, qk2, D, BD, IEEE)
        s = tl.where(_visible(i, i_ok, pos, row_ok, BLOCK_LEN, STRIDE), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), axis=1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    lse = tl.where(l_i == l_i, lse, float("nan"))  # a NaN/+inf score (the max above drops a NaN)
    tl.store(LSE + split.to(tl.int64) * sls + b * slb + head * slh + t.to(tl.int64) * slt, lse, mask=row_ok)


@triton.jit
def _importance_kernel(Q, KC, LSE, BUF, STATS, t0, Tcur, T, S, Sc, n_blocks, Hkv, K, chunks_per_program,
                       qk2, lse_factor, n_splits, forced_value, max_importance, nan_value,
                       sqb, sqh, sqt, sqd, skb, skh, sks, skd, sls, slb, slh, slt,
                       G: tl.constexpr, GP: tl.constexpr, TM: tl.constexpr, BE: tl.constexpr, NB: tl.constexpr,
                       HALO: tl.constexpr, NBX: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                       BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr, IEEE: tl.constexpr):
    tile = tl.program_id(0)
    bg = tl.program_id(2)  # b * Hkv + g: the buffer's middle index
    b = (bg // Hkv).to(tl.int64)
    g = bg % Hkv
    last_local = (S - T + t0 + tl.minimum(tile * TM + TM, Tcur) - 1) // SEL  # the tile's last query's block
    k_lo = tl.program_id(1) * chunks_per_program
    k_hi = tl.minimum(k_lo + chunks_per_program, last_local // NB + 1)  # chunks holding blocks <= last_local
    if (last_local >= K) & (k_lo < k_hi):  # some row sees more than K blocks; the range holds visible ones
        head, t, row_ok, pos = _rows(tile, g, t0, Tcur, T, S, G, GP, TM)
        q = _load_q(Q, b, head, t, row_ok, sqb, sqh, sqt, sqd, D, BD)
        lse2 = _merged_lse(LSE, b, head, t, row_ok, n_splits, lse_factor, sls, slb, slh, slt)
        poisoned = tl.max(tl.reshape((lse2 != lse2).to(tl.int32), [TM, GP]), axis=1) > 0  # per query
        lse2 = tl.where(lse2 == lse2, lse2, float("-inf"))
        KC_G = KC + b * skb + g.to(tl.int64) * skh
        tt = tile * TM + tl.arange(0, TM)  # queries within the chunk
        tok_ok = tt < Tcur
        local = (S - T + t0 + tt) // SEL
        row = tt.to(tl.int64) * tl.num_programs(2) + bg  # buffer / stats row
        c = tl.arange(0, NBX)
        complete = (c >= HALO) & (c < HALO + NB)
        key_min = tl.full([TM], _KEY_HIGH, tl.int32)
        key_max = tl.full([TM], _KEY_LOW, tl.int32)
        for k in range(k_lo, k_hi):
            jb = k * NB
            imp = _chunk_importance(q, KC_G, lse2, pos, row_ok, jb, Sc, qk2, sks, skd, TM, GP, BE, NB, HALO, NBX,
                                    D, BD, BLOCK_LEN, STRIDE, SEL, IEEE)
            j = (jb - HALO + c)[None, :]  # >= jb >= 0 on the complete columns
            write = tok_ok[:, None] & complete[None, :] & (j <= local[:, None])
            forced = (j == 0) | (j >= local[:, None] - 1)
            nan = poisoned[:, None] & (imp > 0)  # a NaN importance in the reference: a visible entry reaches it
            value = tl.where(forced, forced_value, tl.where(nan, nan_value, tl.minimum(imp, max_importance)))
            tl.store(BUF + row[:, None] * n_blocks + j, value, mask=write)
            key = _ordered_key(value)
            key_min = tl.minimum(key_min, tl.min(tl.where(write, key, _KEY_HIGH), axis=1))
            key_max = tl.maximum(key_max, tl.max(tl.where(write, key, _KEY_LOW), axis=1))
        seen = tok_ok & (local >= k_lo * NB)
        tl.atomic_min(STATS + row * 2, key_min, mask=seen)
        tl.atomic_max(STATS + row * 2 + 1, key_max, mask=seen)


@triton.jit
def _overlap(first, last, c, NBS: tl.constexpr):
    """fp16 [entries, NBX]: entry e overlaps step block c (< NBS)."""
    return ((first[:, None] <= c[None, :]) & (c[None, :] <= last[:, None]) & (c[None, :] < NBS)).to(tl.float16)


@triton.jit
def _stream_step(q, KC_G, lse2s, pos, row_ok, k, Sc, qk2, sks, skd, carry, c, e, first, last, overlap,
                 TM: tl.constexpr, GP: tl.constexpr, BE: tl.constexpr, NBS: tl.constexpr, NBX: tl.constexpr,
                 SPILL: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BLOCK_LEN: tl.constexpr,
                 STRIDE: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr):
    """One step of the stream walk: ([TM, NBX] importances, columns < NBS complete for blocks k * NBS + c;
    the carry into the next step). MASKED=False: every entry of the step exists and is visible to every
    row (rows that are not valid have lse2s = +inf, so p = 0). lse2s = the base-2 LSE - _P_SCALE. Every
    step's entries overlap its blocks alike (BE * STRIDE is a multiple of SEL): first, last (blocks of the
    step, from 0) and the overlap matrix are the caller's, computed once."""
    i = k * BE + e
    i_ok = i < Sc
    s = _scores(q, KC_G, i, i_ok, sks, skd, qk2, D, BD, IEEE, MASKED)
    # p * 2^15 (p <= 1 for a consistent LSE, up to rounding: no clamp per score). A poisoned row (lse2s = -inf)
    # gets p = inf and NaN importances; an inconsistent LSE may overflow the fp16 split to NaN: _stream_store
    # maps both
    p = tl.exp2(s - lse2s[:, None])
    if MASKED:
        p = tl.where(_visible(i, i_ok, pos, row_ok, BLOCK_LEN, STRIDE), p, 0.0)
    p_hi = p.to(tl.float16)
    p_lo = (p - p_hi.to(tl.float32)).to(tl.float16)
    imp_rows = tl.dot(p_hi, overlap) + tl.dot(p_lo, overlap)
    imp = tl.sum(tl.reshape(imp_rows, [TM, GP, NBX]), axis=1) * _P_UNSCALE + carry
    carry = tl.zeros([TM, NBX], tl.float32)
    for sp in tl.static_range(SPILL):  # the blocks after the step: exact fp32 row sums
        hit = (first <= NBS + sp) & (NBS + sp <= last)
        share = tl.sum(tl.reshape(tl.sum(tl.where(hit[None, :], p, 0.0), axis=1), [TM, GP]), axis=1)
        carry += tl.where(c[None, :] == sp, share[:, None] * _P_UNSCALE, 0.0)
    return imp, carry


@triton.jit
def _stream_store(imp, k, c, tok_ok, local, poisoned, row, BUF, n_blocks, forced_value, max_importance,
                  nan_value, key_min, key_max, best, NBS: tl.constexpr, NBX: tl.constexpr, TM: tl.constexpr,
                  FUSED: tl.constexpr, KP: tl.constexpr):
    """Step k's block values: into the buffer (and the row stats), or (FUSED) merged into each row's best."""
    j = (k * NBS + c)[None, :]
    write = tok_ok[:, None] & (c[None, :] < NBS) & (j <= local[:, None])
    forced = (j == 0) | (j >= local[:, None] - 1)
    nan = poisoned[:, None] & (imp != 0)  # imp >= 0, or NaN (see _stream_step)
    capped = tl.where(imp < max_importance, imp, max_importance)  # NaN (an overflow) -> the cap
    value = tl.where(forced, forced_value, tl.where(nan, nan_value, capped))
    key = _ordered_key(value)
    if FUSED:
        rank = tl.where(write, _rank_key(key, j), _KEY_NONE)
        # merge only when a block beats a row's current KP-th best (most steps of a long row do not)
        if tl.max(tl.where(rank > tl.min(best, axis=1)[:, None], 1, 0)) > 0:
            if NBX > KP:  # a new name: the GPU compiler refuses a reshaped `rank` in this branch
                merged = tl.join(best, tl.topk(rank, KP))
            else:
                merged = tl.join(best, rank)
            best = tl.topk(tl.reshape(merged, [TM, 2 * KP]), KP)
    else:
        tl.store(BUF + row[:, None] * n_blocks + j, value, mask=write)
        key_min = tl.minimum(key_min, tl.min(tl.where(write, key, _KEY_HIGH), axis=1))
        key_max = tl.maximum(key_max, tl.max(tl.where(write, key, _KEY_LOW), axis=1))
    return key_min, key_max, best


@triton.jit
def _importance_stream_kernel(Q, KC, LSE, BUF, STATS, OUT, t0, Tcur, T, S, Sc, n_blocks, Hkv, K,
                              qk2, lse_factor, n_splits, forced_value, max_importance, nan_value,
                              sqb, sqh, sqt, sqd, skb, skh, sks, skd, sls, slb, slh, slt, sob, sot,
                              G: tl.constexpr, GP: tl.constexpr, TM: tl.constexpr, BE: tl.constexpr,
                              NBS: tl.constexpr, NBX: tl.constexpr, SPILL: tl.constexpr, D: tl.constexpr,
                              BD: tl.constexpr, BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr,
                              IEEE: tl.constexpr, FUSED: tl.constexpr = False, KP: tl.constexpr = 2,
                              DIAG: tl.constexpr = True):
    """The 'stream' schedule: one program per (token tile, group) walks every entry once, BE at a time,
    as a flash-attention forward walks its keys. A step's BE entries start in exactly NBS blocks (SEL is
    a multiple of STRIDE and BE * STRIDE of SEL); what its entries add to the SPILL blocks after them is
    carried in registers into the next step. The program owns its rows' whole buffer range, so it
    stores their stats without atomics. DIAG: the steps whose entries every row of the tile sees run
    without the visibility mask (as a flash-attention forward's off-diagonal tiles).

    FUSED ('stream_topk'): no buffer; each row keeps its KP best blocks as int64 ranking keys (the value's
    order-preserving bits, then the complemented block id: ties to the smaller id) in registers, merged with
    each step's NBS blocks by a bitonic top-KP, and writes its selection (OUT: [B * Hkv, T, K]) at the end."""
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest tiles first
    bg = tl.program_id(1)
    b = (bg // Hkv).to(tl.int64)
    g = bg % Hkv
    last_local = (S - T + t0 + tl.minimum(tile * TM + TM, Tcur) - 1) // SEL
    if (last_local >= K) | FUSED:  # some row sees more than K blocks (the buffer's select takes the others)
        head, t, row_ok, pos = _rows(tile, g, t0, Tcur, T, S, G, GP, TM)
        q = _load_q(Q, b, head, t, row_ok, sqb, sqh, sqt, sqd, D, BD)
        lse2 = _merged_lse(LSE, b, head, t, row_ok, n_splits, lse_factor, sls, slb, slh, slt)
        poisoned = tl.max(tl.reshape((lse2 != lse2).to(tl.int32), [TM, GP]), axis=1) > 0
        lse2s = tl.where(row_ok, tl.where(lse2 == lse2, lse2, float("-inf")) - _P_SCALE, float("inf"))
        KC_G = KC + b * skb + g.to(tl.int64) * skh
        tt = tile * TM + tl.arange(0, TM)
        tok_ok = tt < Tcur
        local = (S - T + t0 + tt) // SEL
        row = tt.to(tl.int64) * tl.num_programs(1) + bg
        c = tl.arange(0, NBX)
        e = tl.arange(0, BE)
        key_min = tl.full([TM], _KEY_HIGH, tl.int32)
        key_max = tl.full([TM], _KEY_LOW, tl.int32)
        carry = tl.zeros([TM, NBX], tl.float32)  # column s: block (k * NBS + s)'s share from earlier steps
        first = (e * STRIDE) // SEL  # every step's entries start in its blocks [0, NBS)
        last = (e * STRIDE + BLOCK_LEN - 1) // SEL  # and end before block NBS + SPILL
        overlap = _overlap(first, last, c, NBS)
        best = tl.full([TM, KP], _KEY_NONE, tl.int64)
        n_steps = last_local // NBS + 1
        n_open = 0  # steps every row of the tile sees whole (the tile's first query sees the fewest entries)
        if DIAG:
            n_open = tl.minimum(_n_visible(S - T + t0 + tile * TM, Sc, BLOCK_LEN, STRIDE) // BE, n_steps)
        for k in range(0, n_open):
            imp, carry = _stream_step(q, KC_G, lse2s, pos, row_ok, k, Sc, qk2, sks, skd, carry, c, e, first, last,
                                      overlap, TM, GP, BE, NBS, NBX, SPILL, D, BD, BLOCK_LEN, STRIDE, IEEE, False)
            key_min, key_max, best = _stream_store(imp, k, c, tok_ok, local, poisoned, row, BUF, n_blocks,
                                                   forced_value, max_importance, nan_value, key_min, key_max, best,
                                                   NBS, NBX, TM, FUSED, KP)
        for k in range(n_open, n_steps):
            imp, carry = _stream_step(q, KC_G, lse2s, pos, row_ok, k, Sc, qk2, sks, skd, carry, c, e, first, last,
                                      overlap, TM, GP, BE, NBS, NBX, SPILL, D, BD, BLOCK_LEN, STRIDE, IEEE, True)
            key_min, key_max, best = _stream_store(imp, k, c, tok_ok, local, poisoned, row, BUF, n_blocks,
                                                   forced_value, max_importance, nan_value, key_min, key_max, best,
                                                   NBS, NBX, TM, FUSED, KP)
        if FUSED:  # the min(K, L + 1) best ids, ascending, then -1
            slot = tl.arange(0, KP)[None, :]
            ids = tl.sort(tl.where(slot < tl.minimum(local + 1, K)[:, None], _key_ids(best), _ID_PAD), dim=1)
            t_out = (t0 + tt).to(tl.int64)
            tl.store(OUT + bg.to(tl.int64) * sob + t_out[:, None] * sot + slot, tl.where(ids < _ID_PAD, ids, -1),
                     mask=tok_ok[:, None] & (slot < K))
        else:
            tl.store(STATS + row * 2, key_min, mask=tok_ok)
            tl.store(STATS + row * 2 + 1, key_max, mask=tok_ok)


@triton.jit
def _extract_top(x, best, K: tl.constexpr, KP: tl.constexpr):
    """[KP] the K largest of x [A, B] and best [KP] (distinct int64 ranking keys; _KEY_NONE pads), by K rounds
    of max extraction: each round removes one key (keys are distinct)."""
    slot = tl.arange(0, KP)
    kept = tl.full([KP], _KEY_NONE, tl.int64)
    for s in tl.static_range(K):
        m = tl.maximum(tl.max(tl.max(x, axis=1), axis=0), tl.max(best, axis=0))
        kept = tl.where(slot == s, m, kept)
        x = tl.where(x == m, _KEY_NONE, x)
        best = tl.where(best == m, _KEY_NONE, best)
    return kept


@triton.jit
def _row_keys(row_ptr, j, ok):
    """Ranking keys of the buffer values at blocks j (any shape) of one row; _KEY_NONE where not ok."""
    return tl.where(ok, _rank_key(_ordered_key(tl.load(row_ptr + j, mask=ok, other=0.0)), j), _KEY_NONE)


@triton.jit
def _row_topk_kernel(BUF, NVIS, OUT, t0, BH, N, sob, sot,
                     K: tl.constexpr, KP: tl.constexpr, NG: tl.constexpr, GS: tl.constexpr, GROUPS: tl.constexpr):
    """select='rows': one buffer row (row = query * BH + group) per program. A row with more than K visible
    blocks keeps its K best as int64 ranking keys (ties to the smaller id) over steps of NG groups of GS
    blocks, loaded as an [NG, GS] tile (no reshapes). GROUPS: the K best keys lie in the K groups with the
    largest maxima (a group outside them has K larger keys above its maximum), so extraction runs over those
    groups, reloaded as a [KP, GS] tile, and the K kept keys; else over the whole tile. A row with at most K
    visible blocks takes them all without reading. Writes ascending ids, then -1 (OUT: [BH, T, K] at query
    t0 + t)."""
    r = tl.program_id(0)
    tt = r // BH
    nv = tl.load(NVIS + t0 + tt)
    row_ptr = BUF + r.to(tl.int64) * N
    slot = tl.arange(0, KP)
    e = tl.arange(0, GS)[None, :]
    ids = tl.where(slot < nv, slot, _ID_PAD)
    if nv > K:
        best = tl.full([KP], _KEY_NONE, tl.int64)
        for c0 in range(0, nv, NG * GS):
            j = c0 + tl.arange(0, NG)[:, None] * GS + e
            x = _row_keys(row_ptr, j, j < nv)
            if GROUPS:
                tops = _extract_top(tl.max(x, axis=1)[:, None], tl.full([KP], _KEY_NONE, tl.int64), K, KP)
                g_ok = (tops != _KEY_NONE) & (slot < K)
                j = (tl.where(g_ok, _key_ids(tops), 0) // GS * GS)[:, None] + e
                x = _row_keys(row_ptr, j, g_ok[:, None] & (j < nv))
            best = _extract_top(x, best, K, KP)
        ids = tl.where(best != _KEY_NONE, _key_ids(best), _ID_PAD)
    ids = tl.sort(ids)
    ptr = OUT + (r % BH).to(tl.int64) * sob + (t0 + tt).to(tl.int64) * sot + slot
    tl.store(ptr, tl.where(ids < _ID_PAD, ids, -1), mask=slot < K)


# ----------------------------------------------------------------------------- launcher


def _n_visible_host(pos: int, Sc: int, block_len: int, stride: int) -> int:
    return 0 if pos < block_len - 1 else min(Sc, (pos - block_len + 1) // stride + 1)


def chunk_geometry(block_len: int, stride: int, sel_block: int, be: int) -> tuple[int, int, int]:
    """(BE, NB, HALO): entries per chunk, complete blocks per chunk, halo blocks before them.
    A chunk loads the entries starting in NB + HALO blocks, at most ceil((NB + HALO) * sel_block /
    stride) <= BE of them; BE grows (power of two) when sel_block / stride leaves no room for NB >= 1."""
    halo = -(-(block_len - 1) // sel_block)
    need = _pow2(-(-(1 + halo) * sel_block // stride))
    be = max(be, need)
    if be > MAX_ENTRY_TILE:
        raise ValueError(f"nsa_select_triton: sel_block={sel_block} spans {need} compressed entries of stride "
                         f"{stride} per chunk (at most {MAX_ENTRY_TILE}); use backend='reference'")
    return be, be * stride // sel_block - halo, halo


def stream_geometry(block_len: int, stride: int, sel_block: int, be: int) -> tuple[int, int, int] | str:
    """(BE, NBS, SPILL) of the 'stream' schedule, or why it cannot tile this geometry: a step of BE
    entries starts in exactly NBS = BE * stride / sel_block whole blocks (BE grows to make NBS >= 1) and
    adds to at most SPILL <= NBS blocks after them."""
    per_block = sel_block // stride
    if sel_block % stride or per_block & (per_block - 1):
        return (f"the stream schedule needs sel_block ({sel_block}) to be a power-of-two multiple of stride "
                f"({stride})")
    be = max(be, per_block)  # so every step's BE entries start in whole blocks
    if be > MAX_ENTRY_TILE:
        return f"the stream schedule needs {be} entries per step (at most {MAX_ENTRY_TILE})"
    nbs = be * stride // sel_block
    spill = max(0, -(-(block_len - stride) // sel_block))
    if spill > nbs:
        return f"the stream schedule carries at most {nbs} blocks per step, block_len={block_len} spills {spill}"
    return be, nbs, spill


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else _INTERPRET_SMS


def _resolve_config(config: dict | None, device: torch.device) -> dict:
    cfg = dict(NSA_SELECT_CONFIG)
    if device.type != "cuda":
        cfg.update(_INTERPRET_CONFIG)
    cfg = with_overrides(cfg, config, "nsa_select_triton")
    for key in _POW2_KEYS:
        if cfg[key] < 1 or cfg[key] & (cfg[key] - 1):
            raise ValueError(f"config {key} must be a power of two, got {cfg[key]}")
    if cfg["schedule"] not in SCHEDULES:
        raise ValueError(f"config schedule must be one of {SCHEDULES}, got {cfg['schedule']!r}")
    if cfg["ROW_GROUP"] < 0 or cfg["ROW_GROUP"] & (cfg["ROW_GROUP"] - 1):
        raise ValueError(f"config ROW_GROUP must be 0 or a power of two, got {cfg['ROW_GROUP']}")
    if cfg["select"] not in SELECTS:
        raise ValueError(f"config select must be one of {SELECTS}, got {cfg['select']!r}")
    for key in ("ROWS", "BE", "STREAM_ROWS", "STREAM_BE", "BE_LSE"):
        if cfg[key] < 16:
            raise ValueError(f"config {key} must be a power of two >= 16 (tensor-core dots), got {cfg[key]}")
    if cfg["CHUNKS"] < 1:
        raise ValueError(f"config CHUNKS must be >= 1, got {cfg['CHUNKS']}")
    return cfg


def _check_inputs(q: torch.Tensor, kc: torch.Tensor, S: int, block_len: int, stride: int, sel_block: int,
                  topk: int, lse: torch.Tensor | None) -> None:
    if q.dtype == torch.float64 or kc.dtype == torch.float64:
        raise ValueError("nsa_select_triton runs fp32/fp16/bf16; use backend='reference' for fp64")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or kc.dtype != q.dtype:
        raise ValueError(f"q and kc need one dtype among fp32/fp16/bf16, got {q.dtype} and {kc.dtype}")
    if q.dim() != 4 or kc.dim() != 4 or kc.shape[0] != q.shape[0] or kc.shape[3] != q.shape[3] \
            or kc.shape[1] == 0 or q.shape[1] % kc.shape[1]:
        raise ValueError(f"need q [B, Hq, T, D] and kc [B, Hkv | Hq, Sc, D], got {tuple(q.shape)}, {tuple(kc.shape)}")
    if min(block_len, stride, sel_block, topk) < 1 or S < q.shape[2]:
        raise ValueError(f"need positive block_len, stride, sel_block, topk and S >= T, got {block_len}, "
                         f"{stride}, {sel_block}, {topk}, S={S}, T={q.shape[2]}")
    if lse is not None and (lse.shape != q.shape[:3] or not lse.is_floating_point() or lse.device != q.device):
        raise ValueError(f"lse must be a float [B, Hq, T] tensor on q's device, got {tuple(lse.shape)} {lse.dtype}")


def _lse_partials(q, kc, S, block_len, stride, qk2, TM, cfg, dims, launch):
    """Base-2 partial LSEs fp32 [n_splits, B, Hq, T] of the scores over the visible entries."""
    B, Hq, T, _ = q.shape
    Hkv, Sc = kc.shape[1], kc.shape[2]
    be = cfg["BE_LSE"]
    n_tiles = triton.cdiv(T, TM)
    steps = triton.cdiv(_n_visible_host(S - 1, Sc, block_len, stride), be)
    n_splits = cfg["lse_splits"] or -(-cfg["waves"] * _sm_count(q.device) // (n_tiles * B * Hkv))
    n_splits = max(1, min(n_splits, steps // cfg["lse_min_tiles"]))
    per_split = triton.cdiv(steps, n_splits)
    n_splits = max(1, triton.cdiv(steps, max(per_split, 1)))
    lse = torch.empty((n_splits, B, Hq, T), dtype=torch.float32, device=q.device)
    _lse_kernel[(n_tiles, n_splits, B * Hkv)](q, kc, lse, T, S, Sc, Hkv, qk2, per_split, *q.stride(), *kc.stride(),
                                              *lse.stride(), BE=be, **dims, **launch)
    return lse


def _chunks_per_program(cfg: dict, programs: int, n_chunks: int, device: torch.device) -> int:
    """CHUNKS, fewer when tiles x groups x batch x ranges would not fill the GPU `waves` times; the
    range count stays within the grid's y limit."""
    want = cfg["waves"] * _sm_count(device)
    cpp = max(1, min(cfg["CHUNKS"], programs * n_chunks // want))
    return max(cpp, triton.cdiv(n_chunks, 65535))


def _stream_or_none(block_len: int, stride: int, sel_block: int, cfg: dict):
    """The stream schedule's geometry when cfg's schedule runs it here, else None (chunks)."""
    stream = stream_geometry(block_len, stride, sel_block, cfg["STREAM_BE"]) if cfg["schedule"] != "chunks" else None
    if isinstance(stream, str):
        if cfg["schedule"] in ("stream", "stream_topk"):
            raise ValueError(f"nsa_select_triton: {stream}; use config schedule='chunks' or 'auto'")
        return None  # 'auto': the chunk schedule tiles every geometry
    return stream


def _fused_topk_or_none(topk: int, stream, cfg: dict) -> int | None:
    """KP (the power of two >= topk the rows keep) when cfg's schedule is 'stream_topk', else None; an error
    where a step's blocks cannot feed that many (KP above the step's padded block count)."""
    if cfg["schedule"] != "stream_topk":
        return None
    kp, nbx = max(2, _pow2(topk)), max(_pow2(stream[1]), 16)
    if kp > nbx:
        raise ValueError(f"nsa_select_triton: schedule 'stream_topk' keeps at most {nbx} blocks per row with this "
                         f"geometry and STREAM_BE (topk={topk}); use schedule 'stream' or a larger STREAM_BE")
    return kp


def _walk_constants(stream, cfg: dict) -> dict:
    """The stream walk's tile constants: BE entries per step starting in NBS blocks (NBX padded), SPILL blocks
    after them; DIAG (open steps unmasked); the register cap (a launch option)."""
    BE, NBS, SPILL = stream
    cap = {} if cfg["stream_maxnreg"] is None else {"maxnreg": cfg["stream_maxnreg"]}
    return dict(BE=BE, NBS=NBS, NBX=max(_pow2(NBS), 16), SPILL=SPILL, DIAG=cfg["stream_diag"], **cap)


def schedule_for(block_len: int, stride: int, sel_block: int, device, config: dict | None = None) -> str:
    """'stream_topk', 'stream' or 'chunks': the schedule nsa_select_triton runs for this geometry, device and
    config ('stream_topk' only when asked for)."""
    cfg = _resolve_config(config, device)
    if not _stream_or_none(block_len, stride, sel_block, cfg):
        return "chunks"
    return "stream_topk" if cfg["schedule"] == "stream_topk" else "stream"


def _select_cap(n_blocks: int, cfg: dict) -> int:
    """The histogram select's scratch ids per row (a row has at most n_blocks candidates)."""
    return min(cfg["select_cap"], max(16, _pow2(n_blocks)))


def buffer_plan(B: int, Hkv: int, T: int, n_blocks: int, cfg: dict) -> tuple[int, str]:
    """(Tc, select): queries per buffer chunk and the select that reads the buffer ('rows' or 'indexer'). The
    buffer plus the histogram select's scratch ids (8 bytes of stats per row aside) fits buffer_bytes, in
    chunks of equal size; 'auto' takes 'rows' where a chunk holds at least `row_min_rows` rows."""
    def chunk(select: str) -> int:
        row_bytes = 4 * (n_blocks + (_select_cap(n_blocks, cfg) if select == "indexer" else 0))
        most = max(1, min(T, cfg["buffer_bytes"] // (B * Hkv * row_bytes)))
        return triton.cdiv(T, triton.cdiv(T, most))  # the fewest chunks, evened out

    if cfg["select"] != "auto":
        return chunk(cfg["select"]), cfg["select"]
    if chunk("rows") * B * Hkv >= cfg["row_min_rows"]:
        return chunk("rows"), "rows"
    return chunk("indexer"), "indexer"


def buffer_select_for(q: torch.Tensor, kc: torch.Tensor, S: int, sel_block: int, config: dict | None = None) -> str:
    """The select ('rows' or 'indexer') that reads the importance buffer of this call, for the schedules that
    write one (all but 'stream_topk')."""
    cfg = _resolve_config(config, q.device)
    return buffer_plan(q.shape[0], kc.shape[1], q.shape[2], triton.cdiv(S, sel_block), cfg)[1]


@torch.no_grad()
def nsa_select_triton(q: torch.Tensor, kc: torch.Tensor, S: int, block_len: int, stride: int, sel_block: int,
                      topk: int, scale: float, config: dict | None = None,
                      lse: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, T, D] (the last T of S positions), kc [B, Hkv, Sc, D] -> int32 [B, Hkv, T, topk]:
    per row the min(topk, L + 1) selected block ids in ascending order, then -1. Not differentiable.

    lse: optional natural-log LSE [B, Hq, T] of the compressed attention's scale * q.kc over the
    visible entries (as the compressed-attention op computes it); given, the LSE pass is skipped.
    config overrides NSA_SELECT_CONFIG."""
    _check_inputs(q, kc, S, block_len, stride, sel_block, topk, lse)
    cfg = _resolve_config(config, q.device)
    B, Hq, T, D = q.shape
    Hkv, Sc = kc.shape[1], kc.shape[2]
    out = torch.empty((B, Hkv, T, topk), dtype=torch.int32, device=q.device)
    if T == 0 or B == 0:
        return out
    if Sc == 0:  # a valid pointer for the kernels; Sc = 0 still masks every entry
        kc = kc.new_zeros((B, Hkv, 1, D))
    G = Hq // Hkv
    GP = _pow2(G)
    stream = _stream_or_none(block_len, stride, sel_block, cfg)
    rows = cfg["STREAM_ROWS"] if stream else cfg["ROWS"]
    TM = max(min(max(rows // GP, 1), _pow2(T)), -(-16 // GP))  # >= 16 rows for the dots
    if not stream:
        BE, NB, HALO = chunk_geometry(block_len, stride, sel_block, cfg["BE"])
    n_blocks = triton.cdiv(S, sel_block)
    qk2 = float(scale) * LOG2E
    dims = dict(G=G, GP=GP, TM=TM, D=D, BD=max(_pow2(D), 16), BLOCK_LEN=block_len, STRIDE=stride,
                IEEE=q.dtype == torch.float32)
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if lse is None:
        lse_parts, lse_factor = _lse_partials(q, kc, S, block_len, stride, qk2, TM, cfg, dims, launch), 1.0
    else:
        lse_parts, lse_factor = lse.unsqueeze(0), LOG2E
    values = (qk2, lse_factor, lse_parts.shape[0], float(G + 1), float(G), G + 0.5)
    strides = (*q.stride(), *kc.stride(), *lse_parts.stride())
    flat = out.view(B * Hkv, T, topk)
    kp = _fused_topk_or_none(topk, stream, cfg) if stream else None
    if kp:  # 'stream_topk': one launch over every token, no buffer, no select
        _importance_stream_kernel[(triton.cdiv(T, TM), B * Hkv)](
            q, kc, lse_parts, flat, flat, flat, 0, T, T, S, Sc, n_blocks, Hkv, topk, *values, *strides,
            *flat.stride()[:2], SEL=sel_block, **dims, **_walk_constants(stream, cfg),
            FUSED=True, KP=kp, num_warps=cfg["stream_warps"], num_stages=cfg["stream_stages"])
        return out
    sel_cfg = {key: cfg[key] for key in ("select_block", "select_bins", "select_warps", "split")}
    sel_cfg["select_cap"] = _select_cap(n_blocks, cfg)
    Tc, select = buffer_plan(B, Hkv, T, n_blocks, cfg)
    buf = torch.empty((Tc, B * Hkv, n_blocks), dtype=torch.float32, device=q.device)
    stats = torch.empty((Tc * B * Hkv, 2), dtype=torch.int32, device=q.device)
    init = stats_init(q.device)
    positions = torch.arange(S - T, S, device=q.device, dtype=torch.int64)
    nvis = (positions // sel_block + 1).to(torch.int32)  # blocks 0..L
    for t0 in range(0, T, Tc):
        Tcur = min(Tc, T - t0)
        stats.copy_(init.expand_as(stats))
        n_tiles = triton.cdiv(Tcur, TM)
        if stream:
            _importance_stream_kernel[(n_tiles, B * Hkv)](
                q, kc, lse_parts, buf, stats, flat, t0, Tcur, T, S, Sc, n_blocks, Hkv, topk, *values, *strides,
                *flat.stride()[:2], SEL=sel_block, **dims, **_walk_constants(stream, cfg),
                num_warps=cfg["stream_warps"], num_stages=cfg["stream_stages"])
        else:
            n_chunks = triton.cdiv(n_blocks, NB)
            cpp = _chunks_per_program(cfg, n_tiles * B * Hkv, n_chunks, q.device)
            grid = (n_tiles, triton.cdiv(n_chunks, cpp), B * Hkv)
            _importance_kernel[grid](q, kc, lse_parts, buf, stats, t0, Tcur, T, S, Sc, n_blocks, Hkv, topk, cpp,
                                     *values, *strides, BE=BE, NB=NB, HALO=HALO, NBX=max(_pow2(NB + HALO), 16),
                                     SEL=sel_block, **dims, **launch)
        if select == "rows":
            kp = max(2, _pow2(topk))
            blk = min(cfg["ROW_BLK"], max(16, _pow2(n_blocks)))
            groups = 0 < cfg["ROW_GROUP"] and kp * cfg["ROW_GROUP"] < blk
            gs = cfg["ROW_GROUP"] if groups else 16 if blk >= 16 else blk  # no groups: a [blk / 16, 16] tile
            _row_topk_kernel[(Tcur * B * Hkv,)](
                buf, nvis, flat, t0, B * Hkv, n_blocks, *flat.stride()[:2], K=topk, KP=kp, NG=blk // gs, GS=gs,
                GROUPS=groups, num_warps=cfg["row_warps"])
        else:
            _select_triton(buf, nvis, stats, flat, t0, Tcur, topk, sel_cfg)
    return out
