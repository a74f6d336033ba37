"""Rotary position embedding (rotate-half form) for [B, H, T, D] tensors."""

from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape [T, dim] (or [B, T, dim] for per-batch positions)."""
    if dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {dim}")
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    ang = positions.to(torch.float32)[..., None] * inv
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float, inverse: bool = False) -> torch.Tensor:
    """x [B, H, T, D]; positions [T] or [B, T]. inverse rotates back (by minus the angle)."""
    cos, sin = rope_angles(positions, x.shape[-1], theta)
    if cos.dim() == 3:  # per-batch positions -> broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    if inverse:
        sin = -sin
    dt = torch.promote_types(x.dtype, torch.float32)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.to(dt) * cos.to(dt) + rotated.to(dt) * sin.to(dt)).to(x.dtype)


def apply_rope_part(x: torch.Tensor, positions: torch.Tensor, theta: float, dims: int, *, last: bool = True,
                    inverse: bool = False) -> torch.Tensor:
    """RoPE on `dims` of x's last axis only (its own frequencies over those dims): the last `dims`
    (DeepSeek-V4's q/kv) or the first (DeepSeek-V3.2's indexer); the other dims pass through.
    dims = 0: x unchanged; dims = D: apply_rope."""
    D = x.shape[-1]
    if dims == 0:
        return x
    if dims == D:
        return apply_rope(x, positions, theta, inverse)
    if last:
        return torch.cat([x[..., :D - dims], apply_rope(x[..., D - dims:], positions, theta, inverse)], dim=-1)
    return torch.cat([apply_rope(x[..., :dims], positions, theta, inverse), x[..., dims:]], dim=-1)
