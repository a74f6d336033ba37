"""MoBA block gate + top-k (Triton): block means -> scores by tensor-core dot -> streaming top-(k-1).

Semantics (oracle: sparsezoo.ops.moba.moba_select): queries are the last T of S tokens; block j's score
for query head h is <q[h, t], mean of kv head h // G's keys in block j>; each query head keeps its best
k-1 blocks j < L(t) = pos // block (ties to the smaller id), then the local block L(t), then -1.
Output int32 [B, Hq, T, topk] in MSA's selection format (ranked ids best-first, local, -1 padding).

1. Block means (`moba_block_means`): one tiny program per (MEAN_BLOCKS blocks, kv head, batch) sums
   their keys in fp32; a trailing partial block averages its own keys. Output fp32
   [B, Hkv, n_blocks, D] (O(S*D) work).
   Only blocks j < L(t) are ranked and they are complete, so the partial block is never ranked.
2. Selection (`moba_select_from_means`): one program per (tile of TM query tokens, HG query heads of
   one kv group, batch); rows = HG heads x TM tokens share the group's means, so one [BN, D] load of
   BN block means feeds a [rows, BN] tensor-core tile. 16-bit queries dot a hi/lo bf16/fp16 split
   of the fp32 means (two dots, close to fp32 scores); fp32 queries use an IEEE fp32 dot.
   Each row keeps a top-(k-1) list in registers. A chunk of BN candidates is folded in by
   thresholding: candidates not better than the row's current worst entry are dropped at once, and
   while any row of the tile still has a live candidate, every row extracts its best (ties to the
   smaller id) and replaces its worst entry (lowest score, ties to the larger id). Chunks arrive in
   ascending id order, so a strict ">" keeps ties on the smaller id. After the first chunks few
   candidates beat the k-1 best, so the fold costs about one compare per score instead of k.
3. Few programs (decode past DECODE_CAP, or DECODE_T = 0): the candidate range is split over NSPLIT
   programs per row tile, each writing its partial top list; `_merge_kernel` folds the partial lists in
   split order (ascending ids, so the same fold and tie rule apply) and writes the selection.
4. Decode, T <= DECODE_T queries and at most DECODE_CAP ranked blocks (`_decode_select`): one launch,
   one program per (HG query heads of one kv group, kv group, batch). It scores every ranked block as
   in 2 (rows = HG heads x TM tokens, tokens padded to a tl.dot tile; chunks of BN means) and stores
   the fp32 scores to a scratch row per (b, head, t) of NBP = pow2(ranked blocks) slots (L2-resident).
   After a CTA barrier it reloads them RB rows at a time (RB * NBP <= DECODE_TOPK_ELEMS), packs each
   score and its id into one int64 key (order-preserving score bits high, 2**31 - 1 - id low: unique,
   ties to the smaller id; blocks j >= L(t) get a high word below -inf's) and runs tl.topk (a bitonic
   top-KP network) along the row: the KP best keys come out best-first, so the first min(L(t), k-1)
   ids are the ranked blocks, then the local block, then -1. No data-dependent loop; the means are
   re-read (from L2) once per head chunk.

Non-finite values (docs/ops.md): a NaN score (a NaN in the row's q or in a block's keys) counts as +inf,
set before the fold (whose GPU max would drop a NaN) or the key: the block ranks first, ties to the
smaller id; a NaN key changes only the rows that rank its block. An infinite block mean scores +-inf
with fp32 queries, as in the reference; with 16-bit queries its hi/lo split gives inf - inf = NaN, so it
ranks first for every row (the reference ranks a -inf score last). A -inf score: the decode path (4)
ranks it last, as the reference does; the fold (2, 3) never inserts it, so a row with fewer than k-1
other candidates lists fewer ranked blocks than the reference.

No score matrix reaches memory except the decode path's bounded scratch (B * Hq * T * NBP fp32, T <= 4);
no host syncs (graph-capturable).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sparsezoo.kernels.sizes import pow2 as _pow2

_BIG = tl.constexpr(1 << 30)  # empty slots hold ids _BIG + slot
_HUGE = tl.constexpr(3 << 29)  # larger than every id: "no id"

# GPU tiling. ROWS = HG heads x TM tokens per selection program; BN = block means per chunk;
# MEAN_ROWS keys per load and MEAN_BLOCKS blocks per block-mean program.
# A decode launch (fewer than TARGET_PROGRAMS programs) splits the candidates into NSPLIT ranges of
# at least MIN_SPLIT_CHUNKS chunks; SPLIT > 0 forces NSPLIT.
# Decode path (4.): used for T <= DECODE_T queries when the ranked blocks are <= DECODE_CAP (0: never);
# DECODE_HG heads per program, DECODE_BN means per scoring chunk, DECODE_TOPK_ELEMS keys per top-k pass
# (rows x NBP, bounds the registers), DECODE_WARPS / DECODE_STAGES for the launch (one program per SM
# streams its group's means: the stages set the bytes in flight).
MOBA_SELECT_CONFIG = {"ROWS": 128, "TM": 32, "BN": 64, "num_warps": 4, "num_stages": 2,
                      "MEAN_ROWS": 64, "MEAN_BLOCKS": 1, "MERGE_ROWS": 32,
                      "TARGET_PROGRAMS": 264, "MIN_SPLIT_CHUNKS": 4, "SPLIT": 0,
                      "DECODE_T": 4, "DECODE_CAP": 4096, "DECODE_HG": 4, "DECODE_BN": 64,
                      "DECODE_TOPK_ELEMS": 4096, "DECODE_WARPS": 8, "DECODE_STAGES": 3}
# Interpreter (CPU tests): small tiles keep them quick.
_INTERPRET_CONFIG = {"ROWS": 16, "TM": 8, "BN": 16, "MEAN_ROWS": 8, "MEAN_BLOCKS": 32, "MERGE_ROWS": 16,
                     "TARGET_PROGRAMS": 1, "DECODE_BN": 16, "DECODE_TOPK_ELEMS": 256}


# ----------------------------------------------------------------------------- block means

@triton.jit
def _block_mean_kernel(K, M, S, BLOCK, N_BLOCKS, skb, skh, sks, skd, smb, smh, smn, smd,
                       NBP: tl.constexpr, CH: tl.constexpr, D: tl.constexpr, BD: tl.constexpr):
    """Means of blocks NBP * pid(0) .. + NBP - 1 of kv head pid(1), batch pid(2), CH keys per load."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    j = tl.program_id(0).to(tl.int64) * NBP + tl.arange(0, NBP)
    start = j * BLOCK
    end = tl.minimum(start + BLOCK, S)
    d = tl.arange(0, BD)
    base = K + b * skb + h * skh + d[None, None, :] * skd
    acc = tl.zeros([NBP, CH, BD], tl.float32)
    for c in range(0, BLOCK, CH):
        keys = start[:, None] + c + tl.arange(0, CH)[None, :]
        ok = (keys < end[:, None])[:, :, None] & (d < D)[None, None, :]
        acc += tl.load(base + keys[:, :, None] * sks, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=1) / tl.maximum(end - start, 1).to(tl.float32)[:, None]
    tl.store(M + b * smb + h * smh + j[:, None] * smn + d[None, :] * smd, mean,
             mask=(j < N_BLOCKS)[:, None] & (d < D)[None, :])


