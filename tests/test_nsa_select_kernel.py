"""Triton NSA block selection (kernels/nsa_select_triton.py) vs sparsezoo.ops.nsa_select.

On the CPU the kernels run under TRITON_INTERPRET=1 in fp32 (fp16 once) on tiny shapes; the bf16
cases at the paper's configuration run on the GPU (marked gpu).

Per output row: the count of valid ids and the -1 padding are exact; the forced blocks (0, L - 1, L)
come first and are exact; the freely chosen blocks are distinct candidates 1 <= j <= L - 2, listed
best-first, whose importances (fp64, or fp32 on the GPU) equal the reference's chosen ones as
multisets within EPS. EPS allows near-ties to swap ids: the kernel sums probabilities in another
order and with an fp16 hi/lo split (about 2^-21 relative), far below EPS.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsezoo import ops
from sparsezoo.ops.common import masked_softmax_lse, query_positions
from sparsezoo.ops.compressed_attention import compressed_visible, n_compressed
from sparsezoo.ops.nsa_select.reference import add_overlaps

triton = pytest.importorskip("triton")

from sparsezoo.kernels.nsa_select_triton import nsa_select_triton  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS_CPU = 2e-5  # fp32 interpreter vs fp64 reference; importances are at most G
EPS_GPU = 2e-4  # bf16 inputs, fp32 accumulation, vs the fp32 reference on the same inputs

# (block_len, stride, sel_block): the paper's ratios scaled down, stride = block_len, the paper's
# own, and one where neither sel_block nor block_len is a multiple of stride.
GEOMETRIES = [(8, 4, 16), (4, 4, 8), (16, 8, 32), (32, 16, 64), (5, 3, 8)]


# ----------------------------------------------------------------------------- helpers

def importance(q, kc, S, block_len, stride, sel_block, scale, dtype, chunk=512):
    """Block importance [B, Hkv, T, n_blocks] in `dtype`, as nsa_select computes it (chunked over T)."""
    B, Hq, T, D = q.shape
    Hkv, Sc = kc.shape[1], kc.shape[2]
    n_blocks = math.ceil(S / sel_block)
    qg, kf = q.to(dtype).view(B, Hkv, Hq // Hkv, T, D), kc.to(dtype)
    out = torch.zeros(B, Hkv, T, n_blocks, dtype=dtype, device=q.device)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        if Sc:
            ok = compressed_visible(query_positions(T, S, t0, t1, q.device), Sc, block_len, stride)
            s = torch.einsum("bhgtd,bhsd->bhgts", qg[:, :, :, t0:t1], kf) * scale
            p = masked_softmax_lse(s, ok)[0].sum(2)
            out[:, :, t0:t1] = add_overlaps(out[:, :, t0:t1], p, block_len, stride, sel_block)
    return out


def assert_selection_matches(got, q, kc, S, block_len, stride, sel_block, topk, scale, eps, dtype=torch.float64):
    B, Hkv, T, _ = got.shape
    assert got.dtype == torch.int32 and got.shape == (B, Hkv, T, topk)
    qr, kr = q.to(dtype), kc.to(dtype)
    want = ops.nsa_select(qr, kr, S=S, block_len=block_len, stride=stride, sel_block=sel_block, topk=topk,
                          scale=scale, backend="reference")
    imp = importance(q, kc, S, block_len, stride, sel_block, scale, dtype)
    local = (query_positions(T, S, 0, T, got.device) // sel_block).view(T, 1)
    slot = torch.arange(topk, device=got.device).view(1, topk)
    n_valid = torch.clamp(local + 1, max=topk)
    assert torch.equal(got >= 0, (slot < n_valid).expand_as(got)), "valid ids fill exactly the first min(topk, L+1)"
    assert (got[got < 0] == -1).all()
    n_forced = torch.clamp(torch.where(local >= 2, 3, local + 1), max=topk)
    forced = slot < n_forced
    assert torch.equal(got[..., forced.expand(T, topk)], want[..., forced.expand(T, topk)]), "forced blocks"
    free = ((slot >= n_forced) & (slot < n_valid)).expand_as(got)
    ids = got.long()
    assert ((ids >= 1) & (ids <= local - 2))[free].all(), "free blocks must be earlier than L - 1, not 0"
    sorted_ids = torch.sort(torch.where(free, ids, -1 - slot), dim=-1).values
    assert (sorted_ids[..., 1:] != sorted_ids[..., :-1]).all(), "ids must be distinct"

    def free_scores(sel):
        v = torch.gather(imp, -1, sel.long().clamp_min(0))
        return torch.where(free, v, float("-inf"))

    got_v = free_scores(got)
    pairs = free[..., 1:] & free[..., :-1]
    assert (got_v[..., 1:] <= got_v[..., :-1] + eps)[pairs].all(), "free blocks are listed best-first"
    got_sorted = torch.sort(got_v, dim=-1, descending=True).values
    want_sorted = torch.sort(free_scores(want), dim=-1, descending=True).values
    fin = torch.isfinite(want_sorted)
    assert torch.equal(torch.isfinite(got_sorted), fin)
    torch.testing.assert_close(got_sorted[fin], want_sorted[fin], atol=eps, rtol=0)


def random_inputs(B, Hkv, G, T, S, D, block_len, stride, seed, dtype=torch.float32, device=DEV, q_std=1.5):
    gen = torch.Generator().manual_seed(seed)
    Sc = n_compressed(S, block_len, stride)
    q = torch.randn(B, Hkv * G, T, D, generator=gen) * q_std
    kc = torch.randn(B, Hkv, Sc, D, generator=gen)
    return q.to(device, dtype), kc.to(device, dtype)


# ----------------------------------------------------------------------------- CPU (interpreter)

@settings(max_examples=10)
@given(geom=st.sampled_from(GEOMETRIES), G=st.sampled_from([1, 2, 3, 4]), Hkv=st.integers(1, 2), S=st.integers(1, 160),
       frac=st.floats(0.02, 1.0), topk=st.integers(3, 10), seed=st.integers(0, 2**16))
def test_matches_reference(geom, G, Hkv, S, frac, topk, seed):
    block_len, stride, sel_block = geom
    T = max(1, int(S * frac))
    q, kc = random_inputs(3 - Hkv, Hkv, G, T, S, 16, block_len, stride, seed)  # B * Hkv = 2
    got = nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, 0.25)
    assert_selection_matches(got, q, kc, S, block_len, stride, sel_block, topk, 0.25, EPS_CPU)


@pytest.mark.parametrize("geom,G,T,S,topk", [((8, 4, 16), 2, 256, 256, 8), ((32, 16, 64), 4, 40, 300, 5),
                                             ((5, 3, 8), 1, 64, 250, 10)])
def test_long_and_chunked(geom, G, T, S, topk):
    """Many chunks per tile (the halo between chunks), full prefill and a chunked suffix."""
    block_len, stride, sel_block = geom
    q, kc = random_inputs(1, 1, G, T, S, 16, block_len, stride, seed=S + T)
    got = nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, 0.25)
    assert_selection_matches(got, q, kc, S, block_len, stride, sel_block, topk, 0.25, EPS_CPU)


@pytest.mark.parametrize("geom,G,T,n_splits", [((8, 4, 16), 4, 1, None), ((8, 4, 16), 4, 1, 3),
                                               ((4, 4, 8), 2, 3, 2), ((5, 3, 8), 1, 4, 5)])
def test_decode_split(geom, G, T, n_splits):
    """Decode shapes: the entry axis split over programs (partial LSEs, partial lists, merge)."""
    block_len, stride, sel_block = geom
    S = 290
    q, kc = random_inputs(2, 1, G, T, S, 16, block_len, stride, seed=T * 7 + G)
    cfg = {"n_splits": n_splits, "BE_LSE": 16}  # small LSE tiles: every split holds part of the softmax mass
    got = nsa_select_triton(q, kc, S, block_len, stride, sel_block, 9, 0.25, config=cfg)
    assert_selection_matches(got, q, kc, S, block_len, stride, sel_block, 9, 0.25, EPS_CPU)


def test_fp16_and_strided_inputs():
    block_len, stride, sel_block = 8, 4, 16
    q, kc = random_inputs(2, 2, 2, 40, 120, 16, block_len, stride, seed=3, dtype=torch.float16)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, H, D] storage
    got = nsa_select_triton(q, kc, 120, block_len, stride, sel_block, 6, 0.25)
    assert_selection_matches(got, q, kc, 120, block_len, stride, sel_block, 6, 0.25, 1e-4, torch.float32)


@pytest.mark.parametrize("topk", [2, 3, 7])
def test_ties_and_forced_only(topk):
    """No compressed entry yet (Sc = 0): every importance is 0, the free blocks tie and go to the
    smallest ids; topk <= 3 keeps only (a prefix of) the forced blocks. Exact ids."""
    S, T, sel_block = 150, 40, 8
    q = torch.randn(1, 4, T, 16, device=DEV)
    kc = torch.zeros(1, 2, 0, 16, device=DEV)
    got = nsa_select_triton(q, kc, S, 200, 8, sel_block, topk, 0.25)
    want = ops.nsa_select(q, kc, S=S, block_len=200, stride=8, sel_block=sel_block, topk=topk, scale=0.25,
                          backend="reference")
    assert torch.equal(got, want)


def test_rejects_what_it_cannot_run():
    q, kc = random_inputs(1, 1, 1, 4, 40, 16, 8, 4, seed=0)
    with pytest.raises(ValueError, match="backend='reference'"):
        nsa_select_triton(q.double(), kc.double(), 40, 8, 4, 16, 4, 0.25)
    with pytest.raises(ValueError, match="backend='reference'"):
        nsa_select_triton(q, kc, 40, 8, 1, 1024, 4, 0.25)  # one block spans 1024 entries
    with pytest.raises(ValueError, match="power of two"):
        nsa_select_triton(q, kc, 40, 8, 4, 16, 4, 0.25, config={"BE": 24})


# ----------------------------------------------------------------------------- GPU (bf16, paper config)

PAPER = dict(block_len=32, stride=16, sel_block=64, topk=16)
# Seen on an H200 (torch 2.11, triton 3.6): malformed rows at 8k and an illegal memory access at 32k.
# The kernel is off on GPUs (sparsezoo/ops/nsa_select/triton.py) until these pass.
GPU_BROKEN = pytest.mark.xfail(reason="NSA selection kernel fails on the GPU (malformed rows, illegal access)",
                               strict=False)


@pytest.mark.gpu
@GPU_BROKEN
def test_gpu_prefill_paper_config():
    S = T = 8192
    q, kc = random_inputs(1, 4, 16, T, S, 128, 32, 16, seed=1, dtype=torch.bfloat16, q_std=1.0)
    scale = 128 ** -0.5
    got = nsa_select_triton(q, kc, S, PAPER["block_len"], PAPER["stride"], PAPER["sel_block"], PAPER["topk"], scale)
    assert_selection_matches(got, q, kc, S, *PAPER.values(), scale, EPS_GPU, torch.float32)


@pytest.mark.gpu
@GPU_BROKEN
@pytest.mark.parametrize("B,T", [(1, 1), (8, 4)])
def test_gpu_decode_paper_config(B, T):
    S = 32768
    q, kc = random_inputs(B, 4, 16, T, S, 128, 32, 16, seed=2, dtype=torch.bfloat16, q_std=1.0)
    scale = 128 ** -0.5
    got = nsa_select_triton(q, kc, S, PAPER["block_len"], PAPER["stride"], PAPER["sel_block"], PAPER["topk"], scale)
    assert_selection_matches(got, q, kc, S, *PAPER.values(), scale, EPS_GPU, torch.float32)
