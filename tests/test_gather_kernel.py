"""Triton token-gather sparse attention (sparsezoo/kernels/gather_attention_triton.py) vs plain-PyTorch fp64 oracles:
gather_attention_reference (sparsezoo.ops.references) for the output, and a dense masked softmax written here
for the LSE. Forward (out, LSE) and gradients of loss = <out, w> + <LSE, u> over finite LSE entries (so
dLSE enters the backward). On the CPU the kernels run in the Triton interpreter (fp32, tiny shapes);
the bf16 tests at the m3 shapes run on the GPU (marked gpu).

Tolerances: fp32 interpreter results within 1e-4 of the largest reference entry (per tensor); bf16 on
the GPU within 2e-2 relative (norm of the error over norm of the reference).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsezoo.ops.common import expand_selection
from sparsezoo.ops.references import gather_attention_reference

triton = pytest.importorskip("triton")

from sparsezoo.kernels.gather_attention_triton import gather_attention_triton, split_plan  # noqa: E402

from .helpers import rel_err  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = 1e-4


# ----------------------------------------------------------------------------- inputs and oracles

def random_selection(B, Hs, T, N, K, gen, empty_frac=0.35, empty_rows=True):
    """Duplicate-free ids in [0, N) at random slots, -1 interleaved; some rows have no key at all."""
    ids = torch.argsort(torch.rand(B, Hs, T, max(N, K), generator=gen), dim=-1)[..., :K]
    ids = torch.where(ids < N, ids, -1)
    ids = torch.where(torch.rand(B, Hs, T, K, generator=gen) < empty_frac, -1, ids)
    if empty_rows and T > 1:
        ids[:, :, T // 2] = -1
    return ids.to(DEV, torch.int32)


def random_inputs(B, Hq, Hkv, T, N, D, seed, dtype=torch.float32, device=DEV):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)
    return make(B, Hq, T, D), make(B, Hkv, N, D), make(B, Hkv, N, D), gen


def dense_out_lse(q, k, v, idx, scale):
    """Softmax over a dense mask built from the ids (out-of-range ids dropped): (out, LSE), any dtype."""
    B, Hq, T, _ = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    sel = expand_selection(idx, Hkv).long()
    ok = (sel >= 0) & (sel < N)
    allowed = torch.zeros(B, Hkv, T, N + 1, dtype=torch.bool, device=q.device)
    allowed.scatter_(-1, torch.where(ok, sel, N), True)
    allowed = allowed[..., :N].repeat_interleave(Hq // Hkv, dim=1)
    kk, vv = (x.repeat_interleave(Hq // Hkv, dim=1) for x in (k, v))
    s = (torch.einsum("bhtd,bhnd->bhtn", q, kk) * scale).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return torch.einsum("bhtn,bhnd->bhtd", p, vv), lse


def loss_of(out, lse, w, u):
    return (out * w).sum() + torch.where(torch.isfinite(lse), lse * u, 0.0).sum()


def kernel_run(q, k, v, idx, scale, w, u, config=None):
    """The kernel's (out, LSE, dq, dk, dv) for loss_of."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out, lse = gather_attention_triton(q, k, v, idx, scale, return_lse=True, config=config)
    loss_of(out, lse, w.to(out.dtype), u).backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def oracle_run(q, k, v, idx, scale, w, u, dtype=torch.float64):
    """(out, LSE, dq, dk, dv) of the oracles: out from gather_attention_reference (the library's
    reference, which wants ids in [-1, N)), LSE from dense_out_lse."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    clean = torch.where((idx >= 0) & (idx < k.shape[2]), idx, -1)
    out = gather_attention_reference(q, k, v, expand_selection(clean, k.shape[1]), scale)
    lse = dense_out_lse(q, k, v, idx, scale)[1]
    loss_of(out, lse, w.to(dtype), u.to(dtype)).backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def assert_close(got, want, tol=TOL, what=""):
    got, want = got.double(), want.double()
    err = (got - want).abs().max().item() if want.numel() else 0.0
    bound = tol * max(1.0, want.abs().max().item() if want.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def assert_lse_close(got, want, tol=TOL):
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), "the kernel's -inf LSE rows differ from the oracle's"
    assert (got[~fin] == float("-inf")).all()
    assert_close(got[fin], want[fin], tol, "lse")


def check_against_oracle(B, Hq, Hkv, Hs, T, N, D, K, seed, config=None, scale=0.3, dtype=torch.float32, tol=TOL):
    q, k, v, gen = random_inputs(B, Hq, Hkv, T, N, D, seed, dtype)
    idx = random_selection(B, Hs, T, N, K, gen)
    w = torch.randn(B, Hq, T, D, generator=gen, dtype=torch.float64)
    u = torch.randn(B, Hq, T, generator=gen, dtype=torch.float64)
    got = kernel_run(q, k, v, idx, scale, w, u, config)
    want = oracle_run(q, k, v, idx, scale, w, u)
    assert_close(got[0], want[0], tol, "out")
    assert_lse_close(got[1], want[1], tol)
    for name, g, r in zip(("dq", "dk", "dv"), got[2:], want[2:]):
        assert_close(g, r, tol, name)


# ----------------------------------------------------------------------------- the oracle itself

def test_dense_oracle_matches_library_reference():
    q, k, v, gen = random_inputs(2, 4, 2, 9, 30, 8, seed=1, dtype=torch.float64, device="cpu")
    idx = random_selection(2, 1, 9, 30, 12, gen)
    out, lse = dense_out_lse(q, k, v, idx, 0.4)
    assert_close(out, gather_attention_reference(q, k, v, expand_selection(idx, 2), 0.4), 1e-12, "out")
    assert torch.isinf(lse[:, :, 9 // 2]).all() and torch.isfinite(lse[:, :, 0]).all()


# ----------------------------------------------------------------------------- prefill path

@pytest.mark.parametrize("B, Hq, Hkv, Hs, T, N, D, K, BN", [
    (1, 2, 2, 2, 9, 40, 16, 20, 16),    # G = 1, one list per KV group, two key tiles
    (2, 4, 2, 1, 8, 60, 16, 33, 16),    # G = 2, one shared list, three key tiles (last partial)
    (1, 4, 1, 1, 40, 200, 12, 70, 64),  # G = 4, D not a power of two
    (2, 4, 1, 1, 5, 30, 16, 1, 16),     # G = 4, a single slot
])
def test_matches_reference(B, Hq, Hkv, Hs, T, N, D, K, BN):
    check_against_oracle(B, Hq, Hkv, Hs, T, N, D, K, seed=B * 100 + K, config={"BN": BN, "bwd_BN": BN})


def test_fp16_matches_reference():
    """fp16 inputs (fp32 accumulation; P and dS rounded to fp16 for their dots): within 1e-2."""
    check_against_oracle(1, 4, 2, 1, 6, 40, 16, 24, seed=7, config={"BN": 16, "bwd_BN": 16},
                         dtype=torch.float16, tol=1e-2)


@settings(max_examples=5)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.sampled_from([1, 2, 4]), shared=st.booleans(),
       T=st.integers(1, 6), N=st.integers(1, 50), K=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_matches_reference_random_shapes(B, Hkv, G, shared, T, N, K, seed):
    check_against_oracle(B, Hkv * G, Hkv, 1 if shared else Hkv, T, N, 16, K, seed,
                         config={"BN": 32, "bwd_BN": 16})


def test_rows_without_keys_get_zero_output_and_no_gradient():
    q, k, v, gen = random_inputs(1, 4, 2, 3, 10, 16, seed=5)
    idx = torch.full((1, 1, 3, 17), -1, dtype=torch.int32)
    idx[0, 0, 1, 5] = 7  # one key for the middle token only
    w, u = torch.randn(1, 4, 3, 16, generator=gen), torch.randn(1, 4, 3, generator=gen)
    out, lse, dq, dk, dv = kernel_run(q, k, v, idx, 0.5, w, u)
    assert (out[:, :, [0, 2]] == 0).all() and (lse[:, :, [0, 2]] == float("-inf")).all()
    assert (dq[:, :, [0, 2]] == 0).all()
    assert (dk[:, :, :7] == 0).all() and (dv[:, :, 8:] == 0).all()
    assert_close(out[:, :, 1], v[:, :, 7].repeat_interleave(2, dim=1), what="out of a single key")


# ----------------------------------------------------------------------------- decode / split path

@pytest.mark.parametrize("B, Hq, Hkv, Hs, T, K, splits", [
    (2, 4, 2, 1, 1, 70, 3),   # decode: 3 splits of 32 slots (the last 6)
    (1, 8, 2, 2, 1, 40, 8),   # more splits asked than tiles: capped at one per 16 slots
    (2, 2, 1, 1, 3, 50, 4),   # a few tokens, 4 splits, one token without keys
])
def test_split_path_matches_reference(B, Hq, Hkv, Hs, T, K, splits):
    check_against_oracle(B, Hq, Hkv, Hs, T, 90, 16, K, seed=splits + K,
                         config={"BN": 16, "bwd_BN": 32, "SPLITS": splits})


def test_split_with_an_empty_split():
    """Split 0 holds only -1 slots: its partial (LSE -inf) must not disturb the merge."""
    q, k, v, gen = random_inputs(1, 4, 2, 1, 30, 16, seed=9)
    idx = torch.full((1, 1, 1, 48), -1, dtype=torch.int32)
    ids = torch.randperm(30, generator=gen).to(torch.int32)
    idx[0, 0, 0, 16:46] = torch.where(torch.rand(30, generator=gen) < 0.7, ids, -1)
    w, u = torch.randn(1, 4, 1, 16, generator=gen), torch.randn(1, 4, 1, generator=gen)
    got = kernel_run(q, k, v, idx, 0.3, w, u, config={"BN": 16, "SPLITS": 3})
    want = oracle_run(q, k, v, idx, 0.3, w, u)
    assert_close(got[0], want[0], what="out")
    assert_lse_close(got[1], want[1])


def test_split_plan():
    assert split_plan(4, 2048, 64, 0, n_sms=132, per_sm=2) == (64, 32)  # decode B=1, Hkv=4: 128 programs
    assert split_plan(128, 2048, 64, 0, n_sms=132, per_sm=2) == (704, 3)  # B=32: 384 programs
    assert split_plan(4 * 4096, 2048, 64, 0, n_sms=132, per_sm=2) == (2048, 1)  # prefill: no split
    assert split_plan(4, 640, 64, 0, n_sms=132, per_sm=2) == (64, 10)  # CSA 512 + 128: one tile per split
    assert split_plan(1, 70, 16, 3, n_sms=1, per_sm=1) == (32, 3)  # forced
    assert split_plan(1, 5, 16, 4, n_sms=1, per_sm=1) == (16, 1)  # at most one split per tile


# ----------------------------------------------------------------------------- untrusted ids

@pytest.mark.parametrize("Hs", [1, 2])
def test_out_of_range_ids_are_empty(Hs):
    """Ids >= N or < -1 (which would address the next/previous head or batch item if used as
    offsets) count as empty: same out, LSE and gradients (of every batch item) as with -1 there."""
    B, Hq, Hkv, T, N, D, K = 2, 4, 2, 4, 20, 16, 12
    q, k, v, gen = random_inputs(B, Hq, Hkv, T, N, D, seed=11 + Hs)
    clean = random_selection(B, Hs, T, N, K, gen, empty_frac=0.4, empty_rows=False)
    bad = clean.clone()
    bad[0, 0, :, -1] = N  # batch 0, group 0: ids past N land on group 1 / batch 1 rows
    bad[0, 0, :, -2] = N + 3
    bad[0, -1, :, -3] = 2 * N + 1
    bad[1, -1, :, -1] = -2  # batch 1, last group: negative ids land on the rows before it
    bad[1, -1, :, -2] = -N + 1
    bad[1, 0, :, -3] = -(Hkv * N)
    clean = torch.where(bad == clean, clean, -1)
    w = torch.randn(B, Hq, T, D, generator=gen)
    u = torch.randn(B, Hq, T, generator=gen)
    got = kernel_run(q, k, v, bad, 0.3, w, u)
    want = kernel_run(q, k, v, clean, 0.3, w, u)
    ref = oracle_run(q, k, v, clean, 0.3, w.double(), u.double())
    for name, a, b, r in zip(("out", "lse", "dq", "dk", "dv"), got, want, ref):
        assert torch.equal(a, b), f"{name} changed by out-of-range ids"
        if name != "lse":
            assert_close(a, r, what=name)


def test_int64_ids_past_int32_do_not_wrap():
    q, k, v, gen = random_inputs(1, 2, 1, 2, 16, 16, seed=3)
    idx = torch.tensor([[[[2, 5, 2**32 + 3], [2**33, 1, -1]]]], dtype=torch.int64)
    out, lse = gather_attention_triton(q, k, v, idx, 0.3, return_lse=True)
    want_out, want_lse = dense_out_lse(q.double(), k.double(), v.double(), idx, 0.3)
    assert_close(out, want_out, what="out")
    assert_lse_close(lse, want_lse)


# ----------------------------------------------------------------------------- launcher

def test_lse_only_loss_and_no_lse_return():
    q, k, v, gen = random_inputs(1, 2, 1, 4, 20, 16, seed=4)
    idx = random_selection(1, 1, 4, 20, 8, gen, empty_rows=False)
    qq = q.clone().requires_grad_()
    _, lse = gather_attention_triton(qq, k, v, idx, 0.3, return_lse=True)
    lse.sum().backward()  # dout is zero
    qd = q.double().requires_grad_()
    dense_out_lse(qd, k.double(), v.double(), idx, 0.3)[1].sum().backward()
    assert_close(qq.grad, qd.grad, what="dq of an LSE-only loss")
    out = gather_attention_triton(q, k, v, idx, 0.3)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape


def test_launcher_rejects_bad_inputs():
    q, k, v, _ = random_inputs(1, 4, 2, 3, 8, 16, seed=0)
    idx = torch.zeros(1, 1, 3, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="backend='reference'"):
        gather_attention_triton(q.double(), k.double(), v.double(), idx, 0.3)
    with pytest.raises(ValueError, match="Hs"):
        gather_attention_triton(q, k, v, torch.zeros(1, 3, 3, 4, dtype=torch.int32), 0.3)
    with pytest.raises(ValueError, match="Hkv"):
        gather_attention_triton(q, k[:, :1].expand(1, 3, 8, 16), v[:, :1].expand(1, 3, 8, 16), idx, 0.3)


def test_no_slots_at_all():
    q, k, v, _ = random_inputs(1, 2, 1, 3, 8, 16, seed=0)
    out, lse = gather_attention_triton(q, k, v, torch.zeros(1, 1, 3, 0, dtype=torch.int32), 0.3, return_lse=True)
    assert (out == 0).all() and (lse == float("-inf")).all()


# ----------------------------------------------------------------------------- two key pools (CSA: tokens + entries)

def two_pool_inputs(B, Hq, Hkv, Hs, T, N, N2, D, K, seed, strided_second=False):
    """q, (k, v) of N rows, (k2, v2) of N2 rows, ids over [0, N + N2) with -1 and a few ids >= N + N2,
    and the loss weights. strided_second: k2, v2 with non-unit column stride (transposed storage)."""
    q, k, v, gen = random_inputs(B, Hq, Hkv, T, N, D, seed)
    k2, v2 = (torch.randn(B, Hkv, N2, D, generator=gen) for _ in range(2))
    if strided_second:
        k2, v2 = (x.transpose(2, 3).contiguous().transpose(2, 3) for x in (k2, v2))
    idx = random_selection(B, Hs, T, N + N2, K, gen)
    far = torch.rand(idx.shape, generator=gen) < 0.1
    idx = torch.where(far, N + N2 + torch.randint(0, 5, idx.shape, generator=gen).to(torch.int32), idx)
    w = torch.randn(B, Hq, T, D, generator=gen, dtype=torch.float64)
    u = torch.randn(B, Hq, T, generator=gen, dtype=torch.float64)
    return (q.to(DEV), k.to(DEV), v.to(DEV), k2.to(DEV), v2.to(DEV)), idx.to(DEV), w, u


def kernel_run_two_pools(q, k, v, k2, v2, idx, scale, w, u, config=None):
    """The kernel's (out, LSE, dq, dk, dv, dk2, dv2) for loss_of, keys read from two pools."""
    q, k, v, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v, k2, v2))
    out, lse = gather_attention_triton(q, k, v, idx, scale, return_lse=True, config=config, k2=k2, v2=v2)
    loss_of(out, lse, w.to(out.dtype), u.to(out.dtype)).backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad, k2.grad, v2.grad


