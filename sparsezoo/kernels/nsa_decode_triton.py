"""NSA decode (Triton): the whole attention of a few new queries per request (T <= 4), in four launches.

Semantics (sparsezoo.ops.nsa_decode; each branch as its own op defines it). q [B, Hq, T, D] are the last T of S
positions (S = k.shape[2]): query t sits at pos = S - T + t, in selection block L = pos // sel_block.
- compressed branch: softmax attention over the entries of kc, vc [B, Hkv, Sc, D] visible to pos (entry i
  covers tokens [i * stride, i * stride + block_len) and is visible iff it ends at or before pos);
- selection, shared by the G = Hq / Hkv heads of a KV group: block j's importance is the sum over the group's
  heads and over the entries overlapping block j of the compressed probabilities; blocks 0, L - 1, L are
  forced, the best others (ties to the smaller id, a NaN importance first) fill up to min(topk, L + 1);
- selected branch: attention over the tokens <= pos of the selected blocks of k, v [B, Hkv, S, D];
- window branch: attention over the last `window` tokens (pos - window + 1 .. pos) of k_win, v_win;
- out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (gates [3, B, Hq, T]; unit gates when none are given).

Launches (grids follow from shapes alone: no host syncs, CUDA-graph capturable; on sm_90+ kernels 2-4 are
programmatic dependent launches by default, each waiting for the one before it before reading anything):
1. `_compressed_kernel`, grid (splits, B * Hkv): flash-decoding over the compressed entries. A program owns one
   KV group: its rows are the T queries (padded to a power of two) x the G heads (padded), >= 16, so each
   kc / vc tile is loaded once for the whole group and all T queries. Its split is a run of chunks, a chunk
   being the EC = NB * sel_block / stride entries that start in NB consecutive selection blocks; it walks them
   BE entries per tile (exp2 online softmax) and writes a normalised partial output and its log2-LSE. On the
   way it sums each row's probabilities (relative to the row's running max) per selection block: one
   tensor-core dot of p [rows, BE] with the tile's 0/1 overlap map [BE, 2 NB] (p through an fp16 hi/lo split
   for 16-bit inputs, about 21 bits; an IEEE fp32 dot for fp32 inputs), rescaled with the output accumulator.
   At a chunk's end it stores the sums of its NB own blocks, of the HALO blocks after them that its last
   entries reach, and the running max they are relative to. Where sel_block is a power-of-two multiple R of
   stride and no entry reaches past the next block (NSA's geometries), config block_sums='auto' takes the
   'reshape' sums instead: a tile is one chunk, and each block's sum is an exact fp32 sum of its R entries'
   p plus the previous block's entries that reach into it (no dots, no rescaling).
2. `_importance_kernel`, grid (B * Hkv * T, segments): merges each head's partial LSEs; then per BJ blocks of
   its segment: importance = sum over the heads of exp2(max - lse) x sums (block j: chunk j // NB's own sums
   plus the previous chunk's halo), the forced / NaN / causal rules folded into a 64-bit key (the importance's
   order-preserving bits, then the complemented block id: ties go to the smaller id), and the segment's KP
   largest keys (tl.topk) go to a candidate list.
3. `_sparse_kernel`, grid (B * Hkv * T, splits): flash-decoding over the selected blocks' tokens and the
   window's tokens, one program per query x KV group (rows: the G heads, padded to >= 16), each split inside
   one branch (the two softmaxes are separate: the window and the selected blocks may overlap). A program
   first reduces the row's candidates (segments x KP keys) to its top-k with tl.topk, which maps its slots to
   tokens; the first split also writes the selection (ascending ids, then -1).
4. `_combine_kernel`, grid (B * Hkv * T, D / merge_cols): LSE-merges each branch's splits and writes the gated
   sum (and the compressed branch's natural-log LSE).

Non-finite values (sparsezoo/kernels/nonfinite.py): output row (b, h, t) is NaN iff q[b, h, t] or a key it reads (its
visible compressed entries, selected tokens, window) holds a NaN/inf in k or v. In (1) rows of different
queries see different entries, so for T > 1 the non-finite v rows of a tile are zeroed before the PV dot and a
row that sees one is flagged; for T = 1 every loaded entry is seen by every row. Scores are checked where
attended (`saw_nonfinite`), the accumulators at the end; a flagged split poisons its partial output, which
poisons the merged row. The selection reads only q and kc, as the reference does: the partial LSEs it merges
are the scores' own (NaN only where a score is), not poisoned by v. A NaN score of a row (its q, or a visible
kc entry) makes the group's importances at that query NaN on every candidate block (with stride <= block_len,
as NSA configures it, every candidate block overlaps a visible entry); they rank first: it takes the smallest
ids, as the reference does.

No backward: decode is inference-only (sparsezoo.ops.nsa_decode sends gradient-carrying calls to the
branch ops).

Memory (fp32 workspaces, per KV group): the partial outputs [splits, rows, D]; per chunk the block sums
[rows, NB + HALO] and maxima [rows]; candidates [T, segments, KP] int64. At 128k tokens, B = 8, Hkv = 4,
G = 16, T = 1: ~4.5 MB of block sums, against ~160 MB of K/V read.

GPU cost (H200, m3, bf16, the paper's NSA config at 128k, B = 8, T = 1; scripts/probes/nsa_decode_compressed.py):
(1) reads kc and vc, 134 MB of the step's ~160 MB (32 us at the copy rate): 38.9 us with the reshape sums in one
wave of one program per SM, 3 tiles in flight (42 us in two waves with 2; 55 us with the dot sums; 37 us as a
plain flash-decoding loop, 34 us for the loads alone). (2)-(4) touch ~25 MB (the selected blocks and the window)
plus L2-resident workspaces: 6, 13 and 4 us, mostly latency. The step: 63.7 us back to back (benchmarks/zoo.py
flushes L2 and reads more: 0.074 ms there), against a 37 us byte floor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsezoo.kernels.indexer_triton import _KEY_NONE, _dot, _key_ids, _ordered_key, _rank_key
from sparsezoo.kernels.nonfinite import nonfinite_rows, poison, poison_rows, saw_nonfinite, zero_rows
from sparsezoo.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_launch, resolve_pdl
from sparsezoo.kernels.sizes import SMEM_BUDGET, fit_tiles
from sparsezoo.kernels.sizes import pow2 as _pow2
from sparsezoo.kernels.sizes import with_overrides

LOG2E = 1.4426950408889634
MAX_NB = 256  # most selection blocks per chunk the geometry may need
MAX_TILE = 256  # most compressed entries per tile of the reshape block sums
MAX_ROWS = 128  # most rows (queries x padded heads) of one compressed-branch program

# GPU tiling, an untimed first guess for the H200 (to be tuned). BE: compressed entries per tile; NB: selection
# blocks per chunk (grows until a chunk holds a multiple of 16 entries); cmp_warps / cmp_warps_wide: kernel 1
# with <= 16 / more rows; BJ: blocks per importance step; BN: tokens per tile of kernel 3; merge_cols: output
# columns per combine program; programs_per_sm: kernels 2-3 split their work to give every SM this many
# programs; cmp_programs_per_sm: kernel 1 splits each KV group's entries into the most runs that keep its grid
# within this many programs per SM (one wave, at least one run per group); cmp_splits / segments / attn_splits:
# force those counts (0: from the programs per SM). cmp_stages / attn_stages: tiles in flight, lowered where
# they would not fit SMEM_BUDGET (and a tile halved where one alone would not).
# block_sums: how kernel 1 sums the probabilities per selection block: 'dot' (the 0/1 overlap map through the
# tensor cores, any geometry), 'reshape' (fp32 sums of each block's R = sel_block / stride entries, one chunk
# of NB_reshape blocks per tile; needs R a power of two and no entry reaching past the next block), 'auto':
# reshape where the geometry allows it. H200, 128k, B = 8, the paper's config (scripts/probes/
# nsa_decode_compressed.py): kernel 1 takes 55 us with the dot sums, 42 us with the reshape sums at NB_reshape 32
# (128 entries per tile; 16: 50 us, and kernel 2 20 us against 8; 64: 57 us), 37 us as a plain flash-decoding loop.
# imp_warps 2 and merge_cols 16 (from 4 and 32): kernel 2 5.8 against 8.3 us, kernel 4 5.0 against 7.3 us at B = 8,
# the step 68.5 against 71.6 us (B = 1: 32.5 against 43.2 us); other kernel knobs slower or tied. Kernel 1 in
# one wave of one program per SM with 3 tiles in flight (from two waves and 2): 38.7 against 42.3 us at B = 8,
# the step 63.8 against 67.9 us; one wave with 2 stages 61.7 us, two waves with 1 stage 47.4 us.
CONFIG = {"BE": 64, "NB": 32, "block_sums": "auto", "NB_reshape": 32, "cmp_warps": 4, "cmp_warps_wide": 8,
          "cmp_stages": 3, "cmp_programs_per_sm": 1,
          "BJ": 256, "imp_warps": 2,
          "BN": 64, "attn_warps": 4, "attn_stages": 2,
          "merge_cols": 16, "merge_warps": 4,
          "programs_per_sm": 2, "cmp_splits": 0, "segments": 0, "attn_splits": 0}
_INTERPRET_CONFIG = {"BE": 16, "NB": 8, "NB_reshape": 4, "BJ": 32, "BN": 16, "merge_cols": 16}  # tiny tiles
BLOCK_SUMS = ("auto", "dot", "reshape")
_INTERPRET_SMS = 4  # stands in for the SM count on the CPU, so the default grids split too
_POW2_KEYS = ("BE", "NB", "NB_reshape", "BJ", "BN", "merge_cols")

_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # a NaN importance ranks as this (first, below forced blocks)


# ----------------------------------------------------------------------------- helpers

@triton.jit
def _n_visible(pos, Sc, BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr):
    """Compressed entries visible to position pos (those ending at or before it)."""
    n = tl.where(pos >= BLOCK_LEN - 1, (pos - BLOCK_LEN + 1) // STRIDE + 1, 0)
    return tl.minimum(n, Sc)


@triton.jit
def _online_step(s, m_i, l_i, acc, vt, IEEE: tl.constexpr):
    """One exp2 online-softmax step over the scores s [rows, keys] (-inf where not attended) and values vt:
    (p, alpha, m, l, acc) after it; p and acc are relative to m (0 where m is -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, IEEE)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1), acc


