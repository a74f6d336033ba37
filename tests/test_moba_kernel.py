"""MoBA Triton kernels: the block gate + top-k (sparsezoo/kernels/moba_select_triton.py) and per-query-head
selections in the block-sparse attention (sparsezoo/kernels/sparse_attention_triton.py), against the plain-PyTorch
references. On the CPU they run under TRITON_INTERPRET=1 (fp32/fp16, tiny shapes); bf16 at the m3
shape runs on the GPU (marked gpu).

Tolerances: selections are compared as multisets of ranked block scores (fp64 scores of the chosen
ids) within 1e-4 (fp32) / 1e-3 (fp16) / 2e-3 (bf16), so ties and near-ties may swap ids; all-equal
scores must give the reference's ids exactly. fp32 attention, LSE and gradients 1e-4 (gradients: of
the largest entry); bf16 attention atol=rtol=3e-2, LSE 2e-2, gradients 3e-2 of the largest entry.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsezoo.ops.moba_select import api as moba
from sparsezoo.ops import references as ref
from sparsezoo.ops.checks import check_selection_values

triton = pytest.importorskip("triton")

from sparsezoo.kernels import moba_select_triton as mst  # noqa: E402
from sparsezoo.kernels import sparse_attention_triton as sat  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Block sizes of the attention tests times this: the GPU's tensor-core dots need blocks of 16+ keys, the
# interpreter runs small ones quickly.
_S = 1 if DEV.type == "cpu" else 4


# ----------------------------------------------------------------------------- helpers

def moba_block_scores(q, k, block):
    """fp64 scores [B, Hq, T, n_blocks] = <q, mean key of the block> (the kv head of each query head)."""
    G = q.shape[1] // k.shape[1]
    means = moba.block_mean_keys(k.double(), block).repeat_interleave(G, dim=1)
    return torch.einsum("bhtd,bhnd->bhtn", q.double(), means)


def assert_moba_selection(sel, q, k, block, topk, eps):
    """Format (ids best-first, then the local block, then -1) and ranked scores equal to the
    reference's as multisets within eps."""
    B, Hq, T, _ = q.shape
    S = k.shape[2]
    assert sel.dtype == torch.int32 and sel.shape == (B, Hq, T, topk)
    check_selection_values(sel, T, S, block)
    local = ((S - T + torch.arange(T, device=sel.device)) // block).view(1, 1, T, 1)
    n_valid = torch.clamp(local + 1, max=topk)
    at = torch.arange(topk, device=sel.device)
    want_local = torch.where(at == n_valid - 1, local, torch.where(at < n_valid - 1, -2, -1))
    shown = torch.where(at < n_valid - 1, -2, sel.long())
    assert torch.equal(shown, want_local.expand_as(shown)), "local block then -1 padding"
    b = moba_block_scores(q, k, block)

    def ranked(s):
        ids = s.long()
        keep = (ids >= 0) & (ids != local)
        return torch.where(keep, torch.gather(b, -1, ids.clamp_min(0)), float("-inf"))

    got = ranked(sel)
    fin = torch.isfinite(got)
    assert (got[..., 1:] <= got[..., :-1] + eps)[fin[..., 1:]].all(), "ranked ids are best-first"
    want = ranked(moba.moba_select(q.float(), k.float(), block_size=block, topk=topk))
    got, want = (torch.sort(x, dim=-1, descending=True).values for x in (got, want))
    fin = torch.isfinite(want)
    assert (torch.isfinite(got) == fin).all()
    assert torch.allclose(got[fin], want[fin], atol=eps, rtol=0)


def moba_selection(q, k, block, topk, gen):
    """The reference MoBA selection per query head, in shuffled order (any unique order is legal)."""
    sel = moba.moba_select(q.detach().float(), k.detach().float(), block_size=block, topk=topk)
    n_valid = (sel >= 0).sum(-1, keepdim=True)
    perm = torch.argsort(torch.rand(sel.shape, generator=gen).to(sel.device)
                         + (torch.arange(topk, device=sel.device) >= n_valid) * 2, dim=-1)
    return torch.gather(sel, -1, perm)


def attention_and_grads(q, k, v, sel, block, scale, config=None):
    out, lse = sat.block_sparse_attention_triton(q, k, v, sel, block, scale, True, config)
    gen = torch.Generator().manual_seed(7)
    go = torch.randn(out.shape, generator=gen).to(out.device)
    gl = torch.randn(lse.shape, generator=gen).to(out.device)
    grads = torch.autograd.grad((out.float() * go).sum() + (torch.where(torch.isfinite(lse), lse, 0) * gl).sum(),
                                (q, k, v))
    return out, lse, grads


# ----------------------------------------------------------------------------- block means

@pytest.mark.parametrize("S,block", [(37, 4), (36, 6), (5, 8), (64, 16)])
def test_block_means_match_reference(S, block):
    gen = torch.Generator().manual_seed(S)
    k = torch.randn(2, 3, 16, S, generator=gen).to(DEV).transpose(2, 3)  # strided [B, H, S, D]
    got = mst.moba_block_means(k, block)
    assert got.dtype == torch.float32 and got.shape == (2, 3, math.ceil(S / block), 16)
    torch.testing.assert_close(got, moba.block_mean_keys(k.float(), block), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- selection

@settings(max_examples=8)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), G=st.sampled_from([1, 2, 3, 4]), S=st.integers(1, 60),
       frac=st.floats(0.02, 1.0), D=st.sampled_from([8, 16]), block=st.sampled_from([3, 4, 8]),
       topk=st.integers(1, 6), half=st.booleans(), seed=st.integers(0, 2**16))