def split_pool_grads(run, N):
    """(out, LSE, dq, dk, dv) of one concatenated pool -> (out, LSE, dq, dk, dv, dk2, dv2)."""
    out, lse, dq, dk, dv = run
    return out, lse, dq, dk[:, :, :N], dv[:, :, :N], dk[:, :, N:], dv[:, :, N:]


NAMES = ("out", "lse", "dq", "dk", "dv", "dk2", "dv2")


@pytest.mark.parametrize("B, Hq, Hkv, Hs, T, N, N2, D, K, config, strided", [
    (1, 2, 2, 2, 7, 30, 12, 16, 24, {"BN": 16, "bwd_BN": 16}, False),   # G = 1, one list per group
    (2, 4, 2, 1, 6, 20, 9, 12, 33, {"BN": 16, "bwd_BN": 32}, True),     # G = 2, D 12, k2 column stride != 1
    (2, 4, 1, 1, 1, 40, 20, 16, 50, {"BN": 16, "SPLITS": 3}, False),    # decode: split path forced, T = 1
    (1, 8, 2, 2, 1, 25, 25, 16, 40, {"BN": 16, "SPLITS": 8}, False),    # decode, splits capped at one per tile
])
def test_two_pools_match_one_concatenated_pool(B, Hq, Hkv, Hs, T, N, N2, D, K, config, strided):
    """k2, v2 read in place = k2, v2 concatenated after k, v: out, LSE and the gradients of q, k, v,
    k2, v2 against the kernel on the concatenated pool and against the fp64 oracle. Ids >= N + N2
    in the lists count as empty."""
    (q, k, v, k2, v2), idx, w, u = two_pool_inputs(B, Hq, Hkv, Hs, T, N, N2, D, K, seed=N + K, strided_second=strided)
    assert (idx >= N + N2).any() and ((idx >= N) & (idx < N + N2)).any() and ((idx >= 0) & (idx < N)).any()
    got = kernel_run_two_pools(q, k, v, k2, v2, idx, 0.3, w, u, config)
    kk, vv = torch.cat([k, k2], 2), torch.cat([v, v2], 2)
    one_pool = split_pool_grads(kernel_run(q, kk, vv, idx, 0.3, w, u, config), N)
    oracle = split_pool_grads(oracle_run(q, kk, vv, idx, 0.3, w, u), N)
    for name, g, c, r in zip(NAMES, got, one_pool, oracle):
        assert g.shape == r.shape, name
        if name == "lse":
            assert_lse_close(g, c, 1e-5)
            assert_lse_close(g, r)
        else:
            assert_close(g, c, 1e-5, name + " vs one pool")
            assert_close(g, r, TOL, name)


