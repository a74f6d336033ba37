"""Non-finite values (NaN, +-inf) reach exactly the outputs that attend to them, in every backend
(docs/ops.md, "Non-finite values").

Attention: one row of q, k or v gets a NaN or an infinity; the oracle is an explicit [T, S] map of the
keys each row attends to, built here. The rows that attend to the bad row (or own it) must be entirely
NaN, every other row equal to the all-finite run bit for bit. Gradients: finite, and equal to those of
the run on zeroed bad rows with the poisoned rows' upstream gradient dropped. Selections: a NaN score
changes no selection of a row that does not see it and ranks first for a row that does. Decode caches
and variant modules: a NaN past the sequence, outside the selection or in a later token changes no
output that does not read it.

CPU: references, SDPA, FlexAttention uncompiled (it applies the mask_mod exactly; the compiled kernels
are the GPU's), Triton kernels under the interpreter, in fp32 (fp64 for the reference gradients).
"""

from __future__ import annotations

import pytest
import torch

import sparsezoo
from sparsezoo import ops
from sparsezoo.ops import flex_utils

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAN, INF = float("nan"), float("inf")
VALUES = [NAN, INF, -INF]
B, HQ, HKV, T, S, D = 1, 4, 2, 24, 40, 16
BLOCK, WINDOW = 8, 6
# the block-sparse attention's selections: the GPU's tensor-core tiles need blocks of >= 16 keys
ATTN_BLOCK, ATTN_TOPK = (16, 2) if DEV.type == "cuda" else (BLOCK, 3)
SPLIT_BN = 16 if DEV.type == "cuda" else 2  # gathered keys per tile in the split test (GPU dots need K >= 16)
CMP_LEN, CMP_STRIDE = 8, 4
SC = (S - CMP_LEN) // CMP_STRIDE + 1  # compressed entries
POS = torch.arange(S - T, S)  # query positions
# (tensor, head, row, column): a key row past some queries (v, k) or one query row (q)
CASES = [("v", 1, 27, 3), ("k", 0, 20, 5), ("q", 2, 5, 0)]
CMP_CASES = [("v", 1, 5, 3), ("k", 0, 3, 5), ("q", 2, 5, 0)]  # rows are compressed entries
SLOW_CASES = [(CASES[0], NAN), (CASES[1], INF), (CASES[2], -INF)]  # for the interpreted Triton kernels


@pytest.fixture
def eager_flex(monkeypatch):
    """FlexAttention uncompiled on a CPU, where the compiled one costs ~25 s per shape."""
    from torch.nn.attention.flex_attention import flex_attention

    if DEV.type == "cpu":
        monkeypatch.setattr(flex_utils, "_compiled", flex_attention)


