"""torch.compile of the example GPT on a GPU, every variant, from a cold start (the fast paths: Triton
kernels through their custom ops, FlexAttention, SDPA). fp32 weights and activations; the compiled model
must give the eager model's logits, losses and gradients within the tolerance below (TF32 is off, so
the remaining differences are summation order in the fused kernels)."""

from __future__ import annotations

import pytest
import torch

from tests.test_compile import VARIANTS, assert_compiled_matches_eager, cold_start, tiny_gpt  # noqa: F401

pytestmark = pytest.mark.gpu
LINEAR = ("lightning", "gdn")

GPU_TINY = {  # GPU tiles need blocks of >= 16 keys and power-of-two groups
    "msa": {"block_size": 16, "topk": 2, "index_dim": 16},
    "moba": {"block_size": 16, "topk": 2},
    "nsa": {"cmp_block": 16, "cmp_stride": 16, "sel_block": 16, "sel_topk": 3, "window": 16,
            "compressor_hidden": 32},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_gpt_trains_compiled_on_the_gpu(variant, monkeypatch):
    """The training graph (forward, auxiliary loss, backward) through Inductor."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    layers = ["dense", variant] if variant != "dense" else ["dense", "dense"]
    model = tiny_gpt(layers, **GPU_TINY.get(variant, {})).cuda()
    # fla's kernels (lightning, gdn) are wrapped in torch.compiler.disable: the graph breaks around them
    compiled = torch.compile(model, fullgraph=variant not in LINEAR)
    assert_compiled_matches_eager(model, compiled, train=True, T=64, device="cuda", tol=dict(rtol=2e-3, atol=2e-3))
