"""FlexAttention paths against the reference.

CPU: compiled flex runs forward only and each new shape costs ~25 s to compile, so these use a few
fixed shapes. GPU: forward and backward (and LSE), fp32 and bf16, including the m3 group size.
"""

from __future__ import annotations

import pytest
import torch

from sparsezoo import ops
from sparsezoo.ops import flex_utils
from sparsezoo.ops import references as reference
from sparsezoo.ops.block_sparse_attention.flex import msa_block_mask
from tests.helpers import rand_qkv, rel_err

compile_mark = pytest.mark.compile


def _selection(B, Hkv, T, S, bs, K, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q_idx = torch.randn(B, Hkv, T, 16, generator=g).to(device)
    k_idx = torch.randn(B, S, 16, generator=g).to(device)
    return ops.msa_select(q_idx, k_idx, block_size=bs, topk=K, backend="reference")


@compile_mark
@pytest.mark.parametrize("T,S,bs", [(640, 640, 128), (37, 256, 16)])
def test_msa_flex_forward_matches_reference_cpu(T, S, bs):
    q, k, v = rand_qkv(1, 4, 2, T, S, 16, dtype=torch.float32, seed=T)
    sel = _selection(1, 2, T, S, bs, 2, seed=T)
    out = ops.block_sparse_attention(q, k, v, sel, block_size=bs, backend="flex")
    assert ops.last_implementation("block_sparse_attention") == "flex"
    ref = ops.block_sparse_attention(q, k, v, sel, block_size=bs, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@compile_mark
def test_flex_full_topk_equals_dense_cpu():
    T = S = 256
    q, k, v = rand_qkv(1, 4, 2, T, S, 16, dtype=torch.float32, seed=1)
    full = reference.full_selection(T, S, 16, 1, 2, q.device).contiguous()
    out = ops.block_sparse_attention(q, k, v, full, block_size=16, backend="flex")
    dense = ops.dense_attention(q, k, v, backend="flex")
    ref = ops.dense_attention(q, k, v, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(dense, ref, atol=2e-5, rtol=2e-5)


def test_flex_refuses_gradients_and_lse_on_cpu():
    q, k, v = rand_qkv(1, 2, 1, 16, 16, 16, dtype=torch.float32, seed=0, requires_grad=True)
    sel = reference.full_selection(16, 16, 16, 1, 1, q.device)
    with pytest.raises(ValueError, match="forward only"):
        ops.block_sparse_attention(q, k, v, sel, block_size=16, backend="flex")
    with pytest.raises(ValueError, match="LSE"):
        ops.block_sparse_attention(q.detach(), k.detach(), v.detach(), sel, block_size=16, backend="flex",
                                   return_lse=True)


def test_tile_union_is_compact_and_covers_every_selection():
    B, Hkv, G, T, S, bs, K = 2, 2, 3, 100, 700, 16, 5
    sel = _selection(B, Hkv, T, S, bs, K, seed=4)
    counts, ids = flex_utils.tile_block_union(sel, G, q_tile=32, coarsen=2)
    n_tiles = ids.shape[2]
    assert ids.shape[-1] <= ((32 - 1) // G + 2) * K  # width bounded by tokens per tile x k, not n_blocks
    for b in range(B):
        for h in range(Hkv):
            for tile in range(n_tiles):
                rows = range(tile * 32, min(T * G, (tile + 1) * 32))
                want = {int(x) // 2 for r in rows for x in sel[b, h, r // G] if x >= 0}
                got = ids[b, h, tile, :counts[b, h, tile]].tolist()
                assert got == sorted(want)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_msa_block_mask_width(device):
    # G = 64 heads per group: a 128-row tile spans 3 tokens, so the union is far narrower than S / 128
    sel = _selection(1, 1, 64, 64 * 128, 128, 2, seed=0).to(device)
    mask = msa_block_mask(sel, 64, 64 * 128, 128, with_backward=False)
    width = mask.kv_indices.shape[-1]
    # compact on the GPU path; padded to the KV block count on the CPU, whose flex template needs it
    assert width == 64 if device == "cpu" else width == ((128 - 1) // 64 + 2) * 2


def test_transpose_compact_inverts_rows_and_columns():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 5, (2, 3, 7), generator=g, dtype=torch.int32)
    ids = torch.stack([torch.randperm(9, generator=g)[:5] for _ in range(42)]).view(2, 3, 7, 5).to(torch.int32)
    col_counts, rows = flex_utils.transpose_compact(counts, ids, 9)
    for b in range(2):
        for h in range(3):
            pairs = {(r, int(c)) for r in range(7) for c in ids[b, h, r, :counts[b, h, r]]}
            back = {(int(r), c) for c in range(9) for r in rows[b, h, c, :col_counts[b, h, c]]}
            assert pairs == back


@pytest.mark.parametrize("seed", range(20))
def test_range_transpose_lists_the_query_tiles_of_each_key_tile(seed):
    """The analytic column lists of range_block_mask (no data-dependent width, so it compiles): for
    non-decreasing ranges [lo_i, hi_i), key tile j lists exactly the query tiles i with lo_i <= j < hi_i."""
    g = torch.Generator().manual_seed(seed)
    n_q, n_kv = (int(n) for n in torch.randint(1, 12, (2,), generator=g))
    hi = torch.randint(0, n_kv + 1, (n_q,), generator=g).sort().values
    lo = torch.minimum(torch.randint(0, n_kv + 1, (n_q,), generator=g).sort().values, hi)
    counts, rows = flex_utils._transpose_ranges(lo, hi, n_kv)
    assert rows.shape == (1, 1, n_kv, n_q)
    for j in range(n_kv):
        want = [i for i in range(n_q) if lo[i] <= j < hi[i]]
        assert rows[0, 0, j, : counts[0, 0, j]].tolist() == want


@pytest.mark.parametrize("seed", range(20))
def test_range_transpose_of_two_runs_lists_both(seed):
    """The partial tiles of a range mask with full tiles are two runs per query tile, [lo, flo) and [fhi, hi):
    key tile j lists the query tiles of the first run, then those of the second."""
    g = torch.Generator().manual_seed(seed)
    n_q, n_kv = (int(n) for n in torch.randint(1, 12, (2,), generator=g))
    bounds = torch.randint(0, n_kv + 1, (4, n_q), generator=g).sort(dim=1).values.sort(dim=0).values
    lo, flo, fhi, hi = bounds  # lo <= flo <= fhi <= hi per tile, each non-decreasing over tiles
    counts, rows = flex_utils._transpose_two_ranges(lo, flo, fhi, hi, n_kv)
    for j in range(n_kv):
        want = [i for i in range(n_q) if lo[i] <= j < flo[i]] + [i for i in range(n_q) if fhi[i] <= j < hi[i]]
        assert rows[0, 0, j, : counts[0, 0, j]].tolist() == want


# Shapes whose masks hold full tiles and partial tiles on both sides of them (window) or before the diagonal
# (compressed entries: stride 4, so a 128-entry tile spans 512 positions)
RANGE_CASES = [("window", dict(window=400)), ("compressed", dict(block_len=8, stride=4))]


def _range_op(kind, kw, q, k, v, backend):
    if kind == "window":
        return ops.window_attention(q, k, v, scale=0.25, backend=backend, **kw)
    S = 1280
    return ops.compressed_attention(q, k, v, S=S, scale=0.25, backend=backend, **kw)


def _range_inputs(kind, kw, dtype, device, requires_grad=False):
    from sparsezoo.ops.compressed_attention import n_compressed

    T = 1280 if kind == "window" else 1000  # chunked: the last 1000 of 1280 positions
    S = 1280 if kind == "window" else n_compressed(1280, kw["block_len"], kw["stride"])
    return rand_qkv(1, 4, 2, T, S, 32, dtype=dtype, device=device, seed=T, requires_grad=requires_grad)


@compile_mark
@pytest.mark.parametrize("kind,kw", RANGE_CASES)
def test_range_masks_with_full_tiles_match_reference_cpu(kind, kw):
    q, k, v = _range_inputs(kind, kw, torch.float32, "cpu")
    out = _range_op(kind, kw, q, k, v, "flex")
    ref = _range_op(kind, kw, q.double(), k.double(), v.double(), "reference")
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,kw", RANGE_CASES)
def test_range_masks_with_full_tiles_forward_backward_gpu(kind, kw, dtype):
    q, k, v = _range_inputs(kind, kw, dtype, "cuda", requires_grad=True)
    w = torch.randn_like(q)
    out = _range_op(kind, kw, q, k, v, "flex")
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _range_op(kind, kw, q64, k64, v64, "reference")
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), (q64, k64, v64))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel_err(out, ref) < tol
    for g_, r_ in zip(grads, ref_grads):
        assert rel_err(g_, r_) < 5 * tol


GPU_CASES = [
    # B, Hq, Hkv, T, S, D, block, topk
    (1, 4, 2, 300, 300, 64, 32, 3),
    (2, 16, 1, 512, 1024, 128, 128, 4),   # m3 group size G = 16, chunked prefill
    (1, 8, 2, 1000, 1000, 64, 64, 5),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES)
def test_msa_flex_forward_backward_matches_reference_gpu(case, dtype):
    B, Hq, Hkv, T, S, D, bs, K = case
    q, k, v = rand_qkv(B, Hq, Hkv, T, S, D, dtype=dtype, device="cuda", seed=T, requires_grad=True)
    sel = _selection(B, Hkv, T, S, bs, K, seed=T, device="cuda")
    w = torch.randn(B, Hq, T, D, device="cuda", dtype=dtype)
    out, lse = ops.block_sparse_attention(q, k, v, sel, block_size=bs, backend="flex", return_lse=True)
    assert ops.last_implementation("block_sparse_attention") == "flex"
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = ops.block_sparse_attention(q64, k64, v64, sel, block_size=bs, backend="reference", return_lse=True)
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), (q64, k64, v64))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel_err(out, ref) < tol
    assert (lse.double() - ref_lse).abs().max().item() < (1e-3 if dtype == torch.float32 else 2e-2)
    for g_, r_ in zip(grads, ref_grads):
        assert rel_err(g_, r_) < (5 * tol)


@pytest.mark.gpu
@pytest.mark.parametrize("T,S", [(512, 512), (200, 700), (100, 700)])  # 100 x G=4 rows: decoding kernel
def test_dense_flex_forward_backward_gpu(T, S):
    q, k, v = rand_qkv(1, 8, 2, T, S, 64, dtype=torch.float32, device="cuda", seed=2, requires_grad=True)
    out = ops.dense_attention(q, k, v, backend="flex")
    ref = ops.dense_attention(q, k, v, backend="reference")
    assert rel_err(out, ref) < 1e-4
    g = torch.autograd.grad(out.sum(), (q, k, v))
    r = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g, r):
        assert rel_err(a, b) < 1e-3
