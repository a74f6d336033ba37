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
    if torch.compiler.is_compiling():  # Inductor fuses the formula: no fp32 copies of x
        return _rotate(x, cos, sin)
    return _Rope.apply(x, cos, sin)


ROPE_CHUNK_ELEMENTS = 1 << 25  # eager: fp32 temporaries of at most 128 MiB each, whatever T


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, in fp32 (fp64 for fp64 x), returned in x's dtype."""
    dt = torch.promote_types(x.dtype, torch.float32)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.to(dt) * cos.to(dt) + rotated.to(dt) * sin.to(dt)).to(x.dtype)


def _rotate_chunked(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """_rotate over slices of the T axis (dim -2), so that the fp32 temporaries stay small at long T."""
    T = x.shape[-2]
    step = max(1, ROPE_CHUNK_ELEMENTS // max(1, x.numel() // max(T, 1)))
    if step >= T:
        return _rotate(x, cos, sin)
    out = torch.empty_like(x)
    for t0 in range(0, T, step):
        sl = slice(t0, t0 + step)
        out[..., sl, :] = _rotate(x[..., sl, :], cos[..., sl, :], sin[..., sl, :])
    return out


class _Rope(torch.autograd.Function):
    """RoPE that keeps only cos/sin for the backward, whose gradient is the inverse rotation (the halves of
    sin are equal, so rotate_half commutes with the product by sin)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate_chunked(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate_chunked(grad, cos, -sin), None, None


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