def test_two_pools_ids_past_both_pools_are_empty():
    """Ids >= N + N2 (which would address the next head's or batch item's rows of k2) give the same
    out, LSE and gradients as -1 there."""
    B, Hq, Hkv, T, N, N2, D, K = 2, 4, 2, 3, 12, 8, 16, 10
    (q, k, v, k2, v2), idx, w, u = two_pool_inputs(B, Hq, Hkv, Hkv, T, N, N2, D, K, seed=21)
    clean = torch.where(idx < N + N2, idx, -1)
    bad = clean.clone()
    bad[0, 0, :, -1] = N + N2
    bad[0, 0, :, -2] = N + 2 * N2 + 1
    bad[1, 0, :, -3] = 2 * (N + N2)
    clean = torch.where(bad == clean, clean, -1)
    got = kernel_run_two_pools(q, k, v, k2, v2, bad, 0.3, w, u)
    want = kernel_run_two_pools(q, k, v, k2, v2, clean, 0.3, w, u)
    for name, a, b in zip(NAMES, got, want):
        assert torch.equal(a, b), f"{name} changed by ids past both pools"


def test_two_pools_with_an_empty_pool():
    """N2 = 0 behaves as one pool; N = 0 reads the second pool only (ids from 0)."""
    (q, k, v, k2, v2), idx, w, u = two_pool_inputs(1, 2, 1, 1, 4, 10, 6, 16, 8, seed=5)
    idx = torch.where(idx < 10, idx, -1)
    out = gather_attention_triton(q, k, v, idx, 0.3, k2=k2[:, :, :0], v2=v2[:, :, :0])
    assert torch.equal(out, gather_attention_triton(q, k, v, idx, 0.3))
    idx2 = torch.where(idx < 6, idx, -1)
    out = gather_attention_triton(q, k[:, :, :0], v[:, :, :0], idx2, 0.3, k2=k2, v2=v2)
    assert torch.equal(out, gather_attention_triton(q, k2, v2, idx2, 0.3))


