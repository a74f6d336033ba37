"""Properties of the MSA functional layer (reference paths), drawn over random shapes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsezoo import ops
from sparsezoo.ops import references as reference
from sparsezoo.variants.base import selection_token_mask
from tests.helpers import causal_allowed, explicit_mask_attention, naive_select, rand_qkv

shapes = st.fixed_dictionaries({
    "B": st.integers(1, 2),
    "Hkv": st.integers(1, 3),
    "G": st.sampled_from([1, 2, 4]),
    "S": st.integers(1, 90),
    "chunk": st.integers(0, 60),  # T = S - chunk offset (chunked prefill / decode when T is small)
    "D": st.sampled_from([4, 8, 16]),
    "block": st.sampled_from([4, 8, 16]),
    "topk": st.integers(1, 6),
    "seed": st.integers(0, 2**16),
})


def _draw(p, dtype=torch.float64):
    T = max(1, p["S"] - p["chunk"])
    q, k, v = rand_qkv(p["B"], p["Hkv"] * p["G"], p["Hkv"], T, p["S"], p["D"], dtype=dtype, seed=p["seed"])
    g = torch.Generator().manual_seed(p["seed"] + 1)
    q_idx = torch.randn(p["B"], p["Hkv"], T, p["D"], generator=g, dtype=torch.float64).to(dtype)
    k_idx = torch.randn(p["B"], p["S"], p["D"], generator=g, dtype=torch.float64).to(dtype)
    return T, q, k, v, q_idx, k_idx


@given(shapes)
def test_select_matches_independent_oracle_and_format(p):
    T, _, _, _, q_idx, k_idx = _draw(p)
    bs, K, S = p["block"], p["topk"], p["S"]
    scale = 1 / math.sqrt(p["D"])
    sel = ops.msa_select(q_idx, k_idx, block_size=bs, topk=K)
    assert sel.dtype == torch.int32 and tuple(sel.shape) == (p["B"], p["Hkv"], T, K)
    oracle = naive_select(q_idx, k_idx, bs, K, scale)
    for (b, h, t), want in oracle.items():
        row = sel[b, h, t].tolist()
        n = len(want)
        assert row[:n] == want, (b, h, t, row, want)  # valid prefix in rank order, local block last
        assert all(x == -1 for x in row[n:])
        assert row[n - 1] == (S - T + t) // bs  # the local block is always selected
    ops.checks.check_selection_values(sel, T, S, bs)


def test_select_tie_break_example_from_spec():
    # all-equal scores, L = 17, k = 16 -> [0 .. 14, 17]
    bs = 4
    sel = ops.msa_select(torch.ones(1, 1, 1, 4), torch.ones(1, 17 * bs + 1, 4), block_size=bs, topk=16)
    assert sel[0, 0, 0].tolist() == list(range(15)) + [17]


def test_index_heads_select_independently():
    # Index heads are never merged (transformers #46762): random heads give different selections.
    torch.manual_seed(0)
    sel = ops.msa_select(torch.randn(1, 4, 64, 8), torch.randn(1, 512, 8), block_size=16, topk=4)
    assert not all(torch.equal(sel[:, 0], sel[:, h]) for h in range(1, 4))


@given(shapes)
def test_full_topk_equals_dense(p):
    T, q, k, v, _, _ = _draw(p)
    full = reference.full_selection(T, p["S"], p["block"], p["B"], p["Hkv"], q.device)
    out, lse = ops.block_sparse_attention(q, k, v, full, block_size=p["block"], return_lse=True, check=True)
    ref, ref_lse = ops.dense_attention(q, k, v, backend="reference", return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out, ops.dense_attention(q, k, v, backend="sdpa"), atol=1e-10, rtol=1e-10)


@given(shapes)
def test_sparse_equals_dense_under_explicit_selection_mask(p):
    T, q, k, v, q_idx, k_idx = _draw(p)
    sel = ops.msa_select(q_idx, k_idx, block_size=p["block"], topk=p["topk"])
    out = ops.block_sparse_attention(q, k, v, sel, block_size=p["block"])
    # the group's G heads share the selection: the mask is spread to heads with repeat_interleave
    allowed = selection_token_mask(sel, p["S"], p["block"], q.shape[1])
    torch.testing.assert_close(out, explicit_mask_attention(q, k, v, allowed), atol=1e-10, rtol=1e-10)


def test_selection_order_is_free():
    q, k, v = rand_qkv(1, 4, 2, 50, 50, 8, seed=3)
    sel = ops.msa_select(torch.randn(1, 2, 50, 8), torch.randn(1, 50, 8), block_size=8, topk=4)
    # descending ids (local block first) instead of rank order, padding kept at the end
    key = torch.sort(torch.where(sel >= 0, -sel, 10**6), dim=-1).values
    shuffled = torch.where(key == 10**6, -1, -key).to(torch.int32)
    assert not torch.equal(shuffled, sel)
    a = ops.block_sparse_attention(q, k, v, sel, block_size=8)
    b = ops.block_sparse_attention(q, k, v, shuffled, block_size=8, check=True)
    torch.testing.assert_close(a, b)


@given(shapes)
def test_causality_future_tokens_change_nothing(p):
    T, q, k, v, q_idx, k_idx = _draw(p)
    S, bs, K = p["S"], p["block"], p["topk"]
    sel = ops.msa_select(q_idx, k_idx, block_size=bs, topk=K)
    out = ops.block_sparse_attention(q, k, v, sel, block_size=bs)
    cut = S // 2  # perturb keys/values/index keys at positions >= cut
    k2, v2, ki2 = k.clone(), v.clone(), k_idx.clone()
    k2[:, :, cut:] += 5
    v2[:, :, cut:] -= 3
    ki2[:, cut:] *= -2
    sel2 = ops.msa_select(q_idx, ki2, block_size=bs, topk=K)
    out2 = ops.block_sparse_attention(q, k2, v2, sel2, block_size=bs)
    past = (S - T + torch.arange(T)) < cut
    torch.testing.assert_close(out[:, :, past], out2[:, :, past], atol=0, rtol=0)
    assert torch.equal(sel[:, :, past], sel2[:, :, past])


def test_empty_selection_gives_zero_and_neg_inf_lse():
    q, k, v = rand_qkv(1, 2, 1, 3, 8, 4, seed=0)
    sel = torch.full((1, 1, 3, 2), -1, dtype=torch.int32)
    out, lse = ops.block_sparse_attention(q, k, v, sel, block_size=4, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def _kl_inputs(seed, B=1, Hkv=2, G=2, T=24, S=40, D=8, Di=8):
    q, k, _ = rand_qkv(B, Hkv * G, Hkv, T, S, D, seed=seed, requires_grad=True)
    g = torch.Generator().manual_seed(seed + 7)
    q_idx = torch.randn(B, Hkv, T, Di, generator=g, dtype=torch.float64, requires_grad=True)
    k_idx = torch.randn(B, S, Di, generator=g, dtype=torch.float64)
    return q, k, q_idx, k_idx


@pytest.mark.parametrize("dense_warmup", [False, True])
@pytest.mark.parametrize("B", [1, 2])
def test_kl_gradient_matches_closed_form(dense_warmup, B):
    q, k, q_idx, k_idx = _kl_inputs(seed=B, B=B)
    bs, K, coeff = 8, 3, 0.7
    Hq, Hkv, T, S = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    sel = None if dense_warmup else ops.msa_select(q_idx.detach(), k_idx, block_size=bs, topk=K)
    loss = ops.msa_index_kl(q, k, q_idx, k_idx, sel, block_size=bs, coeff=coeff)
    loss.backward()
    assert q.grad is None and k.grad is None  # the main branch never sees the index loss
    # closed form: dL/dz = coeff * (Q - P) / (B * H_i * T), with P, Q built from explicit masks
    allowed = causal_allowed(B, Hkv, T, S) if sel is None else selection_token_mask(sel, S, bs, Hkv)
    scale_i = 1 / math.sqrt(q_idx.shape[-1])
    z = torch.einsum("bhtd,bsd->bhts", q_idx.detach(), k_idx) * scale_i
    Q = torch.softmax(z.masked_fill(~allowed, float("-inf")), -1)
    s = torch.einsum("bhgtd,bhsd->bhgts", q.detach().view(B, Hkv, Hq // Hkv, T, -1), k.detach()) / math.sqrt(q.shape[-1])
    P = torch.softmax(s.masked_fill(~allowed[:, :, None], float("-inf")), -1).mean(2)
    dz = coeff * (Q - P) / (B * Hkv * T)
    want = torch.einsum("bhts,bsd->bhtd", dz, k_idx) * scale_i
    torch.testing.assert_close(q_idx.grad, want, atol=1e-12, rtol=1e-9)
    kl = (P * (torch.log(P.clamp_min(1e-300)) - torch.log(Q.clamp_min(1e-300)))).masked_fill(~allowed, 0).sum()
    torch.testing.assert_close(loss, coeff * kl / (B * Hkv * T))


def test_kl_temperature_changes_lse_not_ranking():
    q, k, q_idx, k_idx = _kl_inputs(seed=5)
    sel = ops.msa_select(q_idx.detach(), k_idx, block_size=8, topk=3)
    a = ops.msa_index_kl(q, k, q_idx, k_idx, sel, block_size=8, temperature=1.0)
    b = ops.msa_index_kl(q, k, q_idx, k_idx, sel, block_size=8, temperature=2.0)
    assert not torch.allclose(a, b)
    assert torch.equal(sel, ops.msa_select(q_idx.detach() / 2.0, k_idx, block_size=8, topk=3))


def test_reference_backward_matches_explicit_mask_gradients():
    q, k, v = rand_qkv(1, 4, 2, 30, 45, 8, seed=11, requires_grad=True)
    sel = ops.msa_select(torch.randn(1, 2, 30, 8), torch.randn(1, 45, 8), block_size=8, topk=3)
    allowed = selection_token_mask(sel, 45, 8, 4)
    w = torch.randn(1, 4, 30, 8, dtype=torch.float64)
    grads = torch.autograd.grad((ops.block_sparse_attention(q, k, v, sel, block_size=8) * w).sum(), (q, k, v))
    want = torch.autograd.grad((explicit_mask_attention(q, k, v, allowed) * w).sum(), (q, k, v))
    for g_, w_ in zip(grads, want):
        torch.testing.assert_close(g_, w_, atol=1e-10, rtol=1e-9)


@given(shapes, st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_low_precision_inputs_match_fp64_oracle(p, dtype):
    T, q, k, v, q_idx, k_idx = _draw(p)
    sel = ops.msa_select(q_idx, k_idx, block_size=p["block"], topk=p["topk"])
    want = ops.block_sparse_attention(q, k, v, sel, block_size=p["block"])
    got = ops.block_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), sel, block_size=p["block"])
    assert got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


def test_fp32_index_tiles_fit_shared_memory():
    """fp32 index queries at D_i = 128 once asked for 256 KB of shared memory (OutOfResources on an H200)."""
    pytest.importorskip("triton")
    from sparsezoo.kernels import select_triton as st_kernel

    c = st_kernel.SELECT_CONFIG
    args = (c["HG"], c["TM"], c["BN"], c["num_stages"], 128)
    assert st_kernel.fit_tiling(*args, elem=2) == (c["TM"], c["num_stages"])  # bf16: the tuned tiles, unchanged
    TM, stages = st_kernel.fit_tiling(*args, elem=4)
    assert (c["HG"] * TM * 128 + stages * c["BN"] * 128) * 4 <= st_kernel.SMEM_BUDGET and TM >= 16


@pytest.mark.gpu
def test_fp32_auto_selection_runs_at_index_dim_128():
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 4, 8192, 128, device="cuda", generator=g)
    k = torch.randn(1, 8192, 128, device="cuda", generator=g)
    with ops.track_implementations() as used:
        got = ops.msa_select(q, k, block_size=128, topk=16)
    assert used["msa_select"] == "triton"
    want = ops.msa_select(q[:, :, -256:].double(), k.double(), block_size=128, topk=16, backend="reference")
    assert (got[:, :, -256:].sort(-1).values == want.sort(-1).values).float().mean() > 0.99