def test_moba_select_matches_reference(B, Hkv, G, S, frac, D, block, topk, half, seed):
    gen = torch.Generator().manual_seed(seed)
    T = max(1, int(S * frac))
    dtype = torch.float16 if half else torch.float32
    q = torch.randn(B, Hkv * G, T, D, generator=gen).to(DEV, dtype)
    k = torch.randn(B, Hkv, S, D, generator=gen).to(DEV, dtype)
    sel = mst.moba_select_triton(q, k, block, topk)
    assert_moba_selection(sel, q, k, block, topk, eps=1e-3 if half else 1e-4)


@pytest.mark.parametrize("config", [None, {"SPLIT": 3}])
def test_moba_select_ties_go_to_smaller_ids(config):
    # equal keys: every block scores the same, over several chunks of 16 candidates (and splits)
    block, S, T, topk = 2, 72, 16, 16
    q = torch.ones(1, 2, T, 8, device=DEV)
    k = torch.ones(1, 1, S, 8, device=DEV)
    sel = mst.moba_select_triton(q, k, block, topk, config)
    assert torch.equal(sel, moba.moba_select(q, k, block_size=block, topk=topk))
    assert sel[0, 1, 66 - (S - T)].tolist() == list(range(15)) + [33]


def test_moba_select_16bit_queries_keep_the_means_precision():
    # block 1's mean is 1 + 2**-12 per dim: below fp16's resolution at 1, so scoring against the means
    # rounded to fp16 would tie it with block 0 (all ones) and pick block 0; the fp32 reference picks 1
    k = torch.ones(1, 1, 12, 16)
    k[0, 0, 7] += 2**-10  # one of block 1's four keys
    q = torch.ones(1, 2, 1, 16)
    sel = mst.moba_select_triton(q.to(DEV, torch.float16), k.to(DEV, torch.float16), 4, 2)
    assert sel.tolist() == [[[[1, 2]], [[1, 2]]]]
    assert torch.equal(sel.cpu(), moba.moba_select(q, k, block_size=4, topk=2))


