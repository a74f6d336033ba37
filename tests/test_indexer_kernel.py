"""Triton lightning-indexer top-k (sparsezoo/kernels/indexer_triton.py) vs the plain-PyTorch oracle
sparsezoo.ops.indexer_topk. On the CPU the kernels run under TRITON_INTERPRET=1 (fp32, one fp16
case, tiny shapes); bf16 at the published DSA/CSA head sizes runs on the GPU (marked gpu).

Per row: the format is exact (int32; exactly min(topk, visible) valid ids, strictly ascending, all
visible, then -1), and the multiset of selected logits (recomputed in fp64) equals the reference's
within EPS, which lets near-ties swap ids (fp32 kernel vs fp32 reference). With small integer inputs
every logit is exact and ties are everywhere, so the 'triton' mode must return the reference's ids
exactly (ties to the smaller id).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsezoo import ops

triton = pytest.importorskip("triton")

from sparsezoo.kernels.indexer_triton import indexer_topk_triton  # noqa: E402

EPS = 1e-4  # fp32 logits of O(1..10) magnitude
SCALE = 0.5


# ----------------------------------------------------------------------------- helpers

def make_inputs(B, Hs, T, J, D, N, seed, dtype=torch.float32, integer=False, device="cpu"):
    """q_i [B, Hs, T, J, D], w [B, Hs, T, J], k_i [B, N, D]; integer=True draws from {-2..2} (exact logits)."""
    g = torch.Generator().manual_seed(seed)
    if integer:
        draw = lambda *shape: torch.randint(-2, 3, shape, generator=g).double()  # noqa: E731
    else:
        draw = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return tuple(x.to(dtype=dtype, device=device) for x in (draw(B, Hs, T, J, D), draw(B, Hs, T, J), draw(B, N, D)))


def dsa_ends(S, device="cpu"):
    return torch.arange(S, device=device)


def csa_ends(S, m, device="cpu"):
    """Compressed entry i covers tokens [i*m, (i+1)*m) and is visible from its last token on."""
    return torch.arange(1, S // m + 1, device=device) * m - 1


def exact_logits(q, w, k, scale):
    """fp64 I [B, Hs, T, N], written independently of the library; chunked over queries."""
    out = []
    for t0 in range(0, q.shape[2], 256):
        dots = torch.einsum("bhtjd,bnd->bhtjn", q[:, :, t0:t0 + 256].double(), k.double())
        out.append(torch.einsum("bhtj,bhtjn->bhtn", w[:, :, t0:t0 + 256].double(), dots.clamp_min(0)) * scale)
    return torch.cat(out, dim=2)


def visible_counts(ends, S, T):
    pos = torch.arange(S - T, S, device=ends.device)
    return (ends[None, :] <= pos[:, None]).sum(-1)


def check_format(sel, nvis, topk):
    assert sel.dtype == torch.int32
    slot = torch.arange(topk, device=sel.device)
    valid = (slot < nvis.clamp(max=topk).view(1, 1, -1, 1)).expand_as(sel)
    assert ((sel >= 0) == valid).all(), "valid ids first, exactly min(topk, visible) of them"
    assert (sel[~valid] == -1).all()
    assert (sel.long() < nvis.view(1, 1, -1, 1)).all(), "only visible keys"
    assert ((sel[..., 1:] > sel[..., :-1]) | ~valid[..., 1:]).all(), "ids strictly ascending"


def selected_scores(sel, z):
    v = torch.gather(z, -1, sel.long().clamp_min(0))
    return torch.sort(torch.where(sel >= 0, v, float("-inf")), dim=-1, descending=True).values


def reference(q, w, k, ends, S, topk):
    return ops.indexer_topk(q.float(), w.float(), k.float(), ends, S=S, topk=topk, scale=SCALE, backend="reference")


def assert_matches_reference(sel, q, w, k, ends, S, topk, eps=EPS):
    check_format(sel, visible_counts(ends, S, q.shape[2]), topk)
    z = exact_logits(q, w, k, SCALE)
    got, want = selected_scores(sel, z), selected_scores(reference(q, w, k, ends, S, topk), z)
    fin = torch.isfinite(want)
    assert (torch.isfinite(got) == fin).all()
    assert torch.allclose(got[fin], want[fin], atol=eps, rtol=0), (got - want)[fin].abs().max()


def assert_same_ids(sel, ref):
    """Reference ids (best first) as ascending sets, -1 last."""
    ref = ref.long()
    key = torch.where(ref >= 0, ref, torch.iinfo(torch.int64).max)
    ref_sorted = torch.sort(key, dim=-1).values
    assert torch.equal(sel.long(), torch.where(ref_sorted == torch.iinfo(torch.int64).max, -1, ref_sorted))


# ----------------------------------------------------------------------------- interpreter tests

DSA_CASES = [  # B, Hs, T, S, J, D, topk
    (1, 1, 24, 24, 2, 16, 5),    # full causal
    (2, 2, 8, 70, 3, 32, 7),     # the last T of S queries, Hs = 2
    (1, 2, 6, 300, 4, 16, 40),   # longer rows: several select blocks
    (2, 1, 3, 50, 2, 16, 1),     # decode-like T: index heads fill the dot rows
]


@pytest.mark.parametrize("mode", ["triton", "torch"])
@pytest.mark.parametrize("B,Hs,T,S,J,D,topk", DSA_CASES)
def test_dsa_matches_reference(B, Hs, T, S, J, D, topk, mode):
    q, w, k = make_inputs(B, Hs, T, J, D, S, seed=S + T)
    sel = indexer_topk_triton(q, w, k, dsa_ends(S), S, topk, SCALE, config={"topk_mode": mode})
    assert_matches_reference(sel, q, w, k, dsa_ends(S), S, topk)


@pytest.mark.parametrize("mode", ["triton", "torch"])
@pytest.mark.parametrize("B,Hs,T,S,m,topk", [(1, 2, 20, 40, 4, 3), (2, 1, 8, 128, 4, 6), (1, 1, 9, 60, 3, 2)])
def test_csa_matches_reference(B, Hs, T, S, m, topk, mode):
    ends = csa_ends(S, m)
    q, w, k = make_inputs(B, Hs, T, 3, 16, ends.numel(), seed=S + m)
    sel = indexer_topk_triton(q, w, k, ends, S, topk, SCALE, config={"topk_mode": mode})
    assert_matches_reference(sel, q, w, k, ends, S, topk)


@pytest.mark.parametrize("config", [
    {},                                                      # linear histogram + candidates
    {"select_bins": 4, "select_cap": 2, "select_block": 16},  # radix passes, single-valued bins
    {"split": 3},                                            # two-stage select
])
def test_ties_go_to_the_smaller_id(config):
    """Integer inputs: exact logits with many ties; the ids must be the reference's exactly."""
    S, T, topk = 64, 8, 9
    q, w, k = make_inputs(1, 2, T, 2, 16, S, seed=7, integer=True)
    sel = indexer_topk_triton(q, w, k, dsa_ends(S), S, topk, SCALE, config=config)
    check_format(sel, visible_counts(dsa_ends(S), S, T), topk)
    assert_same_ids(sel, reference(q, w, k, dsa_ends(S), S, topk))


