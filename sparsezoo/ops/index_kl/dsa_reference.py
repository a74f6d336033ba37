"""Plain-PyTorch DSA/CSA indexer KL (the oracle): chunked over queries; each chunk is recomputed in the
backward (activation checkpointing), so autograd never holds more than one chunk's gathered keys."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..common import chunk_len, compute_dtype, expand_selection, gather_rows, masked_softmax_lse, query_positions
from ..indexer_topk.reference import gathered_index_logits


def supports(req) -> str | None:
    return None


def teacher_scores(qh: torch.Tensor, k_rows: torch.Tensor, Hs: int) -> torch.Tensor:
    """qh [B, Hs, Gs, Tc, D] (query heads grouped by selection head), k_rows [B, Hkv, Tc, K, D] ->
    scores [B, Hs, Gs, Tc, K], each query head against its own KV head's rows."""
    B, _, Gs, Tc, D = qh.shape
    Hkv = k_rows.shape[1]
    if Hs == Hkv:
        return torch.einsum("bhgtd,bhtkd->bhgtk", qh, k_rows)
    G = Gs // Hkv  # Hs == 1: the Hq heads are Hkv groups of G
    s = torch.einsum("bhgtd,bhtkd->bhgtk", qh.view(B, Hkv, G, Tc, D), k_rows)
    return s.reshape(B, 1, Gs, Tc, -1)


def _chunk_kl(qi, wf, ki, qh, kf, tok, ok, scale: float, z_scale: float):
    """Sum over one query chunk of KL(teacher || student) over the key set (tok where ok)."""
    Hs, Hkv = qi.shape[1], kf.shape[1]
    with torch.no_grad():
        k_rows = gather_rows(kf, expand_selection(tok, Hkv))  # [B, Hkv, Tc, K, D]
        s = teacher_scores(qh, k_rows, Hs) * scale
        p = masked_softmax_lse(s, ok[:, :, None])[0].sum(2)
        teacher = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    z = gathered_index_logits(qi, wf, gather_rows(ki, tok), z_scale)
    log_q = torch.log_softmax(z.masked_fill(~ok, float("-inf")), dim=-1)
    log_q = torch.where(ok, log_q, torch.zeros_like(log_q))
    return (torch.xlogy(teacher, teacher) - teacher * log_q).sum()


def index_kl_reference(q, k, q_i, w, k_i, key_end, idx, S: int, scale: float, index_scale: float,
                       coeff: float = 1.0, temperature: float = 1.0):
    B, Hq, T, D = q.shape
    N = k.shape[2]
    Hs, J = q_i.shape[1], q_i.shape[3]
    dt = compute_dtype(q_i)
    qh = q.detach().to(dt).view(B, Hs, Hq // Hs, T, D)
    kf = k.detach().to(dt)
    qi, wf, ki = q_i.to(dt), w.to(dt), k_i.to(dt)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qi, wf, ki))
    K = N if idx is None else idx.shape[-1]
    total = qi.new_zeros(())
    step = chunk_len(B * Hq * K * max(D, J), T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        pos = query_positions(T, S, t0, t1, q.device)
        if idx is None:
            tok = torch.arange(N, device=q.device).expand(B, Hs, t1 - t0, N)
            ok = (key_end[None, :] <= pos[:, None]).expand(B, Hs, t1 - t0, N)
        else:
            sel = idx[:, :, t0:t1].long()
            tok, ok = sel.clamp_min(0), sel >= 0
        args = (qi[:, :, t0:t1], wf[:, :, t0:t1], ki, qh[:, :, :, t0:t1], kf, tok, ok, scale,
                index_scale / temperature)
        total = total + (checkpoint(_chunk_kl, *args, use_reentrant=False) if grad else _chunk_kl(*args))
    return coeff * total / (B * Hs * T)


run = index_kl_reference
