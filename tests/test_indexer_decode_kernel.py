"""Decode lightning-indexer top-k (sparsezoo/kernels/indexer_decode_triton.py) vs the plain-PyTorch oracle
sparsezoo.ops.indexer_topk(backend="reference"). On the CPU the kernels run under TRITON_INTERPRET=1
(fp32, one fp16 case, tiny shapes); bf16 at the decode points (B = 8, J = 64, D_i = 128, N = 32k CSA
and 128k DSA) and CUDA-graph capture run on the GPU (marked gpu).

Per row, as in tests/test_indexer_kernel.py (whose helpers this file reuses): the format is exact
(exactly min(topk, visible) valid ids, strictly ascending, all visible, then -1) and the multiset of
selected logits (recomputed in fp64) equals the reference's within EPS; with small integer inputs the
logits are exact and tie everywhere, so the ids must be the reference's exactly (ties to the smaller id).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsezoo import ops
from tests.test_indexer_kernel import (EPS, SCALE, assert_matches_reference, assert_same_ids, check_format,
                                       csa_ends, dsa_ends, exact_logits, make_inputs, reference, selected_scores,
                                       visible_counts)

triton = pytest.importorskip("triton")

from sparsezoo.kernels import indexer_decode_triton as dec  # noqa: E402
from sparsezoo.kernels.indexer_decode_triton import decode_applies, indexer_topk_decode_triton  # noqa: E402

# Forces several logits programs per request, several select segments per row and several steps
# per pass (the interpreter defaults already split, with fewer pieces).
SPLIT = {"splits": 5, "segments": 7, "BN": 32, "block": 32, "finish_block": 32}
# Few histogram bins and a tiny candidate cap: the finish's radix passes over the list decide.
RADIX = {"hist_bins": 4, "cap": 8, "radix_bins": 4, "finish_block": 32}
# Few histogram bins and a cap that holds them: many candidates (and ties) resolved in registers, then
# the segments' parallel write.
WIDE = {"hist_bins": 4, "cap": 512, "radix_bins": 4, "segments": 5, "block": 32, "write_block": 32}


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """CPU tensors from torch.empty start as garbage (-777 / NaN), so a read of memory the kernels never
    wrote, or an output slot they never filled, fails every time rather than by chance."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        if t.device.type == "cpu" and not t.dtype.is_complex and t.dtype != torch.bool:
            t.fill_(float("nan") if t.is_floating_point() else -777)
        return t

    monkeypatch.setattr(torch, "empty", poisoned)


def run(q, w, k, ends, S, topk, config=None):
    return indexer_topk_decode_triton(q, w, k, ends, S, topk, SCALE, config=config)


# ----------------------------------------------------------------------------- interpreter tests

CASES = [  # B, Hs, T, J, D, N, m (1 = DSA tokens, else CSA entries of m tokens), topk
    (1, 1, 1, 4, 16, 300, 1, 16),
    (2, 1, 1, 8, 32, 2000, 1, 64),
    (3, 1, 2, 4, 16, 600, 4, 32),
    (1, 2, 3, 6, 32, 500, 1, 40),
    (2, 2, 1, 5, 16, 400, 3, 16),
]


def ends_for(N, m, device="cpu"):
    return dsa_ends(N, device) if m == 1 else csa_ends(N * m, m, device)


@pytest.mark.parametrize("B,Hs,T,J,D,N,m,topk", CASES)
def test_matches_reference(B, Hs, T, J, D, N, m, topk):
    ends = ends_for(N, m)
    q, w, k = make_inputs(B, Hs, T, J, D, N, seed=N + T)
    assert_matches_reference(run(q, w, k, ends, N * m, topk), q, w, k, ends, N * m, topk)


@pytest.fixture(scope="module")
def default_run():
    """Inputs (B 1, Hs 2, T 2, N 500) and the default config's selection, shared by test_configs_agree."""
    N, topk = 500, 24
    ends = ends_for(N, 1)
    q, w, k = make_inputs(1, 2, 2, 4, 16, N, seed=21)
    sel = run(q, w, k, ends, N, topk)
    assert_matches_reference(sel, q, w, k, ends, N, topk)
    return (q, w, k, ends, N, topk), sel