@pytest.mark.parametrize("config", [{}, {"select_cap": 2}])
def test_all_logits_equal(config):
    """w = 0: every logit is 0, so each row takes its first topk visible keys."""
    S, T, topk = 50, 12, 6
    q, w, k = make_inputs(1, 1, T, 2, 16, S, seed=3)
    sel = indexer_topk_triton(q, torch.zeros_like(w), k, dsa_ends(S), S, topk, SCALE, config=config)
    check_format(sel, visible_counts(dsa_ends(S), S, T), topk)
    assert (sel == torch.arange(topk, dtype=torch.int32)).all()


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_query_chunks(mode):
    """A small buffer bound forces several query chunks (the last one partial)."""
    B, Hs, T, S, topk = 2, 1, 11, 40, 5
    q, w, k = make_inputs(B, Hs, T, 2, 16, S, seed=11)
    bound = 4 * B * Hs * S * 4  # four queries per chunk
    whole = indexer_topk_triton(q, w, k, dsa_ends(S), S, topk, SCALE, config={"topk_mode": mode})
    chunked = indexer_topk_triton(q, w, k, dsa_ends(S), S, topk, SCALE,
                                  config={"topk_mode": mode, "buffer_bytes": bound})
    assert torch.equal(chunked, whole)
    assert_matches_reference(chunked, q, w, k, dsa_ends(S), S, topk)


