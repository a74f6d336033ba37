"""Exact per-token block-sparse attention (Triton), forward and backward.

Selections: block_idx [B, Hs, T, k] with one selection head per KV group (Hs = Hkv, MSA) or per query
head (Hs = Hq, MoBA). Selection head s serves the G = Hq / Hs query heads s*G .. s*G+G-1 and reads
kv head s // KV_DIV (KV_DIV = Hs / Hkv), so per-head selections need no repeated K/V.

Tiling: one program owns TM consecutive query tokens x the G heads of one selection head (rows
r = token r // G, head r % G), since those heads share the selection. It visits the union of
its tokens' selected blocks, precomputed per tile together with a bitmask of which tokens chose each
block; a row keeps a key only if its token chose the block and the key is causal. Each K/V block is
loaded once per tile and feeds a [TM*G, block] tensor-core tile. Ids outside [0, n_blocks) are
dropped when the tile unions are built (int64 ids compared before any int32 cast), so no kernel ever
acts on them.

Backward: delta = rowsum(dO * O) (minus dLSE), then
- dQ: the forward's loop again (per query tile over its union);
- dK/dV: the transposed lists (per selection head and key block, the query tiles whose union holds
  it, split into segments of at most SEG tiles), accumulated in registers, one fp32 atomic add per
  segment (with KV_DIV > 1 several selection heads add into one kv head).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# GPU tiling, tuned on H100 (docs/prefill.md). ROWS = tokens per tile x G.
ATTN_CONFIG = {"ROWS": 64, "num_warps": 4, "num_stages": 3, "BN": 128, "SEG": 32,
               "bwd_warps": 8, "bwd_stages": 2, "WINDOW": 1}
_INTERPRET_ROWS = 16


def _pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


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


def tile_plan(block_idx: torch.Tensor, TM: int, window: int, n_blocks: int):
    """(token order, union counts, union ids, token bitmasks) for tiles of TM tokens; ids outside
    [0, n_blocks) are dropped."""
    tok = token_order(block_idx, TM, window, n_blocks)
    B, H, T, K = block_idx.shape
    if window <= 1:  # identity order: tile the selection as it is
        return (tok, *tile_unions(block_idx, TM, n_blocks))
    sel = torch.gather(block_idx, 2, tok.clamp(max=T - 1).long()[..., None].expand(B, H, tok.shape[-1], K))
    sel = torch.where((tok < T)[..., None], sel, -1)
    return (tok, *tile_unions(sel, TM, n_blocks))


def tile_unions(block_idx: torch.Tensor, TM: int, n_blocks: int, chunk_entries: int = 1 << 24):
    """Per tile of TM tokens: the union of selected blocks and, per union entry, the bitmask of
    the tile's tokens that chose it; ids outside [0, n_blocks) are dropped. block_idx [B, H, T, k] ->
    (counts [B, H, NT] int32, ids [B, H, NT, W] int32, bits [B, H, NT, W] int32), W = TM * k.
    Works in chunks of tiles so temporaries stay bounded."""
    if TM > 31:
        raise ValueError(f"tokens per tile must be <= 31 (int32 bitmask), got {TM}")
    B, H, T, K = block_idx.shape
    NT = triton.cdiv(T, TM)
    W = TM * K
    sel = block_idx
    if NT * TM != T:
        sel = torch.nn.functional.pad(sel, (0, 0, 0, NT * TM - T), value=-1)
    sel = sel.reshape(B * H, NT, W)
    counts = torch.empty(B * H, NT, dtype=torch.int32, device=sel.device)
    ids = torch.empty(B * H, NT, W, dtype=torch.int32, device=sel.device)
    bits = torch.empty(B * H, NT, W, dtype=torch.int32, device=sel.device)
    big = torch.iinfo(torch.int32).max
    step = max(1, chunk_entries // max(W * B * H, 1))
    for n0 in range(0, NT, step):
        n1 = min(NT, n0 + step)
        x = sel[:, n0:n1]  # range check in the input dtype: an int64 id must not wrap to a valid one
        key, order = torch.sort(torch.where((x >= 0) & (x < n_blocks), x, big).to(torch.int32), dim=-1)
        real = key < big
        first = real.clone()
        first[..., 1:] &= key[..., 1:] != key[..., :-1]
        run = torch.cumsum(first.to(torch.int32), -1) - 1
        tok_bit = torch.bitwise_left_shift(torch.ones_like(order, dtype=torch.int32), (order // K).to(torch.int32))
        slot_of_entry = torch.where(real, run, W).long()
        ub = torch.zeros(*x.shape[:-1], W + 1, dtype=torch.int32, device=x.device)
        ub.scatter_add_(-1, slot_of_entry, torch.where(real, tok_bit, 0))
        ui = torch.zeros(*x.shape[:-1], W + 1, dtype=torch.int32, device=x.device)
        ui.scatter_(-1, torch.where(first, run, W).long(), torch.where(first, key, 0))
        counts[:, n0:n1] = first.sum(-1, dtype=torch.int32)
        ids[:, n0:n1] = ui[..., :W]
        bits[:, n0:n1] = ub[..., :W]
    return counts.view(B, H, NT), ids.view(B, H, NT, W), bits.view(B, H, NT, W)


def key_block_lists(counts, ids, bits, n_blocks: int, seg: int):
    """Transpose tile unions into per-key-block work items for dK/dV.

    Returns items [n_items, 3] int32 (flat (b, h) index, key block, start into the sorted
    entries), item_len [n_items] int32, and sorted entries tiles/bits [n_entries] int32. An id outside
    [0, n_blocks) gets no work item (it would otherwise address another (b, h)'s column)."""
    BH, NT, W = ids.shape[0] * ids.shape[1], ids.shape[2], ids.shape[3]
    dev = ids.device
    valid = torch.arange(W, device=dev) < counts.reshape(BH, NT, 1)
    bh = torch.arange(BH, device=dev).view(BH, 1, 1).expand(BH, NT, W)[valid]
    tile = torch.arange(NT, device=dev, dtype=torch.int32).view(1, NT, 1).expand(BH, NT, W)[valid]
    blk = ids.reshape(BH, NT, W)[valid].long()
    ebits = bits.reshape(BH, NT, W)[valid]
    n_cols = BH * n_blocks
    key = torch.where((blk >= 0) & (blk < n_blocks), bh * n_blocks + blk, n_cols)  # n_cols: sorted last, dropped
    order = torch.argsort(key * NT + tile.long())
    key, tile, ebits = key[order], tile[order], ebits[order]
    col_count = torch.bincount(key, minlength=n_cols + 1)[:n_cols]
    col_start = torch.cumsum(col_count, 0) - col_count
    n_seg = (col_count + seg - 1) // seg
    col = torch.repeat_interleave(torch.arange(n_cols, device=dev), n_seg)
    seg_no = torch.arange(col.numel(), device=dev) - torch.repeat_interleave(torch.cumsum(n_seg, 0) - n_seg, n_seg)
    start = col_start[col] + seg_no * seg
    length = torch.minimum(col_count[col] - seg_no * seg, torch.full_like(start, seg))
    items = torch.stack([col // n_blocks, col % n_blocks, start], 1).to(torch.int32).contiguous()
    return items, length.to(torch.int32), tile.contiguous(), ebits.contiguous()


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
    return tl_tok, head, t, row_ok, pos


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
def _visible(member, row_ok, pos, keys, kmask):
    """[rows, keys]: the row's token selected the block, and the key is causal for it and inside S."""
    return (member & row_ok)[:, None] & (keys[None, :] <= pos[:, None]) & kmask[None, :]


@triton.jit
def _visible_t(member, row_ok, pos, keys, kmask):
    """_visible laid out [keys, rows], for the key-major kernels."""
    return (member & row_ok)[None, :] & (keys[:, None] <= pos[None, :]) & kmask[:, None]


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
    batch, group); HKV counts the selection heads, a group is one of them."""
    item = tl.program_id(0)
    bh = tl.load(ITEMS + item * 3)
    return (bh, tl.load(ITEMS + item * 3 + 1), tl.load(ITEMS + item * 3 + 2), tl.load(ILEN + item),
            bh // HKV, bh % HKV)


@triton.jit
def _fwd_kernel(Q, K, V, O, L, TOK, CNT, IDS, BITS, T, S, W, qk_scale,
                sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                sob, soh, sot, sod, slb, slh, slt, scb, sch, sct,
                TM: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr,
                BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, LSE_ONLY: tl.constexpr,
                KV_DIV: tl.constexpr):
    n_tiles = tl.num_programs(0)
    tile = n_tiles - 1 - tl.program_id(0)
    g = tl.program_id(1)
    kv = _kv_head(g, KV_DIV)
    b = tl.program_id(2)
    tl_tok, head, t, row_ok, pos = _row_setup(TOK, b * tl.num_programs(1) + g, n_tiles, tile, g, T, S, TM, G, BM)
    d = tl.arange(0, BD)
    q = _load_rows(Q, b * sqb + head * sqh + t * sqt, d, sqd, row_ok, D)
    m_i = tl.zeros([BM], tl.float32) + float("-inf")
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    u_base = b * scb + g * sch + tile * sct
    n_u = tl.load(CNT + (b * tl.num_programs(1) + g) * n_tiles + tile)
    kn = tl.arange(0, BN)
    for i in range(0, n_u):
        u = tl.load(IDS + u_base + i)
        member = _chose(BITS, u_base + i, tl_tok)
        for sub in tl.static_range(BLOCK // BN):
            keys = u * BLOCK + sub * BN + kn
            kmask = keys < S
            kt = _load_rows(K, b * skb + kv * skh + keys * sks, d, skd, kmask, D)
            s = tl.dot(q, tl.trans(kt)) * qk_scale
            s = tl.where(_visible(member, row_ok, pos, keys, kmask), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if not LSE_ONLY:
                vt = _load_rows(V, b * svb + kv * svh + keys * svs, d, svd, kmask, D)
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
    lse = tl.where(l_i > 0, (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(L + b * slb + head * slh + t * slt, lse, mask=row_ok)
    if not LSE_ONLY:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O + b * sob + head[:, None] * soh + t[:, None] * sot + d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < D))


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, L, DELTA, TOK, CNT, IDS, BITS, T, S, W, qk_scale, scale,
                   sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                   slb, slh, slt, scb, sch, sct,
                   TM: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr,
                   BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, KV_DIV: tl.constexpr):
    # q, do, dq share strides (made contiguous by the wrapper); so do L and DELTA.
    n_tiles = tl.num_programs(0)
    tile = n_tiles - 1 - tl.program_id(0)
    g = tl.program_id(1)
    kv = _kv_head(g, KV_DIV)
    b = tl.program_id(2)
    tl_tok, head, t, row_ok, pos = _row_setup(TOK, b * tl.num_programs(1) + g, n_tiles, tile, g, T, S, TM, G, BM)
    d = tl.arange(0, BD)
    row_off = b * sqb + head * sqh + t * sqt
    q = _load_rows(Q, row_off, d, sqd, row_ok, D)
    do = _load_rows(DO, row_off, d, sqd, row_ok, D)
    l_off = b * slb + head * slh + t * slt
    lse2 = tl.load(L + l_off, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + l_off, mask=row_ok, other=0.0)
    dq = tl.zeros([BM, BD], tl.float32)
    u_base = b * scb + g * sch + tile * sct
    n_u = tl.load(CNT + (b * tl.num_programs(1) + g) * n_tiles + tile)
    kn = tl.arange(0, BN)
    for i in range(0, n_u):
        u = tl.load(IDS + u_base + i)
        member = _chose(BITS, u_base + i, tl_tok)
        for sub in tl.static_range(BLOCK // BN):
            keys = u * BLOCK + sub * BN + kn
            kmask = keys < S
            kt = _load_rows(K, b * skb + kv * skh + keys * sks, d, skd, kmask, D)
            vt = _load_rows(V, b * svb + kv * svh + keys * svs, d, svd, kmask, D)
            s = tl.dot(q, tl.trans(kt)) * qk_scale
            p = tl.where(_visible(member, row_ok, pos, keys, kmask), tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(vt))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), kt)
    tl.store(DQ + row_off[:, None] + d[None, :] * sqd, (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (d[None, :] < D))


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, L, DELTA, TOK, ITEMS, ILEN, ETILE, EBITS, T, S, HKV, NT, qk_scale, scale,
                     sqb, sqh, sqt, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                     slb, slh, slt, sdb, sdh, sds, sdd,
                     TM: tl.constexpr, G: tl.constexpr, BM: tl.constexpr, BLOCK: tl.constexpr,
                     BN: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, KV_DIV: tl.constexpr):
    bh, u, start, n, b, g = _key_item(ITEMS, ILEN, HKV)
    kv = _kv_head(g, KV_DIV)
    sub = tl.program_id(1)
    d = tl.arange(0, BD)
    keys = u * BLOCK + sub * BN + tl.arange(0, BN)
    kmask = keys < S
    kt = _load_rows(K, b * skb + kv * skh + keys * sks, d, skd, kmask, D)
    vt = _load_rows(V, b * svb + kv * svh + keys * svs, d, svd, kmask, D)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    for i in range(0, n):
        tile = tl.load(ETILE + start + i)
        tl_tok, head, t, row_ok, pos = _row_setup(TOK, bh, NT, tile, g, T, S, TM, G, BM)
        member = _chose(EBITS, start + i, tl_tok)
        row_off = b * sqb + head * sqh + t * sqt
        q = _load_rows(Q, row_off, d, sqd, row_ok, D)
        do = _load_rows(DO, row_off, d, sqd, row_ok, D)
        l_off = b * slb + head * slh + t * slt
        lse2 = tl.load(L + l_off, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + l_off, mask=row_ok, other=0.0)
        st = tl.dot(kt, tl.trans(q)) * qk_scale  # [BN, BM]
        pt = tl.where(_visible_t(member, row_ok, pos, keys, kmask), tl.exp2(st - lse2[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do)
        dpt = tl.dot(vt, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q)
    off = b * sdb + kv * sdh + keys[:, None] * sds + d[None, :] * sdd
    m = kmask[:, None] & (d[None, :] < D)
    tl.atomic_add(DK + off, dk * scale, mask=m)
    tl.atomic_add(DV + off, dv, mask=m)


# ----------------------------------------------------------------------------- launchers

def _tiling(G: int, block_size: int, device, cfg: dict):
    rows = cfg["ROWS"] if device.type == "cuda" else _INTERPRET_ROWS
    TM = 1 << (min(16, max(1, rows // G)).bit_length() - 1)  # power of two, <= 16
    BM = max(_pow2(TM * G), 16)
    if block_size & (block_size - 1) == 0:
        BN = min(block_size, cfg["BN"])
    elif block_size % cfg["BN"] == 0:
        BN = cfg["BN"]
    else:
        raise ValueError(f"the triton sparse attention needs block_size to be a power of two or a "
                         f"multiple of {cfg['BN']}, got {block_size}; use backend='reference' or 'flex'")
    return TM, BM, BN


def _selection_heads(Hq: int, Hkv: int, Hs: int) -> tuple[int, int]:
    """(G query heads per selection head, KV_DIV selection heads per kv head) for Hs selection heads."""
    if Hs < 1 or Hs % Hkv or Hq % Hs:
        raise ValueError(f"block_idx needs Hkv ({Hkv}) or Hq ({Hq}) selection heads: a multiple of Hkv "
                         f"that divides Hq, got {Hs}")
    return Hq // Hs, Hs // Hkv


def _forward(q, k, v, block_idx, block_size, scale, lse_only, cfg, plan=None):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    Hs = block_idx.shape[1]
    G, KV_DIV = _selection_heads(Hq, Hkv, Hs)
    TM, BM, BN = _tiling(G, block_size, q.device, cfg)
    if plan is None:
        plan = tile_plan(block_idx, TM, cfg["WINDOW"], triton.cdiv(S, block_size))
    tok, cnt, ids, bits = plan
    NT = cnt.shape[-1]
    lse = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device)
    out = lse if lse_only else torch.empty_like(q)
    so = (0, 0, 0, 0) if lse_only else out.stride()
    _fwd_kernel[(NT, Hs, B)](
        q, k, v, out, lse, tok, cnt, ids, bits, T, S, ids.shape[-1], scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *so, *lse.stride(), *ids.stride()[:3],
        TM=TM, G=G, BM=BM, BLOCK=block_size, BN=BN, D=D, BD=max(_pow2(D), 16), LSE_ONLY=lse_only,
        KV_DIV=KV_DIV, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return (None if lse_only else out), lse, plan


def sparse_lse(q, k, block_idx, block_size: int, scale: float, config: dict | None = None):
    """LSE only (natural log) of scale * q.k over each query's selected tokens; k [B, Hkv, S, D],
    block_idx [B, Hkv or Hq, T, k]."""
    cfg = dict(ATTN_CONFIG, **(config or {}))
    return _forward(q, k, k, block_idx, block_size, scale, True, cfg)[1]


def _backward(q, k, v, out, lse, do, dlse, plan, block_size, scale, cfg):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    tok, cnt, ids, bits = plan
    Hs = cnt.shape[1]
    G, KV_DIV = _selection_heads(Hq, Hkv, Hs)
    TM, BM, BN = _tiling(G, block_size, q.device, cfg)
    NT = cnt.shape[-1]
    q, do = q.contiguous(), do.contiguous()
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    for h0 in range(0, Hq, 8):  # in head chunks: no fp32 copies of whole q-sized tensors
        delta[:, h0:h0 + 8] = (do[:, h0:h0 + 8].float() * out[:, h0:h0 + 8].float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    lse = lse.contiguous()
    BD = max(_pow2(D), 16)
    dq = torch.empty_like(q)
    _bwd_dq_kernel[(NT, Hs, B)](
        q, k, v, do, dq, lse, delta, tok, cnt, ids, bits, T, S, ids.shape[-1], scale * LOG2E, scale,
        *q.stride(), *k.stride(), *v.stride(), *lse.stride(), *ids.stride()[:3],
        TM=TM, G=G, BM=BM, BLOCK=block_size, BN=BN, D=D, BD=BD, KV_DIV=KV_DIV,
        num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"])
    n_blocks = triton.cdiv(S, block_size)
    items, ilen, etile, ebits = key_block_lists(cnt, ids, bits, n_blocks, cfg["SEG"])
    dk = torch.zeros((B, Hkv, S, D), dtype=torch.float32, device=q.device)
    dv = torch.zeros_like(dk)
    if items.shape[0] > 0:
        _bwd_dkdv_kernel[(items.shape[0], block_size // BN)](
            q, k, v, do, dk, dv, lse, delta, tok, items, ilen, etile, ebits, T, S, Hs, NT, scale * LOG2E, scale,
            *q.stride(), *k.stride(), *v.stride(), *lse.stride(), *dk.stride(),
            TM=TM, G=G, BM=BM, BLOCK=block_size, BN=BN, D=D, BD=BD, KV_DIV=KV_DIV,
            num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"])
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_idx, block_size, scale, cfg):
        out, lse, plan = _forward(q, k, v, block_idx, block_size, scale, False, cfg)
        ctx.save_for_backward(q, k, v, out, lse, *plan)
        ctx.block_size, ctx.scale, ctx.cfg = block_size, scale, cfg
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, tok, cnt, ids, bits = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, (tok, cnt, ids, bits), ctx.block_size,
                               ctx.scale, ctx.cfg)
        return dq, dk, dv, None, None, None, None


def block_sparse_attention_triton(q, k, v, block_idx, block_size: int, scale: float,
                                  return_lse: bool = False, config: dict | None = None):
    """q [B, Hq, T, D], k/v [B, Hkv, S, D], block_idx int32/int64 [B, Hs, T, k] -> out [B, Hq, T, D]
    (and natural-log LSE [B, Hq, T] fp32). Differentiable w.r.t. q, k, v.

    Hs = Hkv: one selection per KV group, shared by its query heads (MSA). Hs = Hq: one selection per
    query head (MoBA), read straight from the unrepeated K/V. Ids outside [0, n_blocks) are ignored.
    Host syncs: none in the forward; the backward's dK/dV work lists (boolean indexing, repeat_interleave)."""
    if q.dtype == torch.float64:
        raise ValueError("the triton sparse attention runs fp32/fp16/bf16; use backend='reference' for fp64")
    cfg = dict(ATTN_CONFIG, **(config or {}))
    out, lse = _BlockSparseAttention.apply(q, k, v, block_idx, block_size, float(scale), cfg)
    return (out, lse) if return_lse else out