# ----------------------------------------------------------------------------- top-k helpers

@triton.jit
def _empty_lists(BM: tl.constexpr, KR: tl.constexpr, KP: tl.constexpr):
    """Per-row lists of KP slots: the first KR empty (-inf, id _BIG + slot), the rest padding that is
    never evicted (+inf, id -2)."""
    slot = tl.arange(0, KP)
    pad = slot >= KR
    top_s = tl.where(pad[None, :], float("inf"), float("-inf")) + tl.zeros([BM, KP], tl.float32)
    top_i = tl.where(pad[None, :], -2, _BIG + slot[None, :]) + tl.zeros([BM, KP], tl.int32)
    return top_s, top_i


@triton.jit
def _worst(top_s, top_i):
    """Per row: the worst score and the id of the entry to evict (lowest score, ties -> larger id)."""
    worst = tl.min(top_s, axis=1)
    return worst, tl.max(tl.where(top_s == worst[:, None], top_i, -3), axis=1)


@triton.jit
def _fold_chunk(top_s, top_i, s, ids):
    """Fold candidates s [BM, N] (ids broadcastable to it, unique per row, all larger than the ids of
    earlier chunks; -inf = not a candidate) into the top lists."""
    worst, evict = _worst(top_s, top_i)
    s = tl.where(s > worst[:, None], s, float("-inf"))
    best = tl.max(s, axis=1)
    while tl.max(best, axis=0) > float("-inf"):  # some row still has a candidate beating its worst
        bid = tl.min(tl.where(s == best[:, None], ids, _HUGE), axis=1)
        repl = (top_i == evict[:, None]) & (best > worst)[:, None]
        top_s = tl.where(repl, best[:, None], top_s)
        top_i = tl.where(repl, bid[:, None], top_i)
        worst, evict = _worst(top_s, top_i)
        s = tl.where((ids == bid[:, None]) | (s <= worst[:, None]), float("-inf"), s)
        best = tl.max(s, axis=1)
    return top_s, top_i


