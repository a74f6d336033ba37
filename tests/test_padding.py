"""Padded batches (attention_mask, left padding) and packed documents (cu_seqlens) for every registered
variant, the example GPT and the transformers integration: each sequence must give exactly what it
gives alone (positions from 0): outputs, gradients of the input and of the weights, auxiliary losses,
cached decoding; padding gives zeros and no gradient. fp64 on the CPU, reference backends, small budgets
so that block alignment and compressed entries matter at these lengths.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparsezoo
from sparsezoo import LayerCache, ops, sequences
from sparsezoo.models import GPT, GPTConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VARIANTS = sparsezoo.list_variants()
DIMS = dict(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, backend="reference")
REF_SELECT = {"select_backend": "reference"}
# Budgets under which every variant is sparse at 8-20 tokens; index RoPE on, so a repeated token does not tie.
TINY = {
    "dense": {},
    "msa": {"block_size": 4, "topk": 2, "index_dim": 8, "index_rope": True, **REF_SELECT},
    "dsa": {"topk": 5, "n_index_heads": 2, "index_dim": 8, "index_rope": True, **REF_SELECT},
    "nsa": {
        "cmp_block": 4,
        "cmp_stride": 2,
        "sel_block": 4,
        "sel_topk": 3,
        "window": 4,
        "compressor_hidden": 8,
        **REF_SELECT,
    },
    "csa": {"compress_ratio": 2, "topk": 2, "window": 3, "n_index_heads": 2, "index_dim": 8, **REF_SELECT},
    "moba": {"block_size": 4, "topk": 2, **REF_SELECT},
}
LENGTHS = [13, 6, 0, 10]  # real tokens per row of a left-padded batch of T = 13 (row 2: all padding)


def layer_for(name: str) -> sparsezoo.AttentionLayer:
    torch.manual_seed(0)
    config = {"variant": name, **TINY[name]} if name in TINY else CONFIGS / f"{name}.yaml"
    return sparsezoo.create_attention(config, **DIMS).double()


def left_padded(lengths, T, d=DIMS["d_model"], seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), T, d, generator=g, dtype=torch.float64)
    mask = torch.arange(T)[None, :] >= T - torch.tensor(lengths)[:, None]
    return x, mask


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True, materialize_grads=True)


def assert_same(got, want, tol=1e-12):
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


# -- the layer: outputs, gradients, aux losses ------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_padded_batch_equals_each_row_alone(name):
    layer = layer_for(name).train()
    T = max(LENGTHS)
    x, mask = left_padded(LENGTHS, T)
    x.requires_grad_(True)
    w = torch.randn_like(x)  # a random linear loss on the outputs
    params = [p for p in layer.parameters()]
    with ops.track_implementations() as used:
        y = layer(x, attention_mask=mask.int())
    assert used["varlen"] == "per_sequence"
    aux = layer.aux_loss
    got = grads((y * w).sum() + (aux if aux is not None else 0), [x, *params])
    assert (y[~mask] == 0).all() and (got[0][~mask] == 0).all()  # padding: zeros, no gradient

    want_x, want_params, losses = torch.zeros_like(x), [torch.zeros_like(p) for p in params], []
    for b, n in enumerate(LENGTHS):
        if n == 0:
            continue
        xb = x.detach()[b : b + 1, T - n :].clone().requires_grad_(True)
        yb = layer(xb)
        assert_same(y[b : b + 1, T - n :], yb)
        losses.append((layer.aux_loss, n))
        gb = grads((yb * w[b : b + 1, T - n :]).sum(), [xb, *params])
        want_x[b : b + 1, T - n :] = gb[0]
        want_params = [a + g for a, g in zip(want_params, gb[1:])]
    if aux is not None:  # the token-weighted mean of the rows' losses, and its gradient
        want_aux = sum(loss * n for loss, n in losses) / sum(LENGTHS)
        assert_same(aux, want_aux)
        want_params = [a + g for a, g in zip(want_params, grads(want_aux, params))]
    else:
        assert all(loss is None for loss, _ in losses)
    assert_same(got[0], want_x)
    for a, b in zip(got[1:], want_params):
        assert_same(a, b)


@pytest.mark.parametrize("name", VARIANTS)
def test_packed_documents_equal_each_document_alone(name):
    layer = layer_for(name).eval()
    bounds = [0, 5, 6, 15, 19]
    x, _ = left_padded([19], 19, seed=1)
    x.requires_grad_(True)
    y = layer(x, cu_seqlens=torch.tensor(bounds, dtype=torch.int32))
    (gx,) = grads((y**2).sum(), [x])
    for a, b in zip(bounds, bounds[1:]):
        xd = x.detach()[:, a:b].clone().requires_grad_(True)
        yd = layer(xd)
        assert_same(y[:, a:b], yd)
        assert_same(gx[:, a:b], grads((yd**2).sum(), [xd])[0])


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_decode_of_a_padded_batch_equals_each_row_uncached(name):
    """Chunked prefill (row 2's first chunk is all padding), then decode steps without and with the mask."""
    layer = layer_for(name).eval()
    lengths, T, steps = [12, 7, 3], 12, 4
    x, _ = left_padded(lengths, T + steps, seed=2)
    mask = torch.arange(T + steps)[None, :] >= T - torch.tensor(lengths)[:, None]  # prompts, then real tokens
    cache = layer.make_cache(3, T + steps)
    with torch.no_grad(), ops.track_implementations() as used:
        outs = [
            layer(x[:, :6], cache=cache, attention_mask=mask[:, :6]),
            layer(x[:, 6:T], cache=cache, attention_mask=mask[:, :T]),
        ]
        outs += [layer(x[:, t : t + 1], cache=cache) for t in range(T, T + 2)]  # no mask: real in every row
        outs += [layer(x[:, t : t + 1], cache=cache, attention_mask=mask[:, : t + 1]) for t in range(T + 2, T + steps)]
    assert used["varlen"] == "per_sequence"
    assert [row.pos for row in cache.rows] == [n + steps for n in lengths] and cache.pos == T + steps
    y = torch.cat(outs, 1)
    for b, n in enumerate(lengths):
        with torch.no_grad():
            assert_same(y[b : b + 1, T - n :], layer(x[b : b + 1, T - n :]), tol=1e-10)
        assert (y[b, : T - n] == 0).all()
    cache.reset()
    assert cache.rows is None and cache.pos == 0


def test_an_unpadded_mask_runs_the_batch_as_one():
    layer = layer_for("msa").eval()
    x, mask = left_padded([9, 9], 9)
    with ops.track_implementations() as used:
        y = layer(x, attention_mask=mask)
    assert used["varlen"] == "batched"
    assert_same(y, layer(x))
    cache = layer.make_cache(2, 10)
    layer(x, cache=cache, attention_mask=mask)
    assert cache.rows is None and cache.pos == 9


def test_paged_msa_decode_cache_serves_a_padded_batch():
    """MSA's paged cache (Triton decode kernels; the interpreter on a CPU): each row gets a paged cache of its own."""
    from sparsezoo.paged_cache import MSAPagedLayerCache

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    layer = sparsezoo.create_attention(
        {
            "variant": "msa",
            "d_model": 64,
            "n_heads": 4,
            "n_kv_heads": 2,
            "head_dim": 16,
            "index_dim": 16,
            "block_size": 16,
            "topk": 2,
            "decode_backend": "triton",
        }
    )
    layer = layer.to(dev).eval()
    lengths, T, steps = [40, 23], 40, 3
    x = torch.randn(2, T + steps, 64, device=dev)
    mask = torch.arange(T, device=dev)[None, :] >= T - torch.tensor(lengths, device=dev)[:, None]
    cache = layer.make_cache(2, T + steps)
    with torch.no_grad(), ops.track_implementations() as used:
        outs = [layer(x[:, :T], cache=cache, attention_mask=mask)]
        outs += [layer(x[:, t : t + 1], cache=cache) for t in range(T, T + steps)]
        y = torch.cat(outs, 1)
        assert isinstance(cache.rows[0], MSAPagedLayerCache) and used["msa_decode"] == "triton"
        for b, n in enumerate(lengths):
            want = layer(x[b : b + 1, T - n :])
            assert ((y[b : b + 1, T - n :] - want).norm() / want.norm()) < 1e-4


GPU = {  # budgets the fast paths (flex, Triton) take: powers of two >= 16
    "msa": {"block_size": 16, "topk": 2, "index_dim": 16},
    "dsa": {"topk": 16, "n_index_heads": 2, "index_dim": 16},
    "nsa": {"cmp_block": 16, "cmp_stride": 8, "sel_block": 16, "sel_topk": 3, "window": 16, "compressor_hidden": 16},
    "csa": {"compress_ratio": 4, "topk": 4, "window": 16, "n_index_heads": 2, "index_dim": 16},
    "moba": {"block_size": 16, "topk": 2},
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", VARIANTS)
def test_fast_paths_of_a_padded_batch_equal_each_row_alone(name, device):
    torch.manual_seed(0)
    dims = {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16}
    config = {"variant": name, **GPU.get(name, {})} if name in TINY else CONFIGS / f"{name}.yaml"
    layer = sparsezoo.create_attention(config, **dims).to(device).train()
    lengths, T = [100, 37, 64], 100
    x = torch.randn(3, T, 64, device=device, requires_grad=True)
    mask = torch.arange(T, device=device)[None, :] >= T - torch.tensor(lengths, device=device)[:, None]
    with ops.track_implementations() as used:
        y = layer(x, attention_mask=mask)
    (gx,) = torch.autograd.grad((y**2).sum(), [x])
    assert used["varlen"] == "per_sequence"
    for b, n in enumerate(lengths):
        xb = x.detach()[b : b + 1, T - n :].clone().requires_grad_(True)
        yb = layer(xb)
        torch.testing.assert_close(y[b : b + 1, T - n :], yb, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            gx[b : b + 1, T - n :], torch.autograd.grad((yb**2).sum(), [xb])[0], atol=1e-5, rtol=1e-5
        )


# -- bad input --------------------------------------------------------------------------------------------
def test_bad_masks_and_boundaries_raise():
    layer = layer_for("dense")
    x, mask = left_padded([6, 3], 6)
    right = mask.flip(1)
    inner = torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6], dtype=torch.bool)
    for bad, match in [
        (right, "only left padding"),
        (inner, "only left padding"),
        (mask.double(), "bool or integer"),
        (mask[:, 1:], r"\[B=2, 6\]"),
        (mask.int() * 2, "other than 0 and 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            layer(x, attention_mask=bad)
    with pytest.raises(ValueError, match="leave positions=None"):
        layer(x, torch.arange(6), attention_mask=mask)
    with pytest.raises(ValueError, match="not both"):
        layer(x[:1], attention_mask=mask[:1], cu_seqlens=torch.tensor([0, 6]))
    for bad, match in [
        ([0, 3, 2, 6], "without going down"),
        ([1, 6], "from 0 to T=6"),
        ([0, 5], "from 0 to T=6"),
        ([6], r"\[n_docs \+ 1\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            layer(x[:1], cu_seqlens=torch.tensor(bad))
    with pytest.raises(ValueError, match="batch must be 1"):
        layer(x, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="without a cache"):
        layer(x[:1], cache=LayerCache(1, 8), cu_seqlens=torch.tensor([0, 2, 6]))
    cache = LayerCache(2, 10)
    layer(x, cache=cache, attention_mask=mask)
    with pytest.raises(ValueError, match="do not match the cache's rows"):
        layer(x[:, :1], cache=cache, attention_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="padded batch of 2 rows"):
        layer(x[:1, :1], cache=cache)
    plain = LayerCache(2, 10)
    layer(x, cache=plain)
    with pytest.raises(ValueError, match="without padding"):
        layer(x[:, :1], cache=plain, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1))


@given(st.lists(st.integers(0, 7), min_size=1, max_size=4), st.integers(1, 7))
def test_mask_pieces_and_scatter_round_trip(lengths, T):
    lengths = [min(n, T) for n in lengths]
    x, mask = left_padded(lengths, T, d=3)
    pieces = sequences.pieces_from_mask(sequences.real_token_mask(mask, len(lengths), T), T)
    assert pieces == [sequences.Piece(b, T - n, T) for b, n in enumerate(lengths) if n]
    if pieces:
        back = sequences.scatter_pieces(
            [(p, x[p.row : p.row + 1, p.start : p.stop]) for p in pieces], len(lengths), T, 1
        )
        assert torch.equal(back, x * mask[..., None])


# -- the example GPT ----------------------------------------------------------------------------------------
def tiny_gpt(variant: str) -> GPT:
    torch.manual_seed(0)
    overrides = {"backend": "reference", **{k: v for k, v in TINY.items() if k in (variant, "dense") and v}}
    return (
        GPT(
            GPTConfig(
                vocab_size=61,
                d_model=32,
                n_layers=2,
                n_heads=4,
                n_kv_heads=2,
                layers=["dense", variant],
                attention_overrides=overrides,
            )
        )
        .double()
        .eval()
    )


@pytest.mark.parametrize("variant", ["msa", "nsa"])
def test_gpt_generates_left_padded_prompts_as_each_alone(variant):
    model = tiny_gpt(variant)
    lengths = [11, 4, 8]
    T = max(lengths)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 61, (n,), generator=g) for n in lengths]
    ids = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), p]) for p in prompts])
    mask = ids != 0
    cached = model.generate(ids, 6, attention_mask=mask)
    assert torch.equal(cached, model.generate(ids, 6, attention_mask=mask, use_cache=False))
    for b, p in enumerate(prompts):
        assert torch.equal(cached[b, T - len(p) :], model.generate(p[None], 6)[0])
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(ids, 2, attention_mask=mask.flip(1))


