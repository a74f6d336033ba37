"""NSA ops (variants.md): compressed-block attention, block selection from its probabilities, and
sliding-window attention. Each has a chunked plain-PyTorch reference and a FlexAttention path.

Layout as in sparsezoo.ops: q [B, Hq, T, D] are the last T of S positions. Compressed entry i of a
stride-d, length-l compression covers tokens [i*d, i*d + l) and is visible to a query at position p
exactly when it ends at or before p: i*d + l - 1 <= p.
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import BlockMask

from . import checks
from .dispatch import record, resolve
from .flex import run_flex, transpose_compact
from .reference import upcast_grouped, _chunk_len, _compute_dtype, masked_softmax_lse, query_positions

FLEX_TILE = 128  # query rows and key columns per BlockMask tile of the NSA flex paths


def resolve_backend(op: str, backend: str, device: torch.device, grad: bool) -> str:
    """auto -> flex on CUDA, reference elsewhere; an explicit backend that cannot run raises."""
    auto = ("flex", "reference") if device.type == "cuda" else ("reference",)
    return resolve(op, backend, ("reference", "flex"), device, grad, auto_order=auto)


def needs_grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def check_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q [B, Hq, T, D]; k, v [B, Hkv, N, D] with any N (compressed or gathered keys)."""
    for name, t, layout in (("q", q, "[B, Hq, T, D]"), ("k", k, "[B, Hkv, N, D]"), ("v", v, "[B, Hkv, N, D]")):
        checks.check_rank(name, t, 4, layout)
    checks.check_float("q", q)
    checks.check_same("q", q, "k", k)
    checks.check_same("q", q, "v", v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"k must be [B={q.shape[0]}, Hkv dividing Hq={q.shape[1]}, N, D={q.shape[3]}], "
                         f"got {tuple(k.shape)}")


def n_compressed(S: int, block_len: int, stride: int) -> int:
    """Compressed entries of S tokens: one per complete block of length block_len at stride."""
    return 0 if S < block_len else (S - block_len) // stride + 1


def compressed_visible(pos: torch.Tensor, n: int, block_len: int, stride: int) -> torch.Tensor:
    """bool [Tc, n]: compressed entry i ends at or before the query position."""
    ends = torch.arange(n, device=pos.device) * stride + block_len - 1
    return ends[None, :] <= pos[:, None]


# -- compression branch ---------------------------------------------------------------------------
def compressed_attention(q, kc, vc, *, S: int, block_len: int, stride: int, scale: float,
                         backend: str = "auto") -> torch.Tensor:
    """Softmax attention of q [B, Hq, T, D] over the visible compressed entries kc, vc [B, Hkv, Sc, D]
    of S tokens. A query that sees no entry yet gets output 0."""
    check_keys(q, kc, vc)
    impl = resolve_backend("nsa_compressed_attention", backend, q.device, needs_grad(q, kc, vc))
    if kc.shape[2] == 0:
        out = q * 0  # nothing compressed yet; stays in the autograd graph
    elif impl == "flex":
        out = compressed_attention_flex(q, kc, vc, S, block_len, stride, scale)
    else:
        out = compressed_attention_reference(q, kc, vc, S, block_len, stride, scale)
    record("nsa_compressed_attention", impl)
    return out


