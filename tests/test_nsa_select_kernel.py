"""Triton NSA block selection (sparsezoo/kernels/nsa_select_triton.py) vs sparsezoo.ops.nsa_select.

On the CPU the kernels run under TRITON_INTERPRET=1 in fp32 (fp16 once) on tiny shapes; the bf16
cases at the paper's configuration run on the GPU (marked gpu).

Per output row: exactly min(topk, L + 1) valid ids, strictly ascending, of visible blocks, then -1;
the forced blocks (0, L - 1, L, or the prefix of them the reference keeps when topk < 3) are
present; the other (free) blocks' importances (fp64, or fp32 on the GPU) equal the reference's free
blocks' as multisets within EPS. EPS allows near-ties to swap ids: the kernel sums probabilities in
another order and with an fp16 hi/lo split (about 2^-21 relative), far below EPS.
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

from sparsezoo.kernels.nsa_select_triton import (  # noqa: E402
    NSA_SELECT_CONFIG, buffer_plan, nsa_select_triton, schedule_for)

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


def ascending(sel):
    """Valid ids of each row in ascending order, then -1 (the kernel's order)."""
    big = torch.iinfo(sel.dtype).max
    s = torch.sort(torch.where(sel >= 0, sel, big), dim=-1).values
    return torch.where(s == big, -1, s)


def natural_lse(q, kc, S, block_len, stride, scale, chunk=512):
    """fp64 natural-log LSE [B, Hq, T] of the compressed attention's scores over the visible entries."""
    B, Hq, T, D = q.shape
    Hkv, Sc = kc.shape[1], kc.shape[2]
    qg = q.double().view(B, Hkv, Hq // Hkv, T, D)
    parts = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        ok = compressed_visible(query_positions(T, S, t0, t1, q.device), Sc, block_len, stride)
        s = torch.einsum("bhgtd,bhsd->bhgts", qg[:, :, :, t0:t1], kc.double()) * scale
        parts.append(masked_softmax_lse(s, ok)[1])
    return torch.cat(parts, dim=3).reshape(B, Hq, T)


def assert_selection_matches(got, q, kc, S, block_len, stride, sel_block, topk, scale, eps, dtype=torch.float64):
    """Row format exact (ascending ids of visible blocks, then -1), forced blocks exact, the free
    blocks' importances equal the reference's as multisets within eps."""
    B, Hkv, T, _ = got.shape
    assert got.dtype == torch.int32 and got.shape == (B, Hkv, T, topk)
    want = ops.nsa_select(q.to(dtype), kc.to(dtype), S=S, block_len=block_len, stride=stride, sel_block=sel_block,
                          topk=topk, scale=scale, backend="reference")
    imp = importance(q, kc, S, block_len, stride, sel_block, scale, dtype)
    local = (query_positions(T, S, 0, T, got.device) // sel_block).view(T, 1)
    slot = torch.arange(topk, device=got.device).view(1, topk)
    n_valid = torch.clamp(local + 1, max=topk)
    valid = (slot < n_valid).expand_as(got)
    assert torch.equal(got >= 0, valid), "valid ids fill exactly the first min(topk, L+1)"
    assert (got[~valid] == -1).all()
    ids = got.long()
    assert ((ids >= 0) & (ids <= local))[valid].all(), "ids of visible blocks only"
    assert (ids[..., 1:] > ids[..., :-1])[valid[..., 1:]].all(), "ids strictly ascending (so distinct)"
    forced = valid & ((ids == 0) | (ids >= local - 1))
    n_forced = torch.clamp(torch.where(local >= 2, 3, local + 1), max=topk)
    big = torch.iinfo(torch.int64).max
    want_forced = torch.sort(torch.where(slot < n_forced, want.long(), big), dim=-1).values
    assert torch.equal(torch.sort(torch.where(forced, ids, big), dim=-1).values, want_forced), \
        "forced blocks (0, L - 1, L; a prefix of them when topk < 3)"

    def free_scores(sel, free):
        v = torch.gather(imp, -1, sel.long().clamp_min(0))
        return torch.sort(torch.where(free, v, float("-inf")), dim=-1, descending=True).values

    got_sorted = free_scores(got, valid & ~forced)
    want_sorted = free_scores(want, ((slot >= n_forced) & (slot < n_valid)).expand_as(want))
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
       frac=st.floats(0.02, 1.0), topk=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_matches_reference(geom, G, Hkv, S, frac, topk, seed):
    block_len, stride, sel_block = geom
    T = max(1, int(min(S, 48) * frac))  # the select runs one interpreted program per row: few rows
    q, kc = random_inputs(3 - Hkv, Hkv, G, T, S, 16, block_len, stride, seed)  # B * Hkv = 2
    got = nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, 0.25)
    assert_selection_matches(got, q, kc, S, block_len, stride, sel_block, topk, 0.25, EPS_CPU)


@pytest.mark.parametrize("geom,G,T,S,topk,schedule", [
    ((8, 4, 16), 2, 256, 256, 8, "chunks"), ((32, 16, 64), 4, 40, 300, 5, "chunks"), ((5, 3, 8), 1, 64, 250, 10, "chunks"),
    ((8, 4, 16), 2, 256, 256, 8, "stream"), ((32, 16, 64), 4, 40, 300, 5, "stream"), ((16, 4, 8), 3, 50, 230, 6, "stream"),
    ((8, 4, 16), 2, 256, 256, 8, "stream_topk"), ((32, 16, 64), 4, 40, 300, 5, "stream_topk"),
    ((16, 4, 8), 3, 50, 230, 16, "stream_topk")])
def test_long_and_chunked(geom, G, T, S, topk, schedule):
    """Many chunks and chunk ranges per tile (the halo between chunks), or many stream steps (the spill
    carried between steps; (16, 4, 8) spills into two blocks); full prefill and a chunked suffix."""
    block_len, stride, sel_block = geom
    q, kc = random_inputs(1, 1, G, T, S, 16, block_len, stride, seed=S + T)
    got = nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, 0.25, config={"schedule": schedule})
    assert_selection_matches(got, q, kc, S, block_len, stride, sel_block, topk, 0.25, EPS_CPU)


@pytest.mark.parametrize("geom,G,T,S,topk,config", [
    ((8, 4, 16), 2, 48, 200, 8, {"schedule": "stream", "stream_diag": False}),
    ((16, 4, 12), 2, 40, 150, 6, None)])
def test_walk_options_and_odd_blocks(geom, G, T, S, topk, config):
    """The stream walk with every step masked (no open steps); blocks of 3 entries (a step of a power of two
    entries is not whole blocks): the chunk schedule runs them, and the stream schedules refuse them."""
    block_len, stride, sel_block = geom
    q, kc = random_inputs(1, 1, G, T, S, 16, block_len, stride, seed=S + G)
    got = nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, 0.25, config=config)
    assert_selection_matches(got, q, kc, S, block_len, stride, sel_block, topk, 0.25, EPS_CPU)
    if config is None:
        assert schedule_for(block_len, stride, sel_block, DEV) == "chunks"
        for schedule in ("stream", "stream_topk"):
            with pytest.raises(ValueError, match="power-of-two multiple of stride"):
                nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, 0.25, config={"schedule": schedule})