def test_launcher_rejects_bad_second_pool():
    q, k, v, _ = random_inputs(1, 4, 2, 3, 8, 16, seed=0)
    idx = torch.zeros(1, 1, 3, 4, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="together"):
        gather_attention_triton(q, k, v, idx, 0.3, k2=k)
    with pytest.raises(ValueError, match="dtype"):
        gather_attention_triton(q, k, v, idx, 0.3, k2=k.half(), v2=v.half())
    with pytest.raises(ValueError, match="Hkv=2"):
        gather_attention_triton(q, k, v, idx, 0.3, k2=k[:, :1], v2=v[:, :1])


def test_public_op_second_pool_reference_vs_triton():
    """ops.gather_attention with k_extra / v_extra: triton (interpreter) against the reference,
    forward, LSE and the gradients of all five inputs; and its validation errors."""
    from sparsezoo import ops

    (q, k, v, k2, v2), idx, w, u = two_pool_inputs(2, 4, 2, 1, 5, 14, 7, 16, 20, seed=8)
    runs = {}
    for backend in ("reference", "triton"):
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v, k2, v2)]
        out, lse = ops.gather_attention(xs[0], xs[1], xs[2], idx, scale=0.3, backend=backend, return_lse=True,
                                        k_extra=xs[3], v_extra=xs[4])
        loss_of(out, lse, w.to(out.dtype), u.to(out.dtype)).backward()
        runs[backend] = (out.detach(), lse.detach(), *(x.grad for x in xs))
    for name, g, r in zip(NAMES, runs["triton"], runs["reference"]):
        if name == "lse":
            assert_lse_close(g, r)
        else:
            assert_close(g, r, TOL, name)
    concatenated = ops.gather_attention(q, torch.cat([k, k2], 2), torch.cat([v, v2], 2), idx, scale=0.3,
                                        backend="reference")
    assert_close(runs["reference"][0], concatenated, 1e-6, "out vs the concatenated pool")
    with pytest.raises(ValueError, match="both or neither"):
        ops.gather_attention(q, k, v, idx, scale=0.3, k_extra=k2)
    with pytest.raises(ValueError, match="share a dtype"):
        ops.gather_attention(q, k, v, idx, scale=0.3, k_extra=k2.double(), v_extra=v2.double())
    with pytest.raises(ValueError, match="one shape"):
        ops.gather_attention(q, k, v, idx, scale=0.3, k_extra=k2, v_extra=v2[:, :, 1:])
    with pytest.raises(ValueError, match="like k"):
        ops.gather_attention(q, k, v, idx, scale=0.3, k_extra=k2[:, :1], v_extra=v2[:, :1])


