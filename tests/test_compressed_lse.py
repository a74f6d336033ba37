"""The compressed attention's LSE (return_lse=True), which NSA's selection reuses instead of recomputing."""

from __future__ import annotations

import pytest
import torch

from sparsezoo import ops
from sparsezoo.ops.compressed_attention import compressed_visible, n_compressed


def _inputs(seed, B=2, Hq=4, Hkv=2, T=24, S=40, D=8, block_len=8, stride=4):
    g = torch.Generator().manual_seed(seed)
    Sc = n_compressed(S, block_len, stride)
    q = torch.randn(B, Hq, T, D, generator=g, dtype=torch.float64)
    kc, vc = (torch.randn(B, Hkv, Sc, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, kc, vc, dict(S=S, block_len=block_len, stride=stride, scale=0.3)


def test_lse_is_the_logsumexp_over_visible_entries():
    q, kc, vc, kw = _inputs(0, T=40)
    out, lse = ops.compressed_attention(q, kc, vc, return_lse=True, backend="reference", **kw)
    assert torch.equal(out, ops.compressed_attention(q, kc, vc, backend="reference", **kw))
    T, G = q.shape[2], q.shape[1] // kc.shape[1]
    pos = torch.arange(kw["S"] - T, kw["S"])
    ok = compressed_visible(pos, kc.shape[2], kw["block_len"], kw["stride"])
    s = torch.einsum("bhtd,bhsd->bhts", q, kc.repeat_interleave(G, 1)) * kw["scale"]
    want = s.masked_fill(~ok, float("-inf")).logsumexp(-1)
    assert lse.dtype == torch.float32 and not lse.requires_grad
    seen = ok.any(-1)
    torch.testing.assert_close(lse[..., seen], want[..., seen].float(), rtol=1e-6, atol=1e-6)
    assert torch.isneginf(lse[..., ~seen]).all() and (~seen).any()  # the first queries see no entry


def test_no_entries_give_minus_inf_and_flex_on_cpu_refuses_clearly():
    q, kc, vc, kw = _inputs(1)
    out, lse = ops.compressed_attention(q, kc[:, :, :0], vc[:, :, :0], return_lse=True, backend="reference", **kw)
    assert torch.isneginf(lse).all() and not out.any()
    with pytest.raises(ValueError, match="LSE"):
        ops.compressed_attention(q.float(), kc.float(), vc.float(), return_lse=True, backend="flex", **kw)


def test_selection_with_the_given_lse_equals_without():
    pytest.importorskip("triton")
    q, kc, _, kw = _inputs(2, T=40, S=40)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernels under the interpreter
    q, kc = q.float().to(dev), kc.float().to(dev)
    lse = ops.compressed_attention(q, kc, kc, return_lse=True, backend="reference", **kw)[1]
    sel = dict(S=kw["S"], block_len=kw["block_len"], stride=kw["stride"], sel_block=8, topk=3, scale=kw["scale"])
    want = ops.nsa_select(q, kc, backend="triton", **sel)
    assert torch.equal(ops.nsa_select(q, kc, lse=lse, backend="triton", **sel), want)
    with pytest.raises(ValueError, match="lse must be"):
        ops.nsa_select(q, kc, lse=lse[:, :, :3], backend="triton", **sel)