@pytest.mark.parametrize("config", [SPLIT, RADIX, WIDE, {"finish": "kernel"}, {"select": "rows"},
                                    {"whole_wave": True, "programs_per_sm": 3}])
def test_configs_agree(default_run, config):
    """Same logits, so every select path and tiling must return the default's ids exactly."""
    args, want = default_run
    assert torch.equal(run(*args, config=config), want)


@pytest.mark.parametrize("config", [{}, SPLIT, RADIX, {"finish": "kernel", **RADIX}, {"max_rows": 4},
                                    {"key_major": False}, {"key_major": False, "max_rows": 4}, WIDE,
                                    {"finish": "kernel", **WIDE}])
def test_ties_go_to_the_smaller_id(config):
    """Integer inputs: exact logits with many ties; the ids must be the reference's exactly.
    max_rows 4: two (head, query) units per logits program, the second program's group half empty."""
    B, Hs, T, N, topk = 1, 1, 3, 300, 37
    ends = ends_for(N, 1)
    q, w, k = make_inputs(B, Hs, T, 2, 16, N, seed=7, integer=True)
    sel = run(q, w, k, ends, N, topk, config=config)
    check_format(sel, visible_counts(ends, N, T), topk)
    assert_same_ids(sel, reference(q, w, k, ends, N, topk))


@pytest.mark.parametrize("config", [{}, SPLIT, RADIX])
def test_all_logits_equal(config):
    """w = 0: every logit is 0 (min = max: one bin, one key value), so each row takes its first topk keys."""
    B, T, N, topk = 1, 2, 300, 20
    q, w, k = make_inputs(B, 1, T, 4, 16, N, seed=3)
    sel = run(q, torch.zeros_like(w), k, ends_for(N, 1), N, topk, config=config)
    check_format(sel, visible_counts(ends_for(N, 1), N, T), topk)
    assert (sel == torch.arange(topk, dtype=torch.int32)).all()


def test_rows_with_few_visible_keys():
    """Queries at 67, 68, 69 see 68, 69, 70 keys: the first two rows take all of them, the last selects."""
    S, T, topk = 70, 3, 69
    ends = ends_for(S, 1)
    q, w, k = make_inputs(2, 2, T, 3, 16, S, seed=2)
    sel = run(q, w, k, ends, S, topk)
    assert_matches_reference(sel, q, w, k, ends, S, topk)
    slot = torch.arange(topk, dtype=torch.int32)
    assert torch.equal(sel[:, :, 0], torch.where(slot < 68, slot, -1).expand(2, 2, topk))
    assert (sel[:, :, 2] >= 0).all()


