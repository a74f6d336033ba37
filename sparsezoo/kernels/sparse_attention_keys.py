"""Key-major block-sparse attention, forward only (Triton): one program per (key block, tile of the rows
that selected it), then a merge of each row's per-block results by their LSEs.

Why a second schedule: the query-major kernels (sparse_attention_triton) give a tile of rows the union
of their tokens' blocks. With one selection per query head (MoBA) or several tokens per tile (MSA: 4
tokens x 16 heads) most of that tensor-core work lands on blocks a row did not choose. Here every row of
a tile chose the tile's block, so the only masked work is the causal diagonal. The price is memory: each
(row, chosen block) pair writes a partial output row (in q's dtype) and its LSE, which the merge reads
back once.

Steps (`block_sparse_attention_keys`), per chunk of queries:
1. Lists. A column is (batch, selection head, key block); its entries are the selection entries
   (token, slot) that chose the block: a count pass and a scatter pass with atomics (the order inside a
   column is arbitrary: a row's result does not depend on its tile-mates). Columns per selection head,
   not per kv head, keep concurrent list programs (which run different selection heads) on different
   counters: MoBA's lists took 51 ms per kv head, 5 ms per selection head (H200, 128k). A repeated id in
   a row counts once; ids outside [0, n_blocks) make no entry.
2. Attention (`_attn_kernel`). A program runs up to R row tiles of one column; the grid is an upper
   bound on the (column, group of R tiles) pairs, known without a host sync. A tile's rows are
   EPT = BM // G entries x their G query heads. Each row gets its partial output [E, G, D] and
   natural-log LSE [E, G]. Two launches over the same grid: the columns whose key block holds a NaN/inf
   (checked, rare), and the rest, whose blocks of one key sub-tile take `_tiles_fast` (a plain softmax
   with few instructions per score: 160 registers on sm_90, scripts/sm90_report.py; the generic tile took
   231 in the state the tune below measured).
3. Merge (`_merge_kernel`): per query row, the LSE-weighted sum of its partials (the LSEs first, then
   the partials with known weights).

Memory: E * G * (D * itemsize + 4) bytes of partials for E = B * Hs * T * k entries, bounded by
running the queries in chunks (config CHUNK_BYTES). Nothing is [T, S].

Non-finite values (docs/ops.md): one read of K and V flags the key blocks holding a NaN/inf; a tile of
such a block takes the checked path (flagged k/v rows read as 0, a row that attends to one or whose q is
non-finite is poisoned). Elsewhere a NaN from q reaches the row's partial sum, and a row whose visible
scores are all -inf (an inf in q) is poisoned too. The merge poisons a row with a poisoned partial, and a
row with no key at all iff its q is non-finite.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from sparsezoo.kernels.nonfinite import nonfinite_rows, poison, poison_rows
from sparsezoo.kernels.sizes import key_tile, with_overrides
from sparsezoo.kernels.sizes import pow2 as _pow2
from sparsezoo.kernels.sparse_attention_triton import (
    _key_rows,
    _load_rows,
    _precision,
    _row_inputs,
    _saw_bad_key,
    _selection_heads,
    bad_keys,
    block_sparse_attention_triton,
    online_softmax,
)

LOG2E = 1.4426950408889634

# BM rows per attention tile on a GPU (at least G; the interpreter runs 16), R row tiles per program,
# BN keys per sub-tile, HOIST: a block of one sub-tile loads its K/V once per program (else per tile),
# LIST_IDS ids per list-building program, MERGE_ROWS rows per merge program, CHUNK_BYTES of partials
# per query chunk, MERGE_WARPS per merge program; FAST: `_tiles_fast` where it applies. Tuned on an H200
# at 128k (zoo.py --tune --tune-parts moba_attention): HOIST 57 ms against 77 ms per tile (MSA); FAST
# 45.5 ms against 54.1 ms (MSA), 58.9 against 85.1 ms (MoBA); 2-3 stages, 8 warps, 128-row tiles, R 8/32
# and merges of 32-256 rows ran slower or within 1 ms.
# BWD_BM / BWD_R / BWD_WARPS: rows per tile, tiles per program and warps of the key-major dK/dV kernel
# (`dkdv_keys`; 254 registers without spills at 8 warps in an offline sm_90 compile, 1 KB of spills at 4;
# 76 ms at 128k on an H200 for MSA; no other config measured).
KEYS_CONFIG = {"BM": 64, "BN": 128, "R": 16, "HOIST": True, "FAST": True, "num_warps": 4, "num_stages": 1,
               "LIST_IDS": 4096, "MERGE_ROWS": 128, "MERGE_WARPS": 4, "CHUNK_BYTES": 4 << 30,
               "BWD_BM": 64, "BWD_R": 16, "BWD_WARPS": 8}
_INTERPRET_BM = 16


def resolve_config(config: dict | None = None) -> dict:
    """KEYS_CONFIG with `config`'s overrides; unknown keys raise, naming the valid ones."""
    return with_overrides(KEYS_CONFIG, config, "key-major attention")


