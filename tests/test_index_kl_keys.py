"""The key-major MSA sparse KL (sparsezoo/kernels/index_kl_keys.py) against the fp64 reference: the loss and its
gradients w.r.t. q_idx and k_idx.

On the CPU under TRITON_INTERPRET=1 (fp32, small shapes, hypothesis-drawn): messy selections (repeated
ids, -1, ids past the query's block, out-of-range ids), every group size up to 16, query chunks forced
small, blocks of several key sub-tiles, a given or a computed main LSE. bf16 at an MSA-like shape on the
GPU (marked gpu), against the query-major Triton KL. Tolerances: fp32 loss 1e-5 relative, gradients 1e-4
of the largest entry; bf16 1e-2 relative (loss) and 3e-2 of the largest entry (gradients).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsezoo.ops import references as ref
from sparsezoo.ops.common import full_selection

triton = pytest.importorskip("triton")

from sparsezoo.kernels import index_kl_keys as klk  # noqa: E402
from tests.test_moba_tiles import DEV, canonical, messy_selection  # noqa: E402


def _inputs(B, Hq, Hkv, T, S, D, Di, gen, dtype=torch.float32):
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEV, dtype)
    return mk(B, Hq, T, D), mk(B, Hkv, S, D), mk(B, Hkv, T, Di), mk(B, S, Di)


def _reference(q, k, q_idx, k_idx, sel, block, scale, index_scale, coeff, temperature):
    """(loss, dq_idx, dk_idx) of the fp64 reference on the canonical selection."""
    qi, ki = (x.double().requires_grad_() for x in (q_idx, k_idx))
    sel = canonical(sel, math.ceil(k.shape[2] / block))
    loss = ref.msa_index_kl_reference(q.double(), k.double(), qi, ki, sel, block, scale, index_scale, coeff,
                                      temperature)
    return (loss.detach(), *torch.autograd.grad(loss, (qi, ki)))


def _assert_grad(got, want, tol):
    err = (got.double() - want).abs().max().item() / (want.abs().max().item() + 1e-12)
    assert err < tol, f"max error {err:.3g} of the largest entry"


def _check(q, k, q_idx, k_idx, sel, block, main_lse=None, config=None, temperature=1.0):
    scale, index_scale, coeff = q.shape[-1] ** -0.5, 0.35, 1.7
    loss, lq, dqi, dki = klk.index_kl_keys_forward(q, k, q_idx, k_idx, sel, block, scale, index_scale, coeff,
                                                   temperature, main_lse, True, config)
    rloss, rdq, rdk = _reference(q, k, q_idx, k_idx, sel, block, scale, index_scale, coeff, temperature)
    torch.testing.assert_close(loss.double(), rloss, atol=1e-6, rtol=1e-5)
    _assert_grad(dqi, rdq, 1e-4)
    _assert_grad(dki, rdk, 1e-4)
    return lq


@pytest.mark.skipif(DEV.type == "cuda", reason="interpreter-sized blocks; the GPU runs the bf16 case")
@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.sampled_from([1, 2]), G=st.sampled_from([1, 2, 4, 16]), T=st.integers(1, 30),
       extra=st.integers(0, 20), block=st.sampled_from([4, 8, 16]), topk=st.integers(1, 4),
       temperature=st.sampled_from([1.0, 0.6]), chunk=st.booleans(), given_lse=st.booleans(), R=st.sampled_from([1, 4]),
       seed=st.integers(0, 2**16))
def test_key_major_kl_matches_reference(B, Hkv, G, T, extra, block, topk, temperature, chunk, given_lse, R, seed):
    gen = torch.Generator().manual_seed(seed)
    S = T + extra
    q, k, q_idx, k_idx = _inputs(B, Hkv * G, Hkv, T, S, 16, 8, gen)
    sel = messy_selection(B, Hkv, T, S, block, topk, gen)
    main_lse = None
    if given_lse:
        main_lse = ref.block_sparse_attention_reference(q, k, k, canonical(sel, math.ceil(S / block)), block,
                                                        16**-0.5, True)[1]
    config = {"R": R}
    if chunk:
        config["CHUNK_BYTES"] = B * Hkv * topk * (4 * 8 + 4) * 3  # chunks of 3 tokens
    _check(q, k, q_idx, k_idx, sel, block, main_lse, config, temperature)


def test_blocks_of_several_key_tiles_and_the_index_lse():
    """A 32-key block in 16-key sub-tiles (a second grid axis), and the returned index LSE against the
    reference's LSE of the index logits over the selected tokens."""
    gen = torch.Generator().manual_seed(3)
    q, k, q_idx, k_idx = _inputs(1, 8, 2, 37, 70, 16, 8, gen)
    sel = messy_selection(1, 2, 37, 70, 32, 3, gen)
    lq = _check(q, k, q_idx, k_idx, sel, 32, config={"BN": 16})
    kh = k_idx[:, None].expand(1, 2, 70, 8)
    want = ref.block_sparse_attention_reference(q_idx.double(), kh.double(), kh.double(),
                                                canonical(sel, 3), 32, 0.35, True)[1]
    torch.testing.assert_close(lq.double(), want, atol=1e-5, rtol=0)


