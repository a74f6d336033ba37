"""CSA keeps its compressed entries in the decode cache (issue 10): each entry (main compressor, the
values' compressor, the indexer's) is pooled once, in the call that brings its last token, and the cached
entries equal pooling every cached token.

Tiny fp64 layers (fp32 where stated) with the reference backends, so every check is fast on a CPU.
"""

from __future__ import annotations

import pytest
import torch

import sparsezoo
from sparsezoo import LayerCache
from sparsezoo.ops import entry_pooling

DIMS = dict(d_model=32, n_heads=4, n_kv_heads=2, head_dim=16, backend="reference", select_backend="reference")
BASE = dict(
    variant="csa", compress_ratio=3, topk=3, window=5, n_index_heads=2, index_dim=8, rope_dim=4, index_rope_dim=4
)
# the compressors and index keys, with and without the simulated low-precision index keys
OPTIONS = {
    "v4": {},
    "v4-separate-v": dict(shared_kv=False),
    "v4-fp4": dict(index_quant="fp4"),
    "v4-no-overlap": dict(overlap=False),
    "scalar-gate-mean": dict(compressor="scalar_gate", index_compressor="mean"),
    "scalar-gate-separate-v-fp8": dict(compressor="scalar_gate", shared_kv=False, index_quant="fp8"),
    "scalar-gate-no-overlap-mean-fp4": dict(
        compressor="scalar_gate", overlap=False, index_compressor="mean", index_quant="fp4"
    ),
    "v4-mean-fp8": dict(index_compressor="mean", index_quant="fp8"),
}


def make(dtype=torch.float64, **options) -> sparsezoo.AttentionLayer:
    torch.manual_seed(0)
    layer = sparsezoo.create_attention({**BASE, **options}, **DIMS).to(dtype).eval()
    with torch.no_grad():  # the learned biases start at zero: make them matter
        for name, p in layer.named_parameters():
            if name.endswith(("ape", "cmp_slot_bias", "attn_sink")):
                p.normal_(0, 0.5)
    return layer


def inputs(B: int, T: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, DIMS["d_model"], generator=g, dtype=torch.float64).to(dtype)


def held_entries(layer, cache) -> dict[str, torch.Tensor | None]:
    names = ["csa_cmp", "csa_idx"] + ([] if layer.config.shared_kv else ["csa_cmp_v"])
    return {name: cache.derived(name) for name in names}


def check_held_entries(layer, cache, x: torch.Tensor, tol: float) -> None:
    """The cache holds the entries of every complete block of its pos tokens (x: those tokens), equal to
    pooling them all in one forward without a cache."""
    S = cache.pos
    with torch.no_grad():
        kc, vc, ki, _, _ = layer.compressed(x[:, :S], torch.arange(S), None)
    held = held_entries(layer, cache)
    want = {"csa_cmp": kc, "csa_cmp_v": vc, "csa_idx": ki[:, None]}
    n = S // layer.config.compress_ratio
    for name, got in held.items():
        assert got is not None, f"{name} is not kept in the cache"
        assert got.shape[2] == n == want[name].shape[2]
        torch.testing.assert_close(got, want[name], rtol=tol, atol=tol)


class EntryCounter:
    """Counts the entries every pooling computes (wraps entry_pooling's two poolings)."""

    def __init__(self, monkeypatch):
        self.n = 0
        for name in ("pool_channels", "pool_windows"):
            monkeypatch.setattr(entry_pooling, name, self.wrap(getattr(entry_pooling, name)))

    def wrap(self, fn):
        def counted(*args, **kwargs):
            out = fn(*args, **kwargs)
            self.n += out.shape[2]
            return out

        return counted


