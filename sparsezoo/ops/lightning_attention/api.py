"""lightning_attention: validation and dispatch."""

from __future__ import annotations

import math

import torch

from .. import checks
from ..dispatch import Op, Request, needs_grad

OP = Op("lightning_attention", __package__, ("triton", "reference"))


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
):
    """Causal linear attention with a fixed decay per head, over the T new tokens of a sequence:

        S_t = exp(log_decay[h]) * S_{t-1} + k_t^T v_t        o_t = scale * q_t S_t

    q, k [B, H, T, K] and v [B, H, T, V] (repeat shared K/V heads beforehand); log_decay [H], <= 0;
    initial_state [B, H, K, V] (the S of the tokens before, zeros when None). Returns (o [B, H, T, V] in
    q's dtype, the final state [B, H, K, V] in fp32 (fp64 for fp64 inputs), or None unless
    output_final_state). Backends: triton (fla-core's kernels), reference.
    """
    checks.check_rank("q", q, 4, "[B, H, T, K]")
    checks.check_rank("k", k, 4, "[B, H, T, K]")
    checks.check_rank("v", v, 4, "[B, H, T, V]")
    checks.check_float("q", q)
    checks.check_same("q", q, "k", k)
    checks.check_same("q", q, "v", v)
    B, H, T, K = q.shape
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"k must be q's shape [B, H, T, K] = {tuple(q.shape)} and v [B, H, T, V], got "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if T < 1:
        raise ValueError("q must hold at least one token (T >= 1)")
    checks.check_rank("log_decay", log_decay, 1, "[H]")
    if log_decay.shape[0] != H:
        raise ValueError(f"log_decay must be [H={H}], got {tuple(log_decay.shape)}")
    check_state(initial_state, (B, H, K, v.shape[-1]), q.device)
    scale = 1.0 / math.sqrt(K) if scale is None else scale
    req = Request.of(q, needs_grad(q, k, v, initial_state), T=T, head_dim=max(K, v.shape[-1]))
    return OP.run(backend, req, q, k, v, log_decay, scale, initial_state, output_final_state)


def check_state(state: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> None:
    """A recurrent state is a float tensor [B, H, K, V] on the inputs' device."""
    if state is None:
        return
    checks.check_rank("initial_state", state, 4, "[B, H, K, V]")
    checks.check_float("initial_state", state)
    if tuple(state.shape) != shape or state.device != device:
        raise ValueError(f"initial_state must be {list(shape)} on {device}, got {tuple(state.shape)} on {state.device}")
