"""NSA block selection (Triton): compressed-attention probabilities -> block importance -> top-n
with forced blocks, without a [T, Sc] or [T, n_blocks] buffer.

Semantics (sparsezoo.ops.nsa.nsa_select): q [B, Hq, T, D] are the last T of S positions, kc
[B, Hkv, Sc, D] compressed keys; entry i covers tokens [i*stride, i*stride + block_len) and is
visible to position p iff it ends at or before p. p[h, t, i] = softmax over the visible entries of
scale * q.kc; importance[g, t, j] = sum over the G heads of group g and over the entries overlapping
selection block j of p. Block 0 and the local blocks L - 1, L (L = p // sel_block) are forced; the
other topk - 3 slots take the best blocks 1 <= j <= L - 2 (ties to the smaller id).

Tiling: a program owns TM consecutive tokens x the G heads of one KV group, BM = TM * GP rows
(row r = token r // GP, head r % GP; GP = G rounded up to a power of two, padding heads masked).
The group shares kc and the selection, so each kc tile feeds one [BM, BE] tensor-core dot.

1. `_lse_kernel`: online log-sum-exp (base 2) of the scores over the visible entries, in tiles
   of BE_LSE entries.
2. `_select_kernel`: recomputes the scores chunk by chunk. A chunk is NB candidate blocks
   [jb, jb + NB) plus a halo of HALO = ceil((block_len - 1) / sel_block) blocks before them: it
   loads every entry whose start lies in [(jb - HALO) * sel_block, (jb + NB) * sel_block) (at most
   BE entries), so the NB blocks see every entry that overlaps them and are complete; the halo
   columns are dropped (the halo costs HALO / (NB + HALO) extra scores). Any (block_len, stride,
   sel_block) works. p = exp2(s - lse) * 2^15 goes through an fp16 hi/lo split and two tensor-core
   dots with the 0/1 overlap matrix [BE, NBX] (entry overlaps block column), about 21 mantissa bits,
   then the GP heads of each token are summed ([TM, GP, NBX] -> [TM, NBX]).
   Candidates are folded into a per-token running top-(topk - 3) of distinct int64 keys
   (score bits << 32 | (2^31 - 1 - id)): one max ranks by score, ties to the smaller id. A chunk
   inserts its best remaining candidate while it beats some row's worst kept key, so once the list
   is warm a chunk costs two reductions.
3. Output row: the forced blocks in ascending id (0, L - 1, L; only 0 when L = 0, 0 and 1 when
   L = 1), then the kept blocks best-first, then -1: the reference's order, up to floating-point
   near-ties. Exactly min(topk, L + 1) valid ids.

Split (decode): when tiles x groups x batch do not fill the GPU, both kernels split the work along
the entry axis into n_splits programs. Kernel 1 writes one partial LSE per split, every program of
kernel 2 merges all of its rows' partials, streams its own range of chunks and writes its best
topk - 3 keys to a workspace; `_merge_kernel` picks the final list from the n_splits * (topk - 3)
candidates. Prefill runs one split: kernel 2 writes the output directly.

Memory: partial LSEs fp32 [B, n_splits, Hq, T], plus int64 [B*Hkv*T, n_splits, topk - 3] when split.
No host syncs: capturable in a CUDA graph (the split count depends on shapes only).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparsezoo.kernels.decode_indexer import _pack  # int64 key: score, then the smaller block id

LOG2E = 1.4426950408889634
MAX_ENTRY_TILE = 256  # largest BE the chunking may need (sel_block >> stride needs big chunks)

# GPU tiling (to be tuned on H200). ROWS = tokens per tile x GP; BE entries per selection chunk;
# BE_LSE entries per LSE tile; a split run aims at `waves` programs per SM, each split covering at
# least `split_min_chunks` chunks; n_splits forces a split count (None: automatic).
NSA_SELECT_CONFIG = {"ROWS": 64, "BE": 64, "BE_LSE": 128, "num_warps": 4, "num_stages": 2,
                     "waves": 2, "split_min_chunks": 4, "n_splits": None}
_INTERPRET_TILES = {"ROWS": 64, "BE": 16, "BE_LSE": 64}  # interpreter: few programs, many chunk edges
_INTERPRET_SMS = 4

_INVALID = tl.constexpr(-9223372036854775807)  # candidate key that never enters a list
_PAD = tl.constexpr(9223372036854775807)  # list slots beyond topk - 3: never evicted
_P_SCALE = tl.constexpr(15.0)  # log2 of the factor on p before the fp16 split (p <= 1 stays finite)


# ----------------------------------------------------------------------------- helpers

@triton.jit
def _rows(tile, g, T, S, G: tl.constexpr, GP: tl.constexpr, TM: tl.constexpr):
    """Rows of a tile: (head, token, valid, position), row r = token r // GP x head r % GP."""
    r = tl.arange(0, TM * GP)
    t = tile * TM + r // GP
    hh = r % GP
    return (g * G + hh).to(tl.int64), t, (hh < G) & (t < T), S - T + t