@pytest.mark.parametrize("split", [2, 5])
def test_split_rows(split):
    """Decode-like rows split into segments (stage A) and merged (stage B): same ids as one stage;
    early queries leave segments empty or shorter than topk."""
    B, Hs, T, S, topk = 2, 1, 4, 90, 8
    ends = dsa_ends(S)
    q, w, k = make_inputs(B, Hs, T, 4, 16, S, seed=5)
    one = indexer_topk_triton(q, w, k, ends, S, topk, SCALE, config={"split": 1})
    many = indexer_topk_triton(q, w, k, ends, S, topk, SCALE, config={"split": split, "select_block": 16})
    assert torch.equal(many, one)
    assert_matches_reference(many, q, w, k, ends, S, topk)
    early = indexer_topk_triton(q, w, k, ends, 20, topk, SCALE, config={"split": split, "select_block": 16})
    assert_matches_reference(early, q, w, k, ends, 20, topk)


def test_radix_refinement():
    """Tiny candidate cap and few bins: the radix passes on the key decide the threshold."""
    B, Hs, T, S, topk = 1, 1, 6, 120, 17
    q, w, k = make_inputs(B, Hs, T, 3, 16, S, seed=13)
    sel = indexer_topk_triton(q, w, k, dsa_ends(S), S, topk, SCALE,
                              config={"select_bins": 4, "select_cap": 2, "select_block": 32})
    assert_matches_reference(sel, q, w, k, dsa_ends(S), S, topk)


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_short_rows_take_every_visible_key(mode):
    S, T, topk = 30, 30, 40
    q, w, k = make_inputs(1, 2, T, 2, 16, S, seed=2)
    sel = indexer_topk_triton(q, w, k, dsa_ends(S), S, topk, SCALE, config={"topk_mode": mode})
    nvis = visible_counts(dsa_ends(S), S, T)
    check_format(sel, nvis, topk)
    slot = torch.arange(topk)
    assert torch.equal(sel[0, 0], torch.where(slot < nvis[:, None], slot, -1).to(torch.int32))


def test_fp16_inputs():
    B, Hs, T, S, topk = 1, 1, 10, 48, 6
    q, w, k = make_inputs(B, Hs, T, 2, 16, S, seed=17, dtype=torch.float16)
    sel = indexer_topk_triton(q, w, k, dsa_ends(S), S, topk, SCALE)
    assert_matches_reference(sel, q, w, k, dsa_ends(S), S, topk, eps=1e-2)


@settings(max_examples=5)
@given(B=st.integers(1, 2), Hs=st.integers(1, 2), S=st.integers(2, 60), frac=st.floats(0.05, 0.5),
       J=st.integers(1, 4), m=st.sampled_from([1, 2, 4]), topk=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_random_shapes(B, Hs, S, frac, J, m, topk, seed):
    T = max(1, int(S * frac))
    ends = csa_ends(S, m)
    if ends.numel() == 0:
        return
    q, w, k = make_inputs(B, Hs, T, J, 16, ends.numel(), seed=seed)
    sel = indexer_topk_triton(q, w, k, ends, S, topk, SCALE)
    assert_matches_reference(sel, q, w, k, ends, S, topk)


def test_rejects_fp64_and_bad_mode():
    q, w, k = make_inputs(1, 1, 4, 2, 16, 8, seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='reference'"):
        indexer_topk_triton(q, w, k, dsa_ends(8), 8, 2, SCALE)
    with pytest.raises(ValueError, match="topk_mode"):
        indexer_topk_triton(q.float(), w.float(), k.float(), dsa_ends(8), 8, 2, SCALE, config={"topk_mode": "sort"})


# ----------------------------------------------------------------------------- GPU (bf16, published sizes)

GPU_CASES = [  # B, T, S, m (1 = DSA), topk
    (1, 4096, 4096, 1, 2048),   # DSA prefill
    (1, 4096, 4096, 4, 512),    # CSA prefill over S / 4 compressed entries
    (4, 2, 16384, 1, 2048),     # decode: few rows, the select splits each row
]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["triton", "torch"])
@pytest.mark.parametrize("B,T,S,m,topk", GPU_CASES)
def test_gpu_bf16_published_sizes(B, T, S, m, topk, mode):
    dev = torch.device("cuda")
    ends = csa_ends(S, m, dev)
    q, w, k = make_inputs(B, 1, T, 64, 128, ends.numel(), seed=1, dtype=torch.bfloat16, device=dev)
    sel = indexer_topk_triton(q, w, k, ends, S, topk, SCALE, config={"topk_mode": mode})
    z_max = exact_logits(q[:, :, -8:], w[:, :, -8:], k, SCALE).abs().max().item()
    assert_matches_reference(sel, q, w, k, ends, S, topk, eps=1e-4 * z_max)
