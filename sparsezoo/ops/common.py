"""Helpers shared by the plain-PyTorch references (the oracle for every fast path).

References run anywhere torch runs, support autograd and fp64, and work in query chunks so memory
stays bounded by `chunk x S` (selection) or `chunk x k x block` (attention), never T x S at once.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from .nonfinite import clean_qkv, poison_rows

# Elements of one chunk's largest intermediate; bounds reference memory (~256 MB in fp32).
CHUNK_ELEMENTS = 1 << 26


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def upcast_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q [B, Hq, T, D] -> [B, Hkv, G, T, D], with q, k, v in the compute dtype (fp64 stays fp64)."""
    dt = compute_dtype(q)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    return q.to(dt).view(B, Hkv, Hq // Hkv, T, D), k.to(dt), v.to(dt)


def clean_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """upcast_grouped with the non-finite rows zeroed (docs/ops.md, non-finite values): (qg, kf, vf,
    q_bad [B, Hkv, G, T], kv_bad [B, Hkv, S]). A chunk poisons its rows with seen_bad."""
    qg, kf, vf = upcast_grouped(q, k, v)
    qg, kf, vf, q_bad, kv_bad = clean_qkv(qg, kf, vf)
    return qg, kf, vf, q_bad, kv_bad


def seen_bad(out, lse, q_bad, ok, kv_bad):
    """Poison the rows of one chunk that saw a non-finite value: out [B, H, G, Tc, D], lse [B, H, G, Tc],
    q_bad [B, H, G, Tc], ok (which keys each row attends to) and kv_bad (which keys are bad), both
    broadcastable to [B, H, Tc, N]. Returns (out, lse)."""
    bad = q_bad | (ok & kv_bad).any(-1)[:, :, None]
    return poison_rows(out, bad), poison_rows(lse, bad)


def gather_flags(flags: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """flags [B, H, S], tok [B, H, Tc, N] -> [B, H, Tc, N]."""
    B, H, Tc, N = tok.shape
    return torch.gather(flags, 2, tok.reshape(B, H, Tc * N)).view(B, H, Tc, N)


def chunk_len(per_query: int, total: int) -> int:
    return max(1, min(total, CHUNK_ELEMENTS // max(per_query, 1)))


def query_positions(T: int, S: int, start: int, end: int, device) -> torch.Tensor:
    """Absolute positions of queries start..end-1 when queries are the last T of S tokens."""
    return torch.arange(S - T + start, S - T + end, device=device)


def nan_first(scores: torch.Tensor, rank: float = float("inf")) -> torch.Tensor:
    """A NaN score ranks as `rank` (+inf: first, ties to the smaller id); docs/ops.md, non-finite values."""
    return torch.where(torch.isnan(scores), torch.full((), rank, dtype=scores.dtype, device=scores.device), scores)


def select_from_block_scores(b: torch.Tensor, pos: torch.Tensor, block_size: int, topk: int) -> torch.Tensor:
    """MSA's selection rule (docs/msa.md), also MoBA's: best k-1 blocks before the local one (ties to the smaller id), then the
    local block, then -1 padding; a NaN score ranks first. b is [..., Tc, n_blocks]; returns int32 [..., Tc, topk]."""
    n_blocks = b.shape[-1]
    local = pos // block_size  # [Tc]
    candidate = torch.arange(n_blocks, device=b.device)[None, :] < local[:, None]
    b = b.masked_fill(~candidate, float("-inf"))
    n_rank = min(topk - 1, n_blocks)
    # A stable descending sort keeps equal scores in ascending id order: ties go to the smaller id.
    order = torch.sort(nan_first(b), dim=-1, descending=True, stable=True).indices[..., :n_rank]
    n_valid = local.clamp(max=topk - 1)  # [Tc]
    out = torch.full((*b.shape[:-1], topk), -1, dtype=torch.int64, device=b.device)
    keep = torch.arange(n_rank, device=b.device)[None, :] < n_valid[:, None]
    out[..., :n_rank] = torch.where(keep, order, -1)
    local_at = n_valid.view(*([1] * (b.dim() - 2)), -1, 1).expand(*b.shape[:-1], 1)
    out.scatter_(-1, local_at, local.view(*([1] * (b.dim() - 2)), -1, 1).expand(*b.shape[:-1], 1))
    return out.to(torch.int32)


def gather_selected_tokens(block_idx: torch.Tensor, pos: torch.Tensor, block_size: int, S: int):
    """Token ids [..., Tc, k*block] of the selected blocks, and which of them a query may see."""
    idx = block_idx.long()
    tok = idx.clamp_min(0)[..., None] * block_size + torch.arange(block_size, device=idx.device)
    ok = (idx >= 0)[..., None] & (tok <= pos.view(-1, 1, 1)) & (tok < S)
    return tok.clamp(max=S - 1).flatten(-2), ok.flatten(-2)


def gather_rows(x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D] (or [B, S, D] broadcast over H), tok [B, H, Tc, N] -> [B, H, Tc, N, D]."""
    B, H, Tc, N = tok.shape
    if x.dim() == 3:
        x = x[:, None].expand(B, H, *x.shape[1:])
    flat = tok.reshape(B, H, Tc * N, 1).expand(B, H, Tc * N, x.shape[-1])
    return torch.gather(x, 2, flat).view(B, H, Tc, N, x.shape[-1])


def masked_softmax_lse(s: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim restricted to `ok`; empty rows give p = 0 and lse = -inf."""
    s = s.masked_fill(~ok, float("-inf"))
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    p = e / denom.clamp_min(torch.finfo(s.dtype).tiny)
    return p, (torch.log(denom) + m).squeeze(-1)


def full_selection(T: int, S: int, block_size: int, batch: int, heads: int, device) -> torch.Tensor:
    """The selection that keeps every visible block (blocks 0..L(t)), in the standard format."""
    n_blocks = math.ceil(S / block_size)
    local = query_positions(T, S, 0, T, device) // block_size
    ids = torch.arange(n_blocks, device=device)
    sel = torch.where(ids[None, :] <= local[:, None], ids[None, :], -1).to(torch.int32)
    return sel.view(1, 1, T, n_blocks).expand(batch, heads, T, n_blocks)


def expand_selection(idx: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """[B, Hs, T, k] with Hs in (1, Hkv) -> [B, Hkv, T, k]."""
    if idx.shape[1] not in (1, n_kv_heads):
        raise ValueError(f"selection heads must be 1 or Hkv={n_kv_heads}, got {idx.shape[1]}")
    return idx.expand(idx.shape[0], n_kv_heads, *idx.shape[2:])



def run_chunk(fn, *args):
    """fn(*args) for one query chunk; under autograd the chunk is recomputed in the backward
    (activation checkpointing), so a reference never holds more than one chunk's intermediates."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def join_chunks(parts: list, q: torch.Tensor, return_lse: bool):
    """Per-chunk (out [B, Hkv, G, Tc, D], lse [B, Hkv, G, Tc]) pairs -> out [B, Hq, T, D] in q's dtype
    (and the LSE [B, Hq, T] when return_lse)."""
    B, Hq, T, D = q.shape
    out = torch.cat([o for o, _ in parts], dim=3).reshape(B, Hq, T, D).to(q.dtype)
    if return_lse:
        return out, torch.cat([lse for _, lse in parts], dim=3).reshape(B, Hq, T)
    return out