def compressed_attention_reference(q, kc, vc, S: int, block_len: int, stride: int, scale: float):
    B, Hq, T, D = q.shape
    Sc = kc.shape[2]
    qg, kf, vf = upcast_grouped(q, kc, vc)
    outs = []
    step = _chunk_len(B * Hq * Sc, T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        ok = compressed_visible(query_positions(T, S, t0, t1, q.device), Sc, block_len, stride)
        s = torch.einsum("bhgtd,bhsd->bhgts", qg[:, :, :, t0:t1], kf) * scale
        p, _ = masked_softmax_lse(s, ok)
        outs.append(torch.einsum("bhgts,bhsd->bhgtd", p, vf))
    return torch.cat(outs, dim=3).reshape(B, Hq, T, D).to(q.dtype)


def range_block_mask(lo: torch.Tensor, hi: torch.Tensor, T: int, S: int, mask_mod, with_backward: bool,
                     tile: int = FLEX_TILE) -> BlockMask:
    """BlockMask where query tile i visits key tiles lo[i] <= j < hi[i] (all partial: mask_mod decides),
    built from per-tile ranges: [n_q_tiles, n_kv_tiles] block indices, never a T x S map."""
    n_kv = max(1, math.ceil(S / tile))
    counts = (hi - lo).clamp_min(0)
    # Full width n_kv (as flex.dense_causal_block_mask): flex infers the masked KV extent from it.
    ids = torch.clamp(lo[:, None] + torch.arange(n_kv, device=lo.device), 0, n_kv - 1)
    counts = counts.to(torch.int32).view(1, 1, -1).contiguous()
    ids = ids.to(torch.int32).view(1, 1, *ids.shape).contiguous()
    mask = BlockMask.from_kv_blocks(counts, ids, BLOCK_SIZE=(tile, tile), mask_mod=mask_mod,
                                    seq_lengths=(T, S), compute_q_blocks=False)
    if with_backward:
        mask.q_num_blocks, mask.q_indices = transpose_compact(counts, ids, n_kv)
    return mask


def tile_last_positions(T: int, S: int, device, tile: int = FLEX_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, last) absolute query position of each query tile."""
    tiles = torch.arange(math.ceil(T / tile), device=device)
    return S - T + tiles * tile, S - T + torch.clamp((tiles + 1) * tile, max=T) - 1


def compressed_attention_flex(q, kc, vc, S: int, block_len: int, stride: int, scale: float):
    T, Sc = q.shape[2], kc.shape[2]
    offset = S - T

    def compressed_causal(b, h, q_idx, kv_idx):
        return kv_idx * stride + block_len - 1 <= q_idx + offset

    _, last = tile_last_positions(T, S, q.device)
    n_visible = torch.where(last >= block_len - 1, (last - block_len + 1) // stride + 1, 0).clamp(max=Sc)
    hi = (n_visible + FLEX_TILE - 1) // FLEX_TILE
    mask = range_block_mask(torch.zeros_like(hi), hi, T, Sc, compressed_causal, needs_grad(q, kc, vc))
    return run_flex(q, kc, vc, mask, scale, False, enable_gqa=q.shape[1] != kc.shape[1])


# -- selection branch -----------------------------------------------------------------------------
@torch.no_grad()
def nsa_select(q, kc, *, S: int, block_len: int, stride: int, sel_block: int, topk: int,
               scale: float) -> torch.Tensor:
    """NSA block selection, int32 [B, Hkv, T, topk] in the sparsezoo selection format.

    Block j's importance is the sum of the compression-attention probabilities of the compressed
    entries that overlap it, summed over the G heads of a GQA group (the group shares the selection).
    Block 0 and the two local blocks (the query's own and the one before) are always kept; the rest
    are the best-scoring earlier blocks (ties to the smaller id). Chunked over queries.
    """
    check_keys(q, kc, kc)
    checks.check_positive_int("topk", topk)
    B, Hq, T, D = q.shape
    Hkv, Sc = kc.shape[1], kc.shape[2]
    G = Hq // Hkv
    n_blocks = math.ceil(S / sel_block)
    dt = _compute_dtype(q)
    qg, kf = q.to(dt).view(B, Hkv, G, T, D), kc.to(dt)
    out = torch.empty((B, Hkv, T, topk), dtype=torch.int32, device=q.device)
    step = _chunk_len(B * Hq * max(Sc, n_blocks), T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        pos = query_positions(T, S, t0, t1, q.device)
        imp = q.new_zeros((B, Hkv, t1 - t0, n_blocks), dtype=dt)
        if Sc:
            ok = compressed_visible(pos, Sc, block_len, stride)
            s = torch.einsum("bhgtd,bhsd->bhgts", qg[:, :, :, t0:t1], kf) * scale
            p = masked_softmax_lse(s, ok)[0].sum(2)  # [B, Hkv, Tc, Sc], summed over the group
            imp = add_overlaps(imp, p, block_len, stride, sel_block)
        out[:, :, t0:t1] = select_with_forced_blocks(imp, pos, sel_block, topk)
    record("nsa_select", "reference")
    return out


def add_overlaps(imp: torch.Tensor, p: torch.Tensor, block_len: int, stride: int, sel_block: int) -> torch.Tensor:
    """imp[..., j] += sum of p[..., i] over compressed entries i overlapping selection block j."""
    n_blocks, Sc = imp.shape[-1], p.shape[-1]
    start = torch.arange(Sc, device=p.device) * stride
    first = start // sel_block
    last = (start + block_len - 1) // sel_block
    for o in range(int((last - first).max().item()) + 1):
        j = first + o
        keep = (j <= last) & (j < n_blocks)
        imp = imp.index_add(-1, j[keep], p[..., keep])
    return imp


def select_with_forced_blocks(imp: torch.Tensor, pos: torch.Tensor, sel_block: int, topk: int) -> torch.Tensor:
    """imp [..., Tc, n_blocks] -> int32 [..., Tc, topk]: forced blocks first, then by score; -1 pad."""
    n_blocks = imp.shape[-1]
    local = pos // sel_block
    ids = torch.arange(n_blocks, device=imp.device)[None, :]
    forced = (ids == 0) | (ids == local[:, None]) | (ids == local[:, None] - 1)
    imp = imp.masked_fill(forced, float("inf")).masked_fill(ids > local[:, None], float("-inf"))
    n = min(topk, n_blocks)
    order = torch.sort(imp, dim=-1, descending=True, stable=True).indices[..., :n]
    n_valid = torch.clamp(local + 1, max=topk)
    keep = torch.arange(n, device=imp.device)[None, :] < n_valid[:, None]
    out = torch.full((*imp.shape[:-1], topk), -1, dtype=torch.int32, device=imp.device)
    out[..., :n] = torch.where(keep, order, -1).to(torch.int32)
    return out


# -- sliding-window branch ------------------------------------------------------------------------
def window_attention(q, k, v, *, window: int, scale: float, backend: str = "auto") -> torch.Tensor:
    """Causal attention of q over the last `window` keys (positions p - window + 1 .. p)."""
    checks.check_qkv(q, k, v)
    checks.check_positive_int("window", window)
    impl = resolve_backend("window_attention", backend, q.device, needs_grad(q, k, v))
    if impl == "flex":
        out = window_attention_flex(q, k, v, window, scale)
    else:
        out = window_attention_reference(q, k, v, window, scale)
    record("window_attention", impl)
    return out


def window_attention_reference(q, k, v, window: int, scale: float):
    B, Hq, T, D = q.shape
    S = k.shape[2]
    qg, kf, vf = upcast_grouped(q, k, v)
    outs = []
    step = max(1, min(T, _chunk_len(B * Hq * window, T), 4096))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        pos = query_positions(T, S, t0, t1, q.device)
        lo = max(0, int(pos[0]) - window + 1)
        hi = int(pos[-1]) + 1
        keys = torch.arange(lo, hi, device=q.device)
        ok = (keys[None, :] <= pos[:, None]) & (keys[None, :] > pos[:, None] - window)
        s = torch.einsum("bhgtd,bhsd->bhgts", qg[:, :, :, t0:t1], kf[:, :, lo:hi]) * scale
        p, _ = masked_softmax_lse(s, ok)
        outs.append(torch.einsum("bhgts,bhsd->bhgtd", p, vf[:, :, lo:hi]))
    return torch.cat(outs, dim=3).reshape(B, Hq, T, D).to(q.dtype)


def window_mask_mod(window: int, offset: int):
    """attn-gym's sliding window (lookback window - 1, causal), aligned bottom-right."""
    from attn_gym.masks import generate_sliding_window

    inner = generate_sliding_window(window - 1)

    def window_bottom_right(b, h, q_idx, kv_idx):
        return inner(b, h, q_idx + offset, kv_idx)

    return window_bottom_right


def window_attention_flex(q, k, v, window: int, scale: float):
    T, S = q.shape[2], k.shape[2]
    first, last = tile_last_positions(T, S, q.device)
    lo = torch.clamp(first - window + 1, min=0) // FLEX_TILE
    hi = last // FLEX_TILE + 1
    mask = range_block_mask(lo, hi, T, S, window_mask_mod(window, S - T), needs_grad(q, k, v))
    return run_flex(q, k, v, mask, scale, False, enable_gqa=q.shape[1] != k.shape[1])