@settings(max_examples=6)
@given(geom=st.sampled_from(GEOMETRIES[:4] + [(16, 4, 8), (3, 1, 4)]), G=st.sampled_from([1, 2, 3]),
       S=st.integers(1, 200), frac=st.floats(0.02, 1.0), topk=st.integers(1, 10), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("schedule", ["stream", "stream_topk"])
def test_stream_schedule_matches_reference(schedule, geom, G, S, frac, topk, seed):
    """The stream schedules on drawn shapes (geometries they tile; spills of one and two blocks): the buffer and
    select, or each row's running top-k ('stream_topk')."""
    block_len, stride, sel_block = geom
    T = max(1, int(min(S, 40) * frac))
    q, kc = random_inputs(2, 1, G, T, S, 16, block_len, stride, seed)
    got = nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, 0.25, config={"schedule": schedule})
    assert_selection_matches(got, q, kc, S, block_len, stride, sel_block, topk, 0.25, EPS_CPU)


@pytest.mark.parametrize("geom,G,T,lse_splits,split", [((8, 4, 16), 4, 1, None, 2), ((8, 4, 16), 4, 1, 3, 3),
                                                       ((4, 4, 8), 2, 3, 2, 4), ((5, 3, 8), 1, 4, 5, 2)])
def test_decode_split(geom, G, T, lse_splits, split):
    """Decode shapes: partial LSEs over split entry ranges, and the select's rows split into
    segments (same ids as one segment)."""
    block_len, stride, sel_block = geom
    S, topk = 290, 9
    q, kc = random_inputs(2, 1, G, T, S, 16, block_len, stride, seed=T * 7 + G)
    # small LSE steps, one per split at least: every split holds part of the mass; small select
    # steps: segments of 16 blocks
    base = {"lse_splits": lse_splits, "lse_min_tiles": 1, "BE_LSE": 16, "select_block": 16, "select": "indexer"}
    one = nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, 0.25, config={**base, "split": 1})
    got = nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, 0.25, config={**base, "split": split})
    assert torch.equal(got, one)
    assert_selection_matches(got, q, kc, S, block_len, stride, sel_block, topk, 0.25, EPS_CPU)


