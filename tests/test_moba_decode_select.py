"""MoBA's decode selection (sparsezoo/kernels/moba_select_triton.py, path 4: T <= DECODE_T queries scored into a
scratch row per (b, head, t), ranked by a top-k over packed (score, id) keys) against the plain-PyTorch
reference `ops.moba_select(..., means=, backend="reference")`.

CPU: TRITON_INTERPRET=1 in fp32. Integer-valued inputs make every score exact (and tie a lot), so the ids
must equal the reference's exactly (its tie rule: the smaller id first; NaN as +inf; -inf last but still
ranked); random inputs compare the ranked blocks' fp64 scores as multisets within 1e-4. bf16 at the m3
decode shape runs on the GPU (marked gpu) within 2e-3 of the scores. A spy checks that the decode kernel
ran wherever a test counts on it.
"""

import pytest
import torch

from sparsezoo.ops.common import nan_first
from sparsezoo.ops.moba_select import api as moba

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from sparsezoo.kernels import moba_select_triton as mst  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAN, INF = float("nan"), float("inf")


@pytest.fixture
def decode_runs(monkeypatch):
    """Counts the decode launcher's calls."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    real = mst._decode_select
    monkeypatch.setattr(mst, "_decode_select", spy)
    return calls


# ----------------------------------------------------------------------------- helpers

def make(B, Hkv, G, T, S, D, block, integer, seed, n_means=None):
    """q [B, Hkv*G, T, D] and fp32 means of the complete blocks [B, Hkv, n, D] (n = the ranked count unless
    given); integer: small integers (exact scores, many ties)."""
    g = torch.Generator().manual_seed(seed)
    n = (S - 1) // block if n_means is None else n_means
    if integer:
        draw = lambda *s: torch.randint(-2, 3, s, generator=g).float()
    else:
        draw = lambda *s: torch.randn(*s, generator=g)
    return draw(B, Hkv * G, T, D).to(DEV), draw(B, Hkv, n, D).to(DEV)


def reference(q, means, S, block, topk):
    B, Hq, T, D = q.shape
    k = torch.zeros(1, dtype=q.dtype, device=q.device).expand(B, means.shape[1], S, D)  # only its shape is read
    return moba.moba_select(q, k, block_size=block, topk=topk, means=means, backend="reference")


def ranked_scores(sel, q, means, S, block):
    """fp64 scores of each row's ranked ids (NaN as +inf), -inf where a slot holds no ranked block."""
    B, Hq, T, _ = q.shape
    G = Hq // means.shape[1]
    local = ((S - T + torch.arange(T, device=sel.device)) // block).view(1, 1, T, 1)
    m = means.double().repeat_interleave(G, dim=1)
    s = nan_first(torch.einsum("bhtd,bhnd->bhtn", q.double(), m))
    ids = sel.long()
    ranked = (ids >= 0) & (ids < local)
    return torch.where(ranked, torch.gather(s, -1, ids.clamp(0, s.shape[-1] - 1)), -INF), ranked


def assert_selection(sel, q, means, S, block, topk, eps=None):
    """eps None: the reference's ids exactly; else the same format (ranked slots, local, -1), the ranked
    blocks best-first and their scores equal to the reference's as multisets within eps."""
    want = reference(q, means, S, block, topk)
    assert sel.dtype == torch.int32 and sel.shape == want.shape
    if eps is None:
        assert torch.equal(sel, want)
        return
    got_s, got_ranked = ranked_scores(sel, q, means, S, block)
    want_s, want_ranked = ranked_scores(want, q, means, S, block)
    assert torch.equal(got_ranked, want_ranked) and torch.equal(sel[~got_ranked], want[~want_ranked])
    assert (got_s[..., 1:] <= got_s[..., :-1] + eps).all(), "ranked ids are best-first"
    got_s, want_s = (torch.sort(x, dim=-1, descending=True).values for x in (got_s, want_s))
    fin = torch.isfinite(want_s)
    assert torch.equal(torch.isfinite(got_s), fin) and torch.equal(got_s[~fin], want_s[~fin])
    torch.testing.assert_close(got_s[fin], want_s[fin], atol=eps, rtol=0)


# ----------------------------------------------------------------------------- CPU (interpreter), fp32

# S per T with block 4: under 2 blocks, a multiple of the block, one past a multiple, and longer
S_CASES = [5, 32, 33, 50]


@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("S", S_CASES)
def test_decode_select_exact_on_integer_scores(T, S, decode_runs):
    """Exact scores with many ties: the reference's ids, for G of 1, 3 (a partial head chunk) and 4."""
    block = 4
    for i, (G, topk) in enumerate([(1, 3), (3, 16), (4, 6)]):  # topk 16 > every row's rankable blocks
        q, means = make(1 + i % 2, 2 - i % 2, G, T, S, 8, block, integer=True, seed=100 * T + S + i)
        sel = mst.moba_select_from_means(q, means, S, block, topk)
        assert_selection(sel, q, means, S, block, topk)
    assert len(decode_runs) == 3


@pytest.mark.parametrize("T,S,topk", [(1, 61, 5), (4, 61, 8), (2, 9, 4), (3, 40, 1)])
def test_decode_select_random_scores(T, S, topk, decode_runs):
    q, means = make(2, 2, 2, T, S, 16, 4, integer=False, seed=T * S + topk)
    sel = mst.moba_select_from_means(q, means, S, 4, topk)
    assert_selection(sel, q, means, S, 4, topk, eps=1e-4)
    assert decode_runs


@pytest.mark.parametrize("config", [{"DECODE_HG": 1}, {"DECODE_HG": 2, "DECODE_TOPK_ELEMS": 1},
                                    {"DECODE_HG": 8, "DECODE_BN": 32}])
def test_decode_select_tilings(config, decode_runs):
    """Head chunks of 1, 2 or 8 of 6 heads (the default 4: a partial chunk), top-k passes of 1 row, BN."""
    T, S, block, topk = 2, 70, 4, 5
    q, means = make(1, 2, 6, T, S, 8, block, integer=True, seed=7)
    sel = mst.moba_select_from_means(q, means, S, block, topk, config)
    assert_selection(sel, q, means, S, block, topk)
    assert decode_runs


def test_decode_select_longer_means_buffer_and_strided_q(decode_runs):
    """A preallocated means buffer (NaN past the ranked blocks, the local block's slot included) and a q with
    the strides of a [B, Hq, D, T] tensor: the reference's ids."""
    T, S, block, topk = 3, 38, 4, 4  # positions 35..37: local blocks 8, 9, 9
    q, means = make(1, 2, 2, T, S, 8, block, integer=True, seed=3, n_means=(S - 1) // block + 3)
    means[:, :, (S - 1) // block:] = NAN
    q = q.transpose(2, 3).contiguous().transpose(2, 3)
    sel = mst.moba_select_from_means(q, means, S, block, topk)
    assert_selection(sel, q, means[:, :, :(S - 1) // block], S, block, topk)
    assert decode_runs


def test_decode_select_all_ties_take_the_smallest_ids(decode_runs):
    T, S, block, topk = 4, 72, 2, 16
    q = torch.ones(1, 2, T, 8, device=DEV)
    means = torch.ones(1, 1, (S - 1) // block, 8, device=DEV)
    sel = mst.moba_select_from_means(q, means, S, block, topk)
    assert torch.equal(sel, reference(q, means, S, block, topk))
    assert sel[0, 1, 2].tolist() == list(range(15)) + [35]
    assert decode_runs


def test_decode_select_the_split_path_agrees(decode_runs):
    """DECODE_T = 0 runs the split + merge fold instead: the same ids on finite integer scores."""
    T, S, block, topk = 2, 50, 2, 6
    q, means = make(2, 1, 4, T, S, 8, block, integer=True, seed=5)
    sel = mst.moba_select_from_means(q, means, S, block, topk)
    assert torch.equal(sel, mst.moba_select_from_means(q, means, S, block, topk, {"DECODE_T": 0, "SPLIT": 3}))
    assert torch.equal(sel, mst.moba_select_from_means(q, means, S, block, topk, {"DECODE_CAP": 10}))
    assert len(decode_runs) == 1  # 24 ranked blocks > DECODE_CAP 10: the split path


# ----------------------------------------------------------------------------- non-finite values

def _unchanged_except(sel, clean, rows):
    rows = rows.expand(sel.shape[:3])
    assert rows.any() and (~rows).any(), "the case must split the rows"
    assert torch.equal(sel[~rows], clean[~rows])


def test_decode_select_nan_mean(decode_runs):
    """A NaN in block 2's mean (kv head 1): heads 2, 3 of the rows past block 2 rank it first; nothing else
    changes (tests/test_nonfinite.py's rule)."""
    T, S, block, topk = 4, 14, 4, 3  # positions 10..13: local blocks 2, 2, 3, 3
    q, means = make(1, 2, 2, T, S, 8, block, integer=False, seed=11)
    clean = mst.moba_select_from_means(q, means, S, block, topk)
    bad = means.clone()
    bad[0, 1, 2, 3] = NAN
    sel = mst.moba_select_from_means(q, bad, S, block, topk)
    sees = (torch.arange(4) // 2 == 1).view(1, 4, 1) & (torch.arange(S - T, S) // block > 2).view(1, 1, T)
    _unchanged_except(sel, clean, sees.to(DEV))
    assert (sel[..., 0][sees.expand(1, 4, T).to(DEV)] == 2).all()
    assert_selection(sel, q, bad, S, block, topk, eps=1e-4)
    assert len(decode_runs) == 2


def test_decode_select_nan_query(decode_runs):
    """A NaN query row ranks every candidate first: it takes the smallest ids; no other row changes."""
    T, S, block, topk = 2, 30, 4, 4
    q, means = make(1, 2, 2, T, S, 8, block, integer=False, seed=12)
    clean = mst.moba_select_from_means(q, means, S, block, topk)
    bad = q.clone()
    bad[0, 3, 1, 5] = NAN
    sel = mst.moba_select_from_means(bad, means, S, block, topk)
    row = torch.zeros(1, 4, T, dtype=torch.bool, device=DEV)
    row[0, 3, 1] = True
    _unchanged_except(sel, clean, row)
    assert sel[0, 3, 1].tolist() == [0, 1, 2, 7]
    assert_selection(sel, bad, means, S, block, topk)
    assert decode_runs


@pytest.mark.parametrize("topk", [3, 16])
def test_decode_select_infinite_means(topk, decode_runs):
    """fp32 queries: an inf in block 1's mean scores +inf (ranked first) or -inf (ranked last, yet ranked when
    the row has room: topk 16 exceeds the candidates), NaN where q's entry is 0: the reference's ids."""
    T, S, block = 4, 26, 4
    q, means = make(1, 1, 4, T, S, 8, block, integer=True, seed=13)
    means[0, 0, 1, 2] = INF
    means[0, 0, 3, 5] = -INF
    sel = mst.moba_select_from_means(q, means, S, block, topk)
    assert_selection(sel, q, means, S, block, topk)
    s, ranked = ranked_scores(sel, q, means, S, block)
    assert (s[ranked] == INF).any() and (s[ranked] == -INF).any() == (topk == 16)
    assert decode_runs


@triton.jit
def _keys_kernel(SC, J, LOCAL, OUT, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(OUT + i, mst._sort_keys(tl.load(SC + i), tl.load(J + i), tl.load(LOCAL)))


def test_sort_keys_follow_the_reference_order():
    """The packed keys order blocks as the reference does: NaN (either sign) = +inf, ties to the smaller id;
    -0 ties +0; -inf after every finite score; blocks j >= L(t) below every candidate (-inf included)."""
    scores = [INF, -0.0, NAN, 0.5, -INF, 0.0, -1.5, 0.5, 3e38, -3e38, 1e-45, -1e-45, NAN, -INF, NAN, 7.0]
    sc = torch.tensor(scores, dtype=torch.float32)
    sc[12] = -sc[12]  # a NaN with the sign bit set (x86's default NaN)
    j = torch.arange(16, dtype=torch.int32)
    local = 13
    keys = torch.empty(16, dtype=torch.int64, device=DEV)
    _keys_kernel[(1,)](sc.to(DEV), j.to(DEV), torch.tensor([local], dtype=torch.int32, device=DEV), keys, N=16)
    keys = keys.cpu()
    want = torch.sort(nan_first(sc).masked_fill(j >= local, -INF), descending=True, stable=True).indices
    assert torch.sort(keys, descending=True).indices.tolist() == want.tolist()
    assert want[:3].tolist() == [0, 2, 12] and keys.unique().numel() == 16 and (keys[local:] < keys[:local].min()).all()


# ----------------------------------------------------------------------------- GPU, bf16

@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4])
def test_gpu_decode_select_m3_bf16(T, decode_runs):
    """m3 heads at 128k tokens, batch 8, block 128, topk 16: the reference's scores within 2e-3, the split path's
    selection as score multisets, and a CUDA-graph replay gives the same ids."""
    B, Hkv, G, S, D, block, topk = 8, 4, 16, 131072, 128, 128, 16
    q, means = make(B, Hkv, G, T, S, D, block, integer=False, seed=T)
    q = q.bfloat16()
    sel = mst.moba_select_from_means(q, means, S, block, topk)
    assert_selection(sel, q, means, S, block, topk, eps=2e-3)
    split = mst.moba_select_from_means(q, means, S, block, topk, {"DECODE_T": 0})
    a, _ = ranked_scores(sel, q, means, S, block)
    b, _ = ranked_scores(split, q, means, S, block)
    torch.testing.assert_close(a.sort(-1).values, b.sort(-1).values, atol=2e-3, rtol=0)
    out = torch.empty_like(sel)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(mst.moba_select_from_means(q, means, S, block, topk))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, sel)
    assert decode_runs


@pytest.mark.gpu
def test_gpu_decode_select_bf16_integer_scores_exact(decode_runs):
    """bf16 queries, integer means (exact in the hi part): exact scores, so the reference's ids and ties."""
    T, S, block, topk = 3, 8192, 64, 16
    q, means = make(2, 4, 16, T, S, 128, block, integer=True, seed=9)
    sel = mst.moba_select_from_means(q.bfloat16(), means, S, block, topk)
    assert_selection(sel, q, means, S, block, topk)
    assert decode_runs