def test_gpt_packed_documents_and_padded_targets():
    model = tiny_gpt("dsa")
    ids = torch.randint(1, 61, (1, 17), generator=torch.Generator().manual_seed(4))
    bounds = [0, 7, 17]
    logits, _ = model(ids, cu_seqlens=torch.tensor(bounds))
    for a, b in zip(bounds, bounds[1:]):
        assert_same(logits[:, a:b], model(ids[:, a:b])[0], tol=1e-10)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:, :7]], 1)
    mask = padded != 0
    _, loss = model(padded, padded.roll(-1, 1), attention_mask=mask)  # targets at padding are ignored
    targets = ids[:, :7].roll(-1, 1)
    targets[:, -1] = padded[:, 0]
    assert_same(loss, model(ids[:, :7], targets)[1], tol=1e-6)  # the loss is taken in fp32


# -- transformers --------------------------------------------------------------------------------------
HF_TINY = {
    "msa": {"block_size": 4, "topk": 2, "index_dim": 16, "index_rope": True},
    "dsa": {"topk": 6, "n_index_heads": 2, "index_dim": 16, "index_rope": True},
    "nsa": {"cmp_block": 4, "cmp_stride": 2, "sel_block": 4, "sel_topk": 3, "window": 4, "compressor_hidden": 16},
}
HF_DIMS = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    eos_token_id=None,
)