@triton.jit
def _finish(acc, m_i, l_i, bad):
    """(normalised output, poisoned where bad or non-finite; log2-LSE, -inf where nothing was attended)."""
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    o = poison_rows(o, bad | nonfinite_rows(o))
    return o, tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))


@triton.jit
def _block_sums(p, i, c0, col, BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr,
                IEEE: tl.constexpr):
    """[rows, 2 NB]: per row, the sum of p [rows, BE] over the entries i [BE] overlapping block c0 + col."""
    first = (i * STRIDE) // SEL - c0
    last = (i * STRIDE + BLOCK_LEN - 1) // SEL - c0
    overlap = (first[:, None] <= col[None, :]) & (col[None, :] <= last[:, None])
    if IEEE:
        sums = tl.dot(p, overlap.to(tl.float32), input_precision="ieee")
    else:  # p <= 1: scaled by 2^15 it stays finite in fp16; hi + lo keeps ~21 bits
        p = p * 32768.0
        hi = p.to(tl.float16)
        lo = (p - hi.to(tl.float32)).to(tl.float16)
        o16 = overlap.to(tl.float16)
        sums = (tl.dot(hi, o16) + tl.dot(lo, o16)) * (1.0 / 32768.0)
    return sums


@triton.jit
def _block_sums_reshaped(p, BM: tl.constexpr, NB: tl.constexpr, BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr,
                         SEL: tl.constexpr):
    """The block sums of one chunk's p [rows, NB * R] (R = SEL / STRIDE entries start in each block, whole
    chunks of NB blocks, no entry reaching past the next block), exact fp32 sums of the entries' own groups:
    (own [rows, NB]: block c's sum over the entries starting in it and the previous block's that reach into it;
    halo [rows]: what the last block's entries add to the next chunk's first block)."""
    R: tl.constexpr = SEL // STRIDE
    p3 = tl.reshape(p, [BM, NB, R])
    k = tl.arange(0, R)
    reaches = (k * STRIDE + BLOCK_LEN - 1 >= SEL)[None, None, :]  # entry k of a block reaches the next one
    own = tl.sum(p3, axis=2)
    out = tl.sum(tl.where(reaches, p3, 0.0), axis=2)  # [rows, NB]: block c's share of block c + 1
    c = tl.arange(0, NB)[None, :]
    prev = tl.gather(out, tl.broadcast_to(tl.maximum(c - 1, 0), [BM, NB]), axis=1)
    own = own + tl.where(c >= 1, prev, 0.0)
    halo = tl.sum(tl.where(c == NB - 1, out, 0.0), axis=1)
    return own, halo


