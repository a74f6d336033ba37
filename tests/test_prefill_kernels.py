"""Triton prefill kernels (indexer, block-sparse attention fwd/bwd, sparse KL, training step) vs the
plain-PyTorch references. On the CPU they run under TRITON_INTERPRET=1 (fp32/fp16, tiny shapes);
bf16 at realistic tiles runs on the GPU (marked gpu).

Tolerances: fp32 outputs/grads 1e-4 (interpreter, fp32 dots); bf16 attention atol=rtol=3e-2 and LSE
2e-2 (MSA's release tolerances, relaxed for the LSE by bf16 inputs); KL grads rtol 1e-2 of the
largest entry. Top-k: the multisets of selected block scores must agree within a score eps, which
allows ties and near-ties to swap ids.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsezoo import ops
from sparsezoo.ops import references as ref

triton = pytest.importorskip("triton")

from sparsezoo.kernels import index_kl_triton, select_triton, sparse_attention_triton  # noqa: E402
from sparsezoo.training_step import msa_sparse_step  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- helpers

def check_format(sel: torch.Tensor, T: int, S: int, block: int) -> None:
    ref_local = (S - T + torch.arange(T, device=sel.device)) // block
    from sparsezoo.ops.checks import check_selection_values

    check_selection_values(sel, T, S, block)
    n_valid = (sel >= 0).sum(-1)
    assert (n_valid == torch.clamp(ref_local + 1, max=sel.shape[-1]).view(1, 1, T)).all()
    # the local block is always selected
    assert (sel.long() == ref_local.view(1, 1, T, 1)).any(-1).all()


def assert_same_selection(sel, q_idx, k_idx, block, topk, scale, eps):
    """Selected (ranked) block scores equal the reference's as multisets, within eps."""
    B, H, T, _ = q_idx.shape
    S = k_idx.shape[1]
    check_format(sel, T, S, block)
    want = ref.msa_select_reference(q_idx.float(), k_idx.float(), block, topk, scale)
    pos = ref.query_positions(T, S, 0, T, q_idx.device)
    b = ref.block_scores(q_idx.float(), k_idx.float(), pos, block, scale)  # [B, H, T, nb]
    local = (pos // block).view(1, 1, T, 1)

    def ranked_scores(s):
        ids = s.long()
        keep = (ids >= 0) & (ids != local)
        v = torch.gather(b, -1, ids.clamp_min(0))
        return torch.sort(torch.where(keep, v, float("-inf")), dim=-1, descending=True).values

    got, exp = ranked_scores(sel), ranked_scores(want)
    fin = torch.isfinite(exp)
    assert (torch.isfinite(got) == fin).all()
    assert torch.allclose(got[fin], exp[fin], atol=eps, rtol=0)


def random_selection(B, H, T, S, block, topk, gen):
    """Valid selections in shuffled order (any unique causal order is legal input)."""
    q_idx = torch.randn(B, H, T, 8, generator=gen)
    k_idx = torch.randn(B, S, 8, generator=gen)
    sel = ref.msa_select_reference(q_idx, k_idx, block, topk, 0.3)
    n_valid = (sel >= 0).sum(-1, keepdim=True)
    perm = torch.argsort(torch.rand(sel.shape, generator=gen) + (torch.arange(topk) >= n_valid) * 2, dim=-1)
    return torch.gather(sel, -1, perm)


# ----------------------------------------------------------------------------- indexer

@settings(max_examples=8)
@given(B=st.integers(1, 2), H=st.integers(1, 3), S=st.integers(1, 70), frac=st.floats(0.05, 1.0),
       D=st.sampled_from([8, 16]), block=st.sampled_from([4, 8, 16]), topk=st.integers(1, 6),
       half=st.booleans(), seed=st.integers(0, 2**16))
def test_select_matches_reference(B, H, S, frac, D, block, topk, half, seed):
    gen = torch.Generator().manual_seed(seed)
    T = max(1, int(S * frac))
    dtype = torch.float16 if half else torch.float32
    q_idx = torch.randn(B, H, T, D, generator=gen).to(DEV, dtype)
    k_idx = torch.randn(B, S, D, generator=gen).to(DEV, dtype)
    scale = 1 / math.sqrt(D)
    sel = select_triton.msa_select_triton(q_idx, k_idx, block, topk, scale)
    assert sel.dtype == torch.int32 and sel.shape == (B, H, T, topk)
    assert_same_selection(sel, q_idx, k_idx, block, topk, scale, eps=1e-4 if not half else 2e-3)


def test_select_ties_go_to_smaller_ids():
    # every block scores the same: the spec's example L = 17, k = 16 gives [0 .. 14, 17]
    block, S, topk = 4, 72, 16
    q_idx = torch.ones(1, 2, S, 8, device=DEV)
    k_idx = torch.ones(1, S, 8, device=DEV)
    sel = select_triton.msa_select_triton(q_idx, k_idx, block, topk, 0.5)
    want = ref.msa_select_reference(q_idx, k_idx, block, topk, 0.5)
    assert torch.equal(sel, want)
    assert sel[0, 0, 17 * block].tolist() == list(range(15)) + [17]


def test_select_chunked_prefill_exact_ids():
    gen = torch.Generator().manual_seed(3)
    q_idx = torch.randn(1, 2, 11, 16, generator=gen).to(DEV)
    k_idx = torch.randn(1, 83, 16, generator=gen).to(DEV)
    sel = ops.msa_select(q_idx, k_idx, block_size=8, topk=4, backend="triton")
    assert ops.last_implementation("msa_select") == "triton"
    assert torch.equal(sel, ref.msa_select_reference(q_idx, k_idx, 8, 4, 0.25))


def test_select_rejects_bad_inputs():
    q = torch.randn(1, 1, 4, 8, device=DEV)
    k = torch.randn(1, 4, 8, device=DEV)
    with pytest.raises(ValueError, match="power of two"):
        select_triton.msa_select_triton(q, k, 12, 2, 0.3)
    with pytest.raises(ValueError, match="scale > 0"):
        select_triton.msa_select_triton(q, k, 4, 2, -1.0)


# ----------------------------------------------------------------------------- attention

def _attention_case(B, Hq, Hkv, T, S, D, block, topk, seed, dtype=torch.float32, device=DEV):
    gen = torch.Generator().manual_seed(seed)
    sel = random_selection(B, Hkv, T, S, block, topk, gen).to(device)
    mk = lambda *s: torch.randn(*s, generator=gen).to(device, dtype).requires_grad_()
    return mk(B, Hq, T, D), mk(B, Hkv, S, D), mk(B, Hkv, S, D), sel


def _compare_attention(q, k, v, sel, block, scale, atol, rtol, lse_atol):
    out, lse = sparse_attention_triton.block_sparse_attention_triton(q, k, v, sel, block, scale, True)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    rout, rlse = ref.block_sparse_attention_reference(q64, k64, v64, sel, block, scale, True)
    torch.testing.assert_close(out.double(), rout, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), rlse, atol=lse_atol, rtol=0)
    gen = torch.Generator().manual_seed(7)
    go = torch.randn(out.shape, generator=gen).to(out.device)
    gl = torch.randn(lse.shape, generator=gen).to(out.device)
    grads = torch.autograd.grad((out.float() * go).sum() + (lse * gl).sum(), (q, k, v))
    rgrads = torch.autograd.grad((rout * go.double()).sum() + (rlse * gl.double()).sum(), (q64, k64, v64))
    for name, g, rg in zip("qkv", grads, rgrads):
        scale_g = rg.abs().max().item() + 1e-6
        err = (g.double() - rg).abs().max().item() / scale_g
        assert err < rtol, f"d{name}: max error {err:.3g} of the largest entry"