@pytest.mark.parametrize("T,B", [(1, 2), (3, 1)])
def test_moba_select_decode_splits_are_exact(T, B):
    # few query rows on the split path (DECODE_T = 0; tests/test_moba_decode_select.py covers the decode
    # kernel): the candidates split over programs and merged; any split gives the same ids
    gen = torch.Generator().manual_seed(T * 10 + B)
    S, block, topk = 70, 2, 5
    q = torch.randn(B, 2, T, 16, generator=gen).to(DEV)
    k = torch.randn(B, 1, S, 16, generator=gen).to(DEV)
    base = mst.moba_select_triton(q, k, block, topk, {"SPLIT": 1, "DECODE_T": 0})
    assert_moba_selection(base, q, k, block, topk, eps=1e-4)
    assert torch.equal(mst.moba_select_triton(q, k, block, topk, {"SPLIT": 3, "DECODE_T": 0}), base)
    means = mst.moba_block_means(k, block)[:, :, :S // block]  # a decode cache of the complete blocks
    assert torch.equal(mst.moba_select_from_means(q, means, S, block, topk, {"SPLIT": 2, "DECODE_T": 0}), base)
    assert_moba_selection(mst.moba_select_from_means(q, means, S, block, topk), q, k, block, topk, eps=1e-4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_cached_means_give_the_same_selection(backend):
    """A decode loop passes the complete blocks' means (possibly a longer buffer): same ids as from k."""
    g = torch.Generator().manual_seed(11)
    B, Hkv, G, S, T, D, block = 2, 2, 2, 70, 3, 16, 8
    q = torch.randn(B, Hkv * G, T, D, generator=g).to(DEV)
    k = torch.randn(B, Hkv, S, D, generator=g).to(DEV)
    means = moba.block_mean_keys(k.float(), block)
    spare = torch.nn.functional.pad(means, (0, 0, 0, 5))  # a preallocated buffer longer than needed
    want = moba.moba_select(q, k, block_size=block, topk=4, backend=backend)
    for m in (means[:, :, :(S - 1) // block], spare):
        assert torch.equal(moba.moba_select(q, k, block_size=block, topk=4, means=m, backend=backend), want)
    with pytest.raises(ValueError, match="complete blocks"):
        moba.moba_select(q, k, block_size=block, topk=4, means=means[:, :, :2], backend=backend)
    with pytest.raises(ValueError, match="fp32"):
        moba.moba_select(q, k, block_size=block, topk=4, means=means.double(), backend=backend)


def test_moba_select_rejects_bad_inputs():
    q = torch.randn(1, 4, 4, 8, device=DEV)
    k = torch.randn(1, 3, 8, 8, device=DEV)
    with pytest.raises(ValueError, match="do not match"):
        mst.moba_select_triton(q, k, 4, 2)
    with pytest.raises(ValueError, match="T <= S"):
        mst.moba_select_triton(q, k[:, :2, :3], 4, 2)
    with pytest.raises(ValueError, match="fp64"):
        mst.moba_select_triton(q.double(), k[:, :2].double(), 4, 2)
    with pytest.raises(ValueError, match="must be fp32"):
        mst.moba_select_from_means(q, mst.moba_block_means(k[:, :2], 4).half(), 8, 4, 2)


# ----------------------------------------------------------------------------- per-head attention

@pytest.mark.parametrize("G,window", [(1, 1), (2, 4), (4, 1)])
def test_per_head_attention_matches_reference(G, window):
    # window 4: tokens reordered inside windows of 4 before tiling (config WINDOW)
    gen = torch.Generator().manual_seed(G + window)
    B, Hkv, T, S, D, block, topk = 2, 2, 9, 23 * _S, 16, 4 * _S, 3
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEV).requires_grad_()
    q, k, v = mk(B, Hkv * G, T, D), mk(B, Hkv, S, D), mk(B, Hkv, S, D)
    sel = moba_selection(q, k, block, topk, gen)  # [B, Hq, T, topk]
    out, lse, grads = attention_and_grads(q, k, v, sel, block, 0.25, {"WINDOW": window})
    rk, rv = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    rout, rlse = ref.block_sparse_attention_reference(q, rk, rv, sel, block, 0.25, True)
    torch.testing.assert_close(out, rout, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=0)
    gen_g = torch.Generator().manual_seed(7)
    go = torch.randn(rout.shape, generator=gen_g).to(DEV)
    gl = torch.randn(rlse.shape, generator=gen_g).to(DEV)
    rgrads = torch.autograd.grad((rout * go).sum() + (rlse * gl).sum(), (q, k, v))
    for name, g, rg in zip("qkv", grads, rgrads):
        err = (g - rg).abs().max().item() / (rg.abs().max().item() + 1e-6)
        assert err < 1e-4, f"d{name}: max error {err:.3g} of the largest entry"


def test_selection_heads_must_fit():
    q = torch.randn(1, 4, 4, 16, device=DEV)
    k = torch.randn(1, 2, 8, 16, device=DEV)
    sel = torch.zeros(1, 3, 4, 1, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="selection heads"):
        sat.block_sparse_attention_triton(q, k, k, sel, 4, 0.25)


CASES = [(3, torch.int32), (2, torch.int64), (-7, torch.int32), (2**32, torch.int64), (2**32 + 1, torch.int64)]


@pytest.mark.parametrize("per_head,cases", [(False, CASES), (True, CASES[::3])])
def test_out_of_range_ids_are_dropped(per_head, cases):
    # 2 blocks exist; id 3 (or an int64 id that wraps to a valid int32) must act like -1 and, above all,
    # must not send batch 0's key-block gradients into batch 1
    gen = torch.Generator().manual_seed(0)
    n = 8 * _S
    q = torch.randn(2, 2, n, 16, generator=gen).to(DEV)
    k = torch.randn(2, 1, n, 16, generator=gen).to(DEV)
    v = torch.randn(2, 1, n, 16, generator=gen).to(DEV)
    base = ref.full_selection(n, n, 4 * _S, 2, 2 if per_head else 1, DEV).clone()
    base[0, 0, 7, 1] = -1

    def run(sel):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        return attention_and_grads(*leaves, sel, 4 * _S, 0.25)

    want_out, want_lse, want_grads = run(base)
    for bad, dtype in cases:
        sel = base.long()
        sel[0, 0, 7, 1] = bad
        out, lse, grads = run(sel.to(dtype))
        torch.testing.assert_close(out, want_out, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse, want_lse, atol=1e-6, rtol=1e-6)
        for name, g, wg in zip("qkv", grads, want_grads):
            torch.testing.assert_close(g, wg, atol=1e-6, rtol=1e-6, msg=lambda m: f"d{name}, id {bad}: {m}")


# ----------------------------------------------------------------------------- GPU, bf16

def dense_masked_reference(q, k, v, sel, block, scale, go, gl, heads_per_chunk=8):
    """fp32 dense attention under the per-head selection's token mask, in head chunks; returns
    (out, lse, dq, dk, dv) for the loss sum(out * go) + sum(lse * gl)."""
    B, Hq, T, D = q.shape
    S = k.shape[2]
    G = Hq // k.shape[1]
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    n_blocks = math.ceil(S / block)
    chosen = torch.zeros(B, Hq, T, n_blocks + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(-1, torch.where(sel >= 0, sel.long(), n_blocks), True)
    causal = torch.arange(S, device=q.device)[None, :] <= (S - T + torch.arange(T, device=q.device))[:, None]
    outs, lses = [], []
    for h0 in range(0, Hq, heads_per_chunk):
        h1 = min(Hq, h0 + heads_per_chunk)
        mask = chosen[:, h0:h1, :, :n_blocks].repeat_interleave(block, dim=-1)[..., :S] & causal
        kh = kf[:, torch.arange(h0, h1, device=q.device) // G]
        vh = vf[:, torch.arange(h0, h1, device=q.device) // G]
        s = (torch.einsum("bhtd,bhsd->bhts", qf[:, h0:h1], kh) * scale).masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        out = torch.einsum("bhts,bhsd->bhtd", torch.softmax(s, dim=-1), vh)
        ((out * go[:, h0:h1]).sum() + (lse * gl[:, h0:h1]).sum()).backward()
        outs.append(out.detach())
        lses.append(lse.detach())
    return torch.cat(outs, 1), torch.cat(lses, 1), qf.grad, kf.grad, vf.grad


@pytest.mark.gpu
def test_gpu_moba_select_and_attention_bf16():
    B, Hq, Hkv, T, S, D, block, topk = 1, 64, 4, 8192, 8192, 128, 128, 16
    torch.manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16).requires_grad_()
    q, k, v = mk(B, Hq, T, D), mk(B, Hkv, S, D), mk(B, Hkv, S, D)
    sel = mst.moba_select_triton(q.detach(), k.detach(), block, topk)
    assert_moba_selection(sel, q.detach(), k.detach(), block, topk, eps=2e-3)
    scale = 1 / math.sqrt(D)
    out, lse, grads = attention_and_grads(q, k, v, sel, block, scale)
    gen = torch.Generator().manual_seed(7)
    go = torch.randn(out.shape, generator=gen).to("cuda")
    gl = torch.randn(lse.shape, generator=gen).to("cuda")
    rout, rlse, *rgrads = dense_masked_reference(q, k, v, sel, block, scale, go, gl)
    torch.testing.assert_close(out.float(), rout, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(lse, rlse, atol=2e-2, rtol=0)
    for name, g, rg in zip("qkv", grads, rgrads):
        err = (g.float() - rg).abs().max().item() / rg.abs().max().item()
        assert err < 3e-2, f"d{name}: max error {err:.3g} of the largest entry"


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("T,S,block", [(1, 45, 8), (3, 200, 16), (2, 70, 32)])
def test_block_token_list_kernel(T, S, block, dtype):
    """The decode's token list in one Triton launch (sparsezoo/kernels/block_tokens.py) equals the torch expression it
    replaces: causal, -1 for empty and out-of-range ids, strided selections of either integer dtype."""
    from sparsezoo.kernels.block_tokens import block_tokens_triton
    from sparsezoo.ops.block_sparse_attention.triton import block_tokens_torch

    g = torch.Generator().manual_seed(T * S)
    n_blocks = -(-S // block)
    sel = torch.randint(-1, n_blocks + 2, (2, 5, T, 3), generator=g).to(DEV, dtype)  # -1, valid, out of range
    sel = sel.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, H, k] storage
    got = block_tokens_triton(sel, block, T, S)
    want = block_tokens_torch(sel, block, T, S)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    assert (got >= 0).any() and (got < 0).any()


@pytest.mark.parametrize("T", [1, 3])
def test_per_head_decode_runs_the_gather_kernel_exactly(T):
    """Few new queries with per-query-head selections go through the token-gather kernel (split-K
    decode): outputs, LSE and gradients equal the reference, causality on the local block included."""
    from sparsezoo import ops
    from sparsezoo.ops.block_sparse_attention import triton as bs_triton

    g = torch.Generator().manual_seed(21)
    B, Hq, Hkv, S, D, block = 2, 4, 2, 45 * _S, 16, 8 * _S
    q = torch.randn(B, Hq, T, D, generator=g).to(DEV).requires_grad_()
    k, v = (torch.randn(B, Hkv, S, D, generator=g).to(DEV).requires_grad_() for _ in range(2))
    sel = torch.randint(0, S // block, (B, Hq, T, 4), generator=g, dtype=torch.int32).to(DEV)
    sel[..., -1] = (S - T + torch.arange(T, dtype=torch.int32, device=DEV)).view(T) // block  # the local block
    sel[0, 1, 0, 0] = -1
    sel[1, 2, -1, 1] = 99  # out of range: selects nothing
    assert T <= bs_triton.GATHER_DECODE_T
    outs = {}
    for backend in ("triton", "reference"):
        out, lse = ops.block_sparse_attention(q, k, v, sel, block_size=block, backend=backend, return_lse=True)
        grads = torch.autograd.grad((out * out).sum() + lse.sum(), (q, k, v))
        outs[backend] = (out, lse, *grads)
    for got, want in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