def cache_arg() -> str:  # transformers 5 renamed the forward argument past_key_values to cache
    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def hf_model(kind: str, **config):
    transformers = pytest.importorskip("transformers")
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    return model_class(config_class(**HF_DIMS, **config)).double().eval()


def hf_converted(kind: str, variant: str, **config):
    from sparsezoo.integrations.transformers import convert

    return convert(
        hf_model(kind, **config), variant, backend="reference", select_backend="reference", **HF_TINY[variant]
    )


def hf_prompts(lengths, seed=5):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 97, (n,), generator=g) for n in lengths]
    T = max(lengths)
    ids = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), p]) for p in prompts])
    return prompts, ids, (ids != 0).long()


@pytest.mark.parametrize(
    "kind, variant",
    [("llama", "msa"), ("llama", "dsa"), ("llama", "nsa"), ("qwen3", "msa"), ("qwen3", "dsa"), ("qwen3", "nsa")],
)
@torch.no_grad()
def test_transformers_padded_generate_equals_each_prompt_alone(kind, variant):
    model = hf_converted(kind, variant)
    prompts, ids, mask = hf_prompts([10, 4, 7])
    run = lambda ids, **kw: model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, **kw)
    with ops.track_implementations() as used:
        padded = run(ids, attention_mask=mask)
    assert used["varlen"] == "per_sequence"
    assert torch.equal(padded, run(ids, attention_mask=mask, use_cache=False))
    for b, p in enumerate(prompts):
        assert torch.equal(padded[b, ids.shape[1] - len(p) :], run(p[None])[0])