@triton.jit
def _list_kernel(SEL, CNT, CUR, START, ORDER, T, NK, HS, n_blocks, ssb, ssh, sst, ssk,
                 TT: tl.constexpr, KP: tl.constexpr, SCATTER: tl.constexpr):
    """Tokens TT * (pid(0) // HS) + [0, TT) of selection head pid(0) % HS (the fastest-varying, so that
    concurrent programs count on different columns), batch pid(1): count each live entry in its column
    (CNT), or (SCATTER) write its flat index (b, s, t, slot) at START[col] + a slot taken from CUR."""
    s = tl.program_id(0) % HS
    b = tl.program_id(1)
    t = (tl.program_id(0) // HS) * TT + tl.arange(0, TT)
    j = tl.arange(0, KP)
    ok = (t < T)[:, None] & (j < NK)[None, :]
    x = tl.load(SEL + b.to(tl.int64) * ssb + s.to(tl.int64) * ssh + t.to(tl.int64)[:, None] * sst + j[None, :] * ssk,
                mask=ok, other=-1)
    live = ok & (x >= 0) & (x < n_blocks)  # range check in the input dtype, before any cast
    x = tl.where(live, x, -1).to(tl.int32)
    earlier = (x[:, :, None] == x[:, None, :]) & (j[None, None, :] < j[None, :, None])
    live = live & (tl.max(earlier.to(tl.int32), axis=2) == 0)  # a repeated id counts once
    col = (b * HS + s) * n_blocks + x
    if SCATTER:
        at = tl.load(START + col, mask=live, other=0) + tl.atomic_add(CUR + col, 1, mask=live, sem="relaxed")
        e = ((b.to(tl.int64) * HS + s) * T + t)[:, None] * NK + j[None, :]
        tl.store(ORDER + at, e.to(ORDER.dtype.element_ty), mask=live)
    else:
        tl.atomic_add(CNT + col, 1, mask=live, sem="relaxed")


@triton.jit
def _column(PCOL, GROUPS, GROUP_END, CNT, START, n_blocks, HS):
    """Program pid(0)'s column (from `column_programs`) -> (column, the program's group in it, batch,
    selection head, key block, entry count, first slot in ORDER)."""
    p = tl.program_id(0)
    col = tl.load(PCOL + p)
    group = p - (tl.load(GROUP_END + col) - tl.load(GROUPS + col))
    bs = col // n_blocks
    return col, group, bs // HS, bs % HS, col % n_blocks, tl.load(CNT + col), tl.load(START + col).to(tl.int64)


@triton.jit
def _entries(ORDER, start, ei, n_e, NK, T, pos0):
    """(valid, flat entry id (int64), token, position) of list slots ei of a column."""
    ok = ei < n_e
    e = tl.load(ORDER + start + ei, mask=ok, other=0)
    t = (e // NK) % T
    return ok, e.to(tl.int64), t, pos0 + t


@triton.jit
def _key_tile(K, V, KBAD, b, kv, keys, S, skb, skh, sks, skd, svb, svh, svs, svd, D: tl.constexpr,
              BD: tl.constexpr, CHECKED: tl.constexpr):
    """(k, v, non-finite flags, inside S) of keys `keys` of kv head kv; CHECKED reads flagged rows as 0."""
    d = tl.arange(0, BD)
    kmask = keys < S
    ok, kb = _key_rows(KBAD, keys, kmask, CHECKED)
    kt = _load_rows(K, b * skb + kv * skh + keys * sks, d, skd, ok, D)
    vt = _load_rows(V, b * svb + kv * svh + keys * svs, d, svd, ok, D)
    return kt, vt, kb, kmask


@triton.jit
def _softmax_step(q, kt, vt, kb, keys, kmask, pos, row_ok, m_i, l_i, acc, bad, qk_scale, PREC: tl.constexpr,
                  CHECKED: tl.constexpr):
    """One key sub-tile of the online softmax; flags (CHECKED) rows that attend to a flagged key."""
    s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
    vis = row_ok[:, None] & (keys[None, :] <= pos[:, None]) & kmask[None, :]
    s = tl.where(vis, s, float("-inf"))
    p, alpha, m_new, l_i = online_softmax(s, m_i, l_i)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
    return m_new, l_i, acc, _saw_bad_key(bad, vis, kb, CHECKED)


@triton.jit
def _tiles(Q, K, V, POUT, PLSE, ORDER, KBAD, b, s, kv, blk, start, n_e, tile0, n_t, T, S, pos0, NK, qk_scale,
           sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
           G: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
           BD: tl.constexpr, PREC: tl.constexpr, HOIST: tl.constexpr, CHECKED: tl.constexpr):
    """Row tiles tile0 .. tile0 + n_t of one column (key block blk of selection head s, which reads kv head
    kv; entries ORDER[start: start + n_e]): each row's partial output and LSE over the block, poisoned
    where the non-finite rule says so. HOIST (a block of one key sub-tile): its K/V loaded once for all
    the tiles."""
    d = tl.arange(0, BD)
    kn = tl.arange(0, BN)
    r = tl.arange(0, BM)
    head = (s * G + r % G).to(tl.int64)
    if HOIST:
        kt0, vt0, kb0, kmask0 = _key_tile(K, V, KBAD, b, kv, blk * BLOCK + kn, S, skb, skh, sks, skd,
                                          svb, svh, svs, svd, D, BD, CHECKED)
    for i in range(n_t):
        row_ok, e, t, pos = _entries(ORDER, start, (tile0 + i) * (BM // G) + r // G, n_e, NK, T, pos0)
        q = _load_rows(Q, b * sqb + head * sqh + t.to(tl.int64) * sqt, d, sqd, row_ok, D)
        bad = tl.zeros([BM], tl.int1)
        if CHECKED:
            bad = nonfinite_rows(q) & row_ok
        m_i = tl.zeros([BM], tl.float32) + float("-inf")
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, BD], tl.float32)
        if HOIST:
            m_i, l_i, acc, bad = _softmax_step(q, kt0, vt0, kb0, blk * BLOCK + kn, kmask0, pos, row_ok, m_i, l_i,
                                               acc, bad, qk_scale, PREC, CHECKED)
        else:
            for sub in tl.static_range(BLOCK // BN):
                keys = blk * BLOCK + sub * BN + kn
                kt, vt, kb, kmask = _key_tile(K, V, KBAD, b, kv, keys, S, skb, skh, sks, skd, svb, svh, svs, svd,
                                              D, BD, CHECKED)
                m_i, l_i, acc, bad = _softmax_step(q, kt, vt, kb, keys, kmask, pos, row_ok, m_i, l_i, acc, bad,
                                                   qk_scale, PREC, CHECKED)
        seen = row_ok & (blk * BLOCK <= pos)  # the row sees at least the block's first key
        bad = bad | (l_i != l_i) | (seen & (l_i == 0))  # NaN from q, or every visible score -inf (inf in q)
        lse = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        row = e * G + r % G
        tl.store(PLSE + row, poison(lse, bad), mask=row_ok)
        tl.store(POUT + row[:, None] * D + d[None, :], poison_rows(out, bad).to(POUT.dtype.element_ty),
                 mask=row_ok[:, None] & (d[None, :] < D))


@triton.jit
def _tiles_fast(Q, POUT, PLSE, ORDER, kt, vt, b, s, blk, start, n_e, tile0, n_t, T, pos0, NK, qk_scale,
                sqb, sqh, sqt, sqd, G: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
                BD: tl.constexpr, PREC: tl.constexpr):
    """`_tiles` for the common case, with fewer instructions per score: a block of one key sub-tile whose
    K/V (kt, vt) hold no NaN/inf, and qk_scale > 0. One plain softmax per row (no running max), the max
    taken on the unscaled scores, the causal mask only on tiles that reach the block's last key, and the
    poison folded into the row's reciprocal sum."""
    d = tl.arange(0, BD)
    r = tl.arange(0, BM)
    kn = tl.arange(0, BLOCK)
    head = (s * G + r % G).to(tl.int64)
    first = blk * BLOCK
    # 128-key blocks: each tile's entries are loaded a tile ahead (loop-carried), so their load overlaps the
    # tile before instead of heading a chain (entries, then rows, then the dots). Measured on an H200 at 128k:
    # the kernel 7-10% faster with 128-key blocks, 20% slower with 64-key ones, which keep the plain loop.
    if BLOCK >= 128:
        n_ok, n_e_id, n_t_id, n_pos = _entries(ORDER, start, tile0 * (BM // G) + r // G, n_e, NK, T, pos0)
    for i in range(n_t):
        if BLOCK >= 128:
            row_ok, e, t, pos = n_ok, n_e_id, n_t_id, n_pos
        else:
            row_ok, e, t, pos = _entries(ORDER, start, (tile0 + i) * (BM // G) + r // G, n_e, NK, T, pos0)
        q = _load_rows(Q, b * sqb + head * sqh + t.to(tl.int64) * sqt, d, sqd, row_ok, D)
        if BLOCK >= 128:
            n_ok, n_e_id, n_t_id, n_pos = _entries(ORDER, start, (tile0 + i + 1) * (BM // G) + r // G, n_e, NK, T,
                                                   pos0)
        x = tl.dot(q, tl.trans(kt), input_precision=PREC)
        if tl.min(tl.where(row_ok, pos, first + BLOCK)) < first + BLOCK - 1:  # a row misses some key
            x = tl.where(kn[None, :] <= (pos - first)[:, None], x, float("-inf"))
        m = tl.max(x, axis=1) * qk_scale
        m = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2(x * qk_scale - m[:, None])
        l_i = tl.sum(p, axis=1)
        acc = tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        seen = row_ok & (first <= pos)  # the row sees at least the block's first key
        bad = (l_i != l_i) | (seen & (l_i == 0))  # NaN from q, or every visible score -inf (inf in q)
        live = l_i > 0
        inv = tl.where(bad, float("nan"), 1.0 / tl.where(live, l_i, 1.0))
        lse = tl.where(live, (m + tl.log2(tl.where(live, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        row = e * G + r % G
        tl.store(PLSE + row, poison(lse, bad), mask=row_ok)
        tl.store(POUT + row[:, None] * D + d[None, :], (acc * inv[:, None]).to(POUT.dtype.element_ty),
                 mask=row_ok[:, None] & (d[None, :] < D))


@triton.jit
def _attn_kernel(Q, K, V, POUT, PLSE, ORDER, CNT, START, GROUPS, GROUP_END, PCOL, KBAD, BBAD,
                 T, S, pos0, NK, HS, n_blocks, n_cols, qk_scale,
                 sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                 G: tl.constexpr, KV_DIV: tl.constexpr, BM: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
                 BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, HOIST: tl.constexpr,
                 FAST: tl.constexpr, CHECKED: tl.constexpr):
    """R row tiles of one column: program p takes column PCOL[p] (n_cols past the last group) and its
    group p - first group of the column. Two launches share the grid: CHECKED runs the columns whose key
    block holds a NaN/inf, the other launch all the rest (so the rare checked path does not set the
    registers of the common one). FAST (HOIST and scale > 0): the common launch takes `_tiles_fast`."""
    if tl.load(PCOL + tl.program_id(0)) < n_cols:
        col, group, b, s, blk, n_e, start = _column(PCOL, GROUPS, GROUP_END, CNT, START, n_blocks, HS)
        kv = s // KV_DIV
        bkv = b * (HS // KV_DIV) + kv
        if (tl.load(BBAD + bkv * n_blocks + blk) != 0) == CHECKED:
            tile0 = group * R
            n_t = tl.minimum(R, tl.cdiv(n_e, BM // G) - tile0)
            kbad = KBAD + bkv.to(tl.int64) * S
            if FAST and not CHECKED:
                kt, vt, kb, kmask = _key_tile(K, V, kbad, b, kv, blk * BLOCK + tl.arange(0, BN), S, skb, skh, sks,
                                              skd, svb, svh, svs, svd, D, BD, False)
                _tiles_fast(Q, POUT, PLSE, ORDER, kt, vt, b, s, blk, start, n_e, tile0, n_t, T, pos0, NK, qk_scale,
                            sqb, sqh, sqt, sqd, G, BM, BLOCK, D, BD, PREC)
            else:
                _tiles(Q, K, V, POUT, PLSE, ORDER, kbad, b, s, kv, blk, start, n_e, tile0, n_t, T, S, pos0, NK,
                       qk_scale, sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                       G, BM, BLOCK, BN, D, BD, PREC, HOIST, CHECKED)


@triton.jit
def _merge_kernel(POUT, PLSE, Q, O, L, T, sqb, sqh, sqt, sqd, sob, soh, sot, sod, slb, slh, slt,
                  NK: tl.constexpr, G: tl.constexpr, TT: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """Rows of tokens TT * pid(0) + [0, TT) x the G heads of selection head pid(1), batch pid(2): the
    LSE-weighted sum of their partials. Two passes over the row's NK partials: the LSEs alone give the
    max, then the partials are read with their weights known, so no running rescale sits between one
    partial's load and the next (the second loop stays a runtime loop: fully unrolled, ptxas spilled it).
    A poisoned partial poisons the row; a row with no key is NaN iff its q is non-finite (output 0 and LSE
    -inf otherwise)."""
    s = tl.program_id(1)
    b = tl.program_id(2)
    r = tl.arange(0, TT * G)
    t = tl.program_id(0) * TT + r // G
    g = r % G
    row_ok = t < T
    head = (s * G + g).to(tl.int64)
    d = tl.arange(0, BD)
    e0 = ((b.to(tl.int64) * tl.num_programs(1) + s) * T + t) * NK
    m = tl.zeros([TT * G], tl.float32) + float("-inf")
    bad = tl.zeros([TT * G], tl.int1)
    for kk in tl.static_range(NK):
        lk = tl.load(PLSE + (e0 + kk) * G + g, mask=row_ok, other=float("-inf"))
        bad = bad | (lk != lk)
        m = tl.maximum(m, lk)  # NaN-dropping max
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.zeros([TT * G], tl.float32)
    acc = tl.zeros([TT * G, BD], tl.float32)
    for kk in range(NK):
        row = (e0 + kk) * G + g
        lk = tl.load(PLSE + row, mask=row_ok, other=float("-inf"))
        live = lk > float("-inf")  # false for NaN too
        w = tl.where(live, tl.exp(lk - m_use), 0.0)
        o = tl.load(POUT + row[:, None] * D + d[None, :], mask=live[:, None] & (d[None, :] < D), other=0.0)
        acc += w[:, None] * o.to(tl.float32)
        l_sum += w
    empty = row_ok & ~(l_sum > 0)
    q = _load_rows(Q, b * sqb + head * sqh + t.to(tl.int64) * sqt, d, sqd, empty, D)  # only keyless rows
    bad = bad | (nonfinite_rows(q) & empty)
    lse = tl.where(l_sum > 0, m_use + tl.log(tl.where(l_sum > 0, l_sum, 1.0)), float("-inf"))
    inv = tl.where(bad, float("nan"), 1.0 / tl.where(l_sum > 0, l_sum, 1.0))
    tl.store(L + b * slb + head * slh + t * slt, poison(lse, bad), mask=row_ok)
    tl.store(O + b * sob + head[:, None] * soh + t.to(tl.int64)[:, None] * sot + d[None, :] * sod,
             (acc * inv[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < D))


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, L, DELTA, ORDER, CNT, START, GROUPS, GROUP_END, PCOL,
                 T, S, NK, HS, n_blocks, n_cols, qk_scale, scale,
                 sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd, slb, slh, slt, sdb, sdh, sds, sdd,
                 G: tl.constexpr, KV_DIV: tl.constexpr, BM: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr,
                 BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """dK/dV of key sub-tile pid(1) of one column over R row tiles of exactly the entries that chose it
    (the rows of the query-major dK/dV kernel, with no row of a token that did not choose the block), one
    fp32 atomic add per program. Finite K/V only: the backward runs the query-major kernels when the
    forward flagged a NaN/inf key (a non-finite q reaches dK/dV as it does there)."""
    if tl.load(PCOL + tl.program_id(0)) < n_cols:
        col, group, b, s, blk, n_e, start = _column(PCOL, GROUPS, GROUP_END, CNT, START, n_blocks, HS)
        kv = s // KV_DIV
        d = tl.arange(0, BD)
        r = tl.arange(0, BM)
        head = (s * G + r % G).to(tl.int64)
        keys = blk * BLOCK + tl.program_id(1) * BN + tl.arange(0, BN)
        kmask = keys < S
        kt = _load_rows(K, b * skb + kv * skh + keys * sks, d, skd, kmask, D)
        vt = _load_rows(V, b * svb + kv * svh + keys * svs, d, svd, kmask, D)
        dk = tl.zeros([BN, BD], tl.float32)
        dv = tl.zeros([BN, BD], tl.float32)
        tile0 = group * R
        for i in range(tl.minimum(R, tl.cdiv(n_e, BM // G) - tile0)):
            row_ok, e, t, pos = _entries(ORDER, start, (tile0 + i) * (BM // G) + r // G, n_e, NK, T, S - T)
            q, do, lse2, delta = _row_inputs(Q, DO, L, DELTA, b * sqb + head * sqh + t * sqt,
                                             b * slb + head * slh + t * slt, d, sqd, row_ok, D, False)
            st = tl.dot(kt, tl.trans(q), input_precision=PREC) * qk_scale  # [BN, BM]
            vis = row_ok[None, :] & (keys[:, None] <= pos[None, :]) & kmask[:, None]
            pt = tl.where(vis, tl.exp2(st - lse2[None, :]), 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(vt, tl.trans(do), input_precision=PREC)
            dk += tl.dot((pt * (dpt - delta[None, :])).to(q.dtype), q, input_precision=PREC)
        off = b * sdb + kv * sdh + keys[:, None] * sds + d[None, :] * sdd
        m = kmask[:, None] & (d[None, :] < D)
        tl.atomic_add(DK + off, dk * scale, mask=m)
        tl.atomic_add(DV + off, dv, mask=m)


def dkdv_keys(q, k, v, do, lse, delta, block_idx, block_size: int, scale: float, config: dict | None = None):
    """dK, dV (fp32 [B, Hkv, S, D]) of block-sparse attention with the key-major schedule, for finite K/V:
    q, do [B, Hq, T, D] with one layout, k/v [B, Hkv, S, D], lse (natural log) and delta = rowsum(dO * O) -
    dLSE [B, Hq, T] fp32, block_idx [B, Hs, T, k] as the forward's. Host syncs: none."""
    if q.stride() != do.stride():
        raise ValueError("dkdv_keys reads q and dO with one set of strides; make both contiguous")
    cfg = resolve_config(config)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    Hs, NK = block_idx.shape[1], block_idx.shape[3]
    G, KV_DIV = _selection_heads(Hq, Hkv, Hs)
    dk = torch.zeros((B, Hkv, S, D), dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    if q.numel() == 0 or NK == 0:
        return dk, dv
    n_blocks = triton.cdiv(S, block_size)
    BM = max(cfg["BWD_BM"] if q.is_cuda else _INTERPRET_BM, _pow2(G))
    R = cfg["BWD_R"]
    BN = key_tile(block_size, cfg["BN"], "the key-major attention backward", gpu=q.is_cuda)
    E = B * Hs * T * NK
    order = torch.empty(E, dtype=torch.int32, device=q.device)
    cnt, start = column_lists(block_idx, n_blocks, order, cfg["LIST_IDS"])
    groups, group_end, pcol, bound = column_programs(cnt, (BM // G) * R, E)
    _dkdv_kernel[(bound, block_size // BN)](
        q, k, v, do, dk, dv, lse, delta, order, cnt, start, groups, group_end, pcol,
        T, S, NK, Hs, n_blocks, B * Hs * n_blocks, scale * LOG2E, scale,
        *q.stride(), *k.stride(), *v.stride(), *lse.stride(), *dk.stride(),
        G=G, KV_DIV=KV_DIV, BM=BM, R=R, BLOCK=block_size, BN=BN, D=D, BD=max(_pow2(D), 16), PREC=_precision(q),
        num_warps=cfg["BWD_WARPS"], num_stages=1)
    return dk, dv


def query_chunk(T: int, entries_per_token: int, bytes_per_entry: int, cap_bytes: int) -> int:
    """Queries per chunk: at most cap_bytes of per-entry buffers, and entry ids that fit in int32."""
    return max(1, min(T, cap_bytes // (entries_per_token * bytes_per_entry), (2**31 - 1) // entries_per_token))


def column_lists(sel, n_blocks: int, order: torch.Tensor, list_ids: int):
    """Key-major lists of a chunk's selections sel [B, Hs, tc, NK] -> (cnt, start): column
    c = (b * Hs + s) * n_blocks + block holds cnt[c] entries, their flat ids ((b * Hs + s) * tc + t) * NK +
    slot at order[start[c]:][:cnt[c]]."""
    B, Hs, tc, NK = sel.shape
    n_cols = B * Hs * n_blocks
    KP = _pow2(NK)
    TT = max(1, list_ids // (KP * KP))
    cnt = torch.zeros(n_cols, dtype=torch.int32, device=sel.device)
    cur = torch.zeros(n_cols, dtype=torch.int32, device=sel.device)
    grid = (Hs * triton.cdiv(tc, TT), B)
    sizes = (tc, NK, Hs, n_blocks, *sel.stride())
    _list_kernel[grid](sel, cnt, cur, cnt, order, *sizes, TT=TT, KP=KP, SCATTER=False)  # START unread
    start = torch.cumsum(cnt, 0, dtype=torch.int32) - cnt
    _list_kernel[grid](sel, cnt, cur, start, order, *sizes, TT=TT, KP=KP, SCATTER=True)
    return cnt, start


def column_programs(cnt, per_program: int, n_entries: int):
    """Programs of `per_program` entries over the columns -> (groups, group_end, pcol, bound): groups[c]
    per column, group_end their running sum, pcol[p] the column of program p (len(cnt) past the last)
    over a grid of `bound` programs, an upper bound known without a host sync."""
    groups = (cnt + per_program - 1) // per_program
    group_end = torch.cumsum(groups, 0, dtype=torch.int32)
    bound = triton.cdiv(n_entries, per_program) + cnt.numel()
    pcol = torch.searchsorted(group_end, torch.arange(bound, device=cnt.device, dtype=torch.int32), right=True,
                              out_int32=True)
    return groups, group_end, pcol, bound


def block_sparse_attention_keys(q, k, v, block_idx, block_size: int, scale: float, return_lse: bool = False,
                                config: dict | None = None):
    """Forward-only block-sparse attention with the key-major schedule: the same contract as
    `sparse_attention_triton.block_sparse_attention_triton` (q [B, Hq, T, D], k/v [B, Hkv, S, D], block_idx
    [B, Hs, T, k] with Hs = Hkv or Hq; ids outside [0, n_blocks) ignored, a repeated id counts once;
    out [B, Hq, T, D] and natural-log LSE [B, Hq, T]) without gradients. No host sync. config: overrides of
    KEYS_CONFIG."""
    if q.dtype == torch.float64:
        raise ValueError("the triton sparse attention runs fp32/fp16/bf16; use backend='reference' for fp64")
    cfg = resolve_config(config)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    Hs, NK = block_idx.shape[1], block_idx.shape[3]
    G, KV_DIV = _selection_heads(Hq, Hkv, Hs)
    n_blocks = triton.cdiv(S, block_size)
    n_cols = B * Hs * n_blocks
    BM = max(cfg["BM"] if q.device.type == "cuda" else _INTERPRET_BM, _pow2(G))
    EPT = BM // G
    R = cfg["R"]
    BN = key_tile(block_size, cfg["BN"], "the key-major attention", gpu=q.is_cuda)
    hoist = cfg["HOIST"] and BN == block_size
    fast = hoist and cfg["FAST"] and scale > 0
    BD = max(_pow2(D), 16)
    dev = q.device
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, T), dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return (out, lse) if return_lse else out
    kbad, bbad = bad_keys(k, v, block_size)
    chunk = query_chunk(T, B * Hs * NK, G * (D * q.element_size() + 4), cfg["CHUNK_BYTES"])
    E_max = B * Hs * chunk * NK
    pout = torch.empty(E_max * G * D, dtype=q.dtype, device=dev)
    plse = torch.empty(E_max * G, dtype=torch.float32, device=dev)
    order = torch.empty(E_max, dtype=torch.int32, device=dev)
    MT = max(1, cfg["MERGE_ROWS"] // G)
    for t0 in range(0, T, chunk):
        tc = min(chunk, T - t0)
        E = B * Hs * tc * NK
        cnt, start = column_lists(block_idx[:, :, t0:t0 + tc], n_blocks, order, cfg["LIST_IDS"])
        groups, group_end, pcol, bound = column_programs(cnt, EPT * R, E)
        plse[:E * G].fill_(float("-inf"))
        qc = q[:, :, t0:t0 + tc]
        for checked in (False, True):
            _attn_kernel[(bound,)](qc, k, v, pout, plse, order, cnt, start, groups, group_end, pcol, kbad, bbad,
                                   tc, S, S - T + t0, NK, Hs, n_blocks, n_cols, scale * LOG2E,
                                   *qc.stride(), *k.stride(), *v.stride(), G=G, KV_DIV=KV_DIV, BM=BM, R=R,
                                   BLOCK=block_size, BN=BN, D=D, BD=BD, PREC=_precision(q), HOIST=hoist,
                                   FAST=fast, CHECKED=checked, num_warps=cfg["num_warps"],
                                   num_stages=cfg["num_stages"])
        oc, lc = out[:, :, t0:t0 + tc], lse[:, :, t0:t0 + tc]
        _merge_kernel[(triton.cdiv(tc, MT), Hs, B)](pout, plse, qc, oc, lc, tc, *qc.stride(), *oc.stride(),
                                                    *lc.stride(), NK=NK, G=G, TT=MT, D=D, BD=BD,
                                                    num_warps=cfg["MERGE_WARPS"])
    return (out, lse) if return_lse else out


def block_sparse_attention_keys_trainable(q, k, v, block_idx, block_size: int, scale: float,
                                          return_lse: bool = False, config: dict | None = None,
                                          attn_config: dict | None = None, key_major_dkdv: bool = False,
                                          on_dkdv=None):
    """`block_sparse_attention_keys` with gradients: the key-major forward, then the query-major backward
    (`sparse_attention_triton`), whose tile plan is built after the forward. key_major_dkdv: dK/dV by
    `dkdv_keys` instead (the query-major kernels still run when the forward flagged a NaN/inf key).
    config: overrides of KEYS_CONFIG; attn_config: of the query-major ATTN_CONFIG (the backward's). on_dkdv: told
    which dK/dV schedule the backward ran (see `block_sparse_attention_triton`). Host syncs: the backward's."""
    outputs = functools.partial(block_sparse_attention_keys, return_lse=True, config=config)
    dkdv = functools.partial(dkdv_keys, config=config) if key_major_dkdv else None
    return block_sparse_attention_triton(q, k, v, block_idx, block_size, scale, return_lse, attn_config,
                                         outputs=outputs, dkdv=dkdv, on_dkdv=on_dkdv)
