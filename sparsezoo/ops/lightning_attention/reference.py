"""Plain-PyTorch lightning attention in chunks (fp64 capable, autograd).

Within a chunk of L tokens, token i reads token j <= i with weight exp(g (i - j)) and the state from before
the chunk with exp(g (i + 1)); the state after the chunk keeps token j with exp(g (L - 1 - j)). Every
exponent is <= 0, so nothing overflows. Memory: O(T x CHUNK) scores, one [K, V] state per head.
"""

from __future__ import annotations

import torch

CHUNK = 64


def supports(req) -> str | None:
    return None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lightning_attention_reference(
    q, k, v, log_decay, scale: float, initial_state=None, output_final_state: bool = False
):
    B, H, T, K = q.shape
    dtype, ct = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(ct) * scale, k.to(ct), v.to(ct)
    g = log_decay.to(ct)
    state = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(ct)
    outs = []
    for t0 in range(0, T, CHUNK):
        L = min(CHUNK, T - t0)
        qc, kc, vc = q[:, :, t0 : t0 + L], k[:, :, t0 : t0 + L], v[:, :, t0 : t0 + L]
        pos = torch.arange(L, device=q.device, dtype=ct)
        gap = pos[:, None] - pos[None, :]  # i - j
        weight = torch.exp(g[:, None, None] * gap.clamp(min=0))  # [H, L, L]
        scores = torch.where(gap >= 0, (qc @ kc.transpose(-1, -2)) * weight, 0.0)
        read_state = qc * torch.exp(g[:, None] * (pos + 1))[..., None]
        outs.append(scores @ vc + read_state @ state)
        keep = kc * torch.exp(g[:, None] * (L - 1 - pos))[..., None]
        state = state * torch.exp(g * L)[:, None, None] + keep.transpose(-1, -2) @ vc
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.to(dtype), (state if output_final_state else None)


run = lightning_attention_reference
