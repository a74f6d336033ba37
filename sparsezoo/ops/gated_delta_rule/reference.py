"""Plain-PyTorch gated delta rule in chunks (fp64 capable, autograd), in the WY form of the DeltaNet papers.

Within a chunk of L tokens with cumulative log decays b_i (token i's own included, so every exp below
is of a number <= 0), the state before the chunk S0 and A = the strictly lower [L, L] matrix
beta_i (k_i . k_j) exp(b_i - b_j):
    (I + A) U = beta V,   (I + A) W = beta K exp(b)          (unit lower-triangular solves)
    V' = U - W S0                                            (what each token writes, the delta)
    o_i = exp(b_i) q_i S0 + sum_{j <= i} exp(b_i - b_j) (q_i . k_j) V'_j
    S = exp(b_L) S0 + sum_j exp(b_L - b_j) k_j V'_j^T  =  M S0 + N
with M = exp(b_L) I - (K exp(b_L - b))^T W and N = (K exp(b_L - b))^T U. Everything but the chain of states
is computed for all chunks at once; the chain is one matmul per chunk (S <- M S + N), so a GPU runs about
T / 64 small kernels per call instead of twenty per chunk. The last chunk is padded with tokens that write
nothing (beta = 0) and do not decay (g = 0). Runs in fp32 (fp64 for fp64 inputs), autocast off.
Memory: O(T x CHUNK) per head, plus one [K, V] state per value head and chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lightning_attention.reference import compute_dtype

CHUNK = 64


def supports(req) -> str | None:
    return None


def gated_delta_rule_reference(q, k, v, g, beta, scale: float, initial_state=None, output_final_state: bool = False):
    with torch.autocast(q.device.type, enabled=False):
        return _chunked(q, k, v, g, beta, scale, initial_state, output_final_state)


def _chunked(q, k, v, g, beta, scale, initial_state, output_final_state):
    B, Hk, T, K = q.shape
    H, V = v.shape[1], v.shape[-1]
    dtype, ct = q.dtype, compute_dtype(q.dtype)
    L = min(CHUNK, T)
    n = -(-T // L)
    pad = n * L - T

    def chunks(t, heads_of_q=False):  # [B, heads, T, ...] -> [B, H, n, L, ...], padded with zeros
        t = t.to(ct)
        if heads_of_q:
            t = t.repeat_interleave(H // Hk, dim=1)
        t = F.pad(t, (0, 0, 0, pad) if t.dim() == 4 else (0, pad))
        return t.reshape(B, H, n, L, *t.shape[3:])

    q, k, v = chunks(q, True) * scale, chunks(k, True), chunks(v)
    g, beta = chunks(g), chunks(beta)[..., None]
    b = g.cumsum(-1)  # [B, H, n, L]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp(torch.where(causal, b[..., :, None] - b[..., None, :], float("-inf")))
    A = torch.where(causal.tril(-1), (beta * k) @ k.transpose(-1, -2) * decay, 0.0)
    u = torch.linalg.solve_triangular(A, beta * v, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(A, beta * k * b.exp()[..., None], upper=False, unitriangular=True)
    keep = (k * torch.exp(b[..., -1:] - b)[..., None]).transpose(-1, -2)  # [B, H, n, K, L]
    eye = torch.eye(K, dtype=ct, device=q.device)
    M = (b[..., -1].exp()[..., None, None] * eye - keep @ w).reshape(B * H, n, K, K)
    N = (keep @ u).reshape(B * H, n, K, V)
    state = q.new_zeros(B * H, K, V) if initial_state is None else initial_state.to(ct).reshape(B * H, K, V)
    before = []  # the state before each chunk
    for c in range(n):
        before.append(state)
        state = torch.baddbmm(N[:, c], M[:, c], state)
    S0 = torch.stack(before, dim=1).reshape(B, H, n, K, V)
    delta = u - w @ S0
    scores = torch.where(causal, q @ k.transpose(-1, -2) * decay, 0.0)
    out = (q * b.exp()[..., None]) @ S0 + scores @ delta
    out = out.reshape(B, H, n * L, V)[:, :, :T]
    final = state.reshape(B, H, K, V) if output_final_state else None
    return out.to(dtype), final


run = gated_delta_rule_reference
