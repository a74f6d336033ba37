"""The key-major block-sparse attention forward (sparsezoo/kernels/sparse_attention_keys.py) against the fp64 reference.

On the CPU under TRITON_INTERPRET=1 (fp32, small shapes, hypothesis-drawn): messy selections (repeated ids,
-1 anywhere, ids past the query's block, out-of-range ids in int32 and int64), per-KV-group (Hs = Hkv) and
per-query-head (Hs = Hq) selections, query chunks forced small, non-finite inputs. bf16 at MSA- and
MoBA-like shapes on the GPU (marked gpu). Tolerances: fp32 1e-4 (outputs and LSE); bf16 atol=rtol=3e-2 and
LSE 2e-2, as tests/test_moba_kernel.py.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsezoo.ops import references as ref

triton = pytest.importorskip("triton")

from sparsezoo.kernels import sparse_attention_keys as sak  # noqa: E402
from tests.test_moba_tiles import DEV, canonical, messy_selection  # noqa: E402

# The smallest block of the fixed-shape tests: the GPU's tensor-core dots need 16+ keys, the interpreter
# runs 8 faster.
SMALL = 8 if DEV.type == "cpu" else 16


def _reference(q, k, v, sel, block, scale):
    n_blocks = math.ceil(k.shape[2] / block)
    return ref.block_sparse_attention_reference(q.double(), k.double(), v.double(), canonical(sel, n_blocks), block,
                                                scale, True)


def _check(q, k, v, sel, block, tol, lse_tol, config=None):
    scale = q.shape[-1] ** -0.5
    out, lse = sak.block_sparse_attention_keys(q, k, v, sel, block, scale, True, config)
    rout, rlse = _reference(q, k, v, sel, block, scale)
    torch.testing.assert_close(out.double(), rout, atol=tol, rtol=tol, equal_nan=True)
    torch.testing.assert_close(lse.double(), rlse, atol=lse_tol, rtol=0, equal_nan=True)


@pytest.mark.skipif(DEV.type == "cuda", reason="interpreter-sized blocks; the GPU runs the bf16 cases")
@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.sampled_from([1, 2]), G=st.sampled_from([1, 2, 4]), per_head=st.booleans(),
       T=st.integers(1, 40), extra=st.integers(0, 24), block=st.sampled_from([4, 8, 16]), topk=st.integers(1, 5),
       wide=st.booleans(), chunk=st.sampled_from([None, 1]), R=st.sampled_from([1, 8]), hoist=st.booleans(),
       fast=st.booleans(), seed=st.integers(0, 2**16))
def test_key_major_matches_reference(B, Hkv, G, per_head, T, extra, block, topk, wide, chunk, R, hoist, fast, seed):
    gen = torch.Generator().manual_seed(seed)
    Hq, S, D = Hkv * G, T + extra, 16
    Hs = Hq if per_head else Hkv
    q, k, v = (torch.randn(*s, generator=gen).to(DEV) for s in ((B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    sel = messy_selection(B, Hs, T, S, block, topk, gen, torch.int64 if wide else torch.int32)
    per_token = B * Hs * topk * (Hq // Hs) * (D * 4 + 4)
    config = {"R": R, "HOIST": hoist, "FAST": fast}
    if chunk is not None:
        config["CHUNK_BYTES"] = per_token * 3  # chunks of 3 tokens
    _check(q, k, v, sel, block, 1e-4, 1e-4, config)


def test_block_of_several_key_tiles_and_padded_head_dim():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(*s, generator=gen).to(DEV) for s in ((1, 4, 37, 24), (1, 2, 70, 24), (1, 2, 70, 24)))
    sel = messy_selection(1, 2, 37, 70, 32, 3, gen)
    _check(q, k, v, sel, 32, 1e-4, 1e-4, {"BN": 16})


def test_strided_fp16_inputs():
    """[B, T, H, D] tensors seen as [B, H, T, D] (the model's layout) and an int64 selection, in fp16."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(*s, generator=gen).to(DEV, torch.float16).transpose(1, 2)
               for s in ((2, 30, 4, 16), (2, 45, 2, 16), (2, 45, 2, 16)))
    sel = messy_selection(2, 4, 30, 45, SMALL, 4, gen, torch.int64)
    _check(q, k, v, sel, SMALL, 2e-3, 2e-3)


