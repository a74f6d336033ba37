"""Compressed entries for CSA (DeepSeek-V4 compressed sparse attention): windowed token pooling, and
the per-query key list "sliding window of raw tokens + selected compressed entries" that
gather_attention reads. Layout helpers, no backends.

Compressed entry i (ratio m, pooling width W = m, or 2m with overlapping windows) pools tokens
[(i+1)m - W, (i+1)m) and ends at position (i+1)m - 1: a query at p sees it when (i+1)m - 1 <= p.
Only complete entries exist: Sc = S // m.

Two poolings:
- `pool_channels` (V4's compressor): a softmax per channel over the window's slots of per-token gate
  scores plus a learned per-slot, per-channel bias (`ape`); with overlap the previous block's tokens
  enter through the first half of the per-token channels, the entry's own block through the second.
- `pool_windows` (the simpler gate): a softmax over the window's slots of one scalar logit per token
  (and head) plus a learned per-slot bias, shared by every channel.
Both take their softmax in fp64 for fp64 inputs, else in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import compute_dtype


def n_entries(S: int, ratio: int) -> int:
    return S // ratio


def entry_ends(n: int, ratio: int, device) -> torch.Tensor:
    return (torch.arange(n, device=device) + 1) * ratio - 1


def entry_starts(n: int, ratio: int, device) -> torch.Tensor:
    """The first token of each entry's own block (i*m): V4 rotates entry i to this position."""
    return torch.arange(n, device=device) * ratio


def _before_token0(n: int, width: int, ratio: int, device) -> torch.Tensor:
    """[n, width] bool: slot w of entry i's window (tokens (i+1)*ratio - width .. (i+1)*ratio - 1) lies
    before token 0."""
    first = (torch.arange(n, device=device) + 1) * ratio - width
    return (first[:, None] + torch.arange(width, device=device)) < 0


def pool_channels(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, ratio: int, overlap: bool) -> torch.Tensor:
    """V4's gated pooling. kv, score [B, H, S, C * D] per-token values and gate scores (C = 2 with
    overlap, else 1), ape [ratio, C * D] or [H, ratio, C * D] -> entries [B, H, S // ratio, D]:

        entry_i[d] = sum_slots softmax_slots(score + ape)[d] * kv[d]

    over the slots of block i (channels D: with overlap, C * D = 2D and block i uses channels D..2D-1)
    and, with overlap, the slots of block i - 1 (channels 0..D-1; none before token 0)."""
    B, H, S, CD = kv.shape
    C = 2 if overlap else 1
    if tuple(ape.shape[-2:]) != (ratio, CD) or ape.dim() not in (2, 3) or (ape.dim() == 3 and ape.shape[0] != H) \
            or CD % C:
        raise ValueError(f"ape must be [ratio={ratio}, C*D={CD}] or [H={H}, ratio, C*D] (C={C}), got {tuple(ape.shape)}")
    if ape.dim() == 3:
        ape = ape[:, None]  # [H, 1, ratio, C*D] against [B, H, n, ratio, C*D]
    D = CD // C
    n = n_entries(S, ratio)
    if n == 0:
        return kv.new_zeros(B, H, 0, D)
    dt = compute_dtype(kv)
    kb = kv[:, :, :n * ratio].unflatten(2, (n, ratio))  # [B, H, n, m, C*D]
    sb = score[:, :, :n * ratio].unflatten(2, (n, ratio)).to(dt) + ape.to(dt)
    if overlap:  # slots: block i-1 through channels [:D], then block i through channels [D:]
        prev_k = F.pad(kb[:, :, :-1, :, :D], (0, 0, 0, 0, 1, 0))
        prev_s = F.pad(sb[:, :, :-1, :, :D], (0, 0, 0, 0, 1, 0))
        kb = torch.cat([prev_k, kb[..., D:]], dim=3)
        sb = torch.cat([prev_s, sb[..., D:]], dim=3)
        sb = sb.masked_fill(_before_token0(n, 2 * ratio, ratio, sb.device)[..., None], float("-inf"))
    a = torch.softmax(sb, dim=3)
    return (kb.to(dt) * a).sum(3).to(kv.dtype)


def pool_windows(x: torch.Tensor, logits: torch.Tensor, bias: torch.Tensor, ratio: int) -> torch.Tensor:
    """Softmax-weighted pooling. x [B, H, S, D], logits [B, H, S] (per-token gate), bias [W]
    (per slot in the window, W = C * ratio: the entry's own block and the C - 1 blocks before it)
    -> [B, H, S // ratio, D]. Window slots before token 0 are excluded from the softmax."""
    B, H, S, D = x.shape
    W = bias.shape[0]
    if W < ratio or W % ratio:
        raise ValueError(f"bias must have a multiple of ratio={ratio} slots, got {W}")
    n = n_entries(S, ratio)
    if n == 0:
        return x.new_zeros(B, H, 0, D)
    xb = x[:, :, : n * ratio].unflatten(2, (n, ratio))  # [B, H, n, m, D]
    lb = logits[:, :, : n * ratio].unflatten(2, (n, ratio))  # [B, H, n, m]
    # entry i's slots: blocks i - C + 1 .. i, earliest first; blocks before token 0 are zero padding, masked
    # out of the softmax by position (a pad with -inf fused into a gathered input's index arithmetic
    # generates Triton code that Inductor cannot compile under CUDA graphs)
    back = [min(c, n) for c in range(W // ratio - 1, 0, -1)]
    xw = torch.cat([F.pad(xb[:, :, : n - c], (0, 0, 0, 0, c, 0)) for c in back] + [xb], dim=3)
    lw = torch.cat([F.pad(lb[:, :, : n - c], (0, 0, c, 0)) for c in back] + [lb], dim=3)
    lw = lw.masked_fill(_before_token0(n, W, ratio, lw.device), float("-inf"))
    dt = compute_dtype(x)
    a = torch.softmax(lw.to(dt) + bias.to(dt), dim=-1).to(x.dtype)
    return torch.einsum("bhnwd,bhnw->bhnd", xw, a)


def entry_ids(sel: torch.Tensor, S: int) -> torch.Tensor:
    """sel [B, Hs, T, k] (entry ids, -1 pad) -> int32 ids into the concatenation [raw tokens 0..S-1,
    compressed entries]: S + each entry id, -1 kept. gather_attention(..., window=w) adds the raw window."""
    if S + sel.shape[-1] > torch.iinfo(torch.int32).max:
        raise ValueError(f"{S} tokens + entries do not fit int32 ids")
    sel32 = sel if sel.dtype == torch.int32 else sel.clamp(-1, torch.iinfo(torch.int32).max - S).to(torch.int32)
    return torch.where(sel32 >= 0, sel32 + S, -1)
