"""Non-finite values (NaN, +-inf) in q, k, v: the rule every attention backend follows (docs/ops.md).

A non-finite value reaches exactly the output rows that attend to it. Output row (b, h, t) (all of it,
and its LSE) is NaN iff q[b, h, t] holds a non-finite value or a key the row attends to (causal, inside
its selection / window / visible compressed entries) holds one in k or v. Every other row is what it
would be with those values replaced by finite ones.

How: the non-finite rows of q, k and v are zeroed with torch.where before any product (so 0 * NaN
never happens and autograd sees no NaN), the attention runs on the clean tensors, and the rows that saw
a bad row are set to NaN with torch.where (so they carry no gradient). The references find those rows
from the visibility masks they build anyway; the fast paths that cannot be changed inside (SDPA,
FlexAttention) use the O(S) summaries below: a cumulative count of bad key rows per (batch, kv head),
read at each query's key range, or gathered at its selected blocks / ids. No T x S tensor, no host sync.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .dispatch import compiling, kernel_built

NAN = float("nan")
# CUDA tensors [B, H, T, D] go through sparsezoo.kernels.nonfinite (one read for the flags; NaN written to
# the bad rows only), where Triton is installed and torch.compile is not tracing the call
_DEVICE_KERNELS = importlib.util.find_spec("triton") is not None and kernel_built("nonfinite")


def _on_device(x: torch.Tensor) -> bool:
    return _DEVICE_KERNELS and x.is_cuda and x.dim() == 4 and not compiling()


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """bool [...]: row x[..., :] holds a NaN or an infinity (one read of x: the max |x| propagates NaN)."""
    if x.shape[-1] == 0:
        return torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
    if _on_device(x):
        from sparsezoo.kernels import nonfinite

        return nonfinite.row_flags(x.detach())
    return ~torch.isfinite(torch.linalg.vector_norm(x.detach(), float("inf"), dim=-1))


def zero_rows(x: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    return torch.where(bad[..., None], torch.zeros((), dtype=x.dtype, device=x.device), x)


def poison_rows(x: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """NaN where bad (bad has x's shape, or x's shape without the last dim)."""
    if bad.dim() < x.dim():
        bad = bad[..., None]
    return torch.where(bad, torch.full((), NAN, dtype=x.dtype, device=x.device), x)


def clean_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, zero_kv: bool = True, zero_q: bool = True):
    """(q, k, v with their non-finite rows zeroed, q_bad [B, Hq, T], kv_bad [B, Hkv, S]). zero_kv=False
    keeps k and v as they are (for callers where every key that is read is visible to every query that
    reads it, without gradients: the bad rows then only reach rows that are poisoned anyway). zero_q=False
    keeps q as it is (for calls without gradients: a query row reaches only its own output row, which is
    poisoned anyway; it saves a copy of q)."""
    q_bad = nonfinite_rows(q)
    kv_bad = nonfinite_rows(k) | nonfinite_rows(v)
    if zero_kv:
        k, v = zero_rows(k, kv_bad), zero_rows(v, kv_bad)
    return zero_rows(q, q_bad) if zero_q else q, k, v, q_bad, kv_bad


def bad_prefix_counts(kv_bad: torch.Tensor) -> torch.Tensor:
    """[B, H, S] -> int32 [B, H, S + 1]: bad rows among keys 0 .. s - 1 at index s."""
    return F.pad(torch.cumsum(kv_bad, dim=-1, dtype=torch.int32), (1, 0))


def bad_in_ranges(counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """counts [B, H, S + 1] (bad_prefix_counts), key ranges [lo, hi) [T] -> bool [B, H, T]: a bad key
    lies in the range."""
    S = counts.shape[-1] - 1
    hi = hi.clamp(0, S)
    lo = torch.minimum(lo.clamp(0, S), hi)
    return counts[..., hi] > counts[..., lo]


def rows_seeing_selected_blocks(kv_bad: torch.Tensor, block_idx: torch.Tensor, pos: torch.Tensor,
                                block_size: int) -> torch.Tensor:
    """kv_bad [B, Hkv, S], block_idx [B, Hs, T, k] (Hs a multiple of Hkv; -1 = none), pos [T] ->
    bool [B, Hs, T]: one of the row's selected blocks holds a bad key at or before its position
    (O(S) counts, read at 2 * T * k places)."""
    B, Hs, T, K = block_idx.shape
    Hkv, S = kv_bad.shape[1], kv_bad.shape[2]
    counts = bad_prefix_counts(kv_bad)
    idx = block_idx.long()
    lo = (idx.clamp_min(0) * block_size).clamp(max=S)
    hi = torch.maximum(torch.minimum(lo + block_size, (pos + 1).view(1, 1, T, 1)).clamp(max=S), lo)
    head = (torch.arange(Hs, device=idx.device) // (Hs // Hkv) * (S + 1)).view(1, Hs, 1, 1)
    at = lambda x: torch.gather(counts.reshape(B, Hkv * (S + 1)), 1, (head + x).reshape(B, Hs * T * K))
    return ((at(hi) > at(lo)).view(B, Hs, T, K) & (idx >= 0)).any(-1)


def rows_seeing_key_ranges(kv_bad: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    """Rows of queries that attend to the key ranges [lo, hi) [T] (causal: lo = 0, hi = pos + 1) ->
    bool [B, Hq, T]: the range holds a bad key."""
    return per_query_head(bad_in_ranges(bad_prefix_counts(kv_bad), lo, hi), n_q_heads)


def per_query_head(rows: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    """[B, H, T] flags of H key (or selection) heads -> [B, Hq, T] for the query heads they serve."""
    return rows.repeat_interleave(n_q_heads // rows.shape[1], dim=1)


def finish(out: torch.Tensor, bad_rows: torch.Tensor, *, lse: torch.Tensor | None = None):
    """Poison the output rows (and LSE entries) bad_rows [B, Hq, T] of an op's own output; returns out, or
    (out, lse). Outside autograd on a GPU the rows are set in place (only the bad rows are written)."""
    if _on_device(out) and not out.requires_grad:
        from sparsezoo.kernels import nonfinite

        out = nonfinite.poison_rows_(out, bad_rows)
    else:
        out = poison_rows(out, bad_rows)
    return out if lse is None else (out, poison_rows(lse, bad_rows))