@torch.no_grad()
def test_transformers_chunked_prefill_of_a_padded_batch_keeps_the_variant_state_per_column():
    from transformers import DynamicCache

    model = hf_converted("llama", "nsa")
    _, ids, mask = hf_prompts([12, 3])
    ids, mask = (torch.cat([torch.zeros(2, 2, dtype=torch.long), t], 1) for t in (ids, mask))  # 2 pads in every row
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache = DynamicCache()
    chunks = [
        model(ids[:, a:b], attention_mask=mask[:, :b], **{cache_arg(): cache}, use_cache=True).logits
        for a, b in [(0, 2), (2, 6), (6, 14)]
    ]  # the first chunk is all padding, row 1's second too
    assert_same(torch.cat(chunks, 1)[mask.bool()], full[mask.bool()], tol=1e-10)
    for layer in cache.layers:
        assert all(t.shape[dim] == 14 for t, dim in layer.extras.values())
        k_win, dim = layer.extras["k_win"]
        assert (k_win[1].narrow(dim - 1, 0, 11) == 0).all() and (k_win[1].narrow(dim - 1, 11, 3) != 0).all()


@torch.no_grad()
def test_transformers_reads_right_padding_and_packed_position_ids():
    model = hf_converted("llama", "msa")
    prompts, ids, mask = hf_prompts([9, 5])
    alone = [model(p[None]).logits[0] for p in prompts]
    right = torch.stack([torch.cat([p, torch.zeros(9 - len(p), dtype=torch.long)]) for p in prompts])
    out = model(right, attention_mask=(right != 0).long(), use_cache=False).logits
    for b, p in enumerate(prompts):
        assert_same(out[b, : len(p)], alone[b], tol=1e-10)
    packed = torch.cat(prompts)[None]  # two documents in one row, told apart by restarting positions
    position_ids = torch.cat([torch.arange(len(p)) for p in prompts])[None]
    out = model(packed, position_ids=position_ids, use_cache=False).logits[0]
    assert_same(out[:9], alone[0], tol=1e-10)
    assert_same(out[9:], alone[1], tol=1e-10)
    cu = torch.tensor([0, 9, 14], dtype=torch.int32)  # flash-attention style kwargs, read too
    out = model(packed, position_ids=position_ids, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu).logits[0]
    assert_same(out[9:], alone[1], tol=1e-10)
    other = torch.tensor([0, 7, 14], dtype=torch.int32)
    with pytest.raises(ValueError, match="describe different sequences"):
        model(packed, position_ids=position_ids, use_cache=False, cu_seq_lens_q=other, cu_seq_lens_k=other)