def _inputs(n_keys=S, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(DEV, dtype)
    return make(B, HQ, T, D), make(B, HKV, n_keys, D), make(B, HKV, n_keys, D)


def _place(q, k, v, case, value):
    which, head, row, col = case
    q, k, v = q.clone(), k.clone(), v.clone()
    {"q": q, "k": k, "v": v}[which][0, head, row, col] = value
    return q, k, v


def _bad_rows(attends, q, k, v):
    """The oracle: attends bool [B, Hq, T, N] -> rows that own or attend to a non-finite row."""
    kv_bad = ~torch.isfinite(k).all(-1) | ~torch.isfinite(v).all(-1)
    kv_bad = kv_bad.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return ~torch.isfinite(q).all(-1) | (attends & kv_bad[:, :, None, :]).any(-1)


def _assert_rule(run, attends, case, value, n_keys=S, dtype=torch.float64, rows=slice(None)):
    """rows: the query rows run returns (it is given all of q)."""
    q, k, v = _inputs(n_keys, dtype)
    clean = run(q, k, v).cpu()
    bq, bk, bv = _place(q, k, v, case, value)
    out = run(bq, bk, bv).cpu()
    bad = _bad_rows(attends, bq.cpu(), bk.cpu(), bv.cpu())[:, :, rows]
    assert bad.any() and (~bad).any(), "the case must split the rows"
    assert torch.isnan(out[bad]).all(), "a row that attends to a non-finite value must be NaN"
    # on a GPU a redone (checked) tile may round its unaffected rows differently in the last bits
    tol = dict(rtol=1e-6, atol=1e-6) if DEV.type == "cuda" else dict(rtol=0, atol=0)
    torch.testing.assert_close(out[~bad], clean[~bad], **tol, msg="a row that does not must be unchanged")


# ---- which keys each row attends to ------------------------------------------------------------
def _causal():
    return (torch.arange(S)[None, :] <= POS[:, None]).expand(B, HQ, T, S)


def _window():
    keys = torch.arange(S)[None, :]
    return ((keys <= POS[:, None]) & (keys > POS[:, None] - WINDOW)).expand(B, HQ, T, S)


def _compressed():
    ends = torch.arange(SC) * CMP_STRIDE + CMP_LEN - 1
    return (ends[None, :] <= POS[:, None]).expand(B, HQ, T, SC)


def _selection(per_head=False):
    """A causal selection (MSA format) that holds the block of key 27 for some rows and not others."""
    g = torch.Generator().manual_seed(1)
    heads = HQ if per_head else HKV
    q_idx, k_idx = torch.randn(B, heads, T, 8, generator=g), torch.randn(B, S, 8, generator=g)
    return ops.msa_select(q_idx, k_idx, block_size=ATTN_BLOCK, topk=ATTN_TOPK, backend="reference").to(DEV)


def _selected(sel):
    sel = sel.cpu()
    blocks = torch.arange(S) // ATTN_BLOCK
    hit = (sel.long()[..., None] == blocks).any(-2) & (torch.arange(S)[None, :] <= POS[:, None])
    return hit.repeat_interleave(HQ // sel.shape[1], dim=1)


def _ids():
    """Per-query key ids (DSA format): a few causal keys each, key 27 for every third row that sees it."""
    g = torch.Generator().manual_seed(2)
    idx = torch.full((B, HKV, T, 6), -1, dtype=torch.int32)
    for h in range(HKV):
        for t in range(T):
            pick = torch.randperm(int(POS[t]) + 1, generator=g)[:5]
            if t % 3 == 0 and POS[t] >= 27:
                pick[0] = 27
            pick = torch.unique(pick)
            idx[0, h, t, :len(pick)] = pick.int()
    return idx.to(DEV)


def _by_ids(idx):
    hit = (idx.cpu().long()[..., None] == torch.arange(S)).any(-2)  # -1 matches no key
    return hit.repeat_interleave(HQ // HKV, dim=1)


# ---- attention ops -----------------------------------------------------------------------------
def _dense(backend):
    return lambda q, k, v: ops.dense_attention(q, k, v, backend=backend)


def _window_op(backend):
    return lambda q, k, v: ops.window_attention(q, k, v, window=WINDOW, backend=backend)


def _compressed_op(backend):
    return lambda q, k, v: ops.compressed_attention(q, k, v, S=S, block_len=CMP_LEN, stride=CMP_STRIDE,
                                                    scale=0.25, backend=backend)


def _block_sparse(backend, sel):
    return lambda q, k, v: ops.block_sparse_attention(q, k, v, sel, block_size=ATTN_BLOCK, backend=backend)


def _gather(backend, idx):
    return lambda q, k, v: ops.gather_attention(q, k, v, idx, scale=0.25, backend=backend)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex"])
def test_dense(backend, case, value, eager_flex):
    _assert_rule(_dense(backend), _causal(), case, value, dtype=torch.float32)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_window(backend, case, value, eager_flex):
    _assert_rule(_window_op(backend), _window(), case, value, dtype=torch.float32)


@pytest.mark.parametrize("case, value", SLOW_CASES)
def test_window_triton(case, value):
    _assert_rule(_window_op("triton"), _window(), case, value, dtype=torch.float32)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("case", CMP_CASES)
@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_compressed(backend, case, value, eager_flex):
    _assert_rule(_compressed_op(backend), _compressed(), case, value, n_keys=SC, dtype=torch.float32)


@pytest.mark.parametrize("case, value", SLOW_CASES)
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("backend", ["reference", "flex", "triton"])
def test_block_sparse(backend, per_head, case, value, eager_flex):
    sel = _selection(per_head)
    _assert_rule(_block_sparse(backend, sel), _selected(sel), case, value, dtype=torch.float32)


@pytest.mark.parametrize("case, value", SLOW_CASES)
def test_block_sparse_triton_large_tiles(case, value):
    """Tiles of 32 tokens (in-kernel membership instead of token bitmasks), one selection per query head."""
    from sparsezoo.kernels.sparse_attention_triton import block_sparse_attention_triton

    sel = _selection(per_head=True)
    run = lambda q, k, v: block_sparse_attention_triton(q, k, v, sel, ATTN_BLOCK, 0.25, config={"TM": 32})
    _assert_rule(run, _selected(sel), case, value, dtype=torch.float32)


@pytest.mark.parametrize("value", VALUES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["reference", "flex"])
def test_gather(backend, case, value, eager_flex):
    idx = _ids()
    _assert_rule(_gather(backend, idx), _by_ids(idx), case, value, dtype=torch.float32)


@pytest.mark.parametrize("check", ["sum", "tile"])
@pytest.mark.parametrize("case, value", SLOW_CASES)
def test_gather_triton(case, value, check):
    """Both ways the forward spots a non-finite score (GATHER_CONFIG's NF_CHECK)."""
    from sparsezoo.kernels.gather_attention_triton import gather_attention_triton

    idx = _ids()
    run = lambda q, k, v: gather_attention_triton(q, k, v, idx, 0.25, config={"NF_CHECK": check})
    _assert_rule(run, _by_ids(idx), case, value, dtype=torch.float32)


def test_gather_triton_split_and_two_pools():
    """The flash-decoding split (a poisoned split poisons the merged row) and a second key pool."""
    from sparsezoo.kernels.gather_attention_triton import gather_attention_triton

    idx = _ids()
    rows = slice(12, None, 3)  # 4 tokens that read key 27: the bad v row poisons the heads of KV head 1 only

    def run(q, k, v):
        out, lse = gather_attention_triton(q[:, :, rows], k[:, :, :30], v[:, :, :30], idx[:, :, rows], 0.25,
                                           return_lse=True, config={"SPLITS": 3, "BN": SPLIT_BN}, k2=k[:, :, 30:],
                                           v2=v[:, :, 30:])
        assert torch.equal(torch.isnan(lse), torch.isnan(out).all(-1))
        return out

    _assert_rule(run, _by_ids(idx), CASES[0], NAN, dtype=torch.float32, rows=rows)


# ---- gradients ---------------------------------------------------------------------------------
def _grads(run, inputs, upstream):
    inputs = [x.detach().requires_grad_() for x in inputs]
    outs = run(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, upstream[:len(outs)])
    return [x.grad for x in inputs]


def _zero_bad(q, k, v):
    kv_bad = ~torch.isfinite(k).all(-1, keepdim=True) | ~torch.isfinite(v).all(-1, keepdim=True)
    zero = lambda x, bad: torch.where(bad, 0.0, x)
    return zero(q, ~torch.isfinite(q).all(-1, keepdim=True)), zero(k, kv_bad), zero(v, kv_bad)


def _upstream(bad, poisoned):
    """Random output (and LSE) gradients; on the poisoned rows NaN (ignored) or 0 (dropped)."""
    g = torch.Generator().manual_seed(5)
    go = torch.randn(B, HQ, T, D, generator=g, dtype=torch.float64)
    gl = torch.randn(B, HQ, T, generator=g, dtype=torch.float64)
    fill = NAN if poisoned else 0.0
    return go.masked_fill(bad[..., None], fill).to(DEV), gl.masked_fill(bad, fill).to(DEV)


def _grad_ops(backend):
    lse = backend != "sdpa"
    return {
        "dense": (lambda q, k, v: ops.dense_attention(q, k, v, backend=backend, return_lse=lse), _causal),
        "window": (_window_op(backend), _window),
        "block_sparse": (lambda q, k, v: ops.block_sparse_attention(q, k, v, _selection(), block_size=ATTN_BLOCK,
                                                                    backend=backend, return_lse=True),
                         lambda: _selected(_selection())),
        "gather": (lambda q, k, v: ops.gather_attention(q, k, v, _ids(), scale=0.25, backend=backend,
                                                        return_lse=lse), lambda: _by_ids(_ids())),
    }


GPU_ONLY = pytest.mark.skipif(DEV.type == "cpu", reason="flex runs no backward on a CPU")
GRAD_CASES = [*(("reference", op) for op in _grad_ops("reference")), ("sdpa", "dense"),
              *(pytest.param("flex", op, marks=GPU_ONLY) for op in ("dense", "window", "block_sparse"))]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend, op", GRAD_CASES)
def test_gradients_drop_the_poisoned_rows(backend, op, case):
    """Gradients stay finite and equal those of the run on zeroed bad rows whose poisoned rows pass none."""
    run, attends = _grad_ops(backend)[op]
    dtype = torch.float32 if backend == "flex" else torch.float64
    q, k, v = _place(*_inputs(dtype=dtype), case, NAN)
    bad = _bad_rows(attends(), q.cpu(), k.cpu(), v.cpu())
    up = lambda poisoned: [u.to(dtype if u.dim() == 4 else torch.float32) for u in _upstream(bad, poisoned)]
    got = _grads(run, (q, k, v), up(True))
    want = _grads(run, _zero_bad(q, k, v), up(False))
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", CASES)
def test_gather_triton_gradients_match_the_reference(case):
    idx = _ids()
    q, k, v = _place(*_inputs(), case, INF)
    bad = _bad_rows(_by_ids(idx), q.cpu(), k.cpu(), v.cpu())
    upstream = _upstream(bad, poisoned=True)

    def run(backend, dtype):
        f = lambda q, k, v: ops.gather_attention(q, k, v, idx, scale=0.25, backend=backend, return_lse=True)
        return _grads(f, [x.to(dtype) for x in (q, k, v)], [u.to(dtype if u.dim() == 4 else torch.float32)
                                                             for u in upstream])

    for a, b in zip(run("triton", torch.float32), run("reference", torch.float64)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("per_head", [False, True])
def test_block_sparse_triton_gradients_match_the_reference(case, per_head):
    """The checked backward kernels: finite gradients, those of the reference (zeroed bad rows, the poisoned
    rows' NaN upstream gradient dropped)."""
    sel = _selection(per_head)
    q, k, v = _place(*_inputs(), case, INF)
    bad = _bad_rows(_selected(sel), q.cpu(), k.cpu(), v.cpu())
    upstream = _upstream(bad, poisoned=True)

    def run(backend, dtype):
        f = lambda q, k, v: ops.block_sparse_attention(q, k, v, sel, block_size=ATTN_BLOCK, backend=backend,
                                                       return_lse=True)
        return _grads(f, [x.to(dtype) for x in (q, k, v)], [u.to(dtype if u.dim() == 4 else torch.float32)
                                                             for u in upstream])

    for a, b in zip(run("triton", torch.float32), run("reference", torch.float64)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_row_kernels(dtype):
    """The GPU's helpers for the flex and SDPA ops (kernels.nonfinite.row_flags, poison_rows_), on the GPU or
    interpreted: the flags of strided rows (NaN, +-inf) equal torch's, and poisoning in place sets exactly
    the bad rows to NaN and leaves every other value as it was."""
    pytest.importorskip("triton")
    from sparsezoo.kernels import nonfinite as kn

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 3, 24, generator=gen).to(DEV, dtype).transpose(1, 2)  # [B, H, T, D], T-major storage
    for (b, h, t, d), value in zip([(0, 1, 4, 0), (1, 2, 36, 23), (1, 0, 0, 7)], VALUES):
        x[b, h, t, d] = value
    want = ~torch.isfinite(x.float()).all(-1)
    assert torch.equal(kn.row_flags(x), want)
    bad = torch.zeros(x.shape[:3], dtype=torch.bool, device=DEV)
    bad[0, :, 5] = bad[1, 2, 30] = True
    before = x.clone()
    assert kn.poison_rows_(x, bad) is x
    assert torch.isnan(x[bad]).all()
    torch.testing.assert_close(x[~bad], before[~bad], rtol=0, atol=0, equal_nan=True)  # the NaN put above stays


# ---- selections --------------------------------------------------------------------------------
def _unchanged_except(sel, clean, rows):
    """Selections equal outside rows (bool, broadcast over the selection's [B, H, T])."""
    sel, clean, rows = sel.cpu(), clean.cpu(), rows.expand(sel.shape[:3])
    assert rows.any() and (~rows).any(), "the case must split the rows"
    assert torch.equal(sel[~rows], clean[~rows])


def _rand(*shape, seed=3):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_msa_select_nan_index_key(backend):
    """A NaN index key at token 20 (block 2) is a candidate of the rows whose local block is past 2: it ranks
    first there and changes nothing elsewhere (a NaN index query ranks every candidate first: smallest ids)."""
    q_idx, k_idx = _rand(B, HKV, T, 16), _rand(B, S, 16, seed=4)
    run = lambda qi, ki: ops.msa_select(qi, ki, block_size=BLOCK, topk=3, backend=backend)
    clean = run(q_idx, k_idx)
    ki = k_idx.clone()
    ki[0, 20, 1] = NAN
    sel = run(q_idx, ki).cpu()
    sees = (POS // BLOCK > 2).view(1, 1, T)
    _unchanged_except(sel, clean, sees)
    assert (sel[..., 0][sees.expand(B, HKV, T)] == 2).all()
    qi = q_idx.clone()
    qi[0, 1, 20, 0] = NAN  # position 36, local block 4
    sel = run(qi, k_idx).cpu()
    row = torch.zeros(B, HKV, T, dtype=torch.bool)
    row[0, 1, 20] = True
    _unchanged_except(sel, clean, row)
    assert sel[0, 1, 20].tolist() == [0, 1, 4]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_moba_select_nan_key(backend):
    """A NaN key at token 20 makes block 2's mean NaN for kv head 1: query heads 2, 3 of the rows past block
    2 rank it first; no other selection changes."""
    q, k = _rand(B, HQ, T, 16), _rand(B, HKV, S, 16, seed=4)
    run = lambda k: ops.moba_select(q, k, block_size=BLOCK, topk=3, backend=backend)
    clean = run(k)
    bad = k.clone()
    bad[0, 1, 20, 3] = NAN
    sel = run(bad).cpu()
    sees = (torch.arange(HQ) // (HQ // HKV) == 1).view(1, HQ, 1) & (POS // BLOCK > 2).view(1, 1, T)
    _unchanged_except(sel, clean, sees)
    assert (sel[..., 0][sees.expand(B, HQ, T)] == 2).all()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_moba_select_inf_key(backend):
    """An inf key (token 20, dim 3, kv head 1) gives block 2 the score +-inf: +inf (q[..., 3] > 0) ranks it first,
    -inf last (fp32 queries; 16-bit ones rank it first: sparsezoo/kernels/moba_select_triton.py)."""
    q, k = _rand(B, HQ, T, 16), _rand(B, HKV, S, 16, seed=4)
    k[0, 1, 20, 3] = INF
    sel = ops.moba_select(q, k, block_size=BLOCK, topk=3, backend=backend).cpu()
    sees = (torch.arange(HQ) // (HQ // HKV) == 1).view(1, HQ, 1) & (POS // BLOCK > 2).view(1, 1, T)
    sees = sees.expand(B, HQ, T)
    first = q[..., 3].cpu() > 0
    assert first[sees].any() and (~first[sees]).any()
    assert torch.equal((sel[..., 0] == 2)[sees], first[sees])
    assert torch.equal((sel[..., :2] == 2).any(-1)[sees], first[sees])


@pytest.mark.parametrize("backend, where", [("reference", "key"), ("reference", "query"), ("triton", "key")])
def test_indexer_topk_nan(backend, where):
    """A NaN index key (token 20) is selected by every row that sees it; a NaN index query row selects the
    smallest ids. No other row changes."""
    q_i, w, k_i = _rand(B, HKV, T, 2, 16), _rand(B, HKV, T, 2, seed=5).abs(), _rand(B, S, 16, seed=4)
    run = lambda q_i, k_i: ops.indexer_topk(q_i, w, k_i, key_end=torch.arange(S, device=DEV), S=S, topk=6, scale=0.25,
                                            backend=backend)
    clean = run(q_i, k_i)
    if where == "key":
        k_i = k_i.clone()
        k_i[0, 20, 3] = NAN
        sees = (POS >= 20).view(1, 1, T)
    else:
        q_i = q_i.clone()
        q_i[0, 1, 9, 1, 0] = NAN
        sees = torch.zeros(B, HKV, T, dtype=torch.bool)
        sees[0, 1, 9] = True
    sel = run(q_i, k_i).cpu()
    _unchanged_except(sel, clean, sees)
    rows = sel[sees.expand(B, HKV, T)]
    if where == "key":
        assert (rows == 20).any(-1).all()
    else:
        assert rows.tolist() == [[0, 1, 2, 3, 4, 5]]


INDEXER_KERNELS = [("prefill", {"select_cap": 16}), ("prefill", {"split": 2, "select_cap": 16}),
                   ("decode", {}), ("decode", {"cap": 16}), ("decode", {"finish": "kernel"}),
                   ("decode", {"select": "rows", "rows_select": {"select_cap": 16}})]


@pytest.mark.parametrize("where", ["key", "query"])
@pytest.mark.parametrize("kernel, config", INDEXER_KERNELS)
def test_indexer_kernels_rank_nan_first(kernel, config, where):
    """Both Triton indexers and their select paths (a +inf logit in a row of finite ones: an infinite spread,
    one histogram bin, radix passes when the cap is small; segments; the decode finish and row select): a
    NaN index key (token 30) is selected by the rows that see it, no other row changes; a NaN index query
    row takes the smallest ids. The NaN has its sign bit set: left as it is, it would order below every logit
    as an int key (a positive one above every logit: test_indexer_topk_nan)."""
    from sparsezoo.kernels.indexer_decode_triton import indexer_topk_decode_triton
    from sparsezoo.kernels.indexer_triton import indexer_topk_triton

    n_q = T if kernel == "prefill" else 3  # decode: the last 3 positions (37..39)
    q_i, w, k_i = _rand(B, HKV, n_q, 2, 16), _rand(B, HKV, n_q, 2, seed=5).abs(), _rand(B, S, 16, seed=4)
    fn = indexer_topk_triton if kernel == "prefill" else indexer_topk_decode_triton
    run = lambda q_i, k_i: fn(q_i, w, k_i, torch.arange(S, device=DEV), S, 6, 0.25, config=config).cpu()
    clean = run(q_i, k_i)
    pos = torch.arange(S - n_q, S)
    if where == "key":
        k_i = k_i.clone()
        k_i[0, 30 if kernel == "prefill" else 38, 3] = -NAN
        sees = (pos >= (30 if kernel == "prefill" else 38)).view(1, 1, n_q).expand(B, HKV, n_q)
    else:
        q_i = q_i.clone()
        q_i[0, 1, 1, 1, 0] = -NAN
        sees = torch.zeros(B, HKV, n_q, dtype=torch.bool)
        sees[0, 1, 1] = True
    sel = run(q_i, k_i)
    _unchanged_except(sel, clean, sees)
    if where == "key":
        assert (sel[sees] == (30 if kernel == "prefill" else 38)).any(-1).all()
    else:
        assert sel[sees].tolist() == [[0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nsa_select_nan_compressed_key(backend):
    """A NaN compressed key (entry 3, ending at 19) makes every importance of the rows that see it NaN: they
    take the forced blocks, then the smallest candidate ids. No other row changes."""
    q, kc = _rand(B, HQ, T, 16), _rand(B, HKV, SC, 16, seed=4)
    run = lambda kc: ops.nsa_select(q, kc, S=S, block_len=CMP_LEN, stride=CMP_STRIDE, sel_block=4, topk=5,
                                    scale=0.25, backend=backend)
    clean = run(kc)
    bad = kc.clone()
    bad[0, 0, 3, 1] = NAN
    sel = run(bad).cpu()
    sees = (torch.arange(HKV) == 0).view(1, HKV, 1) & (POS >= 19).view(1, 1, T)
    _unchanged_except(sel, clean, sees)
    local = POS // 4
    want = torch.stack([torch.zeros_like(local), local - 1, local, torch.ones_like(local), 2 + 0 * local], -1)
    assert torch.equal(sel[0, 0][POS >= 19].sort(-1).values, want[POS >= 19].int().sort(-1).values)  # sets


@pytest.mark.parametrize("topk, want", [(5, [0, 1, 2, 8, 9]), (2, [0, 8])])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nsa_select_nan_query_head(backend, topk, want):
    """A NaN in one query head (head 1 of group 0, token 20 at position 36) makes every importance of its group's
    row NaN, though the other head's probabilities are finite: forced blocks (0, then L - 1, L), then the
    smallest ids. One entry per block (block_len = stride = sel_block), so the finite head's probabilities
    alone would order them."""
    q, kc = _rand(B, HQ, T, 16), _rand(B, HKV, S // 4, 16, seed=4)
    run = lambda q: ops.nsa_select(q, kc, S=S, block_len=4, stride=4, sel_block=4, topk=topk, scale=0.25,
                                   backend=backend).cpu()
    clean = run(q)
    bad = q.clone()
    bad[0, 1, 20, 2] = NAN
    sel = run(bad)
    row = torch.zeros(B, HKV, T, dtype=torch.bool)
    row[0, 0, 20] = True
    _unchanged_except(sel, clean, row)
    assert sel[0, 0, 20].sort().values.tolist() == want  # local block 9


@pytest.mark.parametrize("config", [{"BE_LSE": 16, "lse_splits": 4, "lse_min_tiles": 1}, {"lse_splits": 1},
                                    {"lse_splits": 2, "schedule": "stream_topk"}])
def test_nsa_select_triton_nan_survives_the_lse_splits(config):
    """A NaN compressed key in a long sequence: the split LSE pass and its merge keep the NaN (a max that drops
    it would leave the other splits' finite LSE), so the rows that see it take the forced blocks, then the
    smallest ids, as the reference; no other row changes."""
    from sparsezoo.kernels.nsa_select_triton import nsa_select_triton

    n, sc = 200, (200 - CMP_LEN) // CMP_STRIDE + 1
    q, kc = _rand(B, HQ, T, 16), _rand(B, HKV, sc, 16, seed=4)
    bad = kc.clone()
    bad[0, 0, 40, 1] = NAN  # entry 40 ends at 167
    run = lambda kc, backend: ops.nsa_select(q, kc, S=n, block_len=CMP_LEN, stride=CMP_STRIDE, sel_block=8, topk=5,
                                             scale=0.25, backend=backend).cpu()
    sel = nsa_select_triton(q, bad, n, CMP_LEN, CMP_STRIDE, 8, 5, 0.25, config=config).cpu()
    clean = nsa_select_triton(q, kc, n, CMP_LEN, CMP_STRIDE, 8, 5, 0.25, config=config).cpu()
    sees = (torch.arange(HKV) == 0).view(1, HKV, 1) & (torch.arange(n - T, n) >= 167).view(1, 1, T)
    _unchanged_except(sel, clean, sees)
    want = run(bad, "reference")
    assert torch.equal(sel[sees.expand(B, HKV, T)].sort(-1).values, want[sees.expand(B, HKV, T)].sort(-1).values)


# ---- decode caches -----------------------------------------------------------------------------
def _paged_msa(lens, seed=0):
    """A paged MSA cache (page 16) with random requests, its decoder planned for one new token each."""
    from sparsezoo.paged_cache import MSADecoder, PageAllocator, PagedKVCache

    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(8, HKV, D, 16, page_size=16, dtype=torch.float32, device=DEV)
    alloc = PageAllocator(8, 16)
    for b, n in enumerate(lens):
        cache.fill(alloc.reserve(b, n), *(torch.randn(*shape, generator=g).to(DEV)
                                          for shape in ((HKV, n, D), (HKV, n, D), (n, 16))))
    table = alloc.page_table(range(len(lens)), device=DEV)
    decoder = MSADecoder(num_q_heads=HQ, num_kv_heads=HKV, head_dim=D, index_dim=16, block_size=16, topk=2)
    decoder.plan(alloc.seq_lens(range(len(lens)), device=DEV), table, 1)
    q = torch.randn(len(lens), HQ, 1, D, generator=g).to(DEV)
    q_idx = torch.randn(len(lens), HKV, 1, 16, generator=g).to(DEV)
    return cache, table, decoder, lambda: decoder.run(q, q_idx, cache).cpu()


def test_paged_msa_decode_ignores_slots_past_the_sequence_and_outside_the_selection():
    lens = [37, 50]  # request 0 ends inside its third page
    cache, table, decoder, run = _paged_msa(lens)
    clean, sel = run(), decoder.selection.clone().cpu()
    page = int(table[0, 2])
    for x in (cache.k, cache.v, cache.k_idx):  # past request 0's last token
        x[page, ..., 37 - 32:, :] = NAN
    unselected = [j for j in range(3) if j not in sel[1, 0, 0].tolist()][0]  # a block group 0 of request 1 skips
    cache.v[int(table[1, unselected]), 0, 3] = NAN
    assert torch.equal(run(), clean)
    assert torch.equal(decoder.selection.cpu(), sel)


def test_paged_msa_decode_poisons_exactly_the_group_that_reads_a_nan():
    cache, table, decoder, run = _paged_msa([37, 50])
    clean, sel = run(), decoder.selection.clone().cpu()
    block = int(sel[1, 1, 0, 0])  # a block group 1 of request 1 reads
    cache.k[int(table[1, block]), 1, 2, 5] = INF
    out = run()
    bad = torch.zeros(2, HQ, 1, dtype=torch.bool)
    bad[1, 2:] = True  # group 1 = query heads 2, 3
    assert torch.isnan(out[bad]).all() and torch.equal(out[~bad], clean[~bad])


def test_paged_msa_decode_ranks_a_nan_index_key_first():
    cache, table, decoder, run = _paged_msa([37, 50])
    run()
    sel = decoder.selection.clone().cpu()
    block = [j for j in range(3) if j not in sel[1, :, 0, 0].tolist()][0]  # no group of request 1 picks it
    cache.k_idx[int(table[1, block]), 4, 0] = NAN
    run()
    assert decoder.selection[1, :, 0, 0].tolist() == [block] * HKV
    assert torch.equal(decoder.selection.cpu()[0], sel[0])


SMALL = dict(d_model=64, n_heads=HQ, n_kv_heads=HKV, head_dim=D)
VARIANTS = {
    "dense": {},
    "msa": dict(block_size=8, topk=3, index_dim=16),
    "nsa": dict(cmp_block=8, cmp_stride=4, sel_block=8, sel_topk=4, window=16, compressor_hidden=16),
    "dsa": dict(topk=8, n_index_heads=2, index_dim=16),
    "moba": dict(block_size=8, topk=3),
    "csa": dict(compress_ratio=4, topk=4, window=8, n_index_heads=2, index_dim=16),
}


def _layer(variant):
    torch.manual_seed(0)
    return sparsezoo.create_attention({"variant": variant, **SMALL, **VARIANTS[variant]}).to(DEV).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_nan_token_changes_no_earlier_output_of_a_variant(variant):
    """The module-level consequence: a NaN in token 30's input leaves outputs 0..29 unchanged and makes
    output 30 NaN (and the later outputs that read token 30: with NaN scores ranked first, all of them here)."""
    layer = _layer(variant)
    x = _rand(B, 64, 64)
    with torch.no_grad():
        clean = layer(x).cpu()
        bad = x.clone()
        bad[0, 30, 7] = NAN
        out = layer(bad).cpu()
    assert torch.equal(out[:, :30], clean[:, :30])
    assert torch.isnan(out[:, 30:]).all()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_ignores_a_nan_past_the_cache_position(variant):
    layer = _layer(variant)
    x = _rand(B, 41, 64)
    outs = []
    for poison in (False, True):
        cache = layer.make_cache(B, 64, DEV)
        with torch.no_grad():
            layer(x[:, :40], cache=cache)
            for buf, dim in getattr(cache, "_buffers", {}).values():  # contiguous caches: slots past 41
                buf.narrow(dim, 44, 3).fill_(NAN if poison else 0.0)
            outs.append(layer(x[:, 40:], cache=cache).cpu())
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[1], outs[0])