# ----------------------------------------------------------------------------- GPU, m3 shapes, bf16

def causal_random_selection(B, T, S, K, gen_device):
    """For query t (position S - T + t): min(pos + 1, K) distinct random visible ids, shuffled, -1 padded."""
    pos = torch.arange(S - T, S, device=gen_device)
    score = torch.rand(B, 1, T, S, device=gen_device)
    score = score.masked_fill(torch.arange(S, device=gen_device)[None, :] > pos[:, None], -1.0)
    top, ids = torch.topk(score, K, dim=-1)
    ids = torch.where(top >= 0, ids, -1)
    perm = torch.argsort(torch.rand(ids.shape, device=gen_device), dim=-1)
    return torch.gather(ids, -1, perm).to(torch.int32)


@pytest.mark.gpu
def test_gpu_prefill_bf16_m3():
    """T = S = 4096, Hq 64, Hkv 4, D 128, K = 2048, one shared list: the whole output against the fp32
    reference, gradients (through out and LSE) on 128 query tokens against the dense fp32 oracle."""
    torch.manual_seed(0)
    B, Hq, Hkv, T, D, K = 1, 64, 4, 4096, 128, 2048
    scale = D ** -0.5
    q, k, v = (torch.randn(B, h, T, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    idx = causal_random_selection(B, T, T, K, "cuda")
    sub = torch.randperm(T, device="cuda")[:128].sort().values
    w = torch.zeros(B, Hq, T, D, device="cuda")
    w[:, :, sub] = torch.randn(B, Hq, len(sub), D, device="cuda")
    u = torch.zeros(B, Hq, T, device="cuda")
    u[:, :, sub] = torch.randn(B, Hq, len(sub), device="cuda")
    out, lse, dq, dk, dv = kernel_run(q, k, v, idx, scale, w, u)
    with torch.no_grad():
        want_out = gather_attention_reference(q.float(), k.float(), v.float(), expand_selection(idx, Hkv), scale)
    assert rel_err(out, want_out) < 2e-2
    qs, kf, vf = (x.float().requires_grad_() for x in (q[:, :, sub], k, v))
    o_s, l_s = dense_out_lse(qs, kf, vf, idx[:, :, sub], scale)
    assert rel_err(lse[:, :, sub], l_s) < 2e-2 and torch.isfinite(lse).all()
    loss_of(o_s, l_s, w[:, :, sub], u[:, :, sub]).backward()
    assert rel_err(dq[:, :, sub], qs.grad) < 2e-2
    rest = torch.ones(T, dtype=torch.bool, device="cuda")
    rest[sub] = False
    assert (dq[:, :, rest] == 0).all()
    assert rel_err(dk, kf.grad) < 2e-2 and rel_err(dv, vf.grad) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("B, K", [(1, 2048), (32, 2048), (4, 640)])
def test_gpu_decode_bf16_m3_graph_capture(B, K):
    """T = 1 (auto flash-decoding splits) against the fp32 reference, also replayed from a CUDA graph."""
    torch.manual_seed(1)
    Hq, Hkv, S, D = 64, 4, 8192, 128
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    idx = causal_random_selection(B, 1, S, K, "cuda")
    want = gather_attention_reference(q.float(), k.float(), v.float(), expand_selection(idx, Hkv), 0.1)
    out = gather_attention_triton(q, k, v, idx, 0.1)  # compiles outside the capture
    assert rel_err(out, want) < 2e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gather_attention_triton(q, k, v, idx, 0.1)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    want = gather_attention_reference(q.float(), k.float(), v.float(), expand_selection(idx, Hkv), 0.1)
    assert rel_err(captured, want) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, D, K", [(torch.float32, 256, 96), (torch.bfloat16, 256, 96),
                                         (torch.float32, 128, 2048)])