@pytest.mark.parametrize("select", ["rows", "indexer"])
def test_query_chunks(select):
    """A tiny buffer bound: chunks of 3 queries (the last one partial): same ids as one chunk."""
    block_len, stride, sel_block, S, T, topk = 8, 4, 16, 280, 10, 6  # 18 blocks, select scratch 32 ids
    q, kc = random_inputs(1, 2, 2, T, S, 16, block_len, stride, seed=5)
    whole = nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, 0.25, config={"select": select})
    config = {"buffer_bytes": 3 * 2 * 4 * (18 + (32 if select == "indexer" else 0)), "select": select}
    assert buffer_plan(1, 2, T, 18, {**NSA_SELECT_CONFIG, **config}) == (3, select)
    chunked = nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, 0.25, config=config)
    assert torch.equal(chunked, whole)
    assert_selection_matches(chunked, q, kc, S, block_len, stride, sel_block, topk, 0.25, EPS_CPU)


def test_buffer_plan():
    """The buffer's chunks and select at NSA's 128k prefill (B 1, Hkv 4, 2048 blocks, the 1 GiB bound): the row
    select needs no scratch, so 4 chunks of 32k queries; the histogram select's scratch halves them. Chunks
    are evened out, and few rows (decode) take the histogram select."""
    cfg = dict(NSA_SELECT_CONFIG)
    assert buffer_plan(1, 4, 131072, 2048, cfg) == (32768, "rows")
    assert buffer_plan(1, 4, 131072, 2048, {**cfg, "select": "indexer"}) == (16384, "indexer")
    assert buffer_plan(1, 4, 100000, 2048, cfg) == (25000, "rows")
    assert buffer_plan(8, 4, 1, 2048, cfg) == (1, "indexer")


def test_radix_select():
    """Few histogram bins and a tiny candidate cap: the select's radix passes run on importances."""
    block_len, stride, sel_block, S, T, topk = 8, 4, 8, 200, 12, 11
    q, kc = random_inputs(1, 2, 2, T, S, 16, block_len, stride, seed=9)
    got = nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, 0.25,
                            config={"select_bins": 4, "select_cap": 2, "select_block": 32, "select": "indexer"})
    assert_selection_matches(got, q, kc, S, block_len, stride, sel_block, topk, 0.25, EPS_CPU)


@settings(max_examples=4)
@given(geom=st.sampled_from(GEOMETRIES), G=st.sampled_from([1, 2, 4]), S=st.integers(1, 260), frac=st.floats(0.02, 1.0),
       topk=st.integers(1, 12), blk=st.sampled_from([16, 32, 64]), group=st.sampled_from([0, 1, 2, 4]),
       seed=st.integers(0, 2**16))
def test_row_select_matches_indexer_select(geom, G, S, frac, topk, blk, group, seed):
    """select='rows' (max extraction, rows longer than ROW_BLK in several steps, over
    the blocks of the best ROW_GROUP-block groups or every block) picks the same ids as the indexer's histogram
    select from the same buffer, and the reference's blocks."""
    block_len, stride, sel_block = geom
    T = max(1, int(min(S, 24) * frac))  # one interpreted program per row and select: few rows
    q, kc = random_inputs(1, 2, G, T, S, 16, block_len, stride, seed)
    want = nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, 0.25, config={"select": "indexer"})
    got = nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, 0.25,
                            config={"select": "rows", "ROW_BLK": blk, "ROW_GROUP": group})
    assert torch.equal(got, want)
    assert_selection_matches(got, q, kc, S, block_len, stride, sel_block, topk, 0.25, EPS_CPU)