def test_loss_without_gradients_and_bad_input():
    gen = torch.Generator().manual_seed(4)
    q, k, q_idx, k_idx = _inputs(1, 4, 2, 12, 20, 16, 8, gen)
    sel = messy_selection(1, 2, 12, 20, 4, 3, gen)
    loss, _, dqi, dki = klk.index_kl_keys_forward(q, k, q_idx, k_idx, sel, 4, 0.25, 0.35, 1.0, 1.0,
                                                  with_grad=False)
    assert dqi is None and dki is None
    torch.testing.assert_close(loss.double(), _reference(q, k, q_idx, k_idx, sel, 4, 0.25, 0.35, 1.0, 1.0)[0],
                               atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="power-of-two group"):
        klk.index_kl_keys_forward(q[:, :3], k[:, :1], q_idx[:, :1], k_idx, sel[:, :1], 4, 0.25, 0.35, 1.0, 1.0)
    with pytest.raises(ValueError, match="block_idx must be"):
        klk.index_kl_keys_forward(q, k, q_idx, k_idx, sel[:, :1], 4, 0.25, 0.35, 1.0, 1.0)
    with pytest.raises(ValueError, match="valid"):
        klk.resolve_config({"ROWS": 64})


@pytest.mark.parametrize("sparse", [True, False])
def test_op_schedule_rule_and_record(monkeypatch, sparse):
    """`ops.msa_index_kl` runs key-major for sparse selections of blocks of at least KEY_MAJOR_MIN_BLOCK keys
    (the dense warm-up runs query-major), records which ran, and matches the reference either way."""
    from sparsezoo import ops
    from sparsezoo.ops.index_kl import msa_triton

    gen = torch.Generator().manual_seed(13)
    block = 4 if DEV.type == "cpu" else 16
    q, k, q_idx, k_idx = _inputs(1, 4, 2, 14, 19, 16, 16, gen)
    sel = messy_selection(1, 2, 14, 19, block, 3, gen) if sparse else None
    assert msa_triton.schedule(sel, block) == "query_major"  # blocks under the floor
    monkeypatch.setattr(msa_triton, "KEY_MAJOR_MIN_BLOCK", block)
    want = "key_major" if sparse else "query_major"
    assert msa_triton.schedule(sel, block) == want
    qi, ki = (x.clone().requires_grad_() for x in (q_idx, k_idx))
    with ops.track_implementations() as used:
        loss = ops.msa_index_kl(q, k, qi, ki, sel, block_size=block, index_scale=0.35, coeff=1.7, backend="triton")
    assert used == {"msa_index_kl_schedule": want, "msa_index_kl": "triton"}
    dqi, dki = torch.autograd.grad(loss, (qi, ki))
    full = sel if sparse else full_selection(14, 19, block, 1, 2, DEV)
    rloss, rdq, rdk = _reference(q, k, q_idx, k_idx, full, block, 0.25, 0.35, 1.7, 1.0)
    torch.testing.assert_close(loss.double(), rloss, atol=1e-6, rtol=1e-5)
    _assert_grad(dqi, rdq, 1e-4)
    _assert_grad(dki, rdk, 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("Di", [64, 128])
def test_key_major_kl_bf16_on_gpu(Di):
    """MSA's heads (G = 16) and blocks of 128 in bf16, against the query-major Triton KL."""
    from sparsezoo.kernels import index_kl_triton

    gen = torch.Generator().manual_seed(11)
    q, k, q_idx, k_idx = _inputs(1, 32, 2, 1500, 2048, 128, Di, gen, torch.bfloat16)
    sel = ref.msa_select_reference(q_idx.float(), k_idx.float(), 128, 6, 0.125).to(DEV)
    args = (q, k, q_idx, k_idx, sel, 128, 128**-0.5, 0.125, 1.0, 1.0)
    want = index_kl_triton.index_kl_forward(*args)
    got = klk.index_kl_keys_forward(*args)
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=1e-2)
    torch.testing.assert_close(got[1], want[1], atol=2e-2, rtol=0)
    for g, w in zip(got[2:], want[2:]):
        _assert_grad(g, w.double(), 3e-2)