def test_gpu_wide_tiles_fit_shared_memory(dtype, D, K):
    """fp32 and 256-wide heads: the forward and backward tiles shed stages (and halve) to fit, and stay exact,
    with prefill-like rows (T 64) and split decode rows (T 1)."""
    torch.manual_seed(3)
    for T in (64, 1):
        q, k, v = (torch.randn(2, h, n, D, device="cuda", dtype=dtype) for h, n in ((8, T), (2, 512), (2, 512)))
        idx = causal_random_selection(2, T, 512, min(K, 512), "cuda")
        w, u = torch.randn(2, 8, T, D, device="cuda"), torch.randn(2, 8, T, device="cuda")
        out, lse, dq, dk, dv = kernel_run(q, k, v, idx, D ** -0.5, w, u)
        qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
        want_out, want_lse = dense_out_lse(qf, kf, vf, idx, D ** -0.5)
        loss_of(want_out, want_lse, w, u).backward()
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
        assert rel_err(out, want_out) < tol and rel_err(lse, want_lse) < tol
        assert rel_err(dq, qf.grad) < tol and rel_err(dk, kf.grad) < tol and rel_err(dv, vf.grad) < tol


@pytest.mark.gpu
def test_gpu_decode_bf16_two_pools_graph_capture():
    """CSA decode (B 8, 8k raw tokens + 2k entries, window 128 + top-512): two pools in place against
    the fp32 reference on the concatenated pool, also replayed from a CUDA graph."""
    torch.manual_seed(2)
    B, Hq, Hkv, S, E, D = 8, 64, 1, 8192, 2048, 128
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kc, vc = (torch.randn(B, Hkv, E, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    window = torch.arange(S - 128, S, device="cuda").expand(B, 1, 1, 128)
    entries = S + torch.rand(B, 1, 1, E, device="cuda").argsort(-1)[..., :512]
    idx = torch.cat([window, entries], -1).to(torch.int32)
    kk, vv = torch.cat([k, kc], 2).float(), torch.cat([v, vc], 2).float()
    want = gather_attention_reference(q.float(), kk, vv, expand_selection(idx, Hkv), 0.1)
    out = gather_attention_triton(q, k, v, idx, 0.1, k2=kc, v2=vc)
    assert rel_err(out, want) < 2e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gather_attention_triton(q, k, v, idx, 0.1, k2=kc, v2=vc)
    kc.copy_(torch.randn_like(kc))
    graph.replay()
    torch.cuda.synchronize()
    want = gather_attention_reference(q.float(), k.float(), v.float(), expand_selection(idx, Hkv), 0.1,
                                      k_extra=kc.float(), v_extra=vc.float())
    assert rel_err(captured, want) < 2e-2


@pytest.mark.parametrize("T,splits", [(9, 1), (1, 3)])
def test_window_slots_equal_an_explicit_window_list(T, splits):
    """gather_attention(window=w) attends to each query's last w raw tokens before its ids, as if they were
    listed: the Triton kernel computes them (split-K decode included), the reference expands the list."""
    from sparsezoo import ops
    from sparsezoo.ops.gather_attention.api import window_ids

    g = torch.Generator().manual_seed(31)
    B, Hq, Hkv, N, N2, D, K, w = 2, 4, 2, 23, 6, 16, 5, 7
    q = torch.randn(B, Hq, T, D, generator=g, requires_grad=True)
    k, v = (torch.randn(B, Hkv, N, D, generator=g, requires_grad=True) for _ in range(2))
    k2, v2 = (torch.randn(B, Hkv, N2, D, generator=g, requires_grad=True) for _ in range(2))
    idx = torch.randint(N, N + N2, (B, 1, T, K), generator=g, dtype=torch.int32)  # entries of the second pool
    idx[0, 0, 0, 1] = -1
    leaves = (q, k, v, k2, v2)
    results = []
    for backend, ids, window in (("triton", idx, w), ("reference", idx, w), ("reference", window_ids(idx, w, N), 0)):
        out, lse = ops.gather_attention(q, k, v, ids, scale=0.3, backend=backend, return_lse=True, k_extra=k2,
                                        v_extra=v2, window=window) if backend == "reference" else \
            gather_attention_triton(q, k, v, ids, 0.3, return_lse=True, config={"SPLITS": splits}, k2=k2, v2=v2,
                                    window=window)
        results.append((out, lse, *torch.autograd.grad((out * out).sum() + lse.sum(), leaves)))
    for got, want in zip(results[0], results[2]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for got, want in zip(results[1], results[2]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("two_pools, window, splits", [(False, 0, 1), (True, 5, 1), (True, 0, 3)])
def test_one_shared_k_equals_v_pool_equals_separate_copies(two_pools, window, splits):
    """v is k (and v2 is k2: DeepSeek-V4's K = V entries) gathers each row once (SHARED); the result and the
    gradient reaching the shared tensor equal those of separate copies (whose k and v gradients add up)."""
    g = torch.Generator().manual_seed(7)
    B, Hq, Hkv, T, N, N2, D, K = 2, 4, 2, 3 if splits == 1 else 1, 19, 8, 16, 6
    q = torch.randn(B, Hq, T, D, generator=g)
    kv, kv2 = torch.randn(B, Hkv, N, D, generator=g), torch.randn(B, Hkv, N2, D, generator=g)
    hi = N + (N2 if two_pools else 0)
    idx = torch.randint(-1, hi, (B, 1, T, K), generator=g, dtype=torch.int32)
    pools = {}

    def run(shared):
        leaves = [x.clone().requires_grad_() for x in (q, kv, kv2)]
        qq, k, k2 = leaves
        v, v2 = (k, k2) if shared else (k.clone(), k2.clone())
        out, lse = gather_attention_triton(qq, k, v, idx, 0.4, return_lse=True, config={"SPLITS": splits},
                                           k2=k2 if two_pools else None, v2=v2 if two_pools else None, window=window)
        grads = torch.autograd.grad((out * out).sum() + lse.sum(), leaves[:2] + leaves[2:] * two_pools)
        pools[shared] = (out, lse, *grads)

    run(True)
    run(False)
    from sparsezoo.kernels.gather_attention_triton import _pools

    second = (kv2, kv2) if two_pools else (None, None)
    assert _pools(kv, kv, *second)[-1]["SHARED"]
    assert not _pools(kv, kv.clone(), *second)[-1]["SHARED"]  # equal values in other memory: two pools
    for got, want in zip(pools[True], pools[False]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the attention sink

@pytest.mark.parametrize("splits", [1, 3])
def test_sink_in_the_epilogue_matches_the_reference(splits):
    """The sink applied in the forward's epilogue (splits = 1) or in the split merge (3), with empty rows
    (out 0, LSE = the sink) and a NaN row (stays NaN, passes no gradient to q, k, v); out, LSE and the
    gradients of q, k, v and the sink against the fp64 reference."""
    q, k, v, gen = random_inputs(2, 4, 2, 6, 20, 16, seed=40 + splits)
    idx = random_selection(2, 2, 6, 20, 7, gen)  # row T // 2 lists no key
    sink = torch.randn(4, generator=gen).to(DEV)
    q[1, 3, 4, 2] = float("nan")
    w, u = torch.randn(2, 4, 6, 16, generator=gen).to(DEV), torch.randn(2, 4, 6, generator=gen).to(DEV)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, sink)]
    out, lse = gather_attention_triton(*leaves[:3], idx, 0.3, return_lse=True, config={"SPLITS": splits},
                                       sink=leaves[3])
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v, sink)]
    ref_out, ref_lse = gather_attention_reference(*ref_leaves[:3], idx, 0.3, True, sink=ref_leaves[3])
    torch.testing.assert_close(out.double(), ref_out, atol=TOL, rtol=TOL, equal_nan=True)
    torch.testing.assert_close(lse.double(), ref_lse, atol=TOL, rtol=TOL, equal_nan=True)
    torch.testing.assert_close(lse[:, :, 3], sink.view(1, 4).expand(2, 4), atol=1e-6, rtol=0)  # empty rows
    live = torch.isfinite(ref_lse)  # the NaN row is left out of the loss: its gradient is not defined
    grads = torch.autograd.grad(((out * w).sum(-1) + lse * u)[live].sum(), leaves)
    ref_grads = torch.autograd.grad(((ref_out * w.double()).sum(-1) + ref_lse * u.double())[live].sum(), ref_leaves)
    for name, g, r in zip(("dq", "dk", "dv", "dsink"), grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=TOL, rtol=TOL, msg=name)
    with pytest.raises(ValueError, match=r"sink must be a float tensor \[Hq=4\]"):
        gather_attention_triton(q, k, v, idx, 0.3, sink=sink[:3])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_op_drops_ids_outside_both_pools(backend):
    """ops.gather_attention: ids below -1, past both pools and int64 ids past int32 (which must not wrap into
    range) are empty slots, with a window and a second pool, on each backend (the Triton kernel masks them
    itself; the reference drops them before listing the window)."""
    from sparsezoo import ops

    q, k, v, gen = random_inputs(1, 4, 2, 5, 12, 16, seed=61)
    kc, vc = torch.randn(2, 1, 2, 3, 16, generator=gen).to(DEV)
    idx = random_selection(1, 1, 5, 15, 6, gen, empty_rows=False).long()
    bad = idx.clone()
    bad[..., 0], bad[..., 1], bad[..., 2] = -7, 15 + 4, 2**32 + 3  # 2**32 + 3 wraps to 3 in int32
    kept = torch.where((bad >= 0) & (bad < 15), bad, -1)
    run = lambda ids: ops.gather_attention(q, k, v, ids, scale=0.3, window=2, k_extra=kc, v_extra=vc,
                                           return_lse=True, backend=backend)
    for got, want in zip(run(bad), run(kept)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend, window, splits, dtype", [("reference", 3, 1, torch.int32),
                                                             ("triton", 3, 1, torch.int32),
                                                             ("triton", 0, 3, torch.int64),
                                                             ("triton", 2, 2, torch.int32)])