@pytest.mark.parametrize("where", ["q", "k", "v", "q_no_keys"])
def test_non_finite_values_reach_exactly_the_rows_that_attend_to_them(where):
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, T, S, D, block = 1, 4, 2, 24, 40, 16, SMALL
    q, k, v = (torch.randn(*s, generator=gen).to(DEV) for s in ((B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    sel = messy_selection(B, Hq, T, S, block, 3, gen)
    if where == "q":
        q[0, 1, 9, 3] = float("inf")
        q[0, 2, 4, 0] = float("nan")
    elif where == "k":
        k[0, 1, 21, 5] = float("nan")
    elif where == "v":
        v[0, 0, 18, 2] = float("-inf")
    else:  # a row that sees no key: NaN iff its q is non-finite
        sel[0, 3, 10] = -1
        q[0, 3, 10, 1] = float("nan")
    _check(q, k, v, sel, block, 1e-4, 1e-4)


@pytest.mark.parametrize("train", [False, True])
def test_schedule_rule_and_record(monkeypatch, train):
    """Blocks of at least KEY_MAJOR_MIN_BLOCK keys run key-major: without gradients the whole op, with them
    the forward (the query-major backward after it) unless KEY_MAJOR_TRAIN is off. The op records which
    schedule ran; every schedule matches the reference, outputs and gradients."""
    from sparsezoo import ops
    from sparsezoo.ops.block_sparse_attention import triton as bsa_triton

    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(*s, generator=gen).to(DEV) for s in ((1, 4, 20, 16), (1, 2, 20, 16), (1, 2, 20, 16)))
    sel = messy_selection(1, 4, 20, 20, SMALL, 2, gen)
    monkeypatch.setattr(bsa_triton, "KEY_MAJOR_TRAIN", train)
    assert bsa_triton.schedule(q, k, v, sel, SMALL) == "query_major"  # blocks under the floor
    monkeypatch.setattr(bsa_triton, "KEY_MAJOR_MIN_BLOCK", SMALL)
    assert bsa_triton.schedule(q, k, v, sel, SMALL) == "key_major"
    with_grad = "key_major_forward" if train else "query_major"
    assert bsa_triton.schedule(q.clone().requires_grad_(), k, v, sel, SMALL) == with_grad
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    rout = _reference(*leaves, sel, SMALL, 0.25)[0]
    go = torch.randn(rout.shape, generator=gen).to(DEV)
    rgrads = torch.autograd.grad((rout * go).sum(), leaves)
    for grad, want in ((False, "key_major"), (True, with_grad)):
        qkv = [x.clone().requires_grad_(grad) for x in (q, k, v)]
        with torch.set_grad_enabled(grad), ops.track_implementations() as used:
            out = ops.block_sparse_attention(*qkv, sel, block_size=SMALL, scale=0.25, backend="triton")
        assert used == {"block_sparse_schedule": want, "block_sparse_attention": "triton"}
        torch.testing.assert_close(out.detach().double(), rout.detach(), atol=1e-4, rtol=1e-4)
        if grad:
            for name, g, rg in zip("qkv", torch.autograd.grad((out * go).sum(), qkv), rgrads):
                torch.testing.assert_close(g.double(), rg, atol=1e-4, rtol=1e-4, msg=lambda m: f"d{name}: {m}")
            # the backward records its dK/dV schedule (query-major: checked where a messy row sees no key)
            got = ops.implementations_used()["block_sparse_dkdv_schedule"]
            assert got == "key_major" if train else got in ("query_major", "query_major_checked"), got


@pytest.mark.parametrize("nan_key", [False, True])
def test_dkdv_schedule_record_names_the_non_finite_fallback(monkeypatch, nan_key):
    """Training key-major: the backward records 'key_major' for its dK/dV, or 'query_major_checked' when a
    NaN key sent it to the checked query-major kernels (whose gradients stay exact elsewhere)."""
    from sparsezoo import ops
    from sparsezoo.ops.block_sparse_attention import triton as bsa_triton

    monkeypatch.setattr(bsa_triton, "KEY_MAJOR_MIN_BLOCK", SMALL)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(*s, generator=gen).to(DEV) for s in ((1, 4, 20, 16), (1, 2, 20, 16), (1, 2, 20, 16)))
    if nan_key:
        k[0, 1, 3, 2] = float("nan")
    sel = messy_selection(1, 4, 20, 20, SMALL, 2, gen)
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    with ops.track_implementations() as used:
        out = ops.block_sparse_attention(*qkv, sel, block_size=SMALL, scale=0.25, backend="triton")
        torch.autograd.grad(out.nansum(), qkv)
    assert used["block_sparse_schedule"] == "key_major_forward"
    assert used["block_sparse_dkdv_schedule"] == ("query_major_checked" if nan_key else "key_major")


@pytest.mark.skipif(DEV.type == "cuda", reason="interpreter-sized blocks; the GPU runs the bf16 case")
@settings(max_examples=6, deadline=None)
@given(Hkv=st.sampled_from([1, 2]), G=st.sampled_from([1, 4]), per_head=st.booleans(), T=st.integers(1, 30),
       extra=st.integers(0, 20), block=st.sampled_from([8, 16]), topk=st.integers(1, 4), nan_key=st.booleans(),
       dkdv=st.booleans(), B=st.integers(1, 2), seed=st.integers(0, 2**16))
def test_trainable_key_major_gradients_match_reference(Hkv, G, per_head, T, extra, block, topk, nan_key, dkdv, B,
                                                       seed):
    """The key-major forward with the query-major backward, or with the key-major dK/dV (dkdv; the
    query-major kernels when a key is NaN): out, LSE and dq, dk, dv against the fp64 reference (fp32, 1e-4),
    with messy selections and, when drawn, a NaN key (its rows' gradients NaN)."""
    gen = torch.Generator().manual_seed(seed)
    Hq, S, D = Hkv * G, T + extra, 16
    Hs = Hq if per_head else Hkv
    q, k, v = (torch.randn(*s, generator=gen).to(DEV) for s in ((B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    if nan_key:
        k[0, 0, S // 2, 3] = float("nan")
    sel = messy_selection(B, Hs, T, S, block, topk, gen)
    canon = canonical(sel, math.ceil(S / block))
    go = torch.randn(q.shape, generator=gen).to(DEV)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = sak.block_sparse_attention_keys_trainable(*leaves, sel, block, 0.25, True, {"BWD_R": 2},
                                                         key_major_dkdv=dkdv)
    grads = torch.autograd.grad((out * go).sum() + lse.nan_to_num(0.0, 0.0, 0.0).sum(), leaves, allow_unused=True)
    rleaves = [x.double().requires_grad_() for x in (q, k, v)]
    rout, rlse = ref.block_sparse_attention_reference(*rleaves, canon, block, 0.25, True)
    rgrads = torch.autograd.grad((rout * go.double()).sum() + rlse.nan_to_num(0.0, 0.0, 0.0).sum(), rleaves,
                                 allow_unused=True)
    torch.testing.assert_close(out.double(), rout.detach(), atol=1e-4, rtol=1e-4, equal_nan=True)
    torch.testing.assert_close(lse.double(), rlse.detach(), atol=1e-4, rtol=0, equal_nan=True)
    for name, g, rg in zip("qkv", grads, rgrads):
        torch.testing.assert_close(g.double(), rg, atol=1e-4, rtol=1e-4, equal_nan=True,
                                   msg=lambda m: f"d{name}: {m}")


def test_unknown_config_keys_raise():
    with pytest.raises(ValueError, match="valid"):
        sak.resolve_config({"ROWS": 64})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("poison", [None, "k", "q"])
def test_key_major_bf16_on_gpu(per_head, poison):
    """MSA- and MoBA-like shapes; poison "k" puts a NaN in one key (its block takes the checked launch), "q"
    an inf and a NaN in two query rows (the fast path's poisoning)."""
    gen = torch.Generator().manual_seed(11)
    B, Hq, Hkv, T, S, D, block = 1, 32, 2, 1500, 2048, 128, 128
    Hs = Hq if per_head else Hkv
    q, k, v = (torch.randn(*s, generator=gen).to(DEV, torch.bfloat16)
               for s in ((B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    if poison == "k":
        k[0, 1, 700, 5] = float("nan")
    elif poison == "q":
        q[0, 3, 600, 7] = float("inf")
        q[0, 5, 900, 1] = float("nan")
    sel = messy_selection(B, Hs, T, S, block, 6, gen)
    _check(q, k, v, sel, block, 3e-2, 2e-2, {"CHUNK_BYTES": 64 << 20})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dkdv", [False, True])
def test_trainable_key_major_bf16_on_gpu(dkdv):
    """MSA-like shape: the key-major forward's gradients (with the key-major dK/dV when dkdv) equal the
    query-major kernels' (bf16, 3e-2 of the largest entry) and the reference's outputs."""
    from sparsezoo.kernels import sparse_attention_triton as sat

    gen = torch.Generator().manual_seed(12)
    B, Hq, Hkv, T, S, D, block = 1, 32, 2, 1500, 2048, 128, 128
    q, k, v = (torch.randn(*s, generator=gen).to(DEV, torch.bfloat16)
               for s in ((B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    sel = messy_selection(B, Hkv, T, S, block, 6, gen)
    go = torch.randn(q.shape, generator=gen).to(DEV, torch.bfloat16)
    results = []
    keys = lambda *a: sak.block_sparse_attention_keys_trainable(*a, key_major_dkdv=dkdv)
    for fn in (keys, sat.block_sparse_attention_triton):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves, sel, block, D ** -0.5)
        results.append((out, torch.autograd.grad((out * go).sum(), leaves)))
    rout = _reference(q, k, v, sel, block, D ** -0.5)[0]
    torch.testing.assert_close(results[0][0].double(), rout, atol=3e-2, rtol=3e-2)
    for name, g, g_q in zip("qkv", results[0][1], results[1][1]):
        err = ((g.float() - g_q.float()).abs().max() / g_q.float().abs().max()).item()
        assert err < 3e-2, f"d{name}: {err:.3g} of the largest entry"


def test_key_tiles_under_16_keys_raise_on_a_gpu():
    """The p @ v dot needs 16+ keys on a GPU: the launchers say so instead of failing to compile."""
    from sparsezoo.kernels.sizes import key_tile

    assert key_tile(8, 128, "x") == 8  # the interpreter runs it
    with pytest.raises(ValueError, match="block_size >= 16 on a GPU"):
        key_tile(8, 128, "the key-major attention", gpu=True)
    assert key_tile(384, 128, "x", gpu=True) == 128
