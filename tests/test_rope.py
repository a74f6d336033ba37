"""RoPE: the memory-lean autograd function (chunked over T, only cos/sin saved) equals the plain formula,
forward and gradient, in fp64; rotating back recovers the input."""

from __future__ import annotations

import pytest
import torch

from sparsezoo import rope


def formula(x, positions, theta=1e4):
    cos, sin = rope.rope_angles(positions, x.shape[-1], theta)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return rope._rotate(x, cos, sin)


@pytest.mark.parametrize("chunk", [1 << 25, 7, 1])
@pytest.mark.parametrize("per_batch", [False, True])
def test_chunked_rope_equals_the_formula_with_its_gradient(monkeypatch, chunk, per_batch):
    monkeypatch.setattr(rope, "ROPE_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(chunk + per_batch)
    x = torch.randn(2, 3, 37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    positions = torch.randint(0, 500, (2, 37), generator=g) if per_batch else torch.arange(5, 42)
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
    got = rope.apply_rope(x, positions, 1e4)
    want = formula(x, positions)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(want, x, grad)[0],
                               rtol=1e-14, atol=1e-14)
    # the angles are fp32 (cos^2 + sin^2 = 1 to ~1e-7), so rotating back is exact to that
    torch.testing.assert_close(rope.apply_rope(got, positions, 1e4, inverse=True), x, rtol=1e-6, atol=1e-6)


def test_rope_keeps_the_input_dtype_and_layout():
    x = torch.randn(1, 10, 4, 16, dtype=torch.bfloat16).transpose(1, 2)  # [B, H, T, D] over [B, T, H, D] memory
    out = rope.apply_rope(x, torch.arange(10), 1e4)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    torch.testing.assert_close(out.float(), formula(x.float(), torch.arange(10)), rtol=1e-2, atol=1e-2)
