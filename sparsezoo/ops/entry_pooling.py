"""Compressed entries for CSA (DeepSeek-V4 compressed sparse attention): windowed token pooling, and
the per-query key list "sliding window of raw tokens + selected compressed entries" that
gather_attention reads. Layout helpers, no backends.

Compressed entry i (ratio m, pooling width W = m, or 2m with overlapping windows) pools tokens
[(i+1)m - W, (i+1)m) and ends at position (i+1)m - 1: a query at p sees it when (i+1)m - 1 <= p.
Only complete entries exist: Sc = S // m.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import compute_dtype


def n_entries(S: int, ratio: int) -> int:
    return S // ratio


def entry_ends(n: int, ratio: int, device) -> torch.Tensor:
    return (torch.arange(n, device=device) + 1) * ratio - 1


def pool_windows(x: torch.Tensor, logits: torch.Tensor, bias: torch.Tensor, ratio: int) -> torch.Tensor:
    """Softmax-weighted pooling. x [B, H, S, D], logits [B, H, S] (per-token gate), bias [W]
    (per slot in the window, W = len(bias) >= ratio) -> [B, H, S // ratio, D]. Window slots before
    token 0 are excluded from the softmax."""
    B, H, S, D = x.shape
    W = bias.shape[0]
    n = n_entries(S, ratio)
    if n == 0:
        return x.new_zeros(B, H, 0, D)
    left = W - ratio
    used = n * ratio
    xw = F.pad(x[:, :, :used], (0, 0, left, 0)).unfold(2, W, ratio)  # [B, H, n, D, W]
    lw = F.pad(logits[:, :, :used], (left, 0), value=float("-inf")).unfold(2, W, ratio)  # [B, H, n, W]
    dt = compute_dtype(x)
    a = torch.softmax(lw.to(dt) + bias.to(dt), dim=-1).to(x.dtype)
    return torch.einsum("bhndw,bhnw->bhnd", xw, a)


def entry_ids(sel: torch.Tensor, S: int) -> torch.Tensor:
    """sel [B, Hs, T, k] (entry ids, -1 pad) -> int32 ids into the concatenation [raw tokens 0..S-1,
    compressed entries]: S + each entry id, -1 kept. gather_attention(..., window=w) adds the raw window."""
    if S + sel.shape[-1] > torch.iinfo(torch.int32).max:
        raise ValueError(f"{S} tokens + entries do not fit int32 ids")
    sel32 = sel if sel.dtype == torch.int32 else sel.clamp(-1, torch.iinfo(torch.int32).max - S).to(torch.int32)
    return torch.where(sel32 >= 0, sel32 + S, -1)