@triton.jit
def _load_q(Q, b, head, t, row_ok, sqb, sqh, sqt, sqd, D: tl.constexpr, BD: tl.constexpr):
    d = tl.arange(0, BD)
    return tl.load(Q + b * sqb + head[:, None] * sqh + t[:, None].to(tl.int64) * sqt + d[None, :] * sqd,
                   mask=row_ok[:, None] & (d[None, :] < D), other=0.0)


@triton.jit
def _scores(q, KC_G, i, i_ok, sks, skd, qk2, D: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr):
    """[rows, entries] base-2 logits qk2 * q.kc[i] (kc rows i of one group)."""
    d = tl.arange(0, BD)
    kt = tl.load(KC_G + i[:, None] * sks + d[None, :] * skd, mask=i_ok[:, None] & (d[None, :] < D), other=0.0)
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
def _empty_list(R: tl.constexpr, KR: tl.constexpr, KP: tl.constexpr):
    """[R, KP] keys: distinct empties (below every real key) in the KR live slots, _PAD beyond."""
    slot = tl.arange(0, KP)
    key = tl.where(slot < KR, _INVALID + 1 + slot.to(tl.int64), _PAD)
    return key[None, :] + tl.zeros([R, KP], tl.int64)


@triton.jit
def _insert(top, cand):
    """Fold candidate keys [R, C] into the running lists [R, KP]: best candidate first, each
    replaces the row's worst key while it beats it (keys are distinct)."""
    best = tl.max(cand, axis=1)
    worst = tl.min(top, axis=1)
    while tl.max((best > worst).to(tl.int32), axis=0) > 0:
        take = best > worst
        top = tl.where((top == worst[:, None]) & take[:, None], best[:, None], top)
        cand = tl.where(cand == best[:, None], _INVALID, cand)
        best = tl.max(cand, axis=1)
        worst = tl.min(top, axis=1)
    return top


