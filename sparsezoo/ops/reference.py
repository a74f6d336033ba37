"""Plain-PyTorch references: the oracle for every fast path.

They run anywhere torch runs, support autograd and fp64, and work in query chunks so memory stays
bounded by `chunk x S` (selection) or `chunk x k x block` (attention), never T x S at once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Elements of one chunk's largest intermediate; bounds reference memory (~256 MB in fp32).
_CHUNK_ELEMENTS = 1 << 26


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def upcast_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q [B, Hq, T, D] -> [B, Hkv, G, T, D], with q, k, v in the compute dtype (fp64 stays fp64)."""
    dt = _compute_dtype(q)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    return q.to(dt).view(B, Hkv, Hq // Hkv, T, D), k.to(dt), v.to(dt)


def _chunk_len(per_query: int, total: int) -> int:
    return max(1, min(total, _CHUNK_ELEMENTS // max(per_query, 1)))


def query_positions(T: int, S: int, start: int, end: int, device) -> torch.Tensor:
    """Absolute positions of queries start..end-1 when queries are the last T of S tokens."""
    return torch.arange(S - T + start, S - T + end, device=device)


def block_scores(q_idx: torch.Tensor, k_idx: torch.Tensor, pos: torch.Tensor, block_size: int,
                 scale: float) -> torch.Tensor:
    """Max-pooled index scores b[B, H, Tc, n_blocks]; invisible or padding tokens count as -inf."""
    S = k_idx.shape[1]
    n_blocks = math.ceil(S / block_size)
    z = torch.einsum("bhtd,bsd->bhts", q_idx, k_idx) * scale
    visible = torch.arange(S, device=z.device)[None, :] <= pos[:, None]
    z = z.masked_fill(~visible, float("-inf"))
    z = F.pad(z, (0, n_blocks * block_size - S), value=float("-inf"))
    return z.view(*z.shape[:-1], n_blocks, block_size).amax(-1)


def select_from_block_scores(b: torch.Tensor, pos: torch.Tensor, block_size: int, topk: int) -> torch.Tensor:
    """msa_spec selection: best k-1 blocks before the local one (ties to the smaller id), then the
    local block, then -1 padding. b is [..., Tc, n_blocks]; returns int32 [..., Tc, topk]."""
    n_blocks = b.shape[-1]
    local = pos // block_size  # [Tc]
    candidate = torch.arange(n_blocks, device=b.device)[None, :] < local[:, None]
    b = b.masked_fill(~candidate, float("-inf"))
    n_rank = min(topk - 1, n_blocks)
    # A stable descending sort keeps equal scores in ascending id order: ties go to the smaller id.
    order = torch.sort(b, dim=-1, descending=True, stable=True).indices[..., :n_rank]
    n_valid = local.clamp(max=topk - 1)  # [Tc]
    out = torch.full((*b.shape[:-1], topk), -1, dtype=torch.int64, device=b.device)
    keep = torch.arange(n_rank, device=b.device)[None, :] < n_valid[:, None]
    out[..., :n_rank] = torch.where(keep, order, -1)
    local_at = n_valid.view(*([1] * (b.dim() - 2)), -1, 1).expand(*b.shape[:-1], 1)
    out.scatter_(-1, local_at, local.view(*([1] * (b.dim() - 2)), -1, 1).expand(*b.shape[:-1], 1))
    return out.to(torch.int32)


def msa_select_reference(q_idx: torch.Tensor, k_idx: torch.Tensor, block_size: int, topk: int,
                         scale: float) -> torch.Tensor:
    """q_idx [B, H_i, T, D_i], k_idx [B, S, D_i] -> int32 [B, H_i, T, topk]."""
    B, H, T, _ = q_idx.shape
    S = k_idx.shape[1]
    dt = _compute_dtype(q_idx)
    kf = k_idx.to(dt)
    out = torch.empty((B, H, T, topk), dtype=torch.int32, device=q_idx.device)
    step = _chunk_len(B * H * S, T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        pos = query_positions(T, S, t0, t1, q_idx.device)
        b = block_scores(q_idx[:, :, t0:t1].to(dt), kf, pos, block_size, scale)
        out[:, :, t0:t1] = select_from_block_scores(b, pos, block_size, topk)
    return out


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


def block_sparse_attention_reference(q, k, v, block_idx, block_size: int, scale: float,
                                     return_lse: bool = False):
    """Exact softmax attention of q [B, Hq, T, D] over the selected blocks of k, v [B, Hkv, S, D]."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    K = block_idx.shape[-1]
    qg, kf, vf = upcast_grouped(q, k, v)
    outs, lses = [], []
    step = _chunk_len(B * Hkv * K * block_size * max(D, G), T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        pos = query_positions(T, S, t0, t1, q.device)
        tok, ok = gather_selected_tokens(block_idx[:, :, t0:t1], pos, block_size, S)
        s = torch.einsum("bhgtd,bhtnd->bhgtn", qg[:, :, :, t0:t1], gather_rows(kf, tok)) * scale
        p, lse = masked_softmax_lse(s, ok[:, :, None])
        outs.append(torch.einsum("bhgtn,bhtnd->bhgtd", p, gather_rows(vf, tok)))
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(B, Hq, T, D).to(q.dtype)
    if return_lse:
        return out, torch.cat(lses, dim=3).reshape(B, Hq, T)
    return out


def full_selection(T: int, S: int, block_size: int, batch: int, heads: int, device) -> torch.Tensor:
    """The selection that keeps every visible block (blocks 0..L(t)), in the standard format."""
    n_blocks = math.ceil(S / block_size)
    local = query_positions(T, S, 0, T, device) // block_size
    ids = torch.arange(n_blocks, device=device)
    sel = torch.where(ids[None, :] <= local[:, None], ids[None, :], -1).to(torch.int32)
    return sel.view(1, 1, T, n_blocks).expand(batch, heads, T, n_blocks)


def dense_attention_reference(q, k, v, scale: float, return_lse: bool = False):
    """Causal GQA softmax attention (queries are the last T of S), in query chunks."""
    B, Hq, T, D = q.shape
    S = k.shape[2]
    qg, kf, vf = upcast_grouped(q, k, v)
    outs, lses = [], []
    step = _chunk_len(B * Hq * S, T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        pos = query_positions(T, S, t0, t1, q.device)
        s = torch.einsum("bhgtd,bhsd->bhgts", qg[:, :, :, t0:t1], kf) * scale
        ok = torch.arange(S, device=q.device)[None, :] <= pos[:, None]
        p, lse = masked_softmax_lse(s, ok)
        outs.append(torch.einsum("bhgts,bhsd->bhgtd", p, vf))
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(B, Hq, T, D).to(q.dtype)
    if return_lse:
        return out, torch.cat(lses, dim=3).reshape(B, Hq, T)
    return out


def msa_index_kl_reference(q, k, q_idx, k_idx, block_idx, block_size: int, scale: float,
                           index_scale: float, coeff: float = 1.0, temperature: float = 1.0):
    """Sparse KL of msa_spec: coeff * mean over (b, g, t) of KL(P || Q) over the selected tokens M.

    P (teacher) is the group-mean main attention over M, detached. Q (student) is the softmax over
    M of the index logits z / temperature. Pass block_idx=None for the dense warm-up (M = all
    visible tokens). Only q_idx and k_idx receive gradients.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if block_idx is None:
        block_idx = full_selection(T, S, block_size, B, Hkv, q.device)
    K = block_idx.shape[-1]
    dt = _compute_dtype(q_idx)
    qg = q.detach().to(dt).view(B, Hkv, G, T, D)
    kf = k.detach().to(dt)
    qi, ki = q_idx.to(dt), k_idx.to(dt)
    total = qi.new_zeros(())
    step = _chunk_len(B * Hkv * K * block_size * max(D, G), T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        pos = query_positions(T, S, t0, t1, q.device)
        tok, ok = gather_selected_tokens(block_idx[:, :, t0:t1], pos, block_size, S)
        with torch.no_grad():
            s = torch.einsum("bhgtd,bhtnd->bhgtn", qg[:, :, :, t0:t1], gather_rows(kf, tok)) * scale
            teacher = masked_softmax_lse(s, ok[:, :, None])[0].mean(2)
        z = torch.einsum("bhtd,bhtnd->bhtn", qi[:, :, t0:t1], gather_rows(ki, tok)) * (index_scale / temperature)
        log_q = torch.log_softmax(z.masked_fill(~ok, float("-inf")), dim=-1)
        log_q = torch.where(ok, log_q, torch.zeros_like(log_q))
        total = total + (torch.xlogy(teacher, teacher) - teacher * log_q).sum()
    return coeff * total / (B * Hkv * T)