@settings(max_examples=5)
@given(Hkv=st.integers(1, 2), G=st.sampled_from([1, 2, 3]), S=st.integers(2, 48), frac=st.floats(0.1, 1.0),
       block=st.sampled_from([4, 8]), topk=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_attention_fwd_bwd_matches_reference(Hkv, G, S, frac, block, topk, seed):
    T = max(1, int(S * frac))
    q, k, v, sel = _attention_case(1, Hkv * G, Hkv, T, S, 16, block, topk, seed)
    _compare_attention(q, k, v, sel, block, 0.25, atol=1e-4, rtol=1e-4, lse_atol=1e-4)


def test_attention_empty_rows_and_dispatch():
    q, k, v, sel = _attention_case(1, 4, 2, 10, 24, 16, 8, 3, seed=1)
    sel = sel.clone()
    sel[:, :, 3] = -1  # token 3 selects nothing
    out, lse = ops.block_sparse_attention(q, k, v, sel, block_size=8, backend="triton", return_lse=True)
    assert ops.last_implementation("block_sparse_attention") == "triton"
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
    assert torch.isneginf(lse[:, :, 3]).all()
    rout, rlse = ref.block_sparse_attention_reference(q, k, v, sel, 8, 0.25, True)
    torch.testing.assert_close(out, rout, atol=1e-4, rtol=1e-4)
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert torch.equal(q.grad[:, :, 3], torch.zeros_like(q.grad[:, :, 3]))


def test_attention_token_reordering_is_exact():
    # tokens regrouped inside windows before tiling (config WINDOW) must not change any result
    q, k, v, sel = _attention_case(1, 4, 2, 30, 40, 16, 4, 4, seed=9)
    outs = []
    for window in (1, 8):
        out, lse = sparse_attention_triton.block_sparse_attention_triton(
            q, k, v, sel, 4, 0.25, True, config={"WINDOW": window})
        grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
        outs.append((out, lse, *grads))
    rout, rlse = ref.block_sparse_attention_reference(q, k, v, sel, 4, 0.25, True)
    torch.testing.assert_close(outs[1][0], rout, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[1][1], rlse, atol=1e-4, rtol=0)
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    q_idx = torch.randn(1, 2, 30, 8, device=DEV, requires_grad=True)
    k_idx = torch.randn(1, 40, 8, device=DEV, requires_grad=True)
    kl = index_kl_triton.msa_index_kl_triton(q, k, q_idx, k_idx, sel, 4, 0.25, 0.35, config={"WINDOW": 8})
    want = ref.msa_index_kl_reference(q, k, q_idx, k_idx, sel, 4, 0.25, 0.35)
    torch.testing.assert_close(kl, want, atol=1e-5, rtol=1e-5)
    for g, rg in zip(torch.autograd.grad(kl, (q_idx, k_idx)), torch.autograd.grad(want, (q_idx, k_idx))):
        torch.testing.assert_close(g, rg, atol=1e-6, rtol=1e-4)


def test_index_lse_matches_reference():
    gen = torch.Generator().manual_seed(5)
    q_idx = torch.randn(2, 2, 9, 16, generator=gen).to(DEV)
    k_idx = torch.randn(2, 30, 16, generator=gen).to(DEV)
    sel = ref.msa_select_reference(q_idx, k_idx, 4, 3, 0.25)
    lse = select_triton.msa_index_lse_triton(q_idx, k_idx, sel, 4, 0.25)
    kh = k_idx[:, None].expand(2, 2, 30, 16)
    want = ref.block_sparse_attention_reference(q_idx, kh, kh, sel, 4, 0.25, True)[1]
    torch.testing.assert_close(lse, want, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- sparse KL + step

def _kl_inputs(B, Hq, Hkv, T, S, D, Di, seed, dtype=torch.float32, device=DEV):
    gen = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=gen).to(device, dtype)
    return (mk(B, Hq, T, D), mk(B, Hkv, S, D), mk(B, Hkv, T, Di).requires_grad_(),
            mk(B, S, Di).requires_grad_())


@pytest.mark.parametrize("dense_warmup,temperature", [(False, 1.0), (False, 0.6), (True, 1.0)])
def test_index_kl_matches_reference(dense_warmup, temperature):
    q, k, q_idx, k_idx = _kl_inputs(2, 4, 2, 13, 37, 16, 8, seed=11)
    sel = None if dense_warmup else ref.msa_select_reference(q_idx.detach(), k_idx.detach(), 4, 4, 0.35)
    loss = index_kl_triton.msa_index_kl_triton(q, k, q_idx, k_idx, sel, 4, 0.25, 0.35, 1.7, temperature)
    want = ref.msa_index_kl_reference(q, k, q_idx, k_idx, sel, 4, 0.25, 0.35, 1.7, temperature)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(loss * 2.0, (q_idx, k_idx))
    rgrads = torch.autograd.grad(want * 2.0, (q_idx, k_idx))
    for g, rg in zip(grads, rgrads):
        torch.testing.assert_close(g, rg, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("Hq,Hkv,config", [(16, 1, None), (8, 2, {"TM": 2}), (2, 2, None)])
def test_index_kl_per_token_student_for_every_group(Hq, Hkv, config):
    """The student runs per token at rows 0, R, 2R, ... of a 16-row index tile: R = 16 (one token per
    tile), R = 4 (a config's TM of 2 raised to fill the rows) and R = 1 (G = 1), loss and gradients."""
    q, k, q_idx, k_idx = _kl_inputs(1, Hq, Hkv, 9, 40, 16, 8, seed=Hq)
    sel = ref.msa_select_reference(q_idx.detach(), k_idx.detach(), 4, 3, 0.35)
    loss = index_kl_triton.msa_index_kl_triton(q, k, q_idx, k_idx, sel, 4, 0.25, 0.35, 1.3, 0.8, config=config)
    want = ref.msa_index_kl_reference(q, k, q_idx, k_idx, sel, 4, 0.25, 0.35, 1.3, 0.8)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    for g, rg in zip(torch.autograd.grad(loss, (q_idx, k_idx)), torch.autograd.grad(want, (q_idx, k_idx))):
        torch.testing.assert_close(g, rg, atol=1e-6, rtol=1e-4)


def test_index_kl_rejects_non_power_of_two_groups():
    q, k, q_idx, k_idx = _kl_inputs(1, 6, 2, 8, 8, 16, 8, seed=1)
    sel = ref.msa_select_reference(q_idx.detach(), k_idx.detach(), 4, 2, 0.35)
    with pytest.raises(ValueError, match="power-of-two group"):
        index_kl_triton.msa_index_kl_triton(q, k, q_idx, k_idx, sel, 4, 0.25, 0.35)


def test_training_step_gradients_match_reference():
    B, Hq, Hkv, T, S, D, Di, block, topk = 1, 4, 2, 20, 29, 16, 16, 4, 4
    gen = torch.Generator().manual_seed(21)
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEV).requires_grad_()
    q, k, v, q_idx, k_idx = mk(B, Hq, T, D), mk(B, Hkv, S, D), mk(B, Hkv, S, D), mk(B, Hkv, T, Di), mk(B, S, Di)
    out, kl, sel = msa_sparse_step(q, k, v, q_idx, k_idx, block_size=block, topk=topk, coeff=0.5)
    assert_same_selection(sel, q_idx.detach(), k_idx.detach(), block, topk, 0.25, eps=1e-4)
    go = torch.randn(out.shape, generator=gen).to(DEV)
    leaves = (q, k, v, q_idx, k_idx)
    grads = torch.autograd.grad((out * go).sum() + kl, leaves)
    rout = ref.block_sparse_attention_reference(q, k, v, sel, block, 0.25)
    rkl = ref.msa_index_kl_reference(q, k, q_idx, k_idx, sel, block, 0.25, 0.25, 0.5)
    torch.testing.assert_close(kl, rkl, atol=1e-5, rtol=1e-5)
    rgrads = torch.autograd.grad((rout * go).sum() + rkl, leaves)
    for name, g, rg in zip(["q", "k", "v", "q_idx", "k_idx"], grads, rgrads):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


# ----------------------------------------------------------------------------- GPU, bf16

@pytest.mark.gpu
@pytest.mark.parametrize("T,S", [(2048, 2048), (700, 3000)])
def test_gpu_select_bf16(T, S):
    torch.manual_seed(0)
    q_idx = torch.randn(1, 4, T, 128, device="cuda", dtype=torch.bfloat16)
    k_idx = torch.randn(1, S, 128, device="cuda", dtype=torch.bfloat16)
    sel = select_triton.msa_select_triton(q_idx, k_idx, 128, 16, 1 / math.sqrt(128))
    assert_same_selection(sel, q_idx, k_idx, 128, 16, 1 / math.sqrt(128), eps=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("T,S", [(1024, 1024), (300, 1500)])
def test_gpu_attention_bf16(T, S):
    q, k, v, sel = _attention_case(1, 32, 2, T, S, 128, 128, 8, seed=2, dtype=torch.bfloat16, device="cuda")
    _compare_attention(q, k, v, sel, 128, 1 / math.sqrt(128), atol=3e-2, rtol=3e-2, lse_atol=2e-2)


@pytest.mark.gpu
def test_gpu_training_step_bf16():
    B, Hq, Hkv, T, S, D, Di, block, topk = 1, 32, 2, 1024, 1024, 128, 128, 128, 4
    torch.manual_seed(1)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16).requires_grad_()
    q, k, v, q_idx, k_idx = mk(B, Hq, T, D), mk(B, Hkv, S, D), mk(B, Hkv, S, D), mk(B, Hkv, T, Di), mk(B, S, Di)
    out, kl, sel = msa_sparse_step(q, k, v, q_idx, k_idx, block_size=block, topk=topk)
    leaves = (q_idx, k_idx)
    grads = torch.autograd.grad(kl, leaves)
    f = [x.detach().float().requires_grad_() for x in (q, k, q_idx, k_idx)]
    rkl = ref.msa_index_kl_reference(f[0], f[1], f[2], f[3], sel, block, 1 / math.sqrt(D), 1 / math.sqrt(Di))
    torch.testing.assert_close(kl.float(), rkl, atol=2e-3, rtol=1e-2)
    rgrads = torch.autograd.grad(rkl, f[2:])
    for g, rg in zip(grads, rgrads):
        err = (g.float() - rg).abs().max().item() / rg.abs().max().item()
        assert err < 2e-2, f"KL gradient error {err:.3g} of the largest entry"
