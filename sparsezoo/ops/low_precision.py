"""Simulated low-precision index vectors: the Hadamard rotation and block-scaled fp8 / fp4 rounding that
DeepSeek's lightning indexers apply to index queries and keys before their dot products (V3.2: fp8 e4m3
in blocks of 128 with scale amax / 448; V4: fp4 e2m1 in blocks of 32 with a power-of-two scale from
amax / 6). Plain torch, any float dtype, differentiable: the rotation is linear and orthonormal, the
rounding passes gradients straight through. A layout helper, no backends.
"""

from __future__ import annotations

import math

import torch

from .common import compute_dtype

FORMATS = ("fp8", "fp4")
FP8_MAX, FP4_MAX = 448.0, 6.0
BLOCK = {"fp8": 128, "fp4": 32}


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ H / sqrt(n) over the last axis (n a power of two; H the Sylvester Hadamard matrix), in
    O(n log n) butterflies. Orthonormal: inner products are unchanged."""
    n = x.shape[-1]
    if n & (n - 1) or n == 0:
        raise ValueError(f"the Hadamard rotation needs a power-of-two dim, got {n}")
    lead = x.shape[:-1]
    y, h = x, 1
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(*lead, n) * (1.0 / math.sqrt(n))


def block_size(fmt: str, dim: int) -> int:
    """The scaling block of `fmt` along a dim of `dim` (the whole vector when dim is smaller)."""
    return min(BLOCK[fmt], dim)


def fake_quant(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """x rounded through `fmt` with one scale per block of the last axis, and back to x's dtype.
    Gradients pass straight through the rounding."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown low-precision format {fmt!r}; choose one of {list(FORMATS)}")
    D = x.shape[-1]
    blk = block_size(fmt, D)
    if D % blk:
        raise ValueError(f"{fmt} rounding needs the dim ({D}) to be a multiple of its block ({blk})")
    dt = compute_dtype(x)
    xb = x.detach().to(dt).unflatten(-1, (D // blk, blk))
    amax = xb.abs().amax(-1, keepdim=True)
    if fmt == "fp8":
        scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        q = (xb / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(dt) * scale
    else:
        scale = torch.exp2(torch.ceil(torch.log2((amax / FP4_MAX).clamp_min(2.0**-126))))
        q = _round_e2m1((xb / scale).clamp(-FP4_MAX, FP4_MAX)) * scale
    return q.flatten(-2).to(x.dtype) + (x - x.detach())  # the rounded values; d/dx = 1


def _round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Round to the nearest fp4 e2m1 value (0, 0.5, 1, 1.5, 2, 3, 4, 6; ties to an even mantissa)."""
    a = y.abs()
    r = torch.where(a < 2, torch.round(a * 2) / 2, torch.where(a < 4, torch.round(a), torch.round(a / 2) * 2))
    return torch.copysign(r, y)


def rotate_and_round(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """The indexers' production path: Hadamard rotation, then block-scaled rounding through `fmt`."""
    return fake_quant(hadamard(x), fmt)