@triton.jit
def _write_selection(o_rows, sok, top_s, top_i, local, row_ok,
                     KP: tl.constexpr, KOUT: tl.constexpr, KOP: tl.constexpr):
    """Store each row's list best-first (ties -> smaller id), then the local block, then -1."""
    slot = tl.arange(0, KP)
    valid = (top_i >= 0) & (top_i < _BIG)
    rs = tl.where(valid, top_s, float("-inf"))
    ri = tl.where(valid, top_i, _HUGE)
    rank = tl.zeros(top_i.shape, tl.int32)
    for c in tl.static_range(KP):  # rank = number of entries better than this one
        cs = tl.max(tl.where(slot[None, :] == c, rs, float("-inf")), axis=1)
        ci = tl.min(tl.where(slot[None, :] == c, ri, _HUGE), axis=1)
        rank += ((cs[:, None] > rs) | ((cs[:, None] == rs) & (ci[:, None] < ri))).to(tl.int32)
    tl.store(o_rows[:, None] + rank * sok, top_i, mask=row_ok[:, None] & valid)
    n_valid = tl.sum(valid.to(tl.int32), axis=1)
    c = tl.arange(0, KOP)
    tail = tl.where(c[None, :] == n_valid[:, None], local[:, None], -1)
    tl.store(o_rows[:, None] + c[None, :] * sok, tail,
             mask=row_ok[:, None] & (c[None, :] >= n_valid[:, None]) & (c[None, :] < KOUT))


@triton.jit
def _scores(q, m, HI_LO: tl.constexpr):
    """[rows, BN] = q . m^T for fp32 means m; 16-bit q dots a hi + lo split of m (near-fp32 scores)."""
    if HI_LO:
        hi = m.to(q.dtype)
        lo = (m - hi.to(tl.float32)).to(q.dtype)
        return tl.dot(q, tl.trans(hi)) + tl.dot(q, tl.trans(lo))
    else:
        return tl.dot(q, tl.trans(m), input_precision="ieee")


# ----------------------------------------------------------------------------- selection kernels

