"""torch.compile of the example GPT for every variant, and the Triton paths' custom ops (docs/models.md,
"torch.compile").

CPU, tiny models, fresh dynamo state per test (a cold start). An Inductor compile costs ~30-60 s per
graph on a 2-core CPU, so one test runs Inductor: dense + MSA layers, training forward and backward
(the widest graph). The others trace through Dynamo and AOTAutograd (backend "aot_eager":
graph breaks, functionalization and the backward graph) and run what they traced. Compiled results
must match the eager model's logits, losses (auxiliary included) and every parameter gradient.
The Triton paths run under the interpreter (tests/conftest.py) through their custom ops.
Tests marked `compile` (the other variants, ~40 s together) can be left out with -m "not compile".
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import sparsezoo
from sparsezoo import ops
from sparsezoo.models import GPT, GPTConfig
from sparsezoo.ops import references as reference

VARIANTS = sparsezoo.list_variants()
TINY = {
    "msa": {"block_size": 16, "topk": 2, "index_dim": 16},
    "dsa": {"topk": 16, "n_index_heads": 2, "index_dim": 16},
    "moba": {"block_size": 16, "topk": 2},
    "nsa": {"cmp_block": 16, "cmp_stride": 8, "sel_block": 16, "sel_topk": 3, "window": 16, "compressor_hidden": 32},
    "csa": {"compress_ratio": 4, "topk": 8, "window": 16, "n_index_heads": 2, "index_dim": 16},
}
TRITON = {"backend": "triton", "select_backend": "triton"}
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def cold_start():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def tiny_gpt(layers: list[str], **variant_fields) -> GPT:
    torch.manual_seed(0)
    sections = {name: {**TINY.get(name, {}), **variant_fields} for name in set(layers) if name != "dense"}
    return GPT(GPTConfig(vocab_size=64, d_model=64, n_heads=4, n_kv_heads=2, layers=layers,
                         attention_overrides=sections))


def step(model: GPT, call, idx, train: bool):
    """(logits, loss + aux loss / 2, {name: grad}) of one forward (and backward when training); the
    factor 1/2 checks that the auxiliary loss's backward scales by its incoming gradient."""
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(train):
        logits, loss = call(idx, idx.roll(-1, 1))
        aux = model.aux_loss()
        total = loss + aux / 2 if aux is not None else loss
        if train:
            total.backward()
    return logits, total, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_compiled_matches_eager(model: GPT, compiled, train: bool, T: int = 64, device: str = "cpu",
                                  tol: dict | None = None):
    model.train(train)
    tol = tol or TOL
    idx = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(T)).to(device)
    logits, total, grads = step(model, compiled, idx, train)
    ref_logits, ref_total, ref_grads = step(model, model, idx, train)
    torch.testing.assert_close(logits, ref_logits, **tol)
    torch.testing.assert_close(total, ref_total, **tol)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, **tol, msg=name)


def graph_ops(seen: set[str]):
    """An aot_eager backend that notes the call targets of every graph it is given."""
    from torch._dynamo.backends.registry import lookup_backend

    aot_eager = lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        seen.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return aot_eager(gm, example_inputs)

    return backend


# -- the whole GPT ---------------------------------------------------------------------------------------
def test_dense_msa_gpt_trains_fullgraph_with_inductor():
    """One graph for dense + MSA layers (selection, sparse attention with LSE, index KL), forward and
    backward through Inductor, from a cold start."""
    model = tiny_gpt(["dense", "msa"])
    assert_compiled_matches_eager(model, torch.compile(model, fullgraph=True), train=True)


def test_dense_msa_gpt_inference_fullgraph():
    model = tiny_gpt(["dense", "msa"])
    assert_compiled_matches_eager(model, torch.compile(model, fullgraph=True, backend="aot_eager"), train=False)


@pytest.mark.compile
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v not in ("dense", "msa")] + ["msa-warmup"])
def test_variant_gpt_trains_fullgraph(variant):
    model = tiny_gpt([variant.removesuffix("-warmup")] * 2)
    if variant.endswith("-warmup"):  # dense routing: dense attention, the index KL over every visible block
        for layer in model.routed_layers():
            layer.set_routing("dense")
    assert_compiled_matches_eager(model, torch.compile(model, fullgraph=True, backend="aot_eager"), train=True)


# -- the Triton paths: custom ops inside compiled code (interpreter) ----------------------------------
def test_msa_gpt_on_triton_compiles_fullgraph_through_custom_ops():
    model = tiny_gpt(["msa"], **TRITON)
    seen: set[str] = set()
    compiled = torch.compile(model, fullgraph=True, backend=graph_ops(seen))
    assert_compiled_matches_eager(model, compiled, train=True, T=32)
    for op in ("msa_select_triton", "block_sparse_attention_triton", "msa_index_kl_triton"):
        assert any(f"sparsezoo.{op}" in target for target in seen), (op, sorted(seen))


