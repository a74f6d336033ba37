"""The public ops reach the Triton kernels when asked (interpreter on a CPU, natively on a GPU)."""

from __future__ import annotations

import pytest
import torch

from sparsezoo import ops


def _inputs(dev):
    g = torch.Generator().manual_seed(3)
    mk = lambda *s: torch.randn(*s, generator=g).to(dev)
    q, k = mk(1, 4, 40, 16), mk(1, 2, 40, 16)
    q_idx, k_idx = mk(1, 2, 40, 16).requires_grad_(), mk(1, 40, 16).requires_grad_()
    return q, k, q_idx, k_idx


@pytest.mark.parametrize("dense_warmup", [False, True])
def test_msa_index_kl_triton_matches_reference(dense_warmup):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q, k, q_idx, k_idx = _inputs(dev)
    sel = None if dense_warmup else ops.msa_select(q_idx.detach(), k_idx.detach(), block_size=16, topk=2,
                                                   backend="reference")
    losses, grads = [], []
    for backend in ("triton", "reference"):
        loss = ops.msa_index_kl(q, k, q_idx, k_idx, sel, block_size=16, coeff=0.5, backend=backend)
        assert ops.last_implementation("msa_index_kl") == backend
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, (q_idx, k_idx)))
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-4)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


def test_auto_kl_uses_reference_off_cuda():
    q, k, q_idx, k_idx = _inputs("cpu")
    ops.msa_index_kl(q, k, q_idx, k_idx, None, block_size=16)
    assert ops.last_implementation("msa_index_kl") == "reference"


def test_auto_follows_each_implementations_supports_rule():
    from sparsezoo.ops.dispatch import Request

    op = ops.op("block_sparse_attention")

    def auto(device, dtype=torch.float32, **kw):
        params = dict(block_size=128, group=2, selection_heads=2, n_kv_heads=2, head_dim=16)
        return op.choose("auto", Request(device, dtype, False, {**params, **kw}))

    assert auto("cpu") == "reference"
    assert auto("cuda") == "triton"
    assert auto("cuda", block_size=64) == "triton"
    assert auto("cuda", block_size=24) == "reference"  # neither kernel tiles 24
    assert auto("cuda", group=3) == "flex"  # group of 3: no triton
    assert auto("cuda", torch.float64) == "flex"


def test_auto_orders_calls_with_gradients_by_grad_order():
    """window_attention: the Triton forward first without gradients, flex first with them; an explicit backend
    runs either way. A grad_order that is not an order of the implementations is refused."""
    from sparsezoo.ops.dispatch import Op, Request

    op = ops.op("window_attention")
    auto = lambda device, grad, **kw: op.choose("auto", Request(device, torch.bfloat16, grad, {"window": 8, "group": 4,
                                                                                             "head_dim": 64, **kw}))
    assert auto("cuda", False) == "triton" and auto("cuda", True) == "flex"
    assert auto("cuda", True, group=3) == "flex" and auto("cuda", False, group=3) == "flex"  # no triton for 3
    assert auto("cpu", True) == auto("cpu", False) == "reference"
    assert op.choose("triton", Request("cuda", torch.bfloat16, True, {"group": 4})) == "triton"
    with pytest.raises(ValueError, match="grad_order"):
        Op("x", "sparsezoo.ops.window_attention", ("triton", "reference"), grad_order=("flex", "reference"))


def test_explicit_backend_that_cannot_run_raises_with_the_reason():
    q, k, _, _ = _inputs("cpu")
    sel = torch.zeros(1, 2, 40, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="flex needs block_size"):
        ops.block_sparse_attention(q, k, k, sel, block_size=24, backend="flex")
    with pytest.raises(ValueError, match="choose one of"):
        ops.block_sparse_attention(q, k, k, sel, block_size=16, backend="sdpa")
