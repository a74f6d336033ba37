"""The MSA module: full budget equals dense, warm-up routing, gradient separation, errors."""

from __future__ import annotations

import math

import pytest
import torch

from sparsezoo import create_attention, ops
from tests.helpers import rand_qkv

SMALL = dict(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, index_dim=16, block_size=16)


def _pair(topk, **kw):
    torch.manual_seed(0)
    msa = create_attention({"variant": "msa", **SMALL, "topk": topk, **kw}).double()
    dense = create_attention({"variant": "dense", **{k: SMALL[k] for k in ("d_model", "n_heads", "n_kv_heads", "head_dim")}}).double()
    missing, unexpected = dense.load_state_dict(msa.state_dict(), strict=False)
    assert not missing and unexpected and all(n.startswith("index_") for n in unexpected)
    return msa, dense


def test_topk_covering_every_block_equals_dense():
    T = 150
    msa, dense = _pair(topk=math.ceil(T / 16))
    x = torch.randn(2, T, 64, dtype=torch.float64)
    torch.testing.assert_close(msa.eval()(x), dense.eval()(x), atol=1e-12, rtol=1e-12)


def test_dense_warmup_routing_equals_dense_and_trains_index_by_kl():
    msa, dense = _pair(topk=2, routing="dense")
    x = torch.randn(1, 100, 64, dtype=torch.float64)
    y = msa.train()(x)
    torch.testing.assert_close(y, dense(x), atol=1e-12, rtol=1e-12)
    assert msa.aux_loss is not None and msa.aux_loss.item() > 0
    msa.set_routing("sparse")
    assert not torch.allclose(msa(x), y)


def test_gradients_stay_in_their_branch():
    msa, _ = _pair(topk=2)
    msa.train()
    x = torch.randn(1, 120, 64, dtype=torch.float64, requires_grad=True)
    y = msa(x)
    main = ("q_proj", "k_proj", "v_proj", "o_proj")
    index = ("index_q", "index_k")
    grads = torch.autograd.grad(msa.aux_loss, [getattr(msa, n).weight for n in main + index] + [x], allow_unused=True)
    assert all(g is None for g in grads[:4]), "index KL leaked into the main branch"
    assert all(g is not None and g.abs().sum() > 0 for g in grads[4:6])
    assert grads[6] is None, "index KL reached the hidden state (index input must be detached)"
    grads = torch.autograd.grad(y.sum(), [getattr(msa, n).weight for n in index], allow_unused=True)
    assert all(g is None for g in grads), "the LM loss must not reach the index branch"


def test_group_shares_one_selection_and_local_block_is_kept():
    msa, _ = _pair(topk=3)
    x = torch.randn(1, 90, 64, dtype=torch.float64)
    msa.eval()(x)
    sel = msa.last_selection
    assert tuple(sel.shape) == (1, 2, 90, 3)  # one selection per KV group, shared by its G heads
    local = torch.arange(90) // 16
    assert ((sel == local.view(1, 1, -1, 1)).any(-1)).all()


@pytest.mark.parametrize("kw", [dict(index_rope=True), dict(index_norm=True)])
def test_index_rope_and_norm_options_run(kw):
    msa, _ = _pair(topk=2, **kw)
    x = torch.randn(1, 64, 64, dtype=torch.float64)
    assert torch.isfinite(msa(x)).all()


def test_op_errors_are_clear():
    q, k, v = rand_qkv(1, 4, 2, 8, 16, 8, dtype=torch.float32)
    sel = torch.zeros(1, 2, 8, 2, dtype=torch.int32) - 1
    sel[..., 0] = 0
    bsa = ops.block_sparse_attention
    with pytest.raises(ValueError, match="rank 4"):
        bsa(q[0], k, v, sel, block_size=8)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        bsa(q[:, :3], k, v, sel, block_size=8)
    with pytest.raises(ValueError, match="share a dtype"):
        bsa(q.double(), k, v, sel, block_size=8)
    with pytest.raises(ValueError, match="one device"):
        bsa(q, k.to("meta"), v, sel, block_size=8)
    with pytest.raises(ValueError, match="must be <= S"):
        bsa(q, k[:, :, :4], v[:, :, :4], sel, block_size=8)
    with pytest.raises(ValueError, match=r"\[B=1, H=2 or 4, T=8, k\]"):
        bsa(q, k, v, sel[:, :1], block_size=8)
    with pytest.raises(ValueError, match="NaN"):
        bsa(q.clone().fill_(float("nan")), k, v, sel, block_size=8, check=True)
    with pytest.raises(ValueError, match="kernel tile"):
        bsa(q, k, v, sel, block_size=24, backend="flex")
    with pytest.raises(ValueError, match="choose one of"):
        bsa(q, k, v, sel, block_size=8, backend="cuda-magic")
    bad = sel.clone()
    bad[..., 1] = 2  # queries sit at positions 8..15: block 2 lies after their local block 1
    with pytest.raises(ValueError, match="not causal"):
        bsa(q, k, v, bad, block_size=8, check=True)
    with pytest.raises(ValueError, match="topk must be an integer >= 1"):
        ops.msa_select(torch.randn(1, 2, 8, 4), torch.randn(1, 16, 4), block_size=8, topk=0)
    with pytest.raises(ValueError, match="NaN"):
        ops.msa_select(torch.full((1, 2, 8, 4), float("nan")), torch.randn(1, 16, 4), block_size=8, topk=2, check=True)
    with pytest.raises(ValueError, match="D_i"):
        ops.msa_select(torch.randn(1, 2, 8, 4), torch.randn(1, 16, 5), block_size=8, topk=2)


def test_config_rejects_flex_with_untileable_block():
    from sparsezoo import ConfigError

    with pytest.raises(ConfigError, match="kernel"):
        create_attention({"variant": "msa", **SMALL, "block_size": 24, "backend": "flex"})
    with pytest.raises(ConfigError, match="must be > 0"):
        create_attention({"variant": "msa", **SMALL, "topk": 0})


def test_auto_records_the_implementation_that_ran():
    msa, _ = _pair(topk=2)
    msa.eval()(torch.randn(1, 40, 64, dtype=torch.float64))
    used = ops.implementations_used()
    assert used["msa_select"] == "reference" and used["block_sparse_attention"] == "reference"
