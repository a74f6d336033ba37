"""FlexAttention plumbing shared by every flex implementation: one compiled flex_attention, BlockMasks
built from per-tile lists or ranges (never a T x S map), and the compact transpose the backward needs.

Folding: MSA-style selections shared by G query heads fold those heads into the query axis (row
r = token r // G, head r % G), so a 128-row query tile spans 128 / G tokens and the union of their
selections stays small.
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

_compiled = None
Q_TILE = 128  # rows of the folded query axis per BlockMask tile


def compiled_flex():
    """One compiled flex_attention for the process (uncompiled flex ignores BlockMask indices)."""
    global _compiled
    if _compiled is None:
        import torch._dynamo

        cfg = torch._dynamo.config
        limit_name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, limit_name, max(getattr(cfg, limit_name), 256))
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


MASK_KV_BLOCK = 128  # BlockMask KV granularity for selection blocks smaller than the kernel tile


def block_size_reason(block_size: int) -> str | None:
    """Flex's kernel tiles must divide the BlockMask block (see mask_kv_block)."""
    if block_size % MASK_KV_BLOCK and MASK_KV_BLOCK % block_size:
        return (f"flex needs block_size to divide, or be a multiple of, the kernel tile {MASK_KV_BLOCK}, "
                f"got {block_size}")
    return None


def mask_kv_block(block_size: int) -> int:
    """Selection blocks smaller than the tile are grouped into 128-token BlockMask blocks (the
    mask_mod stays exact), so flex's default kernel tiles always divide the BlockMask block."""
    return max(block_size, MASK_KV_BLOCK)


def run_flex(q, k, v, block_mask, scale, return_lse, enable_gqa=False, score_mod=None, tma=False):
    """tma: ask for TMA loads on Hopper (flex turns them off where it cannot use them)."""
    if return_lse and q.device.type == "cpu":
        raise ValueError("compiled FlexAttention on the CPU cannot return the LSE; "
                         "use backend='reference' there")
    out = compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                          return_lse=return_lse, kernel_options=_kernel_options(q, k, tma))
    return out


def _kernel_options(q, k, tma=False):
    """Under 128 queries flex picks its decoding kernel, whose tile must hold T x G query rows and
    divide the 128-row BlockMask tile: with T x G > 128 it finds no valid configuration (torch
    2.11, seen on an H100). Ask for the main kernel there. tma: TMA loads on Hopper."""
    options = {}
    T, G = q.shape[2], q.shape[1] // k.shape[1]
    if q.device.type == "cuda" and T < 128 and T * G > 128:
        options["BACKEND"] = "TRITON"
    if tma and q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] == 9:
        options["USE_TMA"] = True
    return options or None


def causal_mask_mod(offset: int):
    """attn-gym's causal mask, aligned bottom-right: query row t sits at position offset + t."""
    from attn_gym.masks import causal_mask

    if offset == 0:
        return causal_mask

    def causal_bottom_right(b, h, q_idx, kv_idx):
        return causal_mask(b, h, q_idx + offset, kv_idx)

    return causal_bottom_right