@pytest.mark.parametrize("m,config", [(1, {}), (4, SPLIT), (1, {"key_major": False, **SPLIT})])
def test_invisible_keys_are_never_selected(m, config):
    """Queries well before the last key: the invisible suffix (-inf in the buffer) must not count, even
    where its logits would win; with S < topk + 1 visible keys some rows take everything."""
    N, T, topk = 300, 3, 30
    ends = ends_for(N, m)
    q, w, k = make_inputs(1, 1, T, 4, 16, N, seed=m)
    k[:, N // 2:] *= 5  # the invisible half holds the largest logits
    for S in (N * m // 2, 34 * m):
        assert_matches_reference(run(q, w, k, ends, S, topk, config=config), q, w, k, ends, S, topk)


def test_outlier_stretches_the_bins():
    """One huge logit puts every other key of the row in the lowest linear bin (inside > cap): the
    finish's radix passes over the list must still find the exact top-k."""
    B, T, N, topk = 2, 1, 1500, 48
    ends = ends_for(N, 1)
    q, w, k = make_inputs(B, 1, T, 4, 16, N, seed=9)
    w = w.abs()  # logits >= 0, so key 123 scaled up gets the largest by far
    k[:, 123] *= 1e4
    sel = run(q, w, k, ends, N, topk)
    check_format(sel, visible_counts(ends, N, T), topk)
    z = exact_logits(q, w, k, SCALE)
    got, want = selected_scores(sel, z), selected_scores(reference(q, w, k, ends, N, topk), z)
    assert (sel == 123).any(-1).all() and torch.equal(got[..., 0], want[..., 0])
    assert torch.allclose(got[..., 1:], want[..., 1:], atol=EPS, rtol=0)


def test_fp16_inputs():
    B, Hs, T, N, topk = 2, 1, 2, 400, 16
    ends = ends_for(N, 1)
    q, w, k = make_inputs(B, Hs, T, 4, 16, N, seed=17, dtype=torch.float16)
    assert_matches_reference(run(q, w, k, ends, N, topk), q, w, k, ends, N, topk, eps=1e-2)


@settings(max_examples=4)
@given(B=st.integers(1, 3), Hs=st.integers(1, 2), T=st.integers(1, 3), J=st.integers(1, 8),
       N=st.integers(20, 700), m=st.sampled_from([1, 2, 4]), topk=st.integers(1, 64), seed=st.integers(0, 2**16))
def test_random_shapes(B, Hs, T, J, N, m, topk, seed):
    ends = ends_for(N, m)
    q, w, k = make_inputs(B, Hs, T, J, 16, N, seed=seed)
    assert_matches_reference(run(q, w, k, ends, N * m, topk), q, w, k, ends, N * m, topk)


def test_dispatch_picks_the_decode_kernel(monkeypatch):
    """ops.indexer_topk(backend='triton') runs the decode launcher for few queries, the general one else."""
    calls = []
    launcher = dec.indexer_topk_decode_triton
    monkeypatch.setattr(dec, "indexer_topk_decode_triton", lambda *a: calls.append(a) or launcher(*a))
    S, topk = 300, 16
    for T in (2, 8):
        q, w, k = make_inputs(1, 1, T, 4, 16, S, seed=T)
        sel = ops.indexer_topk(q, w, k, dsa_ends(S), S=S, topk=topk, scale=SCALE, backend="triton")
        assert_matches_reference(sel, q, w, k, dsa_ends(S), S, topk)
    assert len(calls) == 1 and calls[0][0].shape[2] == 2


def test_whole_wave_grid_never_passes_the_programs_per_sm():
    from sparsezoo.kernels import indexer_decode_triton as idk

    sms = idk._num_sms(torch.device("cpu"))
    for units, per_sm in [(1, 1), (3, 2), (8, 1), (2 * sms, 1), (5, 3)]:
        pieces, piece = idk._splits(units, 10_000, 64, per_sm, None, 1000, torch.device("cpu"), whole_wave=True)
        assert pieces >= 1 and piece % 64 == 0 and pieces * piece >= 10_000
        assert units * pieces <= max(units, per_sm * sms)


def test_decode_applies():
    assert decode_applies(8, 1, 1, 64, 128 * 1024)
    assert decode_applies(8, 1, 4, 64, 32 * 1024)
    assert not decode_applies(8, 1, 5, 64, 32 * 1024)  # prefill chunk
    assert not decode_applies(8, 1, 0, 64, 1024)
    assert not decode_applies(1, 1, 1, 512, 1024)  # index heads beyond one dot
    assert not decode_applies(64, 8, 4, 64, 1 << 20)  # logits + list over the buffer bound


def test_candidate_slots_follow_the_key_count():
    """cap 0: N / (2 hist_bins) slots, a power of two in [64, 2048]; a set cap wins."""
    cfg = {**dec.CONFIG, "cap": 0, "hist_bins": 128}
    assert [dec._cap(cfg, n) for n in (1000, 32768, 131072, 1 << 22)] == [64, 128, 512, 2048]
    assert dec._cap({**cfg, "cap": 32}, 131072) == 32


def test_rejects_fp64_and_bad_config():
    q, w, k = make_inputs(1, 1, 1, 2, 16, 8, seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='reference'"):
        run(q, w, k, dsa_ends(8), 8, 2)
    with pytest.raises(ValueError, match="select"):
        run(q.float(), w.float(), k.float(), dsa_ends(8), 8, 2, config={"select": "sort"})
    with pytest.raises(ValueError, match="finish"):
        run(q.float(), w.float(), k.float(), dsa_ends(8), 8, 2, config={"finish": "later"})
    with pytest.raises(ValueError, match="unknown decode indexer config keys \\['threshold'\\]; valid keys"):
        run(q.float(), w.float(), k.float(), dsa_ends(8), 8, 2, config={"threshold": "sort"})


# ----------------------------------------------------------------------------- GPU (bf16, decode points)

GPU_POINTS = [  # B, T, N, m (1 = DSA), topk
    (8, 1, 32 * 1024, 4, 512),     # CSA decode: 32k compressed entries of 4 tokens
    (8, 1, 128 * 1024, 1, 2048),   # DSA decode: 128k tokens
    (4, 2, 16 * 1024, 1, 2048),    # MTP-style: two new queries per request
]


def near_tie_eps(q, w, k):
    return 1e-4 * exact_logits(q[:, :, -1:], w[:, :, -1:], k, SCALE).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,N,m,topk", GPU_POINTS)
def test_gpu_bf16_decode_points(B, T, N, m, topk):
    """vs the general Triton indexer and the reference: the same multiset of selected logits (up to
    near-ties); every select path of the decode kernel returns the same ids (same logits), another
    tiling the same logits up to fp32 summation order."""
    from sparsezoo.kernels.indexer_triton import indexer_topk_triton

    dev = torch.device("cuda")
    ends = ends_for(N, m, dev)
    S = N * m
    q, w, k = make_inputs(B, 1, T, 64, 128, N, seed=1, dtype=torch.bfloat16, device=dev)
    sel = run(q, w, k, ends, S, topk)
    eps = near_tie_eps(q, w, k)
    assert_matches_reference(sel, q, w, k, ends, S, topk, eps=eps)
    z = exact_logits(q, w, k, SCALE)
    other = indexer_topk_triton(q, w, k, ends, S, topk, SCALE)
    assert torch.allclose(selected_scores(sel, z), selected_scores(other, z), atol=eps, rtol=0)
    for config in ({"finish": "kernel"}, {"select": "rows"}, {"cap": 64}):  # cap 64: the serial finish
        assert torch.equal(run(q, w, k, ends, S, topk, config=config), sel), config
    for config in ({"BN": 128, "num_stages": 3, "programs_per_sm": 1}, {"key_major": False},
                   {"key_major": False, "BN": 128, "num_warps": 8}):
        tiled = run(q, w, k, ends, S, topk, config=config)
        assert torch.allclose(selected_scores(tiled, z), selected_scores(sel, z), atol=eps, rtol=0), config


@pytest.mark.gpu
@pytest.mark.parametrize("config", [{}, {"finish": "kernel"}])
def test_gpu_cuda_graph_capture(config):
    """The launcher captures into a CUDA graph (no host syncs); replays recompute from the inputs in place."""
    dev = torch.device("cuda")
    B, N, topk = 8, 32 * 1024, 512
    ends = ends_for(N, 4, dev)
    q, w, k = make_inputs(B, 1, 1, 64, 128, N, seed=4, dtype=torch.bfloat16, device=dev)
    q2, w2, k2 = make_inputs(B, 1, 1, 64, 128, N, seed=5, dtype=torch.bfloat16, device=dev)
    want, want2 = run(q, w, k, ends, 4 * N, topk, config), run(q2, w2, k2, ends, 4 * N, topk, config)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        run(q, w, k, ends, 4 * N, topk, config)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = run(q, w, k, ends, 4 * N, topk, config)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    for dst, src in ((q, q2), (w, w2), (k, k2)):
        dst.copy_(src)
    graph.replay()
    graph.replay()  # the workspace must start from zero on every replay
    torch.cuda.synchronize()
    assert torch.equal(got, want2)