def n_poolings(layer) -> int:
    """Poolings per forward: keys (or K = V), values with separate K and V, index keys."""
    return 2 if layer.config.shared_kv else 3


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_chunked_prefill_and_decode_equal_one_prefill(options):
    """Odd chunks (not aligned to the ratio), single tokens and the rest: equal one prefill; after every
    call the cache holds the entries of every complete block."""
    layer = make(**options)
    B, T = 2, 41
    x = inputs(B, T, seed=1)
    cache = LayerCache(B, T)
    outs, t = [], 0
    with torch.no_grad():
        full = layer(x)
        for size in [5, 7, 1, 1, 1, 2, 11, 1, 4, 1, T]:
            outs.append(layer(x[:, t : min(T, t + size)], cache=cache))
            t += outs[-1].shape[1]
            check_held_entries(layer, cache, x, tol=1e-12)
    assert t == T == cache.pos
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", [{}, OPTIONS["scalar-gate-mean"]], ids=["v4", "scalar-gate-mean"])
def test_float32_token_by_token_equals_prefill(options):
    layer = make(torch.float32, **options)
    T = 31
    x = inputs(1, T, seed=2, dtype=torch.float32)
    cache = LayerCache(1, T)
    with torch.no_grad():
        full = layer(x)
        steps = []
        for t in range(T):
            steps.append(layer(x[:, t : t + 1], cache=cache))
            check_held_entries(layer, cache, x, tol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {},
        OPTIONS["v4-separate-v"],
        OPTIONS["v4-no-overlap"],
        OPTIONS["scalar-gate-mean"],
        OPTIONS["scalar-gate-no-overlap-mean-fp4"],
    ],
    ids=["v4", "v4-separate-v", "v4-no-overlap", "scalar-gate-mean", "scalar-gate-no-overlap"],
)
def test_each_entry_is_pooled_once(options, monkeypatch):
    """A prefill of P tokens and n decode steps pool P // m entries, then each new entry once (with overlap
    also its previous block's entry, pooled for the context and dropped): about n / m, not a re-pooling of
    every entry per step (about n * S / m)."""
    layer = make(**options)
    m, P, n = layer.config.compress_ratio, 20, 30
    x = inputs(2, P + n, seed=3)
    cache = LayerCache(2, P + n)
    counter = EntryCounter(monkeypatch)
    per_entry = 2 if layer.config.overlap else 1
    with torch.no_grad():
        layer(x[:, :P], cache=cache)
        assert counter.n == n_poolings(layer) * (P // m)
        for t in range(P, P + n):
            layer(x[:, t : t + 1], cache=cache)
    assert counter.n == n_poolings(layer) * (P // m + per_entry * ((P + n) // m - P // m))
    check_held_entries(layer, cache, x, tol=1e-12)


def test_reset_starts_clean(monkeypatch):
    """After reset the held entries are gone; a new sequence (another batch size) decodes as if fresh."""
    layer = make(shared_kv=False)
    m = layer.config.compress_ratio
    cache = LayerCache(3, 30)
    with torch.no_grad():
        x = inputs(2, 25, seed=4)
        for xt in x.split(1, dim=1):
            layer(xt, cache=cache)
        check_held_entries(layer, cache, x, tol=1e-12)
        cache.reset()
        assert all(v is None for v in held_entries(layer, cache).values())
        x = inputs(3, 22, seed=5)
        counter = EntryCounter(monkeypatch)
        steps = [layer(x[:, :4], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(4, 22)]
        assert counter.n == n_poolings(layer) * (4 // m + 2 * (22 // m - 4 // m))  # nothing of the old sequence
        check_held_entries(layer, cache, x, tol=1e-12)
        torch.testing.assert_close(torch.cat(steps, 1), layer(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", [{}, OPTIONS["scalar-gate-separate-v-fp8"]], ids=["v4", "scalar-gate"])
def test_a_forward_with_gradients_repools_every_entry(options, monkeypatch):
    """With gradients every entry is pooled from all cached tokens (autograd sees them all): the
    compressor's gradients equal those of one forward over the whole sequence, and a later no-grad step
    continues from the entries it kept."""
    layer = make(**options).train()
    m, P, T = layer.config.compress_ratio, 17, 7
    x = inputs(1, P + T + 1, seed=6)
    cache = LayerCache(1, P + T + 1)
    with torch.no_grad():
        layer(x[:, :P], cache=cache)
    counter = EntryCounter(monkeypatch)
    y = layer(x[:, P : P + T], cache=cache)
    assert counter.n == n_poolings(layer) * ((P + T) // m)  # every entry, not only the new ones
    # the parameters that act on the cached per-token inputs (a LayerCache keeps those detached)
    params = [
        p
        for name, p in layer.named_parameters()
        if name in ("compressor.ape", "compressor.norm.weight", "cmp_slot_bias")
    ]
    assert len(params) == (2 if layer.config.compressor == "v4" else 1)
    got = torch.autograd.grad(y.square().sum(), params)
    want = torch.autograd.grad(layer(x[:, : P + T])[:, P:].square().sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert not any(v.requires_grad for v in held_entries(layer, cache).values())
    check_held_entries(layer, cache, x, tol=1e-12)
    with torch.no_grad():
        last = layer(x[:, P + T :], cache=cache)
        torch.testing.assert_close(last, layer(x)[:, P + T :], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", [{}, OPTIONS["scalar-gate-mean"]], ids=["v4", "scalar-gate-mean"])
def test_a_padded_batch_keeps_entries_per_row(options):
    """A padded batch decodes with one cache per row: each row holds the entries of its own real tokens."""
    layer = make(**options)
    lengths, T, steps = [14, 9, 4], 14, 5
    x = inputs(3, T + steps, seed=7)
    mask = torch.arange(T + steps)[None, :] >= T - torch.tensor(lengths)[:, None]
    cache = layer.make_cache(3, T + steps)
    with torch.no_grad():
        outs = [layer(x[:, :T], cache=cache, attention_mask=mask[:, :T])]
        outs += [layer(x[:, t : t + 1], cache=cache, attention_mask=mask[:, : t + 1]) for t in range(T, T + steps)]
        y = torch.cat(outs, 1)
        for b, n in enumerate(lengths):
            row, real = cache.rows[b], x[b : b + 1, T - n :]
            assert row.pos == n + steps
            check_held_entries(layer, row, real, tol=1e-12)
            torch.testing.assert_close(y[b : b + 1, T - n :], layer(real), rtol=1e-10, atol=1e-12)


# -- the transformers integration: the entries live in the SparseCacheLayer, per row and sequence -----------
HF_CSA = dict(
    compress_ratio=2,
    topk=2,
    window=3,
    n_index_heads=2,
    index_dim=8,
    shared_kv=False,
    backend="reference",
    select_backend="reference",
)


def hf_csa_model():
    transformers = pytest.importorskip("transformers")
    from sparsezoo.integrations.transformers import convert

    config = transformers.LlamaConfig(
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
    torch.manual_seed(0)
    return convert(transformers.LlamaForCausalLM(config).double().eval(), "csa", **HF_CSA)


def hf_forward(model, ids, cache, **kwargs):
    import inspect

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return model(ids, **{name: cache}, use_cache=True, **kwargs).logits


@torch.no_grad()
def test_transformers_cache_keeps_entries_and_drops_them_on_crop():
    from transformers import DynamicCache

    model = hf_csa_model()
    m, T = HF_CSA["compress_ratio"], 21
    ids = torch.randint(1, 97, (2, T), generator=torch.Generator().manual_seed(8))
    full = model(ids, use_cache=False).logits
    cache = DynamicCache()
    chunks = [hf_forward(model, ids[:, :9], cache)] + [hf_forward(model, ids[:, t : t + 1], cache) for t in range(9, T)]
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-10, atol=1e-10)
    for layer in cache.layers:
        assert {name: t.shape[2] for name, t in layer._derived.items()} == dict.fromkeys(
            ["csa_cmp", "csa_cmp_v", "csa_idx"], T // m
        )
    cache.crop(-5)  # the held entries go with any change of the cache; the next call pools them again
    assert all(not layer._derived for layer in cache.layers)
    again = hf_forward(model, ids[:, T - 5 :], cache)
    torch.testing.assert_close(again, full[:, T - 5 :], rtol=1e-10, atol=1e-10)
    assert all(layer._derived["csa_idx"].shape[2] == T // m for layer in cache.layers)


@torch.no_grad()
def test_transformers_padded_batch_keeps_entries_per_row():
    from transformers import DynamicCache

    model = hf_csa_model()
    m, lengths, T = HF_CSA["compress_ratio"], [12, 5], 14
    ids = torch.randint(1, 97, (2, T), generator=torch.Generator().manual_seed(9))
    mask = (torch.arange(T)[None, :] >= T - torch.tensor(lengths)[:, None]).long()  # left padding
    full = model(ids, attention_mask=mask, use_cache=False).logits
    cache = DynamicCache()
    chunks = [hf_forward(model, ids[:, a:b], cache, attention_mask=mask[:, :b]) for a, b in [(0, 5), (5, 8)]]
    chunks += [hf_forward(model, ids[:, t : t + 1], cache, attention_mask=mask[:, : t + 1]) for t in range(8, T)]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(chunks, 1)[real], full[real], rtol=1e-10, atol=1e-10)
    for layer in cache.layers:
        for row, n in enumerate(lengths):
            held = layer._derived[("csa_cmp", row, T - n)]  # keyed by the row and its sequence's first column
            assert held.shape[:3] == (1, 2, n // m)
