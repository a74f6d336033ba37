"""Plain-PyTorch gated delta rule in chunks (fp64 capable, autograd), in the WY form of the DeltaNet papers.

Within a chunk of L tokens with cumulative log decays b_i (token i's own included, so every exp below
is of a number <= 0), the state before the chunk S0 and A = the strictly lower [L, L] matrix
beta_i (k_i . k_j) exp(b_i - b_j):
    (I + A) U = beta V,   (I + A) W = beta K exp(b)          (unit lower-triangular solves)
    V' = U - W S0                                            (what each token writes, the delta)
    o_i = exp(b_i) q_i S0 + sum_{j <= i} exp(b_i - b_j) (q_i . k_j) V'_j
    S = exp(b_L) S0 + sum_j exp(b_L - b_j) k_j V'_j^T
Memory: O(T x CHUNK) per head, one [K, V] state per value head.
"""

from __future__ import annotations

import torch

from ..lightning_attention.reference import compute_dtype

CHUNK = 64


def supports(req) -> str | None:
    return None


def gated_delta_rule_reference(q, k, v, g, beta, scale: float, initial_state=None, output_final_state: bool = False):
    B, Hk, T, K = q.shape
    H = v.shape[1]
    dtype, ct = q.dtype, compute_dtype(q.dtype)
    q = q.to(ct).repeat_interleave(H // Hk, dim=1) * scale
    k = k.to(ct).repeat_interleave(H // Hk, dim=1)
    v, g, beta = v.to(ct), g.to(ct), beta.to(ct)
    state = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(ct)
    outs = []
    for t0 in range(0, T, CHUNK):
        L = min(CHUNK, T - t0)
        qc, kc, vc = q[:, :, t0 : t0 + L], k[:, :, t0 : t0 + L], v[:, :, t0 : t0 + L]
        b = g[:, :, t0 : t0 + L].cumsum(-1)
        bc = beta[:, :, t0 : t0 + L, None]
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        decay = torch.exp(torch.where(causal, b[..., :, None] - b[..., None, :], float("-inf")))
        A = torch.where(causal.tril(-1), (bc * kc) @ kc.transpose(-1, -2) * decay, 0.0)
        u = torch.linalg.solve_triangular(A, bc * vc, upper=False, unitriangular=True)
        w = torch.linalg.solve_triangular(A, bc * kc * b.exp()[..., None], upper=False, unitriangular=True)
        delta = u - w @ state
        scores = torch.where(causal, qc @ kc.transpose(-1, -2) * decay, 0.0)
        outs.append((qc * b.exp()[..., None]) @ state + scores @ delta)
        keep = kc * torch.exp(b[..., -1:] - b)[..., None]
        state = state * b[..., -1].exp()[..., None, None] + keep.transpose(-1, -2) @ delta
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.to(dtype), (state if output_final_state else None)


run = gated_delta_rule_reference