@triton.jit
def _write_selection(OUT_ROW, top, local, row_ok, KR: tl.constexpr, KP: tl.constexpr,
                     KOUT: tl.constexpr, KOP: tl.constexpr):
    """Write rows OUT_ROW[r, :KOUT]: forced blocks (0, L - 1, L), the kept blocks best-first, -1."""
    slot = tl.arange(0, KP)
    real = (top >= 0) & (slot < KR)[None, :]
    keys = tl.where(real, top, _INVALID)
    rank = tl.zeros(top.shape, tl.int32)
    for c in tl.static_range(KP):  # rank = number of kept keys above this one
        kc = tl.max(tl.where(slot[None, :] == c, keys, _INVALID), axis=1)
        rank += (kc[:, None] > keys).to(tl.int32)
    n_forced = tl.where(local >= 2, 3, local + 1)
    at = n_forced[:, None] + rank
    ids = (0x7FFFFFFF - (top & 0xFFFFFFFF)).to(tl.int32)
    tl.store(OUT_ROW[:, None] + at, ids, mask=row_ok[:, None] & real & (at < KOUT))
    n_free = tl.sum(real.to(tl.int32), axis=1)
    c = tl.arange(0, KOP)[None, :]
    forced = tl.where(c == 0, 0, tl.where(c == n_forced[:, None] - 1, local[:, None], local[:, None] - 1))
    tail = (c < n_forced[:, None]) | (c >= (n_forced + n_free)[:, None])
    tl.store(OUT_ROW[:, None] + c, tl.where(c < n_forced[:, None], forced, -1),
             mask=row_ok[:, None] & (c < KOUT) & tail)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _lse_kernel(Q, KC, PLSE, T, S, Sc, Hq, qk2, n_splits, tiles_per_split,
                sqb, sqh, sqt, sqd, skb, skh, sks, skd,
                G: tl.constexpr, GP: tl.constexpr, TM: tl.constexpr, BE: tl.constexpr,
                D: tl.constexpr, BD: tl.constexpr, BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr,
                IEEE: tl.constexpr):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (latest) tiles first
    g = tl.program_id(1)
    b = (tl.program_id(2) // n_splits).to(tl.int64)
    split = tl.program_id(2) % n_splits
    head, t, row_ok, pos = _rows(tile, g, T, S, G, GP, TM)
    q = _load_q(Q, b, head, t, row_ok, sqb, sqh, sqt, sqd, D, BD)
    KC_G = KC + b * skb + g * skh
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
    tl.store(PLSE + ((b * n_splits + split) * Hq + head) * T + t, lse, mask=row_ok)


@triton.jit
def _merged_lse(PLSE, b, head, t, row_ok, Hq, T, n_splits):
    """log2-sum-exp2 of the rows' partial LSEs over the splits (-inf: the row sees no entry)."""
    m = tl.zeros(t.shape, tl.float32) + float("-inf")
    acc = tl.zeros(t.shape, tl.float32)
    for sp in range(0, n_splits):
        v = tl.load(PLSE + ((b * n_splits + sp) * Hq + head) * T + t, mask=row_ok, other=float("-inf"))
        m_new = tl.maximum(m, v)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp2(m - m_use) + tl.exp2(v - m_use)
        m = m_new
    return tl.where(acc > 0, m + tl.log2(tl.where(acc > 0, acc, 1.0)), float("-inf"))


@triton.jit
def _chunk_importance(q, KC_G, lse2, pos, row_ok, jb, Sc, qk2, sks, skd,
                      TM: tl.constexpr, GP: tl.constexpr, BE: tl.constexpr, NB: tl.constexpr,
                      HALO: tl.constexpr, NBX: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                      BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr, IEEE: tl.constexpr):
    """[TM, NBX] importance (x 2^15) of blocks jb - HALO + c; columns HALO .. HALO + NB - 1 are complete."""
    base = jb - HALO
    i_lo = (tl.maximum(base, 0) * SEL + STRIDE - 1) // STRIDE  # first entry starting at or after block base
    i_hi = ((jb + NB) * SEL + STRIDE - 1) // STRIDE  # first entry starting at or after block jb + NB
    i = i_lo + tl.arange(0, BE)
    i_ok = (i < i_hi) & (i < Sc)
    s = _scores(q, KC_G, i, i_ok, sks, skd, qk2, D, BD, IEEE)
    p = tl.where(_visible(i, i_ok, pos, row_ok, BLOCK_LEN, STRIDE), tl.exp2(s - lse2[:, None] + _P_SCALE), 0.0)
    first = (i * STRIDE) // SEL - base
    last = (i * STRIDE + BLOCK_LEN - 1) // SEL - base
    c = tl.arange(0, NBX)[None, :]
    overlap = ((first[:, None] <= c) & (c <= last[:, None])).to(tl.float16)
    p_hi = p.to(tl.float16)
    p_lo = (p - p_hi.to(tl.float32)).to(tl.float16)
    imp_rows = tl.dot(p_hi, overlap) + tl.dot(p_lo, overlap)
    return tl.sum(tl.reshape(imp_rows, [TM, GP, NBX]), axis=1)


@triton.jit
def _select_kernel(Q, KC, PLSE, PART, OUT, T, S, Sc, Hq, qk2, n_splits, chunks_per_split,
                   sqb, sqh, sqt, sqd, skb, skh, sks, skd,
                   G: tl.constexpr, GP: tl.constexpr, TM: tl.constexpr, BE: tl.constexpr, NB: tl.constexpr,
                   HALO: tl.constexpr, NBX: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                   BLOCK_LEN: tl.constexpr, STRIDE: tl.constexpr, SEL: tl.constexpr,
                   KR: tl.constexpr, KP: tl.constexpr, KOUT: tl.constexpr, KOP: tl.constexpr,
                   IEEE: tl.constexpr, FINAL: tl.constexpr):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    g = tl.program_id(1)
    Hkv = tl.num_programs(1)
    b = (tl.program_id(2) // n_splits).to(tl.int64)
    split = tl.program_id(2) % n_splits
    head, t, row_ok, pos = _rows(tile, g, T, S, G, GP, TM)
    q = _load_q(Q, b, head, t, row_ok, sqb, sqh, sqt, sqd, D, BD)
    lse2 = _merged_lse(PLSE, b, head, t, row_ok, Hq, T, n_splits)
    KC_G = KC + b * skb + g * skh
    tok = tile * TM + tl.arange(0, TM)
    tok_ok = tok < T
    local = (S - T + tok) // SEL
    last_local = (S - T + tl.minimum(tile * TM + TM, T) - 1) // SEL
    lo = split * chunks_per_split
    hi = tl.minimum(lo + chunks_per_split, tl.cdiv(tl.maximum(last_local - 2, 0), NB))
    c = tl.arange(0, NBX)
    top = _empty_list(TM, KR, KP)
    for k in range(lo, hi):
        jb = 1 + k * NB
        imp = _chunk_importance(q, KC_G, lse2, pos, row_ok, jb, Sc, qk2, sks, skd, TM, GP, BE, NB, HALO, NBX,
                                D, BD, BLOCK_LEN, STRIDE, SEL, IEEE)
        j = jb - HALO + c
        ok = (tok_ok[:, None] & ((c >= HALO) & (c < HALO + NB) & (j >= 1))[None, :]
              & (j[None, :] <= local[:, None] - 2))
        top = _insert(top, tl.where(ok, _pack(imp, j[None, :]), _INVALID))
    row = (b * Hkv + g) * T + tok
    if FINAL:
        _write_selection(OUT + row * KOUT, top, local, tok_ok, KR, KP, KOUT, KOP)
    else:
        slot = tl.arange(0, KP)[None, :]
        tl.store(PART + (row[:, None] * n_splits + split) * KR + slot, top, mask=tok_ok[:, None] & (slot < KR))


@triton.jit
def _merge_kernel(PART, OUT, n_rows, T, S, n_splits, RM: tl.constexpr, NC: tl.constexpr, SEL: tl.constexpr,
                  KR: tl.constexpr, KP: tl.constexpr, KOUT: tl.constexpr, KOP: tl.constexpr):
    row = tl.program_id(0) * RM + tl.arange(0, RM).to(tl.int64)
    row_ok = row < n_rows
    local = (S - T + (row % T)) // SEL
    c = tl.arange(0, NC)[None, :]
    cand = tl.load(PART + row[:, None] * (n_splits * KR) + c, mask=row_ok[:, None] & (c < n_splits * KR),
                   other=_INVALID)
    cand = tl.where(cand >= 0, cand, _INVALID)  # a split's empty slots
    top = _insert(_empty_list(RM, KR, KP), cand)
    _write_selection(OUT + row * KOUT, top, local, row_ok, KR, KP, KOUT, KOP)


# ----------------------------------------------------------------------------- launcher

def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _n_visible_host(pos: int, Sc: int, block_len: int, stride: int) -> int:
    return 0 if pos < block_len - 1 else min(Sc, (pos - block_len + 1) // stride + 1)


def chunk_geometry(block_len: int, stride: int, sel_block: int, be: int) -> tuple[int, int, int]:
    """(BE, NB, HALO): entries per chunk, candidate blocks per chunk, halo blocks before them.
    A chunk loads the entries starting in NB + HALO blocks, at most ceil((NB + HALO) * sel_block /
    stride) <= BE of them; BE grows (power of two) when sel_block / stride leaves no room for NB >= 1."""
    halo = -(-(block_len - 1) // sel_block)
    need = _pow2(-(-(1 + halo) * sel_block // stride))
    be = max(be, need)
    if be > MAX_ENTRY_TILE:
        raise ValueError(f"nsa_select_triton: sel_block={sel_block} spans {need} compressed entries of stride "
                         f"{stride} per chunk (at most {MAX_ENTRY_TILE}); use backend='reference'")
    return be, be * stride // sel_block - halo, halo


def _split_count(cfg: dict, programs: int, max_chunks: int, device: torch.device) -> int:
    """Splits of the entry axis so that programs x splits fills the GPU `waves` times."""
    if max_chunks == 0:
        return 1
    if cfg["n_splits"]:
        return max(1, min(cfg["n_splits"], max_chunks))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else _INTERPRET_SMS
    want = -(-cfg["waves"] * sms // programs)
    return max(1, min(want, max_chunks // cfg["split_min_chunks"]))


def _check_inputs(q: torch.Tensor, kc: torch.Tensor, S: int, block_len: int, stride: int, sel_block: int,
                  topk: int) -> None:
    if q.dtype == torch.float64 or kc.dtype == torch.float64:
        raise ValueError("nsa_select_triton runs fp32/fp16/bf16; use backend='reference' for fp64")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or kc.dtype != q.dtype:
        raise ValueError(f"q and kc need one dtype among fp32/fp16/bf16, got {q.dtype} and {kc.dtype}")
    if q.dim() != 4 or kc.dim() != 4 or kc.shape[0] != q.shape[0] or kc.shape[3] != q.shape[3] \
            or q.shape[1] % kc.shape[1]:
        raise ValueError(f"need q [B, Hq, T, D] and kc [B, Hkv | Hq, Sc, D], got {tuple(q.shape)}, {tuple(kc.shape)}")
    if min(block_len, stride, sel_block, topk) < 1 or S < q.shape[2]:
        raise ValueError(f"need positive block_len, stride, sel_block, topk and S >= T, got {block_len}, "
                         f"{stride}, {sel_block}, {topk}, S={S}, T={q.shape[2]}")


def nsa_select_triton(q: torch.Tensor, kc: torch.Tensor, S: int, block_len: int, stride: int, sel_block: int,
                      topk: int, scale: float, config: dict | None = None) -> torch.Tensor:
    """q [B, Hq, T, D] (the last T of S positions), kc [B, Hkv, Sc, D] -> int32 [B, Hkv, T, topk].

    Row order: forced blocks ascending (0, L - 1, L), then the best-importance blocks best-first
    (ties to the smaller id), then -1. Not differentiable."""
    _check_inputs(q, kc, S, block_len, stride, sel_block, topk)
    cfg = dict(NSA_SELECT_CONFIG)
    if q.device.type != "cuda":
        cfg.update(_INTERPRET_TILES)
    cfg.update(config or {})
    for key in ("ROWS", "BE", "BE_LSE"):
        if cfg[key] < 16 or cfg[key] & (cfg[key] - 1):
            raise ValueError(f"config {key} must be a power of two >= 16, got {cfg[key]}")
    B, Hq, T, D = q.shape
    Hkv, Sc = kc.shape[1], kc.shape[2]
    G = Hq // Hkv
    GP = _pow2(G)
    TM = max(min(max(cfg["ROWS"] // GP, 1), _pow2(T)), -(-16 // GP))  # >= 16 rows for the dots
    BE, NB, HALO = chunk_geometry(block_len, stride, sel_block, cfg["BE"])
    KR = max(topk - 3, 0)
    n_tiles = triton.cdiv(T, TM)
    max_chunks = triton.cdiv(max((S - 1) // sel_block - 2, 0), NB) if KR else 0
    n_splits = _split_count(cfg, n_tiles * Hkv * B, max_chunks, q.device)
    chunks_per_split = triton.cdiv(max_chunks, n_splits)
    n_splits = max(1, triton.cdiv(max_chunks, max(chunks_per_split, 1)))
    be_lse = cfg["BE_LSE"]
    tiles_per_split = triton.cdiv(triton.cdiv(_n_visible_host(S - 1, Sc, block_len, stride), be_lse), n_splits)
    if not KR:
        tiles_per_split = 0  # nothing to rank: the output is the forced blocks
    qk2 = float(scale) * LOG2E
    BD = max(_pow2(D), 16)
    dims = dict(G=G, GP=GP, TM=TM, D=D, BD=BD, BLOCK_LEN=block_len, STRIDE=stride, IEEE=q.dtype == torch.float32)
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    grid = (n_tiles, Hkv, B * n_splits)
    plse = torch.empty((B, n_splits, Hq, T), dtype=torch.float32, device=q.device)
    _lse_kernel[grid](q, kc, plse, T, S, Sc, Hq, qk2, n_splits, tiles_per_split, *q.stride(), *kc.stride(),
                      BE=be_lse, **dims, **launch)
    out = torch.empty((B, Hkv, T, topk), dtype=torch.int32, device=q.device)
    lists = dict(KR=KR, KP=max(_pow2(KR), 2), KOUT=topk, KOP=max(_pow2(topk), 2))
    part = out if n_splits == 1 else torch.empty((B * Hkv * T, n_splits, KR), dtype=torch.int64, device=q.device)
    _select_kernel[grid](q, kc, plse, part, out, T, S, Sc, Hq, qk2, n_splits, chunks_per_split,
                         *q.stride(), *kc.stride(), BE=BE, NB=NB, HALO=HALO, NBX=max(_pow2(NB + HALO), 16),
                         SEL=sel_block, FINAL=n_splits == 1, **dims, **lists, **launch)
    if n_splits > 1:
        nc = _pow2(n_splits * KR)
        rm = max(1, min(16, 4096 // nc))  # rows per merge program: at most 4096 candidate keys in registers
        _merge_kernel[(triton.cdiv(B * Hkv * T, rm),)](part, out, B * Hkv * T, T, S, n_splits, RM=rm, NC=nc,
                                                      SEL=sel_block, **lists, num_warps=4)
    return out