@triton.jit
def _merge_lse(PL, split_stride, n_splits, ok):
    """log2-sum-exp2 of n_splits partial log2-LSEs (PL: pointers of split 0; NaN propagates)."""
    m = tl.full(ok.shape, float("-inf"), tl.float32)
    acc = tl.zeros(ok.shape, tl.float32)
    for sp in range(0, n_splits):
        v = tl.load(PL + sp * split_stride, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m, v)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp2(m - m_use) + tl.exp2(v - m_use)
        m = m_new
    return tl.where(acc == 0.0, float("-inf"), m + tl.log2(tl.where(acc == 0.0, 1.0, acc)))


@triton.jit
def _weighted_sums(SUMS, SUM_MAX, width, chunk0, kc, k_ok, r, h_ok, lse2, col, col_ok, BM: tl.constexpr):
    """[chunks, NB]: sum over the heads (rows r) of exp2(max - lse2) x the block sums (width per row) of the
    chunks kc of one KV group (tables indexed by chunk0 + kc); 0 where not k_ok."""
    at = ((chunk0 + kc).to(tl.int64) * BM)[:, None] + r[None, :]
    ok = k_ok[:, None] & h_ok[None, :]
    m = tl.load(SUM_MAX + at, mask=ok, other=float("-inf"))
    coef = tl.exp2(m - tl.where(lse2 == float("-inf"), 0.0, lse2)[None, :])  # 0 at m = -inf; NaN with the LSE
    x = tl.load(SUMS + at[:, :, None] * width + col[None, None, :], mask=ok[:, :, None] & col_ok[None, None, :],
                other=0.0)
    return tl.sum(coef[:, :, None] * x, axis=1)


@triton.jit
def _merge_splits(PO, PL, split_stride, s_lo, s_hi, r, h_ok, dcol, D: tl.constexpr):
    """LSE-merge of the partial outputs of splits s_lo .. s_hi - 1 (rows r, columns dcol): (out, log2-LSE)."""
    ok = h_ok[:, None] & (dcol[None, :] < D)
    m = tl.full(r.shape, float("-inf"), tl.float32)
    l = tl.zeros(r.shape, tl.float32)
    acc = tl.zeros([r.shape[0], dcol.shape[0]], tl.float32)
    for sp in range(s_lo, s_hi):
        row = sp * split_stride + r
        lse_s = tl.load(PL + row, mask=h_ok, other=float("-inf"))
        m_new = tl.maximum(m, lse_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m - m_use)
        w = tl.exp2(lse_s - m_use)
        o_s = tl.load(PO + row[:, None] * D + dcol[None, :], mask=ok, other=0.0)
        acc = acc * a[:, None] + w[:, None] * o_s  # a poisoned (NaN) partial stays NaN, even at weight 0
        l = l * a + w
        m = m_new
    empty = l == 0.0
    return acc / tl.where(empty, 1.0, l)[:, None], tl.where(empty, float("-inf"), m + tl.log2(tl.where(empty, 1.0, l)))


@triton.jit
def _block_keys(imp, j, L):
    """int64 ranking keys of blocks j (importances imp) for a query in block L: forced blocks (0, L - 1, L)
    first, then a NaN importance, then by importance; ties to the smaller id; blocks past L get _KEY_NONE."""
    imp = tl.where(imp != imp, _FLT_MAX, imp)
    imp = tl.where((j == 0) | (j == L) | (j == L - 1), float("inf"), imp)
    return tl.where(j <= L, _rank_key(_ordered_key(imp), j), _KEY_NONE)