@torch.no_grad()
def test_transformers_masks_that_cannot_be_honoured_raise():
    model = hf_converted("qwen3", "dsa")
    prompts, ids, mask = hf_prompts([7, 7])
    inner = mask.clone()
    inner[0, 3] = 0
    with pytest.raises(ValueError, match="cannot honour"):
        model(ids, attention_mask=inner)
    window = torch.ones(7, 7, dtype=torch.bool).tril() & ~torch.ones(7, 7, dtype=torch.bool).tril(-3)
    hidden = torch.randn(1, 7, 64, dtype=torch.float64)
    cos_sin = model.model.rotary_emb(hidden, torch.arange(7)[None])
    with pytest.raises(ValueError, match="cannot honour"):  # a sliding window, straight into the layer
        model.model.layers[0].self_attn(hidden, position_embeddings=cos_sin, attention_mask=window[None, None])


@given(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 5), st.integers(0, 3)), min_size=1, max_size=3),
    st.integers(1, 12),
)
def test_transformers_masks_read_back_into_sequences(rows, n_queries):
    """Rows of (left pads, real tokens, right pads) as transformers masks them (2D, 4D bool, 4D additive)."""
    from sparsezoo.integrations.transformers.sequences import Segment, mask_segments, read_4d

    S = max(1, *(a + n + c for a, n, c in rows))
    rows = [(a, n, S - a - n) for a, n, _ in rows]  # right padding fills each row up to S
    T = min(n_queries, S)
    real_key = torch.tensor([[a <= s < a + n for s in range(S)] for a, n, _ in rows], dtype=torch.bool)
    visible = real_key[:, None, :] & (torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None])[None]
    additive = torch.zeros(visible.shape, dtype=torch.float64).masked_fill(~visible, torch.finfo(torch.float64).min)
    want = [
        Segment(b, a, max(a, S - T) - (S - T), a + n - (S - T))
        for b, (a, n, _) in enumerate(rows)
        if a + n > S - T and n > 0
    ]
    if all(a == 0 and n == S for a, n, _ in rows):
        want = None
    for mask in (real_key.long(), visible[:, None], additive[:, None]):
        assert mask_segments(mask, T, S, len(rows)) == want
    cols = torch.arange(S - T, S)
    assert all(torch.equal(x, y) for x, y in zip(read_4d(visible, cols, chunk=2), read_4d(visible, cols)))
