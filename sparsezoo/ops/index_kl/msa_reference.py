"""Plain-PyTorch MSA sparse KL (the oracle): chunked over queries; each chunk is recomputed in the
backward (activation checkpointing), so autograd never holds more than one chunk's gathered keys."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..common import (chunk_len, compute_dtype, full_selection, gather_rows, gather_selected_tokens,
                      masked_softmax_lse, query_positions)


def supports(req) -> str | None:
    return None


def _chunk_kl(qi, ki, qg, kf, sel, pos, block_size: int, S: int, scale: float, z_scale: float):
    """Sum over one query chunk of KL(teacher || student) over the selected tokens."""
    tok, ok = gather_selected_tokens(sel, pos, block_size, S)
    with torch.no_grad():
        s = torch.einsum("bhgtd,bhtnd->bhgtn", qg, gather_rows(kf, tok)) * scale
        teacher = masked_softmax_lse(s, ok[:, :, None])[0].mean(2)
    z = torch.einsum("bhtd,bhtnd->bhtn", qi, gather_rows(ki, tok)) * z_scale
    log_q = torch.log_softmax(z.masked_fill(~ok, float("-inf")), dim=-1)
    log_q = torch.where(ok, log_q, torch.zeros_like(log_q))
    return (torch.xlogy(teacher, teacher) - teacher * log_q).sum()


def msa_index_kl_reference(q, k, q_idx, k_idx, block_idx, block_size: int, scale: float, index_scale: float,
                           coeff: float = 1.0, temperature: float = 1.0, main_lse=None):
    """coeff * mean over (b, g, t) of KL(P || Q) over the selected tokens M. Pass block_idx=None for the
    dense warm-up (M = all visible tokens). Only q_idx and k_idx receive gradients; main_lse is unused."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if block_idx is None:
        block_idx = full_selection(T, S, block_size, B, Hkv, q.device)
    K = block_idx.shape[-1]
    dt = compute_dtype(q_idx)
    qg = q.detach().to(dt).view(B, Hkv, G, T, D)
    kf = k.detach().to(dt)
    qi, ki = q_idx.to(dt), k_idx.to(dt)
    grad = torch.is_grad_enabled() and (qi.requires_grad or ki.requires_grad)
    total = qi.new_zeros(())
    step = chunk_len(B * Hkv * K * block_size * max(D, G), T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        args = (qi[:, :, t0:t1], ki, qg[:, :, :, t0:t1], kf, block_idx[:, :, t0:t1],
                query_positions(T, S, t0, t1, q.device), block_size, S, scale, index_scale / temperature)
        total = total + (checkpoint(_chunk_kl, *args, use_reentrant=False) if grad else _chunk_kl(*args))
    return coeff * total / (B * Hkv * T)


run = msa_index_kl_reference
