"""FlexAttention paths: dense causal, and MSA block-sparse with an exact per-query mask.

MSA's sparse prefill folds the G heads of a group into the query axis (row r = token r // G, head
r % G), so a 128-row query tile spans 128 / G tokens and the union of their selections stays small.
The BlockMask is compact: each tile lists only the union of its tokens' blocks (width <= tokens per
tile x k), never [n_q_tiles, n_kv_blocks]. Inside a visited block the mask_mod keeps each query to
its own k blocks and to causality, so the result is exact per query token.
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


def check_flex_block_size(block_size: int) -> None:
    if block_size % MASK_KV_BLOCK and MASK_KV_BLOCK % block_size:
        raise ValueError(
            f"the flex backend needs block_size to divide, or be a multiple of, the kernel tile "
            f"{MASK_KV_BLOCK}, got {block_size}; use backend='reference' for other sizes")


def mask_kv_block(block_size: int) -> int:
    """Selection blocks smaller than the tile are grouped into 128-token BlockMask blocks (the
    mask_mod stays exact), so flex's default kernel tiles always divide the BlockMask block."""
    return max(block_size, MASK_KV_BLOCK)


def run_flex(q, k, v, block_mask, scale, return_lse, enable_gqa=False):
    if return_lse and q.device.type == "cpu":
        raise ValueError("compiled FlexAttention on the CPU cannot return the LSE; "
                         "use backend='reference' there")
    out = compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                          return_lse=return_lse, kernel_options=_kernel_options(q, k))
    return out


def _kernel_options(q, k):
    """Under 128 queries flex picks its decoding kernel, whose tile must hold T x G query rows and
    divide the 128-row BlockMask tile: with T x G > 128 it finds no valid configuration (torch
    2.11, seen on an H100). Ask for the main kernel there."""
    T, G = q.shape[2], q.shape[1] // k.shape[1]
    if q.device.type == "cuda" and T < 128 and T * G > 128:
        return {"BACKEND": "TRITON"}
    return None


def causal_mask_mod(offset: int):
    """attn-gym's causal mask, aligned bottom-right: query row t sits at position offset + t."""
    from attn_gym.masks import causal_mask

    if offset == 0:
        return causal_mask

    def causal_bottom_right(b, h, q_idx, kv_idx):
        return causal_mask(b, h, q_idx + offset, kv_idx)

    return causal_bottom_right


def dense_causal_block_mask(T: int, S: int, device, q_block: int = 128, kv_block: int = 128) -> BlockMask:
    """Causal BlockMask built analytically (no T x S mask), with fully visible blocks marked full."""
    offset = S - T
    n_q, n_kv = math.ceil(T / q_block), math.ceil(S / kv_block)
    tiles = torch.arange(n_q, device=device)
    first = offset + tiles * q_block
    last = offset + torch.clamp((tiles + 1) * q_block, max=T) - 1
    n_visible = last // kv_block + 1
    n_full = torch.clamp((first + 1) // kv_block, max=S // kv_block)
    cols = torch.arange(n_kv, device=device)
    full_idx = cols.expand(n_q, n_kv)
    part_idx = torch.clamp(n_full[:, None] + cols[None, :], max=n_kv - 1)
    view = lambda x: x.to(torch.int32).view(1, 1, *x.shape).contiguous()
    return BlockMask.from_kv_blocks(
        view(n_visible - n_full), view(part_idx), view(n_full), view(full_idx),
        BLOCK_SIZE=(q_block, kv_block), mask_mod=causal_mask_mod(offset), seq_lengths=(T, S))


def dense_attention_flex(q, k, v, scale: float, return_lse: bool = False):
    T, S = q.shape[2], k.shape[2]
    mask = dense_causal_block_mask(T, S, q.device)
    return run_flex(q, k, v, mask, scale, return_lse, enable_gqa=q.shape[1] != k.shape[1])


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


def msa_mask_mod(block_idx: torch.Tensor, G: int, offset: int, block_size: int):
    """Exact per-query mask on folded rows: key s is visible to row r when s's block is one of
    token r // G's selected blocks and s <= its position."""
    T, K = block_idx.shape[2], block_idx.shape[3]

    def msa_selected(b, h, q_idx, kv_idx):
        t = torch.clamp(q_idx // G, max=T - 1)
        blk = kv_idx // block_size
        hit = block_idx[b, h, t, 0] == blk
        for j in range(1, K):
            hit = hit | (block_idx[b, h, t, j] == blk)
        return hit & (kv_idx <= t + offset)

    return msa_selected


def msa_block_mask(block_idx: torch.Tensor, n_q_heads: int, S: int, block_size: int,
                   with_backward: bool, q_tile: int = Q_TILE) -> BlockMask:
    """Compact BlockMask on folded rows for the selections block_idx [B, Hkv, T, k]."""
    B, Hkv, T, K = block_idx.shape
    G = n_q_heads // Hkv
    kv_block = mask_kv_block(block_size)
    counts, ids = tile_block_union(block_idx, G, q_tile, coarsen=kv_block // block_size)
    n_kv = math.ceil(S / kv_block)
    if ids.device.type == "cpu" and ids.shape[-1] < n_kv:
        # the CPU flex template reads the KV length off kv_indices' width; the GPU one does not
        ids = torch.nn.functional.pad(ids, (0, n_kv - ids.shape[-1]))
    mask = BlockMask.from_kv_blocks(
        counts, ids, BLOCK_SIZE=(q_tile, kv_block),
        mask_mod=msa_mask_mod(block_idx.to(torch.int32).contiguous(), G, S - T, block_size),
        seq_lengths=(T * G, S), compute_q_blocks=False)
    if with_backward:
        mask.q_num_blocks, mask.q_indices = transpose_compact(counts, ids, n_kv)
    return mask


def block_sparse_attention_flex(q, k, v, block_idx, block_size: int, scale: float, return_lse: bool = False):
    Hq, Hkv, S = q.shape[1], k.shape[1], k.shape[2]
    check_flex_block_size(block_size)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    mask = msa_block_mask(block_idx, Hq, S, block_size, with_backward=needs_grad)
    res = run_flex(fold_heads(q, Hkv), k, v, mask, scale, return_lse)
    if return_lse:
        out, lse = res
        return unfold_heads(out, Hq), unfold_heads(lse, Hq)
    return unfold_heads(res, Hq)
