"""gated_delta_rule: validation and dispatch."""

from __future__ import annotations

import math

import torch

from .. import checks
from ..dispatch import Op, Request, needs_grad
from ..lightning_attention.api import check_state

OP = Op("gated_delta_rule", __package__, ("triton", "reference"))


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
):
    """The gated delta rule over the T new tokens of a sequence (state S: [K, V] per value head):

        S_t = exp(g_t) S_{t-1}       S_t = S_t + beta_t k_t (v_t - S_t^T k_t)^T       o_t = scale * S_t^T q_t

    q, k [B, Hk, T, K]; v [B, H, T, V] with H a multiple of Hk (grouped values: value head h reads
    query/key head h // (H / Hk)); g (log decay, <= 0) and beta (write strength, in [0, 1]) [B, H, T].
    Keys are used as given (normalise them beforehand). initial_state [B, H, K, V] (zeros when None).
    Returns (o [B, H, T, V] in q's dtype, the final state [B, H, K, V] in fp32 (fp64 for fp64 inputs),
    or None unless output_final_state). Backends: triton (fla-core's kernels), reference.
    """
    checks.check_rank("q", q, 4, "[B, Hk, T, K]")
    checks.check_rank("k", k, 4, "[B, Hk, T, K]")
    checks.check_rank("v", v, 4, "[B, H, T, V]")
    checks.check_float("q", q)
    for name, t in (("k", k), ("v", v)):
        checks.check_same("q", q, name, t)
    B, Hk, T, K = q.shape
    H = v.shape[1]
    if k.shape != q.shape or v.shape[0] != B or v.shape[2] != T:
        raise ValueError(
            f"k must be q's shape [B, Hk, T, K] = {tuple(q.shape)} and v [B, H, T, V], got "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if H % Hk:
        raise ValueError(f"v's heads ({H}) must be a multiple of q/k's heads ({Hk})")
    if T < 1:
        raise ValueError("q must hold at least one token (T >= 1)")
    for name, t in (("g", g), ("beta", beta)):
        checks.check_rank(name, t, 3, "[B, H, T]")
        checks.check_float(name, t)
        if tuple(t.shape) != (B, H, T) or t.device != q.device:
            raise ValueError(f"{name} must be [B={B}, H={H}, T={T}] on {q.device}, got {tuple(t.shape)} on {t.device}")
    check_state(initial_state, (B, H, K, v.shape[-1]), q.device)
    scale = 1.0 / math.sqrt(K) if scale is None else scale
    req = Request.of(q, needs_grad(q, k, v, g, beta, initial_state), T=T, head_dim=max(K, v.shape[-1]))
    return OP.run(backend, req, q, k, v, g, beta, scale, initial_state, output_final_state)
