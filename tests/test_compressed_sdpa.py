"""The folded cuDNN compressed attention (ops/compressed_attention/sdpa.py) against the reference.

On the CPU the fold, the unfold, the LSE and the non-finite rule run around an fp64 stand-in for cuDNN's
square causal attention (the stand-in is checked against explicit softmax first); on a GPU the real
cuDNN call runs in bf16, forward and gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsezoo import ops
from sparsezoo.ops.compressed_attention import n_compressed
from sparsezoo.ops.compressed_attention import sdpa as cmp_sdpa


def _stand_in(q, k, v, scale):
    """Square causal attention with grouped key heads in fp64 (cuDNN's contract: output, natural-log LSE)."""
    G, S = q.shape[1] // k.shape[1], q.shape[2]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = torch.einsum("bhtd,bhsd->bhts", q.double(), k) * scale
    s = s.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).to(q.dtype), s.logsumexp(-1).float()


@pytest.fixture
def cpu_stand_in(monkeypatch):
    monkeypatch.setattr(cmp_sdpa, "causal_attention", _stand_in)


def _inputs(seed, B, Hq, Hkv, T, D, block_len, stride, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    Sc = n_compressed(T, block_len, stride)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)
    return make(B, Hq, T, D), make(B, Hkv, Sc, D), make(B, Hkv, Sc, D)


def test_fold_round_trip():
    q = torch.arange(2 * 3 * 21, dtype=torch.float64).view(2, 3, 21, 1)
    rows = n_compressed(21, 5, 4)  # 5 rows, the last one partly past T
    folded = cmp_sdpa.fold_queries(q, 5, 4, rows)
    assert folded.shape == (2, 12, rows, 1)
    assert folded[1, 2 * 4 + 3, 2, 0] == q[1, 2, 4 + 2 * 4 + 3, 0]  # head 2, lane 3, row 2: position 15
    assert not folded[:, :, -1][:, [1, 2, 3]].any() and not folded[:, 4:8, -1][:, 1:].any()
    back = cmp_sdpa.unfold_rows(folded, 3, 21, 5, 4)
    assert torch.equal(back[:, :, 4:], q[:, :, 4:]) and not back[:, :, :4].any() and back.is_contiguous()
    wide = torch.randn(2, 3, 22, 8, dtype=torch.bfloat16)  # rows of 16 bytes: copied as 8-byte words
    assert torch.equal(cmp_sdpa.unfold_rows(cmp_sdpa.fold_queries(wide, 5, 4, 5), 3, 22, 5, 4)[:, :, 4:],
                       wide[:, :, 4:])
    torch.autograd.gradcheck(lambda x: cmp_sdpa.unfold_rows(cmp_sdpa.fold_queries(x, 5, 4, 5) * 2, 2, 21, 5, 4),
                             q[:1, :2, :, :].clone().requires_grad_())


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10**6), Hkv=st.integers(1, 2), G=st.sampled_from([1, 3]),
       block_len=st.integers(1, 9), stride=st.integers(1, 5), T=st.integers(1, 40))
def test_matches_reference(seed, Hkv, G, block_len, stride, T):
    stride = min(stride, block_len)
    if n_compressed(T, block_len, stride) == 0:
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cmp_sdpa, "causal_attention", _stand_in)
        q, kc, vc = _inputs(seed, 2, Hq := Hkv * G, Hkv, T, 8, block_len, stride)
        kw = dict(S=T, block_len=block_len, stride=stride, scale=0.4)
        leaves = [x.requires_grad_() for x in (q, kc, vc)]
        out, lse = cmp_sdpa.run(q, kc, vc, return_lse=True, **kw)
        want, want_lse = ops.compressed_attention(q, kc, vc, return_lse=True, backend="reference", **kw)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse, want_lse, rtol=1e-6, atol=1e-6)  # -inf before the first entry
        g = torch.randn(2, Hq, T, 8, dtype=torch.float64)
        got = torch.autograd.grad(out, leaves, g)
        for a, b in zip(got, torch.autograd.grad(want, leaves, g)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("which, row", [("q", 20), ("kc", 2)])
def test_nonfinite_rows(cpu_stand_in, which, row):
    q, kc, vc = _inputs(3, 1, 4, 2, 32, 8, 8, 4)
    {"q": q, "kc": kc}[which][0, 1, row, 3] = float("nan")
    kw = dict(S=32, block_len=8, stride=4, scale=0.4)
    out, lse = cmp_sdpa.run(q, kc, vc, return_lse=True, **kw)
    want, want_lse = ops.compressed_attention(q, kc, vc, return_lse=True, backend="reference", **kw)
    assert out.isnan().any()
    torch.testing.assert_close(out, want, equal_nan=True)
    torch.testing.assert_close(lse, want_lse, equal_nan=True)


def test_what_it_supports():
    q, kc, vc = _inputs(4, 1, 4, 2, 32, 8, 8, 4, dtype=torch.float32)
    kw = dict(block_len=8, stride=4, scale=0.4)
    with pytest.raises(ValueError, match="CUDA devices only"):
        ops.compressed_attention(q, kc, vc, S=32, backend="sdpa", **kw)
    req = ops.dispatch.Request("cuda", torch.bfloat16, params=dict(T=16, S=32, Sc=kc.shape[2], head_dim=8, **kw))
    assert "T == S" in cmp_sdpa.supports(req)
    req = ops.dispatch.Request("cuda", torch.float32, params=dict(T=32, S=32, head_dim=8))
    assert "fp16/bf16" in cmp_sdpa.supports(req)
    out = ops.compressed_attention(q, kc, vc, S=32, **kw)  # auto on the CPU: the reference
    assert ops.implementations_used()["compressed_attention"] == "reference" and out.shape == q.shape


@pytest.mark.gpu
@pytest.mark.parametrize("T, block_len, stride", [(2048, 32, 16), (1000, 16, 8)])
def test_cudnn_bf16_against_reference(T, block_len, stride):
    q, kc, vc = _inputs(5, 1, 16, 2, T, 128, block_len, stride, dtype=torch.bfloat16, device="cuda")
    kw = dict(S=T, block_len=block_len, stride=stride, scale=1 / math.sqrt(128))
    leaves = [x.requires_grad_() for x in (q, kc, vc)]
    out, lse = ops.compressed_attention(q, kc, vc, return_lse=True, **kw)
    assert ops.implementations_used()["compressed_attention"] == "sdpa"
    want, want_lse = ops.compressed_attention(*(x.float() for x in leaves), return_lse=True, backend="reference",
                                              **kw)
    torch.testing.assert_close(out.float(), want, rtol=0, atol=2e-2)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=2e-2)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    ref = torch.autograd.grad(want, leaves, g.float())
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=5e-2 * b.abs().max().item())


@pytest.mark.gpu
def test_cudnn_under_torch_compile():
    """The folded path traced by torch.compile (the cuDNN op and the fold's word copies): forward and gradients
    as eager's."""
    q, kc, vc = _inputs(6, 1, 8, 2, 1024, 128, 32, 16, dtype=torch.bfloat16, device="cuda")
    kw = dict(S=1024, block_len=32, stride=16, scale=1 / math.sqrt(128))
    fn = lambda q, kc, vc: ops.compressed_attention(q, kc, vc, **kw)
    leaves = [x.requires_grad_() for x in (q, kc, vc)]
    want = fn(*leaves)
    got = torch.compile(fn, fullgraph=True)(*leaves)
    torch.testing.assert_close(got, want)  # bf16's default tolerance
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(a, b)
