"""Exact per-token block-sparse attention (Triton), forward and backward.

Selections: block_idx [B, Hs, T, k] with one selection head per KV group (Hs = Hkv, MSA) or per query
head (Hs = Hq, MoBA). Selection head s serves the G = Hq / Hs query heads s*G .. s*G+G-1 and reads
kv head s // KV_DIV (KV_DIV = Hs / Hkv), so per-head selections need no repeated K/V.

Tiling: one program owns TM consecutive query tokens (in the token order, see `token_order`) x the G
heads of one selection head (rows r = token r // G, head r % G), since those heads share the
selection; TM * G = ROWS (config), so MSA (G = 16) runs 4-token tiles and MoBA (G = 1) 64-token
tiles of one head. The program visits the union of its tokens' selected blocks (sorted, built once
per tile by `_union_kernel`: repeated min-extraction over the tile's TM x k ids, one step per union
block, so its cost follows the attention's own). Each K/V block is loaded once per tile and feeds a
[TM*G, block] tensor-core tile; a row keeps a key only if its token chose the block and the key is
causal. Which tokens chose a union block ("membership"):
- TM <= 16 (MSA; also any tiling when k > SEL_MAX_K): an int32 bitmask per union entry, built with the
  union; one scalar load per block;
- TM > 16 (MoBA): computed in-kernel, any(sel_tile == u) over the tile's [TM, k] ids held in
  registers: k compares per row and one [rows] layout conversion per block, small next to the block's
  two [rows, 128] x [128, D] dots; no bitmask tensors (the dK/dV kernel loads a tile's ids per tile).
Ids outside [0, n_blocks) never enter a union (int64 ids compared before any int32 cast) and never
equal a union block, so no kernel acts on them; a repeated id counts once.

Non-finite values (docs/ops.md; sparsezoo/kernels/nonfinite.py): a row is NaN (out and LSE) iff its q, a k/v row
it attends to or one of its scores is non-finite, and it passes no gradient; the other rows are exact.
Finite inputs pay no per-tile cost (the main kernels' loops are unchanged):
- `nonfinite_flags` (one read of K and V) flags the non-finite k/v rows and queues the tiles whose
  union holds one; the forward kernel also queues the tiles with a row whose softmax sum is not
  positive (NaN: a non-finite q or k, or an fp32 overflow; 0: an inf in q whose scores are all -inf);
- checked kernels redo the queued tiles (persistent grids: one load per program on finite inputs):
  flagged k/v rows are read as 0, so no 0 * NaN reaches a row that does not see them, and a row that
  attends to one, or owns a non-finite q or score, is poisoned. In the backward a poisoned row attends
  to nothing (its q, dO, LSE, delta read as 0), and the dK/dV entries of queued tiles go to a checked
  dK/dV launch.

Backward: delta = rowsum(dO * O) (minus dLSE), then
- dQ: the forward's loop again (per query tile over its union);
- dK/dV: the transposed lists: per (batch, kv head, key block), the (selection head, tile) pairs whose
  union holds it (the KV_DIV selection heads of a kv head share a column), split into segments of at
  most SEG entries, accumulated in registers, one fp32 atomic add per segment.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsezoo.kernels.nonfinite import nonfinite_rows, poison, poison_rows
from sparsezoo.kernels.sizes import key_tile
from sparsezoo.kernels.sizes import pow2 as _pow2

LOG2E = 1.4426950408889634

# GPU tiling, tuned on H100 for MSA (docs/prefill.md). ROWS = tokens per tile x G; TM (when set) fixes the
# tokens per tile instead; UNION: "triton" (_union_kernel) or "torch" (tile_unions) builds the tile unions.
ATTN_CONFIG = {"ROWS": 64, "TM": None, "num_warps": 4, "num_stages": 3, "BN": 128, "SEG": 32,
               "bwd_warps": 8, "bwd_stages": 2, "WINDOW": 1, "UNION": "triton"}
# Overrides of ATTN_CONFIG when a tile holds one query head (G = 1: MoBA, or MSA without GQA).
G1_CONFIG: dict = {}
# Overrides for a sliding window (window > 0: sparsezoo.ops.window_attention's Triton path). None: on an H200 at
# NSA's 128k window, 8 or 16 tokens per tile (8 warps) were slower than the shared tiling (window_backends_h200.log).
WINDOW_CONFIG: dict = {}
_INTERPRET_ROWS = 16
BITS_MAX_TM = 16  # tiles of at most this many tokens carry an int32 token bitmask per union entry
SEL_MAX_K = 64  # in-kernel membership holds a tile's [TM, k] ids in registers: a larger k keeps TM <= BITS_MAX_TM
UNION_MAX_W = 8192  # _union_kernel holds a tile's TM * k ids in registers; wider tiles use tile_unions
_KEY_LIST_CHUNK = 1 << 24  # dK/dV work entries transposed at once by key_block_lists
FLAG_TILES = 16  # tiles per program of _tile_bad_kernel
CHECKED_PROGRAMS_PER_SM = 2  # persistent grid of the checked kernels (an empty queue: one load each)


def resolve_config(G: int, config: dict | None = None, window: int = 0) -> dict:
    """ATTN_CONFIG, then G1_CONFIG when G = 1, then WINDOW_CONFIG when window > 0, then `config`; idempotent on a
    resolved config."""
    return {**ATTN_CONFIG, **(G1_CONFIG if G == 1 else {}), **(WINDOW_CONFIG if window else {}), **(config or {})}


# ----------------------------------------------------------------------------- tile unions

def token_order(block_idx: torch.Tensor, TM: int, window: int, n_blocks: int) -> torch.Tensor:
    """Token order for tiling: inside windows of `window` tokens, tokens are sorted by their first
    two selected ids (the indexer emits best-first), so tokens with similar selections share a tile
    and the tile unions shrink. Any order is exact; this one only saves work. -> int32
    [B, H, NT*TM], padded with T."""
    B, H, T, K = block_idx.shape
    NT = triton.cdiv(T, TM)
    t = torch.arange(T, device=block_idx.device)
    if window > 1 and K >= 1:
        nb = n_blocks + 2  # sort keys are 1 + id clamped to [-1, n_blocks]: all < nb
        first = block_idx[..., 0].long().clamp(-1, n_blocks) + 1
        second = block_idx[..., 1].long().clamp(-1, n_blocks) + 1 if K > 1 else torch.zeros_like(first)
        key = (t // window) * (nb * nb) + first * nb + second
        order = torch.argsort(key, dim=-1, stable=True).to(torch.int32)
    else:
        order = t.to(torch.int32).expand(B, H, T)
    return torch.nn.functional.pad(order, (0, NT * TM - T), value=T).contiguous()


def tile_plan(block_idx: torch.Tensor, TM: int, window: int, n_blocks: int, union: str = "triton"):
    """(token order, union counts, union ids, token bitmasks or None) for tiles of TM tokens; bitmasks
    only for TM <= BITS_MAX_TM. Ids outside [0, n_blocks) are dropped. The union capacity per tile is
    min(TM * k, n_blocks). union="triton" builds the unions with _union_kernel where a tile's ids fit
    it (TM * k, k padded to a power of two, <= UNION_MAX_W); otherwise (or union="torch") with tile_unions."""
    if union not in ("triton", "torch"):
        raise ValueError(f"config UNION must be 'triton' or 'torch', got {union!r}")
    tok = token_order(block_idx, TM, window, n_blocks)
    B, H, T, K = block_idx.shape
    with_bits = TM <= BITS_MAX_TM
    if union == "triton" and TM * _pow2(K) <= UNION_MAX_W:
        return (tok, *_unions_triton(block_idx, tok, TM, n_blocks, with_bits))
    if window <= 1:  # identity order: tile the selection as it is
        return (tok, *tile_unions(block_idx, TM, n_blocks, with_bits))
    sel = torch.gather(block_idx, 2, tok.clamp(max=T - 1).long()[..., None].expand(B, H, tok.shape[-1], K))
    sel = torch.where((tok < T)[..., None], sel, -1)
    return (tok, *tile_unions(sel, TM, n_blocks, with_bits))


def _unions_triton(block_idx, tok, TM: int, n_blocks: int, with_bits: bool):
    """tile_unions' outputs (counts, ids, bits or None) from _union_kernel, tiles read through tok."""
    B, H, T, K = block_idx.shape
    NT = tok.shape[-1] // TM
    cap = min(TM * K, n_blocks)
    counts = torch.empty((B, H, NT), dtype=torch.int32, device=block_idx.device)
    ids = torch.empty((B, H, NT, cap), dtype=torch.int32, device=block_idx.device)
    bits = torch.empty_like(ids) if with_bits else None
    KP = _pow2(K)
    _union_kernel[(NT, H, B)](block_idx, tok, counts, ids, ids if bits is None else bits, T, K, n_blocks, cap,
                              *block_idx.stride(), TM=TM, KP=KP, WITH_BITS=with_bits,
                              num_warps=max(1, min(8, TM * KP // 1024)))
    return counts, ids, bits


def tile_unions(block_idx: torch.Tensor, TM: int, n_blocks: int, with_bits: bool | None = None,
                chunk_entries: int = 1 << 23):
    """Torch version of the tile unions (the fallback of _union_kernel): per tile of TM tokens the
    sorted union of selected blocks and, when with_bits (default: TM <= BITS_MAX_TM), per union entry
    the bitmask of the tile's tokens that chose it; ids outside [0, n_blocks) are dropped, a token's
    repeated id counts once. block_idx [B, H, T, k] -> (counts [B, H, NT] int32, ids [B, H, NT, cap]
    int32, bits [B, H, NT, cap] int32 or None), cap = min(TM * k, n_blocks). Works in chunks of tiles
    so temporaries stay bounded."""
    with_bits = TM <= BITS_MAX_TM if with_bits is None else with_bits
    if with_bits and TM > 31:
        raise ValueError(f"token bitmasks hold at most 31 tokens per tile, got {TM}")
    B, H, T, K = block_idx.shape
    NT = triton.cdiv(T, TM)
    W = TM * K
    cap = min(W, n_blocks)
    sel = block_idx
    if NT * TM != T:
        sel = torch.nn.functional.pad(sel, (0, 0, 0, NT * TM - T), value=-1)
    sel = sel.reshape(B * H, NT, W)
    dev = sel.device
    counts = torch.empty(B * H, NT, dtype=torch.int32, device=dev)
    ids = torch.empty(B * H, NT, cap, dtype=torch.int32, device=dev)
    bits = torch.empty(B * H, NT, cap, dtype=torch.int32, device=dev) if with_bits else None
    tok_of_entry = torch.arange(W, device=dev) // K
    step = max(1, chunk_entries // max(W * B * H, 1))
    for n0 in range(0, NT, step):
        n1 = min(NT, n0 + step)
        x = sel[:, n0:n1].long()  # range check in int64: an id must not wrap to a valid one
        key = torch.where((x >= 0) & (x < n_blocks), x * TM + tok_of_entry, n_blocks * TM)
        key = torch.sort(key, dim=-1).values  # by block, then token
        blk = key // TM
        real = blk < n_blocks
        first = real.clone()
        first[..., 1:] &= blk[..., 1:] != blk[..., :-1]
        run = torch.cumsum(first, -1) - 1
        ui = torch.zeros(*x.shape[:-1], cap + 1, dtype=torch.int32, device=dev)
        ui.scatter_(-1, torch.where(first, run, cap), torch.where(first, blk, 0).to(torch.int32))
        counts[:, n0:n1] = first.sum(-1, dtype=torch.int32)
        ids[:, n0:n1] = ui[..., :cap]
        if with_bits:
            new_pair = real.clone()  # first entry of its (block, token) pair: a repeated id sets its bit once
            new_pair[..., 1:] &= key[..., 1:] != key[..., :-1]
            tok_bit = torch.bitwise_left_shift(torch.ones_like(key), key % TM)
            ub = torch.zeros(*x.shape[:-1], cap + 1, dtype=torch.int64, device=dev)
            ub.scatter_add_(-1, torch.where(real, run, cap), torch.where(new_pair, tok_bit, 0))
            bits[:, n0:n1] = ub[..., :cap].to(torch.int32)
    return (counts.view(B, H, NT), ids.view(B, H, NT, cap),
            None if bits is None else bits.view(B, H, NT, cap))


def key_block_lists(counts, ids, bits, n_blocks: int, seg: int, kv_div: int = 1):
    """Transpose tile unions into per-key-block work items for dK/dV.

    A column is (batch, kv head, key block); its entries are the (selection head, tile) pairs whose
    union holds the block, in selection-head then tile order, the kv_div selection heads of a kv head
    together. Returns items [n_items, 3] int32 (flat batch * Hkv + kv head, key block, start into the
    sorted entries), item_len [n_items] int32 (at most seg), entries [n_entries] int32 (selection head
    within the kv head * NT + tile; the tile when kv_div = 1) and their token bitmasks (None without
    bits). An id outside [0, n_blocks) gets no work item. Memory O(entries): the transposition runs in
    chunks of at most _KEY_LIST_CHUNK entries, whole kv heads where they fit (a kv head with more is
    split by selection heads, its columns then split into more items). Host syncs: the per-head entry
    counts, and the item count of each chunk."""
    B, Hs, NT, cap = ids.shape
    cnt = counts.reshape(B * Hs * NT)
    ids2, bits2 = ids.reshape(B * Hs * NT, cap), None if bits is None else bits.reshape(B * Hs * NT, cap)
    parts, n_done = [], 0
    per_head = counts.reshape(B * Hs, NT).sum(1).tolist()
    for h0, h1 in _head_chunks(per_head, kv_div):
        rows = slice(h0 * NT, h1 * NT)
        part = _key_block_chunk(cnt[rows], ids2[rows], None if bits2 is None else bits2[rows], sum(per_head[h0:h1]),
                                h0, NT, n_blocks, seg, kv_div)
        part[0][:, 2] += n_done
        n_done += part[2].numel()
        parts.append(part)
    if n_done >= 2**31:
        raise ValueError(f"{n_done} dK/dV work entries overflow int32: split the batch")
    items, length, entries = (torch.cat([p[i] for p in parts]) for i in range(3))
    ebits = None if bits is None else torch.cat([p[3] for p in parts])
    return items, length, entries, ebits


def _head_chunks(per_head: list[int], kv_div: int):
    """Ranges [h0, h1) of flat selection heads with at most _KEY_LIST_CHUNK entries in all (a single head
    may hold more), cut between kv heads unless one kv head's heads hold more than the bound."""
    chunks, h0, held = [], 0, 0
    for g0 in range(0, len(per_head), kv_div):
        group = per_head[g0:g0 + kv_div]
        if held + sum(group) > _KEY_LIST_CHUNK and held:
            chunks.append((h0, g0))
            h0, held = g0, 0
        for h, n in enumerate(group, g0):
            if held + n > _KEY_LIST_CHUNK and held:
                chunks.append((h0, h))
                h0, held = h, 0
            held += n
    return chunks + [(h0, len(per_head))]


def _key_block_chunk(cnt, ids, bits, n_e: int, h0: int, NT: int, n_blocks: int, seg: int, kv_div: int):
    """key_block_lists for the n_e entries of the union rows of flat selection heads h0.. (cnt [rows],
    ids/bits [rows, cap]); starts are local to the chunk."""
    dev = ids.device
    owner = torch.repeat_interleave(torch.arange(cnt.numel(), device=dev, dtype=torch.int32), cnt,
                                    output_size=n_e)  # union row of each entry
    row_start = torch.cumsum(cnt, 0, dtype=torch.int32) - cnt
    at = owner.long() * ids.shape[1] + (torch.arange(n_e, device=dev, dtype=torch.int32) - row_start[owner])
    blk = ids.reshape(-1)[at]
    head = h0 + owner // NT
    group0 = h0 // kv_div
    n_cols = ((h0 + cnt.numel() // NT - 1) // kv_div - group0 + 1) * n_blocks
    col = torch.where((blk >= 0) & (blk < n_blocks), (head // kv_div - group0).long() * n_blocks + blk, n_cols)
    col, order = torch.sort(col, stable=True)  # stable: (selection head, tile) order inside a column
    entries = ((head % kv_div) * NT + owner % NT)[order]
    ebits = None if bits is None else bits.reshape(-1)[at][order]
    col_count = torch.bincount(col, minlength=n_cols + 1)[:n_cols]  # n_cols: out-of-range ids, dropped
    col_start = torch.cumsum(col_count, 0) - col_count
    n_seg = (col_count + seg - 1) // seg
    col = torch.repeat_interleave(torch.arange(n_cols, device=dev), n_seg)
    seg_no = torch.arange(col.numel(), device=dev) - torch.repeat_interleave(torch.cumsum(n_seg, 0) - n_seg, n_seg)
    start = col_start[col] + seg_no * seg
    length = torch.minimum(col_count[col] - seg_no * seg, torch.full_like(start, seg))
    items = torch.stack([group0 + col // n_blocks, col % n_blocks, start], 1).to(torch.int32)
    return items, length.to(torch.int32), entries.contiguous(), ebits


@triton.jit
def _union_kernel(SEL, TOK, CNT, IDS, BITS, T, NK, n_blocks, cap, ssb, ssh, sst, ssk,
                  TM: tl.constexpr, KP: tl.constexpr, WITH_BITS: tl.constexpr):
    """One tile's sorted, deduplicated union of the ids in [0, n_blocks) its tokens selected: take the
    smallest id left, store it, remove it everywhere, repeat (one step per union block)."""
    n_tiles = tl.num_programs(0)
    tile = tl.program_id(0)
    s = tl.program_id(1)
    b = tl.program_id(2)
    row = (b * tl.num_programs(1) + s) * n_tiles + tile
    r = tl.arange(0, TM)
    t = tl.load(TOK + row * TM + r)
    j = tl.arange(0, KP)
    x = tl.load(SEL + b.to(tl.int64) * ssb + s.to(tl.int64) * ssh + t.to(tl.int64)[:, None] * sst + j[None, :] * ssk,
                mask=(t < T)[:, None] & (j < NK)[None, :], other=-1)
    x = tl.where((x >= 0) & (x < n_blocks), x, n_blocks).to(tl.int32)  # range check in the input dtype
    out = row.to(tl.int64) * cap
    n = tl.sum(r * 0, axis=0)  # int32 0: the loop-carried union count
    u = tl.min(tl.min(x, axis=1), axis=0)
    while u < n_blocks:
        hit = x == u
        tl.store(IDS + out + n, u)
        if WITH_BITS:
            tl.store(BITS + out + n, tl.sum(tl.where(tl.max(hit.to(tl.int32), axis=1) > 0, 1 << r, 0), axis=0))
        x = tl.where(hit, n_blocks, x)
        n += 1
        u = tl.min(tl.min(x, axis=1), axis=0)
    tl.store(CNT + row, n)


# ----------------------------------------------------------------------------- non-finite flags

@triton.jit
def _bad_keys_kernel(K, V, KBAD, BBAD, S, n_blocks, skb, skh, sks, skd, svb, svh, svs, svd,
                     BLOCK: tl.constexpr, CH: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, WITH_V: tl.constexpr):
    """Per key of block pid(0), kv head pid(1), batch pid(2): its k (or v) row holds a NaN/inf (int8
    KBAD [B, Hkv, S]); and whether the block holds such a key (int8 BBAD [B, Hkv, n_blocks])."""
    blk = tl.program_id(0).to(tl.int64)
    kv = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    d = tl.arange(0, BD)
    row = b * tl.num_programs(1) + kv
    any_bad = tl.zeros([CH], tl.int32)
    for c in range(0, BLOCK, CH):
        keys = blk * BLOCK + c + tl.arange(0, CH)
        ok = keys < S
        bad = nonfinite_rows(_load_rows(K, b * skb + kv * skh + keys * sks, d, skd, ok, D))
        if WITH_V:
            bad = bad | nonfinite_rows(_load_rows(V, b * svb + kv * svh + keys * svs, d, svd, ok, D))
        tl.store(KBAD + row * S + keys, bad.to(tl.int8), mask=ok)
        any_bad = any_bad | bad.to(tl.int32)
    tl.store(BBAD + row * n_blocks + blk, (tl.max(any_bad, axis=0) > 0).to(tl.int8))


@triton.jit
def _tile_bad_kernel(CNT, IDS, BBAD, TBAD, QUEUE, NT, n_blocks, scb, sch, sct,
                     KV_DIV: tl.constexpr, TT: tl.constexpr, CH: tl.constexpr):
    """Tiles TT * pid(0) + [0, TT) of selection head pid(1), batch pid(2): whether the tile's union holds a
    block with a non-finite k/v row (int8 TBAD [B, Hs, NT]); such tiles are appended to QUEUE."""
    g = tl.program_id(1)
    b = tl.program_id(2)
    tile = tl.program_id(0) * TT + tl.arange(0, TT)
    t_ok = tile < NT
    flat = (b * tl.num_programs(1) + g) * NT + tile
    n_u = tl.load(CNT + flat, mask=t_ok, other=0)
    u_base = b.to(tl.int64) * scb + g.to(tl.int64) * sch + tile.to(tl.int64) * sct
    blk_base = (b.to(tl.int64) * (tl.num_programs(1) // KV_DIV) + _kv_head(g, KV_DIV)) * n_blocks
    any_bad = tl.zeros([TT], tl.int32)
    for c in range(0, tl.max(n_u, axis=0), CH):
        i = c + tl.arange(0, CH)
        ok = i[None, :] < n_u[:, None]
        u = tl.load(IDS + u_base[:, None] + i[None, :], mask=ok, other=0)
        any_bad = tl.maximum(any_bad, tl.max(tl.load(BBAD + blk_base + u, mask=ok, other=0).to(tl.int32), axis=1))
    tl.store(TBAD + flat, any_bad.to(tl.int8), mask=t_ok)
    flagged = t_ok & (any_bad > 0)
    n_flagged = tl.sum(flagged.to(tl.int32), axis=0)
    if n_flagged > 0:
        at = tl.atomic_add(QUEUE, n_flagged) + tl.cumsum(flagged.to(tl.int32), axis=0)  # QUEUE[0]: the count
        tl.store(QUEUE + at, flat, mask=flagged)


@triton.jit
def _enqueue_if_unflagged(QUEUE, TBAD, flat):
    """Append tile `flat` to the checked kernels' queue unless _tile_bad_kernel did."""
    if tl.load(TBAD + flat) == 0:
        tl.store(QUEUE + 1 + tl.atomic_add(QUEUE, 1), flat)


@triton.jit
def _queued_tile(QUEUE, w, NT, HS):
    """(batch, selection head, tile) of queue entry w."""
    flat = tl.load(QUEUE + 1 + w)
    return flat // (NT * HS), (flat // NT) % HS, flat % NT


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _row_setup(TOK, bg, n_tiles, tile, g, T, S, TM: tl.constexpr, G: tl.constexpr, BM: tl.constexpr):
    """Rows of one tile: its TM tokens (from the token order TOK) x the G heads of group g."""
    r = tl.arange(0, BM)
    tl_tok = r // G
    head = (g * G + r % G).to(tl.int64)  # head * stride overflows int32 at 1M tokens
    t = tl.load(TOK + (bg * n_tiles + tile) * TM + tl_tok, mask=r < TM * G, other=T)
    row_ok = (r < TM * G) & (t < T)
    pos = S - T + t
    # token * stride overflows int32 past 2^31 elements: [T, 64 heads, 128] at T = 256k
    return tl_tok, head, t.to(tl.int64), row_ok, pos


@triton.jit
def _load_rows(PTR, row_off, cols, s_col, rows_ok, n_cols):
    """The tile PTR[row_off[r] + cols[c] * s_col]; 0 where not rows_ok[r] or cols[c] >= n_cols."""
    return tl.load(PTR + row_off[:, None] + cols[None, :] * s_col,
                   mask=rows_ok[:, None] & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _chose(BITS, at, tl_tok):
    """Per row: whether the row's token (bit tl_tok of the tile entry BITS[at]) selected the entry's block."""
    return ((tl.load(BITS + at) >> tl_tok) & 1) != 0


@triton.jit
def _tile_selection(SEL, b, g, t, row_ok, K, ssb, ssh, sst, ssk, KP: tl.constexpr, FROM_SEL: tl.constexpr):
    """[rows, KP]: the ids selected by each row's token (selection head g; -1 past k and on padded
    rows) when membership is computed in-kernel; a placeholder with bitmasks."""
    if FROM_SEL:
        j = tl.arange(0, KP)
        off = b.to(tl.int64) * ssb + g.to(tl.int64) * ssh + t.to(tl.int64) * sst
        return tl.load(SEL + off[:, None] + j[None, :] * ssk, mask=row_ok[:, None] & (j[None, :] < K), other=-1)
    else:
        return 0


@triton.jit
def _member(BITS, at, tl_tok, sel, u, FROM_SEL: tl.constexpr):
    """Per row: whether the row's token selected block u, the tile's union entry `at`: from the
    tile's selection in registers (FROM_SEL) or from the entry's token bitmask."""
    if FROM_SEL:
        return tl.max((sel == u).to(tl.int32), axis=1) > 0
    else:
        return _chose(BITS, at, tl_tok)


@triton.jit
def _visible(member, row_ok, pos, keys, kmask, WINDOW: tl.constexpr = 0):
    """[rows, keys]: the row's token selected the block, and the key is causal for it and inside S (and, with
    WINDOW > 0, among its last WINDOW positions)."""
    vis = (member & row_ok)[:, None] & (keys[None, :] <= pos[:, None]) & kmask[None, :]
    if WINDOW > 0:
        vis = vis & (keys[None, :] > pos[:, None] - WINDOW)
    return vis


@triton.jit
def _visible_t(member, row_ok, pos, keys, kmask, WINDOW: tl.constexpr = 0):
    """_visible laid out [keys, rows], for the key-major kernels."""
    vis = (member & row_ok)[None, :] & (keys[:, None] <= pos[None, :]) & kmask[:, None]
    if WINDOW > 0:
        vis = vis & (keys[:, None] > pos[None, :] - WINDOW)
    return vis


@triton.jit
def _kv_head(s, KV_DIV: tl.constexpr):
    """The kv head that selection head s reads (KV_DIV = selection heads per kv head)."""
    if KV_DIV == 1:
        return s
    else:
        return s // KV_DIV


@triton.jit
def _key_item(ITEMS, ILEN, HKV):
    """The key-major work item of this program: (batch * HKV + group, block, first entry, entry count,
    batch, group); HKV counts the kv heads (MSA: the selection heads), a group is one of them."""
    item = tl.program_id(0)
    bh = tl.load(ITEMS + item * 3)
    return (bh, tl.load(ITEMS + item * 3 + 1), tl.load(ITEMS + item * 3 + 2), tl.load(ILEN + item),
            bh // HKV, bh % HKV)


@triton.jit
def _entry(ETILE, at, kv, NT, KV_DIV: tl.constexpr):
    """(selection head, tile) of key-major entry `at` in a column of kv head kv."""
    e = tl.load(ETILE + at)
    if KV_DIV == 1:
        return kv, e
    else:
        return kv * KV_DIV + e // NT, e % NT


@triton.jit
def _key_rows(KBAD, keys, kmask, CHECKED: tl.constexpr):
    """(keys to load, their non-finite flags KBAD[keys]): CHECKED loads the flags and drops those rows
    (read as 0); otherwise every key inside S, flags false."""
    if CHECKED:
        kb = tl.load(KBAD + keys, mask=kmask, other=0) != 0
        return kmask & ~kb, kb
    else:
        return kmask, keys < 0


@triton.jit
def _saw_bad_key(seen, vis, kb, CHECKED: tl.constexpr):
    """seen | (the row attends to a key flagged in kb) when CHECKED."""
    if CHECKED:
        return seen | (tl.max((vis & kb[None, :]).to(tl.int32), axis=1) > 0)
    else:
        return seen


@triton.jit
def online_softmax(s, m_i, l_i):
    """One key tile of the online softmax over base-2 scores s [rows, keys] (-inf where masked): (p, the
    rescale alpha of the running sums, the new row max, the new row sum). A row with no key so far keeps
    max -inf and sum 0."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _fwd_tile(Q, K, V, O, L, TOK, SEL, CNT, IDS, BITS, KBAD, b, g, tile, NT, HS, T, S, NK, qk_scale,
              sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
              sob, soh, sot, sod, slb, slh, slt, scb, sch, sct, ssb, ssh, sst, ssk,
              TM: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr,
              BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, LSE_ONLY: tl.constexpr,
              KV_DIV: tl.constexpr, KP: tl.constexpr, FROM_SEL: tl.constexpr, PREC: tl.constexpr, CHECKED: tl.constexpr,
              WINDOW: tl.constexpr = 0):
    """Attention of one tile (selection head g, batch b): its out and LSE rows. CHECKED: the flagged k/v
    rows are read as 0 (no 0 * NaN reaches a row that does not see them) and a row is poisoned (NaN out
    and LSE) when its q, a k/v row it attends to, or a score is non-finite. -> whether some row's
    softmax sum is not a positive number (NaN: a NaN/inf in q or k, or an fp32 overflow; 0: all scores
    -inf, as from an inf in q, or no key), so the tile needs the checked pass."""
    kv = _kv_head(g, KV_DIV)
    bg = b * HS + g
    tl_tok, head, t, row_ok, pos = _row_setup(TOK, bg, NT, tile, g, T, S, TM, G, BM)
    sel = _tile_selection(SEL, b, g, t, row_ok, NK, ssb, ssh, sst, ssk, KP, FROM_SEL)
    d = tl.arange(0, BD)
    q = _load_rows(Q, b * sqb + head * sqh + t * sqt, d, sqd, row_ok, D)
    bad = tl.zeros([BM], tl.int1)
    if CHECKED:
        bad = nonfinite_rows(q)
    kbad = KBAD + (b.to(tl.int64) * (HS // KV_DIV) + kv) * S
    m_i = tl.zeros([BM], tl.float32) + float("-inf")
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    u_base = b.to(tl.int64) * scb + g.to(tl.int64) * sch + tile.to(tl.int64) * sct  # > 2**31 at 1M tokens
    n_u = tl.load(CNT + bg * NT + tile)
    kn = tl.arange(0, BN)
    # each block id is loaded a step ahead (loop-carried), so its load overlaps the step before instead of
    # heading a chain (id, then K, then the dot); measured on an H200 at 128k: 3-6% faster
    u_next = tl.load(IDS + u_base, mask=n_u > 0, other=0)
    for i in range(0, n_u):
        u = u_next
        u_next = tl.load(IDS + u_base + i + 1, mask=i + 1 < n_u, other=0)
        member = _member(BITS, u_base + i, tl_tok, sel, u, FROM_SEL)
        for sub in tl.static_range(BLOCK // BN):
            keys = u * BLOCK + sub * BN + kn
            kmask = keys < S
            ok, kb = _key_rows(kbad, keys, kmask, CHECKED)
            kt = _load_rows(K, b * skb + kv * skh + keys * sks, d, skd, ok, D)
            s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
            vis = _visible(member, row_ok, pos, keys, kmask, WINDOW)  # after the dot: a [BM, BN] mask live across it spills
            s = tl.where(vis, s, float("-inf"))
            p, alpha, m_new, l_i = online_softmax(s, m_i, l_i)
            if not LSE_ONLY:
                vt = _load_rows(V, b * svb + kv * svh + keys * svs, d, svd, ok, D)
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
            m_i = m_new
            bad = _saw_bad_key(bad, vis, kb, CHECKED)
    lse = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    if CHECKED:
        bad = bad | (l_i != l_i)
        lse = poison(lse, bad)
    tl.store(L + b * slb + head * slh + t * slt, lse, mask=row_ok)
    if not LSE_ONLY:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        if CHECKED:
            out = poison_rows(out, bad)
        tl.store(O + b * sob + head[:, None] * soh + t[:, None] * sot + d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < D))
    return tl.max((row_ok & ~(l_i > 0)).to(tl.int32), axis=0) > 0


@triton.jit
def _fwd_kernel(Q, K, V, O, L, TOK, SEL, CNT, IDS, BITS, KBAD, TBAD, QUEUE, T, S, NK, qk_scale,
                sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                sob, soh, sot, sod, slb, slh, slt, scb, sch, sct, ssb, ssh, sst, ssk,
                TM: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr,
                BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, LSE_ONLY: tl.constexpr,
                KV_DIV: tl.constexpr, KP: tl.constexpr, FROM_SEL: tl.constexpr, PREC: tl.constexpr,
                WINDOW: tl.constexpr = 0):
    """Every tile, unchecked; queues the tiles that need the checked pass (_fwd_checked_kernel) unless
    _tile_bad_kernel did: on finite inputs, none."""
    n_tiles = tl.num_programs(0)
    tile = n_tiles - 1 - tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2)
    needs_check = _fwd_tile(Q, K, V, O, L, TOK, SEL, CNT, IDS, BITS, KBAD, b, g, tile, n_tiles, tl.num_programs(1),
                            T, S, NK, qk_scale, sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                            sob, soh, sot, sod, slb, slh, slt, scb, sch, sct, ssb, ssh, sst, ssk,
                            TM, G, BM, BLOCK, BN, D, BD, LSE_ONLY, KV_DIV, KP, FROM_SEL, PREC, False, WINDOW)
    if needs_check:
        _enqueue_if_unflagged(QUEUE, TBAD, (b * tl.num_programs(1) + g) * n_tiles + tile)


@triton.jit
def _fwd_checked_kernel(Q, K, V, O, L, TOK, SEL, CNT, IDS, BITS, KBAD, QUEUE, NT, HS, T, S, NK, qk_scale,
                        sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                        sob, soh, sot, sod, slb, slh, slt, scb, sch, sct, ssb, ssh, sst, ssk,
                        TM: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr,
                        BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, LSE_ONLY: tl.constexpr,
                        KV_DIV: tl.constexpr, KP: tl.constexpr, FROM_SEL: tl.constexpr, PREC: tl.constexpr,
                        WINDOW: tl.constexpr = 0):
    """The queued tiles again, checked (a persistent grid: on finite inputs the queue is empty). Every
    tile with a poisoned row is queued."""
    for w in range(tl.program_id(0), tl.load(QUEUE), tl.num_programs(0)):
        b, g, tile = _queued_tile(QUEUE, w, NT, HS)
        _fwd_tile(Q, K, V, O, L, TOK, SEL, CNT, IDS, BITS, KBAD, b, g, tile, NT, HS, T, S, NK, qk_scale,
                  sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                  sob, soh, sot, sod, slb, slh, slt, scb, sch, sct, ssb, ssh, sst, ssk,
                  TM, G, BM, BLOCK, BN, D, BD, LSE_ONLY, KV_DIV, KP, FROM_SEL, PREC, True, WINDOW)


@triton.jit
def _dq_tile(Q, K, V, DO, DQ, L, DELTA, TOK, SEL, CNT, IDS, BITS, KBAD, b, g, tile, NT, HS, T, S, NK,
             qk_scale, scale, sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
             slb, slh, slt, scb, sch, sct, ssb, ssh, sst, ssk,
             TM: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr,
             BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, KV_DIV: tl.constexpr,
             KP: tl.constexpr, FROM_SEL: tl.constexpr, PREC: tl.constexpr, CHECKED: tl.constexpr,
             WINDOW: tl.constexpr = 0):
    """dQ of one tile. CHECKED (the queued tiles: every poisoned row is in one): a poisoned row (NaN LSE)
    attends to nothing (its q, dO are read as 0: dQ = 0) and the flagged k/v rows are read as 0 (only
    poisoned rows attend to them)."""
    # q, do, dq share strides (made contiguous by the wrapper); so do L and DELTA.
    kv = _kv_head(g, KV_DIV)
    bg = b * HS + g
    tl_tok, head, t, row_ok, pos = _row_setup(TOK, bg, NT, tile, g, T, S, TM, G, BM)
    sel = _tile_selection(SEL, b, g, t, row_ok, NK, ssb, ssh, sst, ssk, KP, FROM_SEL)
    d = tl.arange(0, BD)
    row_off = b * sqb + head * sqh + t * sqt
    q, do, lse2, delta = _row_inputs(Q, DO, L, DELTA, row_off, b * slb + head * slh + t * slt, d, sqd, row_ok, D,
                                     CHECKED)
    kbad = KBAD + (b.to(tl.int64) * (HS // KV_DIV) + kv) * S
    dq = tl.zeros([BM, BD], tl.float32)
    u_base = b.to(tl.int64) * scb + g.to(tl.int64) * sch + tile.to(tl.int64) * sct  # > 2**31 at 1M tokens
    n_u = tl.load(CNT + bg * NT + tile)
    kn = tl.arange(0, BN)
    for i in range(0, n_u):
        u = tl.load(IDS + u_base + i)
        member = _member(BITS, u_base + i, tl_tok, sel, u, FROM_SEL)
        for sub in tl.static_range(BLOCK // BN):
            keys = u * BLOCK + sub * BN + kn
            kmask = keys < S
            ok, kb = _key_rows(kbad, keys, kmask, CHECKED)
            kt = _load_rows(K, b * skb + kv * skh + keys * sks, d, skd, ok, D)
            vt = _load_rows(V, b * svb + kv * svh + keys * svs, d, svd, ok, D)
            s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale
            p = tl.where(_visible(member, row_ok, pos, keys, kmask, WINDOW), tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(vt), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), kt, input_precision=PREC)
    tl.store(DQ + row_off[:, None] + d[None, :] * sqd, (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (d[None, :] < D))


@triton.jit
def _row_inputs(Q, DO, L, DELTA, row_off, l_off, d, sqd, row_ok, D: tl.constexpr, CHECKED: tl.constexpr):
    """q, dO [rows, BD], base-2 LSE and delta [rows] of a tile's rows; CHECKED: all four read as 0 on the
    poisoned rows (NaN LSE), so that they contribute nothing (p * 0, no 0 * NaN)."""
    if CHECKED:
        lse2 = tl.load(L + l_off, mask=row_ok, other=0.0) * 1.4426950408889634
        live = row_ok & (lse2 == lse2)
        q = _load_rows(Q, row_off, d, sqd, live, D)
        do = _load_rows(DO, row_off, d, sqd, live, D)
        return q, do, tl.where(live, lse2, 0.0), tl.load(DELTA + l_off, mask=live, other=0.0)
    else:
        q = _load_rows(Q, row_off, d, sqd, row_ok, D)
        do = _load_rows(DO, row_off, d, sqd, row_ok, D)
        lse2 = tl.load(L + l_off, mask=row_ok, other=0.0) * 1.4426950408889634
        return q, do, lse2, tl.load(DELTA + l_off, mask=row_ok, other=0.0)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, L, DELTA, TOK, SEL, CNT, IDS, BITS, KBAD, T, S, NK, qk_scale, scale,
                   sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                   slb, slh, slt, scb, sch, sct, ssb, ssh, sst, ssk,
                   TM: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr,
                   BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, KV_DIV: tl.constexpr,
                   KP: tl.constexpr, FROM_SEL: tl.constexpr, PREC: tl.constexpr, WINDOW: tl.constexpr = 0):
    """Every tile, unchecked (the queued ones are redone by _bwd_dq_checked_kernel, which overwrites)."""
    n_tiles = tl.num_programs(0)
    _dq_tile(Q, K, V, DO, DQ, L, DELTA, TOK, SEL, CNT, IDS, BITS, KBAD, tl.program_id(2), tl.program_id(1),
             n_tiles - 1 - tl.program_id(0), n_tiles, tl.num_programs(1), T, S, NK, qk_scale, scale,
             sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd, slb, slh, slt, scb, sch, sct,
             ssb, ssh, sst, ssk, TM, G, BM, BLOCK, BN, D, BD, KV_DIV, KP, FROM_SEL, PREC, False, WINDOW)


@triton.jit
def _bwd_dq_checked_kernel(Q, K, V, DO, DQ, L, DELTA, TOK, SEL, CNT, IDS, BITS, KBAD, QUEUE, NT, HS, T, S, NK,
                           qk_scale, scale, sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                           slb, slh, slt, scb, sch, sct, ssb, ssh, sst, ssk,
                           TM: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr,
                           BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, KV_DIV: tl.constexpr,
                           KP: tl.constexpr, FROM_SEL: tl.constexpr, PREC: tl.constexpr, WINDOW: tl.constexpr = 0):
    """The forward's queued tiles again, checked (a persistent grid)."""
    for w in range(tl.program_id(0), tl.load(QUEUE), tl.num_programs(0)):
        b, g, tile = _queued_tile(QUEUE, w, NT, HS)
        _dq_tile(Q, K, V, DO, DQ, L, DELTA, TOK, SEL, CNT, IDS, BITS, KBAD, b, g, tile, NT, HS, T, S, NK,
                 qk_scale, scale, sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                 slb, slh, slt, scb, sch, sct, ssb, ssh, sst, ssk, TM, G, BM, BLOCK, BN, D, BD, KV_DIV, KP,
                 FROM_SEL, PREC, True, WINDOW)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, L, DELTA, TOK, SEL, ITEMS, ILEN, ETILE, EBITS, KBAD, T, S, HKV, NT, NK,
                     qk_scale, scale, sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                     slb, slh, slt, sdb, sdh, sds, sdd, ssb, ssh, sst, ssk,
                     TM: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr,
                     BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, KV_DIV: tl.constexpr,
                     KP: tl.constexpr, FROM_SEL: tl.constexpr, PREC: tl.constexpr, CHECKED: tl.constexpr,
                     WINDOW: tl.constexpr = 0):
    """dK/dV of one key sub-block over its item's entries. CHECKED (the entries of queued tiles): the
    block's non-finite k/v rows are read as 0 (their gradient is 0: only poisoned rows attend to them)
    and a poisoned row attends to nothing (_row_inputs)."""
    _, u, start, n, b, kv = _key_item(ITEMS, ILEN, HKV)
    sub = tl.program_id(1)
    d = tl.arange(0, BD)
    keys = u * BLOCK + sub * BN + tl.arange(0, BN)
    kmask = keys < S
    ok, _ = _key_rows(KBAD + (b.to(tl.int64) * HKV + kv) * S, keys, kmask, CHECKED)
    kt = _load_rows(K, b * skb + kv * skh + keys * sks, d, skd, ok, D)
    vt = _load_rows(V, b * svb + kv * svh + keys * svs, d, svd, ok, D)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    for i in range(0, n):
        g, tile = _entry(ETILE, start + i, kv, NT, KV_DIV)
        tl_tok, head, t, row_ok, pos = _row_setup(TOK, b * (HKV * KV_DIV) + g, NT, tile, g, T, S, TM, G, BM)
        sel = _tile_selection(SEL, b, g, t, row_ok, NK, ssb, ssh, sst, ssk, KP, FROM_SEL)
        member = _member(EBITS, start + i, tl_tok, sel, u, FROM_SEL)
        q, do, lse2, delta = _row_inputs(Q, DO, L, DELTA, b * sqb + head * sqh + t * sqt, b * slb + head * slh + t * slt,
                                         d, sqd, row_ok, D, CHECKED)
        st = tl.dot(kt, tl.trans(q), input_precision=PREC) * qk_scale  # [BN, BM]
        pt = tl.where(_visible_t(member, row_ok, pos, keys, kmask, WINDOW), tl.exp2(st - lse2[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dpt = tl.dot(vt, tl.trans(do), input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    off = b * sdb + kv * sdh + keys[:, None] * sds + d[None, :] * sdd
    m = kmask[:, None] & (d[None, :] < D)
    tl.atomic_add(DK + off, dk * scale, mask=m)
    tl.atomic_add(DV + off, dv, mask=m)


# ----------------------------------------------------------------------------- launchers

def _precision(q: torch.Tensor) -> str:
    """fp32 inputs take exact fp32 dots (as torch's matmuls do by default), not TF32."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _tiling(G: int, block_size: int, device, cfg: dict, max_tokens: int | None = None):
    """(TM tokens per tile, BM rows, BN keys per sub-tile): TM = cfg TM, else ROWS // G (the
    interpreter: 16 rows), a power of two, at most max_tokens."""
    rows = cfg["ROWS"] if device.type == "cuda" else _INTERPRET_ROWS
    want = min(cfg.get("TM") or max(1, rows // G), max_tokens or 1 << 30)
    TM = 1 << (max(1, want).bit_length() - 1)
    BM = max(_pow2(TM * G), 16)
    BN = key_tile(block_size, cfg["BN"], "the triton sparse attention", "; use backend='reference' or 'flex'",
                  gpu=device.type == "cuda")
    return TM, BM, BN


def _plan_tiling(plan, G: int, block_size: int, device, cfg: dict):
    """_tiling for an existing plan: its tokens per tile, and whether membership is computed in-kernel."""
    TM = plan[0].shape[-1] // plan[1].shape[-1]
    BN = _tiling(G, block_size, device, cfg)[2]
    return TM, max(_pow2(TM * G), 16), BN, plan[3] is None


def _selection_heads(Hq: int, Hkv: int, Hs: int) -> tuple[int, int]:
    """(G query heads per selection head, KV_DIV selection heads per kv head) for Hs selection heads."""
    if Hs < 1 or Hs % Hkv or Hq % Hs:
        raise ValueError(f"block_idx needs Hkv ({Hkv}) or Hq ({Hq}) selection heads: a multiple of Hkv "
                         f"that divides Hq, got {Hs}")
    return Hq // Hs, Hs // Hkv


def forward_plan(block_idx, G: int, block_size: int, S: int, device, cfg: dict):
    """The tile plan (token order, per-tile unions and bitmasks) the query-major kernels run, forward and
    backward, for a resolved config."""
    NK = block_idx.shape[3]
    TM = _tiling(G, block_size, device, cfg, None if _pow2(NK) <= SEL_MAX_K else BITS_MAX_TM)[0]
    return tile_plan(block_idx, TM, cfg["WINDOW"], triton.cdiv(S, block_size), cfg["UNION"])


def _forward(q, k, v, block_idx, block_size, scale, lse_only, cfg, plan=None, window: int = 0):
    """-> (out or None, LSE, plan, flags: nonfinite_flags' (per-key flags, queue), for the backward). window > 0:
    a row also drops the keys before its last `window` positions."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    Hs, NK = block_idx.shape[1], block_idx.shape[3]
    G, KV_DIV = _selection_heads(Hq, Hkv, Hs)
    cfg = resolve_config(G, cfg, window)
    if plan is None:
        plan = forward_plan(block_idx, G, block_size, S, q.device, cfg)
    TM, BM, BN, from_sel = _plan_tiling(plan, G, block_size, q.device, cfg)
    tok, cnt, ids, bits = plan
    NT = cnt.shape[-1]
    kbad, tbad, queue = nonfinite_flags(k, None if lse_only else v, plan, block_size, KV_DIV)
    lse = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device)
    out = lse if lse_only else torch.empty_like(q)
    so = (0, 0, 0, 0) if lse_only else out.stride()
    tensors = (q, k, v, out, lse, tok, block_idx, cnt, ids, ids if bits is None else bits, kbad)
    strides = (*q.stride(), *k.stride(), *v.stride(), *so, *lse.stride(), *ids.stride()[:3], *block_idx.stride())
    tiling = dict(TM=TM, G=G, BM=BM, BLOCK=block_size, BN=BN, D=D, BD=max(_pow2(D), 16), LSE_ONLY=lse_only,
                  KV_DIV=KV_DIV, KP=_pow2(NK), FROM_SEL=from_sel, PREC=_precision(q), WINDOW=window,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _fwd_kernel[(NT, Hs, B)](*tensors, tbad, queue, T, S, NK, scale * LOG2E, *strides, **tiling)
    _fwd_checked_kernel[(_checked_programs(queue, q.device),)](*tensors, queue, NT, Hs, T, S, NK, scale * LOG2E,
                                                               *strides, **tiling)
    return (None if lse_only else out), lse, plan, (kbad, queue)


def _checked_programs(queue, device) -> int:
    """Grid of the checked kernels: a few programs per SM at most, one per tile at most."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(queue.numel() - 1, CHECKED_PROGRAMS_PER_SM * sms))


def bad_keys(k, v, block_size: int):
    """One read of k and v (v=None: k alone) -> (kbad int8 [B, Hkv, S]: the key's k or v row holds a
    NaN/inf; bbad int8 [B, Hkv, n_blocks]: the key block holds such a key)."""
    B, Hkv, S, D = k.shape
    n_blocks = triton.cdiv(S, block_size)
    kbad = torch.empty((B, Hkv, S), dtype=torch.int8, device=k.device)
    bbad = torch.empty((B, Hkv, n_blocks), dtype=torch.int8, device=k.device)
    if kbad.numel():
        vv = k if v is None else v
        _bad_keys_kernel[(n_blocks, Hkv, B)](k, vv, kbad, bbad, S, n_blocks, *k.stride(), *vv.stride(),
                                             BLOCK=block_size, CH=min(block_size & -block_size, 64), D=D,
                                             BD=max(_pow2(D), 16), WITH_V=v is not None)
    return kbad, bbad


def nonfinite_flags(k, v, plan, block_size: int, kv_div: int = 1):
    """Non-finite k/v rows for a plan (v=None: k alone), one read of k and v -> (kbad int8 [B, Hkv, S]:
    the key's k or v row holds a NaN/inf; tbad int8 [B, Hs, NT]: the tile's union holds such a key;
    queue int32 [1 + B*Hs*NT]: the count of such tiles, then their flat ids, in any order). The attention
    kernels check (read those rows as 0, flag the rows that attend to them) only the queued tiles."""
    B = k.shape[0]
    tok, cnt, ids, bits = plan
    n_blocks = triton.cdiv(k.shape[2], block_size)
    kbad, bbad = bad_keys(k, v, block_size)
    tbad = torch.empty(cnt.shape, dtype=torch.int8, device=k.device)
    queue = torch.zeros(1 + cnt.numel(), dtype=torch.int32, device=k.device)
    if tbad.numel():
        NT = cnt.shape[2]
        _tile_bad_kernel[(triton.cdiv(NT, FLAG_TILES), cnt.shape[1], B)](
            cnt, ids, bbad, tbad, queue, NT, n_blocks, *ids.stride()[:3], KV_DIV=kv_div, TT=FLAG_TILES,
            CH=min(_pow2(ids.shape[-1]), 64))
    return kbad, tbad, queue


def sparse_lse(q, k, block_idx, block_size: int, scale: float, config: dict | None = None):
    """LSE only (natural log) of scale * q.k over each query's selected tokens; k [B, Hkv, S, D],
    block_idx [B, Hkv or Hq, T, k]."""
    return _forward(q, k, k, block_idx, block_size, scale, True, config)[1]


def backward_delta(do, out, lse, dlse):
    """(delta, lse) for an attention backward, both contiguous fp32 [B, Hq, T]: delta = rowsum(dO * O) -
    dLSE, computed in chunks of 8 heads so no fp32 copy of a whole q-sized tensor is made."""
    delta = torch.empty(lse.shape, dtype=torch.float32, device=do.device)
    for h0 in range(0, do.shape[1], 8):
        delta[:, h0:h0 + 8] = (do[:, h0:h0 + 8].float() * out[:, h0:h0 + 8].float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    return delta.contiguous(), lse.contiguous()


def _backward(q, k, v, out, lse, do, dlse, block_idx, plan, flags, block_size, scale, cfg, dkdv=None, on_dkdv=None,
              window: int = 0):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    Hs, NK = block_idx.shape[1], block_idx.shape[3]
    tok, cnt, ids, bits = plan
    G, KV_DIV = _selection_heads(Hq, Hkv, Hs)
    cfg = resolve_config(G, cfg, window)
    TM, BM, BN, from_sel = _plan_tiling(plan, G, block_size, q.device, cfg)
    NT = cnt.shape[-1]
    q, do = q.contiguous(), do.contiguous()
    delta, lse = backward_delta(do, out, lse, dlse)
    tiling = dict(TM=TM, G=G, BM=BM, BLOCK=block_size, BN=BN, D=D, BD=max(_pow2(D), 16), KV_DIV=KV_DIV,
                  KP=_pow2(NK), FROM_SEL=from_sel, PREC=_precision(q), WINDOW=window, num_warps=cfg["bwd_warps"],
                  num_stages=cfg["bwd_stages"])
    kbad, queue = flags
    n_queued = int(queue[0])  # host sync (the dK/dV lists need several anyway): 0 on finite inputs
    dq = torch.empty_like(q)
    tensors = (q, k, v, do, dq, lse, delta, tok, block_idx, cnt, ids, ids if bits is None else bits, kbad)
    strides = (*q.stride(), *k.stride(), *v.stride(), *lse.stride(), *ids.stride()[:3], *block_idx.stride())
    _bwd_dq_kernel[(NT, Hs, B)](*tensors, T, S, NK, scale * LOG2E, scale, *strides, **tiling)
    counts = {False: cnt}
    if n_queued:
        _bwd_dq_checked_kernel[(_checked_programs(queue, q.device),)](*tensors, queue, NT, Hs, T, S, NK,
                                                                      scale * LOG2E, scale, *strides, **tiling)
        queued = torch.zeros(cnt.numel(), dtype=torch.bool, device=q.device)
        queued[queue[1:1 + n_queued].long()] = True
        queued = queued.view(cnt.shape)
        counts = {False: cnt.masked_fill(queued, 0), True: cnt.masked_fill(~queued, 0)}
    if dkdv is not None and not n_queued:  # another dK/dV schedule, for finite inputs
        dk, dv = dkdv(q, k, v, do, lse, delta, block_idx, block_size, scale)
        if on_dkdv is not None:
            on_dkdv("key_major")
        return dq, dk.to(k.dtype), dv.to(v.dtype)
    if on_dkdv is not None:  # queued tiles (non-finite values, rows without a finite score) run checked
        on_dkdv("query_major_checked" if n_queued else "query_major")
    n_blocks = triton.cdiv(S, block_size)
    dk = torch.zeros((B, Hkv, S, D), dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    for checked, c in counts.items():  # the queued tiles' entries go to the checked kernel
        items, ilen, entries, ebits = key_block_lists(c, ids, bits, n_blocks, cfg["SEG"], KV_DIV)
        if items.shape[0] > 0:
            _bwd_dkdv_kernel[(items.shape[0], block_size // BN)](
                q, k, v, do, dk, dv, lse, delta, tok, block_idx, items, ilen, entries,
                entries if ebits is None else ebits, kbad, T, S, Hkv, NT, NK, scale * LOG2E, scale,
                *q.stride(), *k.stride(), *v.stride(), *lse.stride(), *dk.stride(), *block_idx.stride(),
                CHECKED=checked, **tiling)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


def _backward_inputs(q, k, v, block_idx, block_size, scale, config, outputs):
    """(out, LSE, plan, flags) for the backward, with out and LSE from `outputs(q, k, v, block_idx,
    block_size, scale)` (another forward schedule) rather than the query-major forward kernels."""
    G, KV_DIV = _selection_heads(q.shape[1], k.shape[1], block_idx.shape[1])
    cfg = resolve_config(G, config)
    out, lse = outputs(q, k, v, block_idx, block_size, scale)
    plan = forward_plan(block_idx, G, block_size, k.shape[2], q.device, cfg)
    kbad, _, queue = nonfinite_flags(k, v, plan, block_size, KV_DIV)
    return out, lse, plan, (kbad, queue)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_idx, block_size, scale, config, outputs, dkdv, on_dkdv, window):
        if outputs is None:
            out, lse, plan, (kbad, queue) = _forward(q, k, v, block_idx, block_size, scale, False, config,
                                                     window=window)
        else:
            out, lse, plan, (kbad, queue) = _backward_inputs(q, k, v, block_idx, block_size, scale, config, outputs)
        tok, cnt, ids, bits = plan
        ctx.save_for_backward(q, k, v, out, lse, block_idx, kbad, queue, tok, cnt, ids,
                              *([] if bits is None else [bits]))
        ctx.block_size, ctx.scale, ctx.config, ctx.dkdv, ctx.on_dkdv = block_size, scale, config, dkdv, on_dkdv
        ctx.window = window
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, block_idx, kbad, queue, tok, cnt, ids, *bits = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        plan = (tok, cnt, ids, bits[0] if bits else None)
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, block_idx, plan, (kbad, queue), ctx.block_size,
                               ctx.scale, ctx.config, ctx.dkdv, ctx.on_dkdv, ctx.window)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def block_sparse_attention_triton(q, k, v, block_idx, block_size: int, scale: float,
                                  return_lse: bool = False, config: dict | None = None, outputs=None, dkdv=None,
                                  on_dkdv=None, window: int = 0):
    """q [B, Hq, T, D], k/v [B, Hkv, S, D], block_idx int32/int64 [B, Hs, T, k] -> out [B, Hq, T, D]
    (and natural-log LSE [B, Hq, T] fp32). Differentiable w.r.t. q, k, v.

    Hs = Hkv: one selection per KV group, shared by its query heads (MSA). Hs = Hq: one selection per
    query head (MoBA), read straight from the unrepeated K/V. Ids outside [0, n_blocks) are ignored;
    a repeated id counts once. config: overrides of ATTN_CONFIG (and G1_CONFIG). outputs: a forward-only
    function (q, k, v, block_idx, block_size, scale) -> (out, LSE) run instead of the query-major forward
    kernels (the backward builds their tile plan then), as `sparse_attention_keys` trains. dkdv: a function
    (q, k, v, dO, LSE, delta, block_idx, block_size, scale) -> fp32 (dK, dV) run instead of the dK/dV
    kernels when no key is NaN/inf (`sparse_attention_keys.dkdv_keys`). on_dkdv: called by the backward with
    the dK/dV schedule that ran: 'key_major' (dkdv), 'query_major', or 'query_major_checked' (the query-major
    kernels with the queued tiles checked: a NaN/inf key or value, or a row without a finite score; dkdv is
    not used then). window > 0: each row also drops the keys before its last `window` positions (a sliding
    window inside the selected blocks: sparsezoo.ops.window_attention's Triton path); not with `outputs` or
    `dkdv`.
    Host syncs: none in the forward; the backward's dK/dV work lists (entry and item counts) and the count
    of tiles with non-finite values (docs/ops.md)."""
    if q.dtype == torch.float64:
        raise ValueError("the triton sparse attention runs fp32/fp16/bf16; use backend='reference' for fp64")
    if window < 0 or (window and (outputs is not None or dkdv is not None)):
        raise ValueError(f"window must be >= 0, and 0 with another forward or dK/dV schedule, got {window}")
    out, lse = _BlockSparseAttention.apply(q, k, v, block_idx, block_size, float(scale), config, outputs, dkdv,
                                           on_dkdv, int(window))
    return (out, lse) if return_lse else out