def fold_heads(q: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """[B, Hq, T, D] -> [B, Hkv, T*G, D] with row r = token r // G, head r % G."""
    B, Hq, T, D = q.shape
    G = Hq // n_kv_heads
    return q.view(B, n_kv_heads, G, T, D).transpose(2, 3).reshape(B, n_kv_heads, T * G, D)


def unfold_heads(x: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    """Inverse of fold_heads for [B, Hkv, T*G, ...] (output or LSE)."""
    B, Hkv, R = x.shape[:3]
    G = n_q_heads // Hkv
    rest = x.shape[3:]
    return x.view(B, Hkv, R // G, G, *rest).transpose(2, 3).reshape(B, n_q_heads, R // G, *rest)


def tile_block_union(block_idx: torch.Tensor, G: int, q_tile: int, coarsen: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per folded-query tile, the union of its tokens' selected blocks (ids // coarsen).

    block_idx [B, Hkv, T, k] -> (counts [B, Hkv, n_tiles] int32, ids [B, Hkv, n_tiles, W] int32),
    ids sorted ascending with valid entries first; W = tokens per tile x k.
    """
    B, H, T, K = block_idx.shape
    R = T * G
    n_tiles = math.ceil(R / q_tile)
    dev = block_idx.device
    tiles = torch.arange(n_tiles, device=dev)
    t_lo = tiles * q_tile // G
    t_hi = (torch.clamp((tiles + 1) * q_tile, max=R) - 1) // G
    W = (q_tile - 1) // G + 2
    tok = torch.minimum(t_lo[:, None] + torch.arange(W, device=dev), t_hi[:, None])  # [n_tiles, W]
    ids = block_idx[:, :, tok.reshape(-1)].reshape(B, H, n_tiles, W * K).long()
    big = torch.iinfo(torch.int32).max
    ids = torch.sort(torch.where(ids < 0, big, ids // coarsen), dim=-1).values
    dup = torch.zeros_like(ids, dtype=torch.bool)
    dup[..., 1:] = ids[..., 1:] == ids[..., :-1]
    ids = torch.sort(torch.where(dup, big, ids), dim=-1).values
    counts = (ids < big).sum(-1)
    ids = torch.where(ids < big, ids, 0)
    return counts.to(torch.int32), ids.to(torch.int32)


def transpose_compact(counts: torch.Tensor, ids: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row->columns lists to column->rows lists without a dense [rows, cols] bitmap.

    counts [B, H, R], ids [B, H, R, W] -> (col_counts [B, H, n_cols], rows [B, H, n_cols, W']) with
    W' the largest column count. Needed by FlexAttention's backward.
    """
    B, H, R, W = ids.shape
    dev = ids.device
    valid = torch.arange(W, device=dev) < counts[..., None]
    bh = torch.arange(B * H, device=dev).view(B, H, 1, 1).expand(B, H, R, W)
    row = torch.arange(R, device=dev).view(1, 1, R, 1).expand(B, H, R, W)
    key = (bh * n_cols + ids.long())[valid]
    row = row[valid]
    order = torch.argsort(key * R + row)
    key, row = key[order], row[order]
    col_counts = torch.bincount(key, minlength=B * H * n_cols)
    width = max(int(col_counts.max().item()) if key.numel() else 0, 1)
    start = torch.cumsum(col_counts, 0) - col_counts
    within = torch.arange(key.numel(), device=dev) - start[key]
    rows = torch.zeros(B * H * n_cols, width, dtype=torch.int32, device=dev)
    rows[key, within] = row.to(torch.int32)
    return col_counts.view(B, H, n_cols).to(torch.int32), rows.view(B, H, n_cols, width)


def _transpose_ranges(lo: torch.Tensor, hi: torch.Tensor, n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Key tile j -> the query tiles i with lo[i] <= j < hi[i], for lo and hi non-decreasing in i (causal
    ranges): a contiguous run of tiles, found by two searches. Full width (n_q) with no data-dependent shape,
    so it traces under torch.compile."""
    n_q = lo.shape[0]
    cols = torch.arange(n_kv, device=lo.device, dtype=hi.dtype)
    first = torch.searchsorted(hi.contiguous(), cols, right=True)  # first i with hi[i] > j
    end = torch.searchsorted(lo.contiguous(), cols, right=True)  # i with lo[i] <= j are those before it
    counts = (end - first).clamp_min(0)
    rows = torch.clamp(first[:, None] + torch.arange(n_q, device=lo.device), max=n_q - 1)
    return counts.to(torch.int32).view(1, 1, -1).contiguous(), rows.to(torch.int32).view(1, 1, n_kv, n_q).contiguous()


def _transpose_two_ranges(lo1, hi1, lo2, hi2, n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """_transpose_ranges of the union of two disjoint range families [lo1, hi1) and [lo2, hi2): each key
    tile's two runs of query tiles, the first run's tiles first."""
    c1, r1 = _transpose_ranges(lo1, hi1, n_kv)
    c2, r2 = _transpose_ranges(lo2, hi2, n_kv)
    n_q = lo1.shape[0]
    k = torch.arange(n_q, device=lo1.device, dtype=c1.dtype)
    first2 = r2[..., :1].to(c1.dtype)  # the second run starts here (its rows are first2 + offset)
    rows = torch.where(k < c1[..., None], r1, torch.clamp(first2 + k - c1[..., None], max=n_q - 1).to(r1.dtype))
    return (c1 + c2).contiguous(), rows.contiguous()


def range_block_mask(lo: torch.Tensor, hi: torch.Tensor, T: int, S: int, mask_mod, with_backward: bool,
                     tile: int = Q_TILE, full: tuple[torch.Tensor, torch.Tensor] | None = None) -> BlockMask:
    """BlockMask where query tile i visits key tiles lo[i] <= j < hi[i], built from per-tile ranges:
    [n_q_tiles, n_kv_tiles] block indices, never a T x S map. lo and hi must be non-decreasing in i (causal and
    sliding-window ranges are).

    full: optional (flo, fhi), also non-decreasing: the tiles flo[i] <= j < fhi[i] are visible to every query of
    tile i (flex skips mask_mod there); the rest of [lo, hi) are partial tiles, where mask_mod decides. Without
    it every tile is partial."""
    n_kv = max(1, math.ceil(S / tile))
    flo = torch.minimum(torch.maximum(full[0], lo), hi) if full is not None else hi
    fhi = torch.minimum(torch.maximum(full[1], flo), hi) if full is not None else hi
    before = (flo - lo).clamp_min(0)  # partial tiles [lo, flo), then [fhi, hi)
    counts = before + (hi - fhi).clamp_min(0)
    # Full width n_kv (as flex.dense_causal_block_mask): flex infers the masked KV extent from it.
    cols = torch.arange(n_kv, device=lo.device)
    ids = torch.where(cols < before[:, None], lo[:, None] + cols, fhi[:, None] + cols - before[:, None])
    view = lambda x: x.to(torch.int32).view(1, 1, *x.shape).contiguous()
    parts = (view(counts), view(ids.clamp(0, n_kv - 1)))
    if full is not None:
        parts += (view((fhi - flo).clamp_min(0)), view(torch.clamp(flo[:, None] + cols, 0, n_kv - 1)))
    mask = BlockMask.from_kv_blocks(*parts, BLOCK_SIZE=(tile, tile), mask_mod=mask_mod, seq_lengths=(T, S),
                                    compute_q_blocks=False)
    if with_backward:
        if full is None:
            mask.q_num_blocks, mask.q_indices = _transpose_ranges(lo, hi, n_kv)
        else:
            mask.q_num_blocks, mask.q_indices = _transpose_two_ranges(lo, flo, fhi, hi, n_kv)
            mask.full_q_num_blocks, mask.full_q_indices = _transpose_ranges(flo, fhi, n_kv)
    return mask


def tile_last_positions(T: int, S: int, device, tile: int = Q_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, last) absolute query position of each query tile."""
    tiles = torch.arange(math.ceil(T / tile), device=device)
    return S - T + tiles * tile, S - T + torch.clamp((tiles + 1) * tile, max=T) - 1