@triton.jit
def _step_keys(SUM_OWN, SUM_HALO, SUM_MAX, st, chunk0, r, h_ok, lse2, L, nvis, BM: tl.constexpr, NB: tl.constexpr,
               HALO: tl.constexpr, CPI: tl.constexpr, EC: tl.constexpr):
    """Ranking keys [CPI * NB] of the blocks of importance step st: chunks st * CPI + [0, CPI), block j =
    chunk * NB + column, each summing its chunk's own block sums and the previous chunk's halo."""
    kc = st * CPI + tl.arange(0, CPI)
    col = tl.arange(0, NB)
    imp = _weighted_sums(SUM_OWN, SUM_MAX, NB, chunk0, kc, kc * EC < nvis, r, h_ok, lse2, col, col < NB, BM)
    if HALO > 0:
        kp = kc - 1
        imp += _weighted_sums(SUM_HALO, SUM_MAX, HALO, chunk0, kp, (kp >= 0) & (kp * EC < nvis), r, h_ok, lse2, col,
                              col < HALO, BM)
    j = st * CPI * NB + tl.arange(0, CPI * NB)
    return _block_keys(tl.reshape(imp, [CPI * NB]), j, L)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _compressed_kernel(Q, KC, VC, PO, PL, SUM_OWN, SUM_HALO, SUM_MAX, T, S, Sc, Hkv, n_chunks, chunks_per_split,
                       qk2, sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                       G: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr, BE: tl.constexpr, CT: tl.constexpr,
                       NB: tl.constexpr, HALO: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                       BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr, MULTI: tl.constexpr,
                       RESHAPE: tl.constexpr, IEEE: tl.constexpr):
    sp = tl.program_id(0)
    bg = tl.program_id(1)
    b = (bg // Hkv).to(tl.int64)
    g = (bg % Hkv).to(tl.int64)
    r = tl.arange(0, BM)  # row = query r // GP x head r % GP
    t = r // GP
    row_ok = (t < T) & (r % GP < G)
    d = tl.arange(0, BD)
    d_ok = d[None, :] < D
    q = tl.load(Q + b * sqb + (g * G + r % GP)[:, None] * sqh + t[:, None].to(tl.int64) * sqt + d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok, other=0.0)
    nvis = tl.where(row_ok, _n_visible(S - T + t, Sc, BLOCK_LEN, STRIDE), 0)
    nvis_max = _n_visible(S - 1, Sc, BLOCK_LEN, STRIDE)
    KC_G = KC + b * skb + g * skh
    VC_G = VC + b * svb + g * svh
    bad = nonfinite_rows(q)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    sums = tl.zeros([BM, 2 * NB], tl.float32)
    col = tl.arange(0, 2 * NB)
    e = tl.arange(0, BE)
    tile_lo = sp * chunks_per_split * CT
    tile_hi = tl.minimum(tile_lo + chunks_per_split * CT, tl.cdiv(nvis_max, BE))
    for tile in range(tile_lo, tile_hi):
        i = tile * BE + e
        i_ok = (i < nvis_max)[:, None] & d_ok
        seen = i[None, :] < nvis[:, None]
        kt = tl.load(KC_G + i[:, None].to(tl.int64) * sks + d[None, :] * skd, mask=i_ok, other=0.0)
        s = _dot(q, tl.trans(kt), IEEE) * qk2
        bad = bad | saw_nonfinite(s, seen)
        s = tl.where(seen, s, float("-inf"))
        vt = tl.load(VC_G + i[:, None].to(tl.int64) * svs + d[None, :] * svd, mask=i_ok, other=0.0)
        if MULTI:  # rows see different entries: a bad v row must not reach those that do not see it (0 * NaN)
            v_bad = nonfinite_rows(vt)
            vt = zero_rows(vt, v_bad)
            bad = bad | (tl.max((seen & v_bad[None, :]).to(tl.int32), axis=1) > 0)
        p, alpha, m_i, l_i, acc = _online_step(s, m_i, l_i, acc, vt, IEEE)
        chunk = tile // CT
        if RESHAPE:  # the tile is the chunk: its own sums and halo straight from p, relative to m_i
            own, spill = _block_sums_reshaped(p, BM, NB, BLOCK_LEN, STRIDE, SEL)
            at = (bg * n_chunks + chunk).to(tl.int64) * BM + r
            tl.store(SUM_OWN + at[:, None] * NB + tl.arange(0, NB)[None, :], own)
            if HALO > 0:
                tl.store(SUM_HALO + at * HALO, spill)
            tl.store(SUM_MAX + at, m_i)
        else:
            sums = sums * alpha[:, None] + _block_sums(p, i, chunk * NB, col, BLOCK_LEN, STRIDE, SEL, IEEE)
            if ((tile + 1) % CT == 0) | (tile + 1 == tile_hi):  # the chunk ends: its sums and their max
                at = (bg * n_chunks + chunk).to(tl.int64) * BM + r
                tl.store(SUM_OWN + at[:, None] * NB + col[None, :], sums, mask=col[None, :] < NB)
                if HALO > 0:
                    tl.store(SUM_HALO + at[:, None] * HALO + (col[None, :] - NB), sums,
                             mask=(col[None, :] >= NB) & (col[None, :] < NB + HALO))
                tl.store(SUM_MAX + at, m_i)
                sums = tl.zeros([BM, 2 * NB], tl.float32)
    o, lse2 = _finish(acc, m_i, l_i, bad)
    at = (bg * tl.num_programs(0) + sp).to(tl.int64) * BM + r
    tl.store(PO + at[:, None] * D + d[None, :], o, mask=d_ok)
    tl.store(PL + at, lse2)  # the scores' own LSE (NaN only where a score is): not poisoned by v


@triton.jit
def _importance_kernel(PL, SUM_OWN, SUM_HALO, SUM_MAX, CAND, T, S, Sc, n_splits, n_chunks, steps,
                       G: tl.constexpr, GP: tl.constexpr, BM: tl.constexpr, NB: tl.constexpr, HALO: tl.constexpr,
                       CPI: tl.constexpr, EC: tl.constexpr, KP: tl.constexpr, BLOCK_LEN: tl.constexpr,
                       STRIDE: tl.constexpr, SEL: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # everything it reads is kernel 1's output
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0)  # (b * Hkv + g) * T + t
    seg = tl.program_id(1)
    t = row % T
    bg = row // T
    pos = S - T + t
    L = pos // SEL
    nvis = _n_visible(pos, Sc, BLOCK_LEN, STRIDE)
    h = tl.arange(0, GP)
    h_ok = h < G
    r = t * GP + h
    lse2 = _merge_lse(PL + bg.to(tl.int64) * n_splits * BM + r, BM, n_splits, h_ok)
    first = seg * steps
    best = tl.topk(_step_keys(SUM_OWN, SUM_HALO, SUM_MAX, first, bg * n_chunks, r, h_ok, lse2, L, nvis, BM, NB, HALO,
                              CPI, EC), KP)
    for st in range(first + 1, first + steps):
        keys = _step_keys(SUM_OWN, SUM_HALO, SUM_MAX, st, bg * n_chunks, r, h_ok, lse2, L, nvis, BM, NB, HALO, CPI, EC)
        best = tl.topk(tl.reshape(tl.join(best, tl.topk(keys, KP)), [2 * KP]), KP)
    tl.store(CAND + (row * tl.num_programs(1) + seg).to(tl.int64) * KP + tl.arange(0, KP), best)


@triton.jit
def _sparse_kernel(Q, K, V, KW, VW, CAND, SEL_OUT, PO, PL, T, S, Hkv, n_cand, n_sel_splits, per, topk, win_slots,
                   qk2, sqb, sqh, sqt, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   swb, swh, swn, swd, sxb, sxh, sxn, sxd, ssb, ssh, sst,
                   G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                   KP: tl.constexpr, NC: tl.constexpr, SEL: tl.constexpr, IEEE: tl.constexpr,
                   PDL: tl.constexpr = False):
    if PDL:  # the candidates are kernel 2's output (and the partials' buffers kernel 4's input)
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0)  # (b * Hkv + g) * T + t
    sp = tl.program_id(1)
    t = row % T
    bg = row // T
    b = (bg // Hkv).to(tl.int64)
    g = (bg % Hkv).to(tl.int64)
    pos = S - T + t
    n_valid = tl.minimum(topk, pos // SEL + 1)
    h = tl.arange(0, BM)
    h_ok = h < G
    d = tl.arange(0, BD)
    d_ok = d[None, :] < D
    q = tl.load(Q + b * sqb + (g * G + h)[:, None] * sqh + t.to(tl.int64) * sqt + d[None, :] * sqd,
                mask=h_ok[:, None] & d_ok, other=0.0)
    win = sp >= n_sel_splits  # a window split (selects, rather than branches: strides may be constexpr)
    ids = tl.zeros([KP], tl.int32)
    if not win:  # the row's selection: its KP best keys among the segments' candidates, best first
        c = tl.arange(0, NC)
        ids = _key_ids(tl.topk(tl.load(CAND + row.to(tl.int64) * n_cand + c, mask=c < n_cand, other=_KEY_NONE), KP))
        if sp == 0:
            rank = tl.arange(0, KP)
            srt = tl.sort(tl.where(rank < n_valid, ids, 2147483647))
            tl.store(SEL_OUT + b * ssb + g * ssh + t * sst + rank, tl.where(srt < 2147483647, srt, -1),
                     mask=rank < topk)
    lo = tl.where(win, sp - n_sel_splits, sp) * per
    hi = tl.minimum(lo + per, tl.where(win, win_slots, n_valid * SEL))
    K_G = tl.where(win, KW + b * swb + g * swh, K + b * skb + g * skh)
    V_G = tl.where(win, VW + b * sxb + g * sxh, V + b * svb + g * svh)
    kn, kd = tl.where(win, swn, skn).to(tl.int64), tl.where(win, swd, skd).to(tl.int64)
    vn, vd = tl.where(win, sxn, svn).to(tl.int64), tl.where(win, sxd, svd).to(tl.int64)
    bad = nonfinite_rows(q)  # every loaded key is attended by every row (sparsezoo/kernels/nonfinite.py)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    for start in range(lo, hi, BN):
        slot = start + tl.arange(0, BN)
        blk = tl.gather(ids, tl.minimum(slot // SEL, KP - 1), axis=0).to(tl.int64)
        tok = tl.where(win, pos - win_slots + 1 + slot, blk * SEL + slot % SEL)
        ok = (slot < hi) & (tok >= 0) & (tok <= pos)
        kt = tl.load(K_G + tok[:, None] * kn + d[None, :] * kd, mask=ok[:, None] & d_ok, other=0.0)
        s = _dot(q, tl.trans(kt), IEEE) * qk2
        bad = bad | saw_nonfinite(s, ok[None, :])
        s = tl.where(ok[None, :], s, float("-inf"))
        vt = tl.load(V_G + tok[:, None] * vn + d[None, :] * vd, mask=ok[:, None] & d_ok, other=0.0)
        _, _, m_i, l_i, acc = _online_step(s, m_i, l_i, acc, vt, IEEE)
    o, lse2 = _finish(acc, m_i, l_i, bad)
    at = (row * tl.num_programs(1) + sp).to(tl.int64) * BM + h
    tl.store(PO + at[:, None] * D + d[None, :], o, mask=d_ok)
    tl.store(PL + at, lse2)


@triton.jit
def _combine_kernel(PO1, PL1, PO3, PL3, GATES, OUT, LSE, T, Hkv, n1, n_sel, n3,
                    sgk, sgb, sgh, sgt, sob, soh, sot, sod, slb, slh, slt,
                    G: tl.constexpr, GP: tl.constexpr, BM1: tl.constexpr, BM3: tl.constexpr, DC: tl.constexpr,
                    D: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # the partials of kernels 1 and 3 (kernel 3's wait covers kernel 1)
        gdc_wait()
    row = tl.program_id(0)
    t = row % T
    bg = row // T
    b = (bg // Hkv).to(tl.int64)
    head = ((bg % Hkv) * G + tl.arange(0, GP)).to(tl.int64)
    h = tl.arange(0, GP)
    h_ok = h < G
    dcol = tl.program_id(1) * DC + tl.arange(0, DC)
    o_cmp, lse_cmp = _merge_splits(PO1 + bg.to(tl.int64) * n1 * BM1 * D, PL1 + bg.to(tl.int64) * n1 * BM1, BM1,
                                   0, n1, t * GP + h, h_ok, dcol, D)
    base3 = row.to(tl.int64) * n3 * BM3
    o_slc, _ = _merge_splits(PO3 + base3 * D, PL3 + base3, BM3, 0, n_sel, h, h_ok, dcol, D)
    o_win, _ = _merge_splits(PO3 + base3 * D, PL3 + base3, BM3, n_sel, n3, h, h_ok, dcol, D)
    if GATED:
        gp = GATES + b * sgb + head * sgh + t.to(tl.int64) * sgt
        g0 = tl.load(gp, mask=h_ok, other=0.0).to(tl.float32)
        g1 = tl.load(gp + sgk, mask=h_ok, other=0.0).to(tl.float32)
        g2 = tl.load(gp + 2 * sgk, mask=h_ok, other=0.0).to(tl.float32)
        out = g0[:, None] * o_cmp + g1[:, None] * o_slc + g2[:, None] * o_win
    else:
        out = o_cmp + o_slc + o_win
    ok = h_ok[:, None] & (dcol[None, :] < D)
    tl.store(OUT + b * sob + head[:, None] * soh + t.to(tl.int64) * sot + dcol[None, :] * sod,
             out.to(OUT.dtype.element_ty), mask=ok)
    if tl.program_id(1) == 0:  # a poisoned row is NaN in every column
        lse = poison(lse_cmp * 0.6931471805599453, nonfinite_rows(o_cmp))
        tl.store(LSE + b * slb + head * slh + t.to(tl.int64) * slt, lse, mask=h_ok)


# ----------------------------------------------------------------------------- launcher


def chunk_geometry(block_len: int, stride: int, sel_block: int, nb: int, be: int) -> tuple[int, int, int, int]:
    """(NB, EC, BE, HALO): selection blocks per chunk, entries per chunk (NB * sel_block / stride, a multiple
    of 16), entries per tile (a power of two dividing EC, at most be), and the blocks after its NB own ones
    that a chunk's last entries reach. NB starts at nb and doubles until EC is a whole multiple of 16."""
    while nb <= MAX_NB and (nb * sel_block % stride or nb * sel_block // stride % 16):
        nb *= 2
    if nb > MAX_NB:
        raise ValueError(f"nsa_decode_triton: no power-of-two run of <= {MAX_NB} selection blocks of {sel_block} "
                         f"tokens holds a whole multiple of 16 compressed entries of stride {stride}; use the "
                         f"branch ops (backend='reference' or 'auto')")
    ec = nb * sel_block // stride
    halo = max(0, (block_len - stride - 1) // sel_block + 1)
    if halo > nb:
        raise ValueError(f"nsa_decode_triton: a compressed entry of {block_len} tokens spans more than {nb} "
                         f"selection blocks of {sel_block}; use the branch ops (backend='reference' or 'auto')")
    return nb, ec, min(be, ec & -ec), halo


def reshape_geometry(block_len: int, stride: int, sel_block: int, nb: int) -> tuple[int, int, int, int] | str:
    """(NB, EC, BE, HALO) of the 'reshape' block sums, one chunk per tile (BE = EC = NB * R entries, R =
    sel_block / stride; NB starts at nb and doubles until EC >= 16), or why this geometry cannot take them."""
    if sel_block % stride:
        return f"reshape block sums need sel_block ({sel_block}) to be a multiple of stride ({stride})"
    R = sel_block // stride
    if R & (R - 1):
        return f"reshape block sums need sel_block / stride to be a power of two, got {R}"
    halo = max(0, (block_len - stride - 1) // sel_block + 1)
    if halo > 1:
        return f"reshape block sums need entries ({block_len} tokens) that reach at most one block past their own"
    while nb * R < 16:
        nb *= 2
    if nb * R > MAX_TILE:
        return f"reshape block sums hold at most {MAX_TILE} entries per tile, got {nb * R}"
    return nb, nb * R, nb * R, halo


def compressed_tiles(cfg: dict, block_len: int, stride: int, sel_block: int, BD: int, itemsize: int,
                     reshape: bool) -> tuple[int, int, int, int, int]:
    """(NB, EC, BE, HALO, stages) of kernel 1: the configured geometry with as many of cmp_stages K + V tiles in
    flight as SMEM_BUDGET holds, the tile halved (NB_reshape or BE) while a single one would not fit."""
    nb, be = cfg["NB_reshape"], cfg["BE"]
    while True:
        if reshape:
            NB, EC, BE, HALO = reshape_geometry(block_len, stride, sel_block, nb)
        else:
            NB, EC, BE, HALO = chunk_geometry(block_len, stride, sel_block, cfg["NB"], be)
        if 2 * BE * BD * itemsize <= SMEM_BUDGET or BE <= 16 or (reshape and nb == 1):
            return NB, EC, BE, HALO, fit_tiles(BE, cfg["cmp_stages"], 2 * BD * itemsize)[1]
        nb, be = max(1, nb // 2), be // 2


def block_sums_for(block_len: int, stride: int, sel_block: int, device, config: dict | None = None) -> str:
    """'reshape' or 'dot': the block sums nsa_decode_triton runs for this geometry, device and config."""
    return _block_sums_mode(_resolve_config(config, torch.device(device)), block_len, stride, sel_block)


def _block_sums_mode(cfg: dict, block_len: int, stride: int, sel_block: int) -> str:
    if cfg["block_sums"] == "dot":
        return "dot"
    why = reshape_geometry(block_len, stride, sel_block, cfg["NB_reshape"])
    if isinstance(why, str):
        if cfg["block_sums"] == "reshape":
            raise ValueError(f"nsa_decode_triton: {why}; use config block_sums='dot' or 'auto'")
        return "dot"
    return "reshape"


def launch_mode_for(device, pdl: bool | None = None) -> str:
    """'pdl' or 'plain': how nsa_decode_triton launches kernels 2-4 for this device and pdl argument."""
    return "pdl" if resolve_pdl(pdl, torch.device(device)) else "plain"


def _n_visible_host(pos: int, Sc: int, block_len: int, stride: int) -> int:
    return 0 if pos < block_len - 1 else min(Sc, (pos - block_len + 1) // stride + 1)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else _INTERPRET_SMS


def _resolve_config(config: dict | None, device: torch.device) -> dict:
    cfg = dict(CONFIG)
    if device.type != "cuda":
        cfg.update(_INTERPRET_CONFIG)
    cfg = with_overrides(cfg, config, "nsa_decode_triton")
    for key in _POW2_KEYS:
        if cfg[key] < 1 or cfg[key] & (cfg[key] - 1):
            raise ValueError(f"config {key} must be a power of two, got {cfg[key]}")
    for key, least in (("BE", 16), ("BN", 16), ("merge_cols", 16), ("NB", 8)):
        if cfg[key] < least:
            raise ValueError(f"config {key} must be >= {least} (tensor-core tiles), got {cfg[key]}")
    for key in ("programs_per_sm", "cmp_programs_per_sm", "cmp_stages", "attn_stages"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"config {key} must be an int >= 1, got {cfg[key]!r}")
    if cfg["block_sums"] not in BLOCK_SUMS:
        raise ValueError(f"config block_sums must be one of {BLOCK_SUMS}, got {cfg['block_sums']!r}")
    return cfg


def _check_inputs(q, kc, vc, k, v, k_win, v_win, block_len, stride, sel_block, topk, window, gates):
    tensors = dict(q=q, kc=kc, vc=vc, k=k, v=v, k_win=k_win, v_win=v_win)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or any(x.dtype != q.dtype for x in tensors.values()):
        raise ValueError(f"nsa_decode_triton runs fp32/fp16/bf16 with one dtype for all inputs (fp64: the branch ops' "
                         f"reference), got {[str(x.dtype) for x in tensors.values()]}")
    if any(x.dim() != 4 for x in tensors.values()):
        raise ValueError(f"need 4-d inputs, got {[tuple(x.shape) for x in tensors.values()]}")
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    raw = (B, Hkv, S, D)
    if any(tuple(x.shape) != raw for x in (k, v, k_win, v_win)) or kc.shape != vc.shape \
            or tuple(kc.shape[:2]) != (B, Hkv) or kc.shape[3] != D or Hq % Hkv or not 1 <= T <= S:
        raise ValueError(f"need q [B, Hq, T, D], k = v = k_win = v_win [B, Hkv, S, D], kc = vc [B, Hkv, Sc, D] with "
                         f"Hkv | Hq and 1 <= T <= S; got {[tuple(x.shape) for x in tensors.values()]}")
    if D > 256 or max(16, _pow2(T) * _pow2(Hq // Hkv)) > MAX_ROWS:
        raise ValueError(f"nsa_decode_triton serves head_dim <= 256 and T x G <= {MAX_ROWS} rows per KV group, got "
                         f"head_dim {D}, T {T}, G {Hq // Hkv}")
    if min(block_len, stride, sel_block, topk, window) < 1:
        raise ValueError(f"block_len, stride, sel_block, topk and window must be >= 1, got {block_len}, {stride}, "
                         f"{sel_block}, {topk}, {window}")
    if gates is not None and (tuple(gates.shape) != (3, B, Hq, T) or not gates.is_floating_point()
                              or gates.device != q.device):
        raise ValueError(f"gates must be a float [3, B, Hq, T] = {(3, B, Hq, T)} tensor on {q.device}, got "
                         f"{tuple(gates.shape)} {gates.dtype} on {gates.device}")


def _splits(want: int, units: int) -> tuple[int, int]:
    """(units per split, split count) cutting `units` into about `want` splits, none empty (one when no unit)."""
    if units == 0:
        return 0, 1
    per = triton.cdiv(units, max(1, min(want, units)))
    return per, max(1, triton.cdiv(units, per))


@torch.no_grad()
def nsa_decode_triton(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_win: torch.Tensor, v_win: torch.Tensor, block_len: int, stride: int, sel_block: int, topk: int,
                      window: int, scale: float, gates: torch.Tensor | None = None, config: dict | None = None,
                      pdl: bool | None = None):
    """NSA's attention for the T new queries q [B, Hq, T, D] (the last T of S = k.shape[2] positions): compressed
    entries kc, vc [B, Hkv, Sc, D], selected blocks of k, v [B, Hkv, S, D], window of k_win, v_win [B, Hkv, S, D].
    gates [3, B, Hq, T] (any float dtype and strides; None: unit gates) weigh the compressed, selected and
    window branches. Returns (out [B, Hq, T, D] in q's dtype, selection int32 [B, Hkv, T, topk]: per row the
    min(topk, L + 1) selected block ids ascending, then -1; the compressed branch's natural-log LSE [B, Hq, T]
    fp32). Not differentiable (decode is inference-only). config overrides CONFIG. No host syncs.

    pdl: kernels 2-4 as programmatic dependent launches (sparsezoo/kernels/pdl.py: each starts while the one before it
    finishes, hiding the launch gaps); None: launch_mode_for decides (on where the GPU supports it), True insists
    (an error without such a GPU), False never."""
    _check_inputs(q, kc, vc, k, v, k_win, v_win, block_len, stride, sel_block, topk, window, gates)
    cfg = _resolve_config(config, q.device)
    chained = pdl_launch(resolve_pdl(pdl, q.device), q.device)
    B, Hq, T, D = q.shape
    Hkv, S, Sc = k.shape[1], k.shape[2], kc.shape[2]
    G = Hq // Hkv
    GP = _pow2(G)
    BM1, BM3, BD, KP = max(16, _pow2(T) * GP), max(16, GP), max(16, _pow2(D)), max(2, _pow2(topk))
    reshape = _block_sums_mode(cfg, block_len, stride, sel_block) == "reshape"
    NB, EC, BE, HALO, cmp_stages = compressed_tiles(cfg, block_len, stride, sel_block, BD, q.element_size(), reshape)
    want = cfg["programs_per_sm"] * _sm_count(q.device)
    rows, dev, f32 = B * Hkv * T, q.device, torch.float32
    ieee = q.dtype == torch.float32
    if Sc == 0:  # a valid pointer for the kernels; Sc = 0 still masks every entry
        kc = vc = q.new_zeros((B, Hkv, 1, D))

    # 1. compressed branch: partial outputs and LSEs, per-chunk block sums
    n_chunks = triton.cdiv(_n_visible_host(S - 1, Sc, block_len, stride), EC)
    one_wave = max(1, cfg["cmp_programs_per_sm"] * _sm_count(q.device) // (B * Hkv))
    cps, n1 = _splits(cfg["cmp_splits"] or one_wave, n_chunks)
    po1 = torch.empty((B * Hkv, n1, BM1, D), dtype=f32, device=dev)
    pl1 = torch.empty((B * Hkv, n1, BM1), dtype=f32, device=dev)
    tables = max(1, n_chunks) * B * Hkv * BM1
    own = torch.empty((tables, NB), dtype=f32, device=dev)
    halo = torch.empty((tables, max(1, HALO)), dtype=f32, device=dev)
    sum_max = torch.empty((tables,), dtype=f32, device=dev)
    geometry = dict(BLOCK_LEN=block_len, STRIDE=stride, SEL=sel_block)
    _compressed_kernel[(n1, B * Hkv)](
        q, kc, vc, po1, pl1, own, halo, sum_max, T, S, Sc, Hkv, max(1, n_chunks), cps, scale * LOG2E,
        *q.stride(), *kc.stride(), *vc.stride(),
        G=G, GP=GP, BM=BM1, BE=BE, CT=EC // BE, NB=NB, HALO=HALO, D=D, BD=BD, **geometry, MULTI=T > 1,
        RESHAPE=reshape, IEEE=ieee,
        num_warps=cfg["cmp_warps"] if BM1 <= 16 else cfg["cmp_warps_wide"], num_stages=cmp_stages)

    # 2. importance and each segment's best KP blocks
    BJ = max(cfg["BJ"], NB, KP)
    steps, n_seg = _splits(cfg["segments"] or triton.cdiv(want, rows), triton.cdiv((S - 1) // sel_block + 1, BJ))
    cand = torch.empty((rows, n_seg, KP), dtype=torch.int64, device=dev)
    _importance_kernel[(rows, n_seg)](
        pl1, own, halo, sum_max, cand, T, S, Sc, n1, max(1, n_chunks), steps,
        G=G, GP=GP, BM=BM1, NB=NB, HALO=HALO, CPI=BJ // NB, EC=EC, KP=KP, **geometry, num_warps=cfg["imp_warps"],
        **chained)

    # 3. selected blocks and window: partial outputs and LSEs, split inside each branch; the selection
    sel_slots = min(topk, (S - 1) // sel_block + 1) * sel_block  # the last query's selected tokens (the most)
    win_slots = min(window, S)
    BN, attn_stages = fit_tiles(cfg["BN"], cfg["attn_stages"], 2 * BD * q.element_size())
    per = BN * triton.cdiv(sel_slots + win_slots, BN * (cfg["attn_splits"] or triton.cdiv(want, rows)))
    n_sel, n3 = triton.cdiv(sel_slots, per), triton.cdiv(sel_slots, per) + triton.cdiv(win_slots, per)
    po3 = torch.empty((rows, n3, BM3, D), dtype=f32, device=dev)
    pl3 = torch.empty((rows, n3, BM3), dtype=f32, device=dev)
    sel = torch.empty((B, Hkv, T, topk), dtype=torch.int32, device=dev)
    _sparse_kernel[(rows, n3)](
        q, k, v, k_win, v_win, cand, sel, po3, pl3, T, S, Hkv, n_seg * KP, n_sel, per, topk, win_slots,
        scale * LOG2E, *q.stride(), *k.stride(), *v.stride(), *k_win.stride(), *v_win.stride(), *sel.stride()[:3],
        G=G, BM=BM3, BN=BN, D=D, BD=BD, KP=KP, NC=_pow2(n_seg * KP), SEL=sel_block, IEEE=ieee,
        num_warps=cfg["attn_warps"], num_stages=attn_stages, **chained)

    # 4. the gated sum of the three branches (and the compressed branch's LSE)
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, T), dtype=f32, device=dev)
    DC = min(cfg["merge_cols"], BD)
    g_strides = gates.stride() if gates is not None else (0, 0, 0, 0)
    _combine_kernel[(rows, triton.cdiv(D, DC))](
        po1, pl1, po3, pl3, gates if gates is not None else out, out, lse, T, Hkv, n1, n_sel, n3,
        *g_strides, *out.stride(), *lse.stride(),
        G=G, GP=GP, BM1=BM1, BM3=BM3, DC=DC, D=D, GATED=gates is not None, num_warps=cfg["merge_warps"], **chained)
    return out, sel, lse