def test_given_lse():
    """A caller's natural-log LSE replaces the LSE pass: the true one gives the reference's
    selection; one that mutes every second head (LSE + 40) gives the selection of the other heads."""
    block_len, stride, sel_block, S, T, topk = 8, 4, 16, 200, 16, 7
    q, kc = random_inputs(2, 1, 2, T, S, 16, block_len, stride, seed=21)
    lse = natural_lse(q, kc, S, block_len, stride, 0.25)
    got = nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, 0.25, lse=lse.float())
    assert_selection_matches(got, q, kc, S, block_len, stride, sel_block, topk, 0.25, EPS_CPU)
    muted = lse.clone()
    muted[:, 1::2] += 40.0
    got = nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, 0.25, lse=muted.float())
    assert_selection_matches(got, q[:, 0::2], kc, S, block_len, stride, sel_block, topk, 0.25, EPS_CPU)


@pytest.mark.parametrize("schedule", ["stream", "chunks"])
def test_given_lse_far_too_small(schedule):
    """An LSE far below the true one (p overflows far past 1): every free block's importance saturates at the
    clamp, so the free slots go to the smallest ids, whatever the overflow does inside the walk."""
    block_len, stride, sel_block, S, T, topk = 8, 4, 16, 256, 16, 6
    q, kc = random_inputs(1, 1, 2, T, S, 16, block_len, stride, seed=22)
    lse = natural_lse(q, kc, S, block_len, stride, 0.25) - 60.0
    got = nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, 0.25, lse=lse.float(),
                            config={"schedule": schedule})
    local = (S - T + torch.arange(T, device=got.device)) // sel_block
    for t in range(T):
        L = int(local[t])
        forced = {0, L - 1, L} if L >= 2 else set(range(L + 1))
        free = [j for j in range(L + 1) if j not in forced][:topk - len(forced)]
        assert got[0, 0, t].tolist() == sorted(forced | set(free)), t


def test_fp16_and_strided_inputs():
    block_len, stride, sel_block = 8, 4, 16
    q, kc = random_inputs(2, 2, 2, 16, 120, 16, block_len, stride, seed=3, dtype=torch.float16)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, H, D] storage
    got = nsa_select_triton(q, kc, 120, block_len, stride, sel_block, 6, 0.25)
    assert_selection_matches(got, q, kc, 120, block_len, stride, sel_block, 6, 0.25, 1e-4, torch.float32)


@pytest.mark.parametrize("select", ["rows", "indexer"])
@pytest.mark.parametrize("topk", [1, 2, 3, 7])
def test_ties_and_forced_only(topk, select):
    """No compressed entry yet (Sc = 0): every importance is 0, the free blocks tie and go to the
    smallest ids; topk <= 3 keeps only (a prefix of) the forced blocks. Exact ids."""
    S, T, sel_block = 150, 20, 8
    q = torch.randn(1, 4, T, 16, device=DEV)
    kc = torch.zeros(1, 2, 0, 16, device=DEV)
    got = nsa_select_triton(q, kc, S, 200, 8, sel_block, topk, 0.25, config={"select": select})
    want = ops.nsa_select(q, kc, S=S, block_len=200, stride=8, sel_block=sel_block, topk=topk, scale=0.25,
                          backend="reference")
    assert torch.equal(got, ascending(want))


def test_the_schedule_that_ran_is_recorded():
    """ops.nsa_select records the kernel's schedule: 'stream' where sel_block is a power-of-two multiple of
    stride, else 'chunks' (auto), and the buffer's select; schedule_for says the same as the launcher decides."""
    for (block_len, stride, sel_block), want in (((8, 4, 16), "stream"), ((5, 3, 8), "chunks")):
        assert schedule_for(block_len, stride, sel_block, DEV) == want
        q, kc = random_inputs(1, 1, 2, 4, 40, 16, block_len, stride, seed=1)
        with ops.track_implementations() as used:
            ops.nsa_select(q, kc, S=40, block_len=block_len, stride=stride, sel_block=sel_block, topk=3, scale=0.25,
                           backend="triton")
        buffer = "rows" if DEV.type == "cpu" else "indexer"  # 4 rows: the interpreter's row_min_rows is 1
        assert used == {"nsa_select_schedule": want, "nsa_select_buffer": buffer, "nsa_select": "triton"}
    assert schedule_for(8, 4, 16, DEV, {"schedule": "chunks"}) == "chunks"
    assert schedule_for(8, 4, 16, DEV, {"schedule": "stream_topk"}) == "stream_topk"


