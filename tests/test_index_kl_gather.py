"""The Triton indexer KL (DSA/CSA; sparsezoo/kernels/index_kl_gather_triton.py) against the fp64 reference: loss and
gradients w.r.t. q_i, w, k_i, on the CPU interpreter in fp32 (hypothesis-drawn shapes) and in bf16 on a GPU."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparsezoo import ops
from sparsezoo.kernels.index_kl_gather_triton import index_kl_gather_triton
from sparsezoo.ops.index_kl.dsa_reference import index_kl_reference


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def kl_inputs(B, Hq, Hkv, Hs, T, N, D, J, Di, K, dense, seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    q, k = rnd(B, Hq, T, D), rnd(B, Hkv, N, D)
    q_i, w, k_i = rnd(B, Hs, T, J, Di), rnd(B, Hs, T, J), rnd(B, N, Di)
    key_end = torch.arange(N, device=device)
    idx = None
    if not dense:  # top-K of random scores over the visible keys, -1 where fewer are visible, shuffled
        pos = N - T + torch.arange(T)
        scores = torch.rand(B, Hs, T, N, generator=g).masked_fill(torch.arange(N) > pos[:, None], -1.0)
        top = scores.topk(min(K, N), dim=-1)
        idx = torch.where(top.values >= 0, top.indices, -1)
        idx = torch.gather(idx, -1, torch.argsort(torch.rand(idx.shape, generator=g), dim=-1))
        idx = idx.to(device=device, dtype=torch.int32)
    return q, k, q_i, w, k_i, key_end, idx


def loss_and_grads(fn, q, k, q_i, w, k_i, key_end, idx, S, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q_i, w, k_i)]
    loss = fn(q, k, *leaves, key_end, idx, S, 0.3, 0.4, **kw)
    return loss, torch.autograd.grad(loss, leaves)


@given(
    Hkv=st.sampled_from([1, 2]),
    G=st.sampled_from([1, 2, 3]),
    per_kv_head=st.booleans(),
    T=st.integers(1, 24),
    extra_keys=st.integers(0, 12),
    J=st.integers(1, 5),
    K=st.integers(1, 20),
    dense=st.booleans(),
    seed=st.integers(0, 10**6),
)
def test_triton_kl_matches_the_fp64_reference(Hkv, G, per_kv_head, T, extra_keys, J, K, dense, seed):
    Hs = Hkv if per_kv_head else 1
    N = T + extra_keys
    x = kl_inputs(2, Hkv * G, Hkv, Hs, T, N, 16, J, 8, K, dense, seed)
    loss, grads = loss_and_grads(index_kl_gather_triton, *x, N, coeff=1.7, temperature=1.3)
    x64 = [t.double() if t is not None and t.is_floating_point() else t for t in x]
    want, want_grads = loss_and_grads(index_kl_reference, *x64, N, coeff=1.7, temperature=1.3)
    assert loss.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-6)
    for a, b in zip(grads, want_grads):
        assert rel_err(a, b) < 1e-4 or (b.abs().max() < 1e-6 and a.abs().max() < 1e-5)


def test_out_of_range_ids_count_as_empty_slots_and_an_empty_set_adds_nothing():
    q, k, q_i, w, k_i, key_end, idx = kl_inputs(1, 2, 1, 1, 6, 6, 16, 2, 8, 3, False, 0)
    bad = idx.clone()
    bad[..., 0] = torch.tensor([-7, 6, 1000, 2**30, -1, 6], dtype=torch.int32)[None, None, :]
    cleaned = torch.where((bad >= 0) & (bad < 6), bad, -1)
    cleaned[0, 0, 1] = -1  # query 1 keeps no key at all
    bad[0, 0, 1] = -1
    got, got_grads = loss_and_grads(index_kl_gather_triton, q, k, q_i, w, k_i, key_end, bad, 6)
    want, want_grads = loss_and_grads(index_kl_reference, q.double(), k.double(), q_i.double(), w.double(),
                                      k_i.double(), key_end, cleaned, 6)
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    assert got_grads[0][0, 0, 1].abs().max() == 0 and got_grads[1][0, 0, 1].abs().max() == 0
    for a, b in zip(got_grads, want_grads):
        assert rel_err(a, b) < 1e-4


def test_the_public_op_dispatches_and_records_the_kernel():
    x = kl_inputs(1, 4, 2, 1, 10, 12, 16, 3, 8, 5, False, 1)
    with ops.track_implementations() as used:
        a = ops.index_kl(*x, S=12, scale=0.3, index_scale=0.4, backend="triton")
    assert used["index_kl"] == "triton"
    b = ops.index_kl(*x, S=12, scale=0.3, index_scale=0.4, backend="reference")
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    ops.index_kl(*x, S=12, scale=0.3, index_scale=0.4)  # auto: the kernel only on CUDA
    assert ops.last_implementation("index_kl") == ("triton" if torch.cuda.is_available() else "reference")
    with pytest.raises(ValueError, match="fp64"):
        ops.index_kl(*[t.double() if t is not None and t.is_floating_point() else t for t in x], S=12,
                     scale=0.3, index_scale=0.4, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("Hs", [1, 4])
def test_triton_kl_matches_the_reference_in_bf16_on_gpu(dense, Hs):
    x = kl_inputs(2, 16, 4, Hs, 512, 640, 128, 16, 64, 96, dense, 3, device="cuda", dtype=torch.bfloat16)
    loss, grads = loss_and_grads(index_kl_gather_triton, *x, 640)
    x64 = [t.double() if t is not None and t.is_floating_point() else t for t in x]
    want, want_grads = loss_and_grads(index_kl_reference, *x64, 640)
    assert loss.item() == pytest.approx(want.item(), rel=2e-2)
    for a, b in zip(grads, want_grads):
        assert rel_err(a, b) < 3e-2


@pytest.mark.parametrize("dense", [False, True])
def test_a_nan_key_makes_the_loss_nan_only_when_a_query_attends_to_it(dense):
    q, k, q_i, w, k_i, key_end, idx = kl_inputs(1, 2, 1, 1, 8, 12, 16, 2, 8, 3, dense, 4)
    attended = set(range(12)) if dense else {int(i) for i in idx.flatten() if i >= 0}
    unseen = next(n for n in range(12) if n not in attended) if not dense else None
    for n, want_nan in ([(min(attended), True)] + ([(unseen, False)] if unseen is not None else [])):
        for tensor in ("k", "k_i"):
            kk, ki = k.clone(), k_i.clone()
            (kk[0, 0, n, 0] if tensor == "k" else ki[0, n, 0]).fill_(float("nan"))
            got = index_kl_gather_triton(q, kk, q_i, w, ki, key_end, idx, 12, 0.3, 0.4)
            want = index_kl_reference(q.double(), kk.double(), q_i.double(), w.double(), ki.double(), key_end,
                                      idx, 12, 0.3, 0.4)
            assert got.isnan().item() == want.isnan().item() == want_nan, (n, tensor)
            if not want_nan:
                assert got.item() == pytest.approx(want.item(), rel=1e-4)