def test_extra_ids_name_the_second_pool(backend, window, splits, dtype):
    """extra_ids=True: the ids name rows of k_extra (CSA's selected entries), as ids N + id of the
    concatenation would; out, LSE and every gradient (k_extra = v_extra shared, as V4's entries) match that
    call exactly, and ids past the second pool (int64 past int32 too) are empty."""
    from sparsezoo import ops

    q, k, v, gen = random_inputs(2, 4, 2, 4, 11, 16, seed=71 + window)
    kc = torch.randn(2, 2, 7, 16, generator=gen).to(DEV)
    sel = random_selection(2, 1, 4, 7, 5, gen).to(dtype)
    sel[0, 0, :, -1] = 7 if dtype == torch.int32 else 2**32 + 1  # past the second pool: empty
    shifted = torch.where((sel >= 0) & (sel < 7), sel + 11, -1)
    w = torch.randn(2, 4, 4, 16, generator=gen, dtype=torch.float64).to(DEV)
    config = {"SPLITS": splits}

    def run(ids, extra_ids):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, kc)]
        qq, kk, vv, cc = leaves
        call = dict(scale=0.3, window=window, k_extra=cc, v_extra=cc, return_lse=True, backend=backend)
        if backend == "triton":  # the launcher, to force the split path
            out, lse = gather_attention_triton(qq, kk, vv, ids, 0.3, True, config, k2=cc, v2=cc, window=window,
                                               extra_ids=extra_ids)
        else:
            out, lse = ops.gather_attention(qq, kk, vv, ids, extra_ids=extra_ids, **call)
        ((out.double() * w).sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
        return out, lse, *(x.grad for x in leaves)

    for got, want in zip(run(sel, True), run(shifted, False)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="second pool"):
        ops.gather_attention(q, k, v, sel, scale=0.3, extra_ids=True)