def test_rejects_what_it_cannot_run():
    q, kc = random_inputs(1, 1, 1, 4, 40, 16, 8, 4, seed=0)
    with pytest.raises(ValueError, match="backend='reference'"):
        nsa_select_triton(q.double(), kc.double(), 40, 8, 4, 16, 4, 0.25)
    with pytest.raises(ValueError, match="backend='reference'"):
        nsa_select_triton(q, kc, 40, 8, 1, 1024, 4, 0.25)  # one block spans 1024 entries
    with pytest.raises(ValueError, match="power of two"):
        nsa_select_triton(q, kc, 40, 8, 4, 16, 4, 0.25, config={"BE": 24})
    assert torch.equal(nsa_select_triton(q, kc, 40, 5, 3, 8, 4, 0.25), nsa_select_triton(  # 'auto' takes chunks
        q, kc, 40, 5, 3, 8, 4, 0.25, config={"schedule": "chunks"}))
    with pytest.raises(ValueError, match="multiple of stride.*schedule='chunks'"):
        nsa_select_triton(q, kc, 40, 5, 3, 8, 4, 0.25, config={"schedule": "stream"})
    with pytest.raises(ValueError, match="schedule must be one of"):
        nsa_select_triton(q, kc, 40, 8, 4, 16, 4, 0.25, config={"schedule": "rows"})
    with pytest.raises(ValueError, match="select must be one of"):
        nsa_select_triton(q, kc, 40, 8, 4, 16, 4, 0.25, config={"select": "stream"})
    with pytest.raises(ValueError, match="ROW_GROUP must be 0 or a power of two"):
        nsa_select_triton(q, kc, 40, 8, 4, 16, 4, 0.25, config={"ROW_GROUP": 3})
    with pytest.raises(ValueError, match="stream_topk' keeps at most 16"):  # 32 best of a 16-block step
        nsa_select_triton(q, kc, 40, 8, 4, 16, 17, 0.25, config={"schedule": "stream_topk"})
    with pytest.raises(ValueError, match="unknown"):
        nsa_select_triton(q, kc, 40, 8, 4, 16, 4, 0.25, config={"n_splits": 2})
    with pytest.raises(ValueError, match="lse"):
        nsa_select_triton(q, kc, 40, 8, 4, 16, 4, 0.25, lse=torch.zeros(1, 1, 5))


# ----------------------------------------------------------------------------- GPU (bf16, paper config)

PAPER = dict(block_len=32, stride=16, sel_block=64, topk=16)


def _gpu_case(B, T, S, seed, config=None, given_lse=False):
    q, kc = random_inputs(B, 4, 16, T, S, 128, 32, 16, seed=seed, dtype=torch.bfloat16, q_std=1.0)
    scale = 128 ** -0.5
    lse = natural_lse(q, kc, S, 32, 16, scale).float() if given_lse else None
    got = nsa_select_triton(q, kc, S, *PAPER.values(), scale, config=config, lse=lse)
    torch.cuda.synchronize()
    assert_selection_matches(got, q, kc, S, *PAPER.values(), scale, EPS_GPU, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("T,config,given_lse", [(8192, None, False), (8192, None, True),
                                                (32768, {"buffer_bytes": 1 << 26}, False),
                                                (8192, {"schedule": "stream"}, True),
                                                (8192, {"select": "indexer"}, True),
                                                (32768, {"schedule": "stream", "buffer_bytes": 1 << 26}, False),
                                                (8192, {"schedule": "stream_topk"}, True),
                                                (8192, {"schedule": "stream", "stream_diag": False}, True),
                                                (32768, {"schedule": "stream_topk"}, False)])
def test_gpu_prefill_paper_config(T, config, given_lse):
    """bf16 prefill, batch 2 (8k also with the LSE given; 32k in eight query chunks): every row
    well-formed and set-equal to the fp32 reference up to near-ties."""
    _gpu_case(2, T, T, seed=1, config=config, given_lse=given_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,S", [(1, 1, 32768), (8, 4, 32768), (2, 1, 131072), (1, 2048, 32768)])
def test_gpu_decode_and_chunked_prefill_paper_config(B, T, S):
    """Decode (few rows: split LSE pass, split select rows) and a chunked-prefill suffix."""
    _gpu_case(B, T, S, seed=2)