def test_msa_gpt_inference_on_triton_takes_the_key_major_custom_op(monkeypatch):
    """Without gradients the block-sparse attention runs the key-major schedule, traced as its own custom op
    (its block-size floor lowered to the tiny model's blocks)."""
    from sparsezoo.ops.block_sparse_attention import triton as bsa_triton

    monkeypatch.setattr(bsa_triton, "KEY_MAJOR_MIN_BLOCK", 1)
    model = tiny_gpt(["msa"], **TRITON)
    seen: set[str] = set()
    compiled = torch.compile(model, fullgraph=True, backend=graph_ops(seen))
    assert_compiled_matches_eager(model, compiled, train=False, T=32)
    assert any("sparsezoo.block_sparse_attention_keys" in target for target in seen), sorted(seen)
    assert not any("sparsezoo.block_sparse_attention_triton" in target for target in seen), sorted(seen)


def test_triton_ops_compile_fullgraph_through_custom_ops():
    """gather_attention (two key pools, forward and backward), indexer_topk, moba_select and nsa_select
    with backend='triton', traced whole."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 16, 16, generator=g, requires_grad=True) for h in (4, 2, 2))
    kc, vc = (torch.randn(1, 2, 4, 16, generator=g, requires_grad=True) for _ in range(2))
    q_i, w, k_i = torch.randn(1, 1, 16, 2, 16, generator=g), torch.randn(1, 1, 16, 2, generator=g), \
        torch.randn(1, 16, 16, generator=g)

    def calls(q, k, v, kc, vc):
        ids = ops.indexer_topk(q_i, w, k_i, torch.arange(16), S=16, topk=6, scale=0.25, backend="triton")
        ids = torch.cat([ids, ids.clamp(min=0) % 4 + 16], dim=-1)  # raw tokens, then entries of the second pool
        out = ops.gather_attention(q, k, v, ids, scale=0.25, backend="triton", k_extra=kc, v_extra=vc)
        moba = ops.moba_select(q, k, block_size=4, topk=2, backend="triton")
        nsa = ops.nsa_select(q, kc, S=16, block_len=4, stride=4, sel_block=8, topk=2, scale=0.25, backend="triton")
        return out, moba, nsa

    seen: set[str] = set()
    compiled = torch.compile(calls, fullgraph=True, backend=graph_ops(seen))
    results = compiled(q, k, v, kc, vc)
    expected = calls(q, k, v, kc, vc)
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, **TOL)
    cot = torch.randn_like(expected[0])
    for got, want in zip(torch.autograd.grad((results[0] * cot).sum(), (q, k, v, kc, vc)),
                         torch.autograd.grad((expected[0] * cot).sum(), (q, k, v, kc, vc))):
        torch.testing.assert_close(got, want, **TOL)
    for op in ("indexer_topk_triton", "gather_attention_triton", "moba_select_triton", "nsa_select_triton"):
        assert any(f"sparsezoo.{op}" in target for target in seen), (op, sorted(seen))


# -- the custom ops on their own: schema, fake (shapes, dtypes, strides), autograd, AOT dispatch ----------
def _qkv(Hq=4, Hkv=2, T=32, S=32, D=16, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).requires_grad_(grad)
    return make(1, Hq, T, D), make(1, Hkv, S, D), make(1, Hkv, S, D)


def _block_sparse_args():
    q, k, v = _qkv(grad=True)
    sel = ops.msa_select(torch.randn(1, 2, 32, 16), torch.randn(1, 32, 16), block_size=16, topk=2,
                         backend="reference")
    return torch.ops.sparsezoo.block_sparse_attention_triton, (q, k, v, sel, 16, 0.25)


def _block_sparse_keys_args():
    q, k, v = _qkv()
    sel = ops.msa_select(torch.randn(1, 2, 32, 16), torch.randn(1, 32, 16), block_size=16, topk=2,
                         backend="reference")
    return torch.ops.sparsezoo.block_sparse_attention_keys, (q, k, v, sel, 16, 0.25)


def _gather_args(second_pool: bool, sink: bool = False):
    q, k, v = _qkv(T=8, S=16, grad=True)
    k2, v2 = (t[:, :, :4].detach().clone().requires_grad_() for t in (k, v)) if second_pool else (None, None)
    idx = torch.randint(-1, 16 + (4 if second_pool else 0), (1, 1, 8, 8), dtype=torch.int32,
                        generator=torch.Generator().manual_seed(1))
    logits = torch.randn(q.shape[1], requires_grad=True) if sink else None  # DeepSeek-V4's attention sink
    # 3: a raw window; 0: listed ids count from the first pool's row 0
    return torch.ops.sparsezoo.gather_attention_triton, (q, k, v, idx, 0.25, k2, v2, 3, logits, 0)


def _index_kl_args(with_lse: bool, key_major: bool = False):
    q, k, _ = _qkv(T=16, S=16)
    q_idx = torch.randn(1, 2, 16, 16, requires_grad=True)
    k_idx = torch.randn(1, 16, 16, requires_grad=True)
    sel = ops.msa_select(q_idx.detach(), k_idx.detach(), block_size=8, topk=2, backend="reference")
    lse = ops.block_sparse_attention(q, k, k, sel, block_size=8, scale=0.25, backend="reference",
                                     return_lse=True)[1] if with_lse else None
    return torch.ops.sparsezoo.msa_index_kl_triton, (q, k, q_idx, k_idx, sel, lse, 8, 0.25, 0.25, 1.0, 1.0, True,
                                                     key_major)


def _gather_kl_args(dense: bool):
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 12, 16, generator=g), torch.randn(1, 2, 12, 16, generator=g)
    q_i = torch.randn(1, 1, 12, 2, 16, generator=g, requires_grad=True)
    w = torch.randn(1, 1, 12, 2, generator=g, requires_grad=True)
    k_i = torch.randn(1, 12, 16, generator=g, requires_grad=True)
    idx = None if dense else torch.randint(-1, 12, (1, 1, 12, 5), dtype=torch.int32, generator=g)
    args = (q, k, q_i, w, k_i, torch.arange(12), idx, 12, 0.25, 0.3, 1.0, 1.0, True)
    return torch.ops.sparsezoo.index_kl_gather_triton, args


def _select_args(name: str):
    q, k, _ = _qkv()
    if name == "msa_select":
        return torch.ops.sparsezoo.msa_select_triton, (torch.randn(1, 2, 32, 16), torch.randn(1, 32, 16), 16, 2, 0.25)
    if name == "nsa_select":
        kc = torch.randn(1, 2, 3, 16)  # entries of 16 tokens at stride 8 over S = 32
        return torch.ops.sparsezoo.nsa_select_triton, (q, kc, 32, 16, 8, 16, 3, 0.25, None)
    if name == "indexer_topk":
        q_i, w, k_i = torch.randn(1, 1, 16, 2, 16), torch.randn(1, 1, 16, 2), torch.randn(1, 16, 16)
        return torch.ops.sparsezoo.indexer_topk_triton, (q_i, w, k_i, torch.arange(16), 16, 4, 0.25)
    return torch.ops.sparsezoo.moba_select_triton, (q, k, 16, 2, None)


CUSTOM_OPS = {
    "block_sparse_attention": _block_sparse_args,
    "block_sparse_attention-key_major": _block_sparse_keys_args,
    "gather_attention": lambda: _gather_args(False),
    "gather_attention-two-pools": lambda: _gather_args(True),
    "gather_attention-sink": lambda: _gather_args(True, sink=True),
    "msa_index_kl": lambda: _index_kl_args(False),
    "msa_index_kl-lse": lambda: _index_kl_args(True),
    "msa_index_kl-key_major": lambda: _index_kl_args(True, key_major=True),
    "index_kl": lambda: _gather_kl_args(False),
    "index_kl-dense": lambda: _gather_kl_args(True),
    **{name: (lambda name=name: _select_args(name)) for name in ("msa_select", "nsa_select", "indexer_topk",
                                                                  "moba_select")},
}


@pytest.mark.parametrize("case", list(CUSTOM_OPS))
def test_custom_op_passes_opcheck(case):
    op, args = CUSTOM_OPS[case]()
    torch.library.opcheck(op, args)


def test_custom_op_gradients_match_the_reference():
    """The autograd formulas of the differentiable custom ops give the reference's gradients."""
    op, (q, k, v, sel, bs, scale) = _block_sparse_args()
    out, lse = op(q, k, v, sel, bs, scale)[:2]
    ref_out, ref_lse = reference.block_sparse_attention_reference(q, k, v, sel, bs, scale, True)
    torch.testing.assert_close(out, ref_out, **TOL)
    cot, cot_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * cot).sum() + (lse * cot_lse).sum(), (q, k, v))
    ref = torch.autograd.grad((ref_out * cot).sum() + (ref_lse * cot_lse).sum(), (q, k, v))
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, **TOL)

    op, (q, k, v, idx, scale, k2, v2, window, sink, base) = _gather_args(second_pool=True, sink=True)
    entries = torch.where(idx < k2.shape[2], idx, -1)  # base = N: the ids name the second pool's rows
    for ids, base, extra_ids in ((idx, base, False), (entries, k.shape[2], True)):
        out = op(q, k, v, ids, scale, k2, v2, window, sink, base)[0]
        ref_out = reference.gather_attention_reference(q, k, v, ids, scale, False, k_extra=k2, v_extra=v2,
                                                       window=window, sink=sink, extra_ids=extra_ids)
        torch.testing.assert_close(out, ref_out, **TOL)
        cot = torch.randn_like(out)
        for g, r in zip(torch.autograd.grad((out * cot).sum(), (q, k, v, k2, v2, sink)),
                        torch.autograd.grad((ref_out * cot).sum(), (q, k, v, k2, v2, sink))):
            torch.testing.assert_close(g, r, **TOL)