@triton.jit
def _select_kernel(Q, M, OUT, PS, PI, T, S, HQ, G, BLOCK, NSPL, CPS,
                   sqb, sqh, sqt, sqd, smb, smh, smn, smd, sob, soh, sot, sok,
                   HG: tl.constexpr, TM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                   KR: tl.constexpr, KP: tl.constexpr, KOUT: tl.constexpr, KOP: tl.constexpr,
                   HI_LO: tl.constexpr, PARTIAL: tl.constexpr):
    n_tiles = tl.num_programs(0) // NSPL
    tile = n_tiles - 1 - tl.program_id(0) // NSPL  # longest (latest) tiles first
    split = tl.program_id(0) % NSPL
    n_hc = tl.cdiv(G, HG)
    g = tl.program_id(1) // n_hc
    hc = tl.program_id(1) % n_hc
    b = tl.program_id(2).to(tl.int64)
    BM: tl.constexpr = HG * TM
    r = tl.arange(0, BM)
    in_group = hc * HG + r // TM
    head = (g * G + in_group).to(tl.int64)
    t = tile * TM + r % TM
    row_ok = (t < T) & (in_group < G)
    local = (S - T + t) // BLOCK
    d = tl.arange(0, BD)
    q = tl.load(Q + b * sqb + head[:, None] * sqh + t[:, None].to(tl.int64) * sqt + d[None, :] * sqd,
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    top_s, top_i = _empty_lists(BM, KR, KP)
    if KR > 0:
        t_last = tl.minimum(tile * TM + TM, T) - 1
        n_rank = (S - T + t_last) // BLOCK  # ranked blocks are j < L(t) <= n_rank
        lo = split * CPS * BN
        hi = tl.minimum(n_rank, lo + CPS * BN)
        jn = tl.arange(0, BN)
        m_base = M + b * smb + g.to(tl.int64) * smh + d[None, :] * smd
        for c0 in range(lo, hi, BN):
            j = c0 + jn
            m = tl.load(m_base + j[:, None] * smn, mask=(j[:, None] < hi) & (d[None, :] < D), other=0.0)
            sc = _scores(q, m, HI_LO)
            sc = tl.where(sc == sc, sc, float("inf"))  # a NaN ranks first (the GPU's max would drop it)
            s = tl.where(j[None, :] < local[:, None], sc, float("-inf"))
            top_s, top_i = _fold_chunk(top_s, top_i, s, j[None, :])
    if PARTIAL:
        slot = tl.arange(0, KP)
        off = (((b * HQ + head) * T + t) * NSPL + split)[:, None] * KP + slot[None, :]
        tl.store(PS + off, top_s, mask=row_ok[:, None])
        tl.store(PI + off, top_i, mask=row_ok[:, None])
    else:
        o_rows = OUT + b * sob + head * soh + t.to(tl.int64) * sot
        _write_selection(o_rows, sok, top_s, top_i, local, row_ok, KP, KOUT, KOP)


@triton.jit
def _merge_kernel(PS, PI, OUT, N_ROWS, T, S, BLOCK, NSPL,
                  BM: tl.constexpr, KR: tl.constexpr, KP: tl.constexpr, KOUT: tl.constexpr, KOP: tl.constexpr):
    """Rows are flat (b, h, t); folds the NSPL partial lists of each row in split (= id) order."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < N_ROWS
    local = ((S - T + rows % T) // BLOCK).to(tl.int32)
    slot = tl.arange(0, KP)
    top_s, top_i = _empty_lists(BM, KR, KP)
    for sp in range(0, NSPL):
        off = (rows * NSPL + sp)[:, None] * KP + slot[None, :]
        cs = tl.load(PS + off, mask=row_ok[:, None], other=float("-inf"))
        ci = tl.load(PI + off, mask=row_ok[:, None], other=-1)
        cs = tl.where((ci >= 0) & (ci < _BIG), cs, float("-inf"))
        top_s, top_i = _fold_chunk(top_s, top_i, cs, ci)
    _write_selection(OUT + rows * KOUT, 1, top_s, top_i, local, row_ok, KP, KOUT, KOP)


# ----------------------------------------------------------------------------- decode selection

_NO_CANDIDATE = tl.constexpr(-2**31)  # high word of blocks j >= L(t): below every score's, -inf's too


@triton.jit
def _sort_keys(sc, j, local):
    """int64 keys, larger = better: order-preserving bits of the score (NaN -> +inf, -0 -> +0) high,
    j ^ (2**31 - 1) = 2**31 - 1 - j low (ties to the smaller id); blocks j >= local get the
    _NO_CANDIDATE high word."""
    bits = tl.where(sc == sc, sc, float("inf")).to(tl.int32, bitcast=True)
    bits = tl.where(bits == _NO_CANDIDATE, 0, bits)  # -0.0 (sign bit alone) ties with +0.0
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    ordered = tl.where(j < local, ordered, _NO_CANDIDATE)
    return (ordered.to(tl.int64) << 32) | (j ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _group_rows(hc, g, r, G, T, HG: tl.constexpr, TR: tl.constexpr):
    """Rows r = head-in-chunk x TR tokens -> (query head, token, row is real)."""
    in_group = hc * HG + r // TR
    t = r % TR
    return (g * G + in_group).to(tl.int64), t, (t < T) & (in_group < G)


@triton.jit
def _decode_select_kernel(Q, M, OUT, SC, T, S, HQ, G, BLOCK, sqb, sqh, sqt, sqd, smb, smh, smn, smd,
                          sob, soh, sot, sok,
                          HG: tl.constexpr, TM: tl.constexpr, TR: tl.constexpr, RB: tl.constexpr,
                          BN: tl.constexpr, NBP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                          KR: tl.constexpr, KP: tl.constexpr, KOUT: tl.constexpr, KOP: tl.constexpr,
                          HI_LO: tl.constexpr):
    """HG heads of kv group pid(1), batch pid(2): score every ranked block into SC [B, HQ, T, NBP], then
    top-KP per row by sorting packed (score, id) keys; writes the selection as _write_selection does."""
    hc = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_rank = (S - 1) // BLOCK  # ranked blocks: j < L(t) <= L(T - 1)
    if KR > 0:
        # 1. scores of rows HG heads x TM tokens (TM >= TR pads the rows to a tl.dot tile)
        head, t, row_ok = _group_rows(hc, g, tl.arange(0, HG * TM), G, T, HG, TM)
        d = tl.arange(0, BD)
        q = tl.load(Q + b * sqb + head[:, None] * sqh + t[:, None].to(tl.int64) * sqt + d[None, :] * sqd,
                    mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
        sc_rows = SC + ((b * HQ + head) * T + t) * NBP
        m_base = M + b * smb + g.to(tl.int64) * smh + d[None, :] * smd
        for c0 in range(0, n_rank, BN):
            j = c0 + tl.arange(0, BN)
            m = tl.load(m_base + j[:, None] * smn, mask=(j[:, None] < n_rank) & (d[None, :] < D), other=0.0)
            tl.store(sc_rows[:, None] + j[None, :], _scores(q, m, HI_LO),
                     mask=row_ok[:, None] & (j[None, :] < n_rank))
        tl.debug_barrier()  # the scores this CTA stored are read back by other threads
    # 2. per RB rows: keys, top-KP (best first), selection
    jb = tl.arange(0, NBP)
    slot = tl.arange(0, KP)
    c = tl.arange(0, KOP)
    for r0 in tl.static_range(0, HG * TR, RB):
        head, t, row_ok = _group_rows(hc, g, r0 + tl.arange(0, RB), G, T, HG, TR)
        local = (S - T + t) // BLOCK
        o_rows = OUT + b * sob + head * soh + t.to(tl.int64) * sot
        n_valid = tl.minimum(local, KR)  # every j < L(t) is a candidate and beats every non-candidate
        if KR > 0:
            sc = tl.load(SC + ((b * HQ + head) * T + t)[:, None] * NBP + jb[None, :],
                         mask=row_ok[:, None] & (jb[None, :] < n_rank), other=0.0)
            best = tl.topk(_sort_keys(sc, jb[None, :], local[:, None]), KP)
            ids = best.to(tl.int32) ^ 0x7FFFFFFF  # the low word
            tl.store(o_rows[:, None] + slot[None, :] * sok, ids,
                     mask=row_ok[:, None] & (slot[None, :] < n_valid[:, None]))
        tail = tl.where(c[None, :] == n_valid[:, None], local[:, None], -1)
        tl.store(o_rows[:, None] + c[None, :] * sok, tail,
                 mask=row_ok[:, None] & (c[None, :] >= n_valid[:, None]) & (c[None, :] < KOUT))


# ----------------------------------------------------------------------------- launchers

def _config(device, config: dict | None) -> dict:
    interp = _INTERPRET_CONFIG if device.type != "cuda" else {}
    return {**MOBA_SELECT_CONFIG, **interp, **(config or {})}


def moba_block_means(k: torch.Tensor, block_size: int, config: dict | None = None) -> torch.Tensor:
    """k [B, Hkv, S, D] -> fp32 [B, Hkv, ceil(S / block_size), D], the mean key of every block (a
    trailing partial block averages its own keys). Means of complete blocks never change as the
    sequence grows, so a decode loop may cache them."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    cfg = _config(k.device, config)
    B, H, S, D = k.shape
    n_blocks = triton.cdiv(S, block_size)
    means = torch.empty((B, H, n_blocks, D), dtype=torch.float32, device=k.device)
    if means.numel() == 0:
        return means
    CH = min(cfg["MEAN_ROWS"], _pow2(block_size))
    NBP = _pow2(cfg["MEAN_BLOCKS"])
    _block_mean_kernel[(triton.cdiv(n_blocks, NBP), H, B)](
        k, means, S, block_size, n_blocks, *k.stride(), *means.stride(), NBP=NBP, CH=CH, D=D, BD=_pow2(D),
        num_warps=4)
    return means


def _select_tiling(T: int, G: int, cfg: dict) -> tuple[int, int]:
    """(TM tokens, HG heads) per program: powers of two with HG * TM >= 16 (tl.dot's minimum)."""
    TM = min(_pow2(cfg["TM"]), _pow2(T))
    HG = min(_pow2(G), max(1, cfg["ROWS"] // TM))
    return max(TM, 16 // HG), HG


def _n_split(programs: int, n_chunks: int, cfg: dict) -> int:
    if n_chunks <= 1:
        return 1
    want = cfg["SPLIT"] or min(triton.cdiv(cfg["TARGET_PROGRAMS"], programs), n_chunks // cfg["MIN_SPLIT_CHUNKS"])
    return max(1, min(want, n_chunks))


def _check(q: torch.Tensor, means: torch.Tensor, S: int, block_size: int, topk: int) -> None:
    if q.dim() != 4 or means.dim() != 4:
        raise ValueError(f"q must be [B, Hq, T, D] and means [B, Hkv, n_blocks, D], got {tuple(q.shape)}, "
                         f"{tuple(means.shape)}")
    (B, Hq, T, D), (Bm, Hkv, n_blocks, Dm) = q.shape, means.shape
    if B != Bm or D != Dm or Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q {tuple(q.shape)} and the block means {tuple(means.shape)} do not match "
                         f"(same B and D, Hq a multiple of Hkv)")
    if block_size < 1 or topk < 1:
        raise ValueError(f"block_size and topk must be >= 1, got {block_size}, {topk}")
    if not 1 <= T <= S or n_blocks < (S - 1) // block_size:
        raise ValueError(f"need 1 <= T <= S and the means of blocks 0 .. (S - 1) // block_size - 1 (the ranked "
                         f"ones), got T={T}, S={S}, {n_blocks} means")
    if q.dtype == torch.float64:
        raise ValueError("the triton MoBA gate runs fp32/fp16/bf16; use the reference for fp64")
    if means.dtype != torch.float32:
        raise ValueError(f"the block means must be fp32 (moba_block_means), got {means.dtype}")


def moba_select_from_means(q: torch.Tensor, means: torch.Tensor, S: int, block_size: int, topk: int,
                           config: dict | None = None) -> torch.Tensor:
    """q [B, Hq, T, D] (the last T of S tokens), means fp32 [B, Hkv, n, D] from moba_block_means ->
    int32 [B, Hq, T, topk], the MoBA selection per query head. Only the complete blocks' means are read
    (n >= (S - 1) // block_size), so a decode cache may hold just those, or a longer preallocated buffer.
    T <= DECODE_T with at most DECODE_CAP ranked blocks runs the one-launch decode kernel (module
    docstring, 4.); otherwise the streaming fold (2., 3.)."""
    _check(q, means, S, block_size, topk)
    cfg = _config(q.device, config)
    B, Hq, T, D = q.shape
    if T <= cfg["DECODE_T"] and (S - 1) // block_size <= cfg["DECODE_CAP"]:
        return _decode_select(q, means, S, block_size, topk, cfg)
    Hkv = means.shape[1]
    G = Hq // Hkv
    TM, HG = _select_tiling(T, G, cfg)
    BN = max(16, _pow2(cfg["BN"]))
    KR = topk - 1
    n_tiles, n_hc = triton.cdiv(T, TM), triton.cdiv(G, HG)
    n_chunks = triton.cdiv((S - 1) // block_size, BN) if KR > 0 else 0
    n_split = _n_split(n_tiles * Hkv * n_hc * B, n_chunks, cfg)
    cps = triton.cdiv(n_chunks, n_split) if n_chunks else 0
    if cps:
        n_split = triton.cdiv(n_chunks, cps)  # no empty splits
    out = torch.empty((B, Hq, T, topk), dtype=torch.int32, device=q.device)
    KP, KOP = max(_pow2(KR), 2), max(_pow2(topk), 2)
    partial = n_split > 1
    ps = torch.empty((B, Hq, T, n_split, KP), dtype=torch.float32, device=q.device) if partial else out
    pi = torch.empty(ps.shape, dtype=torch.int32, device=q.device) if partial else out
    _select_kernel[(n_tiles * n_split, Hkv * n_hc, B)](
        q, means, out, ps, pi, T, S, Hq, G, block_size, n_split, cps,
        *q.stride(), *means.stride(), *out.stride(),
        HG=HG, TM=TM, BN=BN, D=D, BD=max(_pow2(D), 16), KR=KR, KP=KP, KOUT=topk, KOP=KOP,
        HI_LO=q.dtype != torch.float32, PARTIAL=partial,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if partial:
        rows = B * Hq * T
        MR = _pow2(cfg["MERGE_ROWS"])
        _merge_kernel[(triton.cdiv(rows, MR),)](ps, pi, out, rows, T, S, block_size, n_split,
                                                BM=MR, KR=KR, KP=KP, KOUT=topk, KOP=KOP, num_warps=4)
    return out


def _decode_select(q: torch.Tensor, means: torch.Tensor, S: int, block_size: int, topk: int,
                   cfg: dict) -> torch.Tensor:
    """The decode path (module docstring, 4.): one launch; an fp32 scratch of B*Hq*T*NBP scores."""
    B, Hq, T, D = q.shape
    Hkv = means.shape[1]
    G = Hq // Hkv
    KR = topk - 1
    KP, KOP = max(_pow2(KR), 2), max(_pow2(topk), 2)
    NBP = max(_pow2((S - 1) // block_size), KP)
    HG, TR = min(_pow2(G), _pow2(cfg["DECODE_HG"])), _pow2(T)
    TM = max(TR, 16 // HG)  # the scoring dot's rows HG * TM >= 16
    RB = min(HG * TR, max(1, 1 << int(math.log2(max(1, cfg["DECODE_TOPK_ELEMS"] // NBP)))))
    out = torch.empty((B, Hq, T, topk), dtype=torch.int32, device=q.device)
    scratch = torch.empty((B, Hq, T, NBP), dtype=torch.float32, device=q.device) if KR > 0 else out
    _decode_select_kernel[(triton.cdiv(G, HG), Hkv, B)](
        q, means, out, scratch, T, S, Hq, G, block_size, *q.stride(), *means.stride(), *out.stride(),
        HG=HG, TM=TM, TR=TR, RB=RB, BN=max(16, _pow2(cfg["DECODE_BN"])), NBP=NBP, D=D, BD=max(_pow2(D), 16),
        KR=KR, KP=KP, KOUT=topk, KOP=KOP, HI_LO=q.dtype != torch.float32,
        num_warps=cfg["DECODE_WARPS"], num_stages=cfg["DECODE_STAGES"])
    return out


def moba_select_triton(q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int,
                       config: dict | None = None) -> torch.Tensor:
    """q [B, Hq, T, D] (the last T of S tokens), k [B, Hkv, S, D] -> int32 [B, Hq, T, topk]:
    per query head the best topk-1 earlier blocks by <q, block mean key>, then the local block, then -1."""
    if k.dim() != 4:
        raise ValueError(f"k must be [B, Hkv, S, D], got {tuple(k.shape)}")
    means = moba_block_means(k, block_size, config)
    return moba_select_from_means(q, means, k.shape[2], block_size, topk, config)
