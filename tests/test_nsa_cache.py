"""NSA keeps its compressed entries in the decode cache (issue 10): each entry is computed once, in the
call that brings its last token, and the cached entries equal a recomputation from all cached tokens.

Tiny fp64 layers (fp32 where stated) with the reference backends, so every check is fast on a CPU.
"""

from __future__ import annotations

import pytest
import torch

import sparsezoo
from sparsezoo import LayerCache
from sparsezoo.ops.compressed_attention import n_compressed

DIMS = dict(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, backend="reference", select_backend="reference")
# (cmp_block, cmp_stride): a stride that does not divide the block, a stride equal to it, stride 1
GEOMETRIES = [(8, 3), (6, 6), (5, 1)]


def make(cmp_block: int, cmp_stride: int, separate_kv: bool = True, dtype=torch.float64) -> sparsezoo.AttentionLayer:
    torch.manual_seed(0)
    config = {
        "variant": "nsa",
        "cmp_block": cmp_block,
        "cmp_stride": cmp_stride,
        "sel_block": 8,
        "sel_topk": 3,
        "window": 8,
        "compressor_hidden": 16,
        "separate_kv": separate_kv,
    }
    return sparsezoo.create_attention(config, **DIMS).to(dtype).eval()


def inputs(B: int, T: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(B, T, DIMS["d_model"], generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        dtype
    )


def held_entries(cache) -> tuple[torch.Tensor, torch.Tensor]:
    return cache.derived("nsa_cmp_k"), cache.derived("nsa_cmp_v")


def check_held_entries(layer, cache, B: int, tol: float) -> None:
    """The cache holds exactly n_compressed(pos) entries, equal to compressing every cached branch token."""
    k_name, v_name = ("k_cmp", "v_cmp") if layer.config.separate_kv else ("k", "v")
    k_all, v_all = cache.get(k_name, B), cache.get(v_name, B)
    kc, vc = held_entries(cache)
    n = n_compressed(cache.pos, layer.config.cmp_block, layer.config.cmp_stride)
    assert kc.shape == vc.shape == (B, layer.n_kv_heads, n, layer.head_dim)
    with torch.no_grad():
        torch.testing.assert_close(kc, layer.compress_k(k_all), rtol=tol, atol=tol)
        torch.testing.assert_close(vc, layer.compress_v(v_all), rtol=tol, atol=tol)


class EntryCounter:
    """Counts the compressed entries each compressor computes (forward hooks on compress_k / compress_v)."""

    def __init__(self, layer):
        self.k = self.v = 0
        self.hooks = [
            layer.compress_k.register_forward_hook(lambda m, a, out: self.add("k", out)),
            layer.compress_v.register_forward_hook(lambda m, a, out: self.add("v", out)),
        ]

    def add(self, which: str, out: torch.Tensor) -> None:
        setattr(self, which, getattr(self, which) + out.shape[2])

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


@pytest.mark.parametrize("separate_kv", [True, False])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_chunked_prefill_and_decode_equal_one_prefill(geometry, separate_kv):
    """Odd chunks (not aligned to the stride), then single tokens, then a short chunk (the decode op) and the
    rest: equals one prefill; after every call the cache holds the entries of every complete block."""
    layer = make(*geometry, separate_kv=separate_kv)
    B, T = 2, 47
    x = inputs(B, T, seed=1)
    cache = LayerCache(B, T)
    outs, t = [], 0
    with torch.no_grad():
        full = layer(x)
        for size in [5, 7, 1, 1, 1, 11, 1, 3, 1, 2, T]:
            outs.append(layer(x[:, t : min(T, t + size)], cache=cache))
            t += outs[-1].shape[1]
            check_held_entries(layer, cache, B, tol=1e-13)
    assert t == T == cache.pos
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-11)


def test_float32_token_by_token_equals_prefill():
    layer = make(8, 3, dtype=torch.float32)
    x = inputs(1, 40, seed=2, dtype=torch.float32)
    cache = LayerCache(1, 40)
    with torch.no_grad():
        full = layer(x)
        steps = []
        for t in range(40):
            steps.append(layer(x[:, t : t + 1], cache=cache))
            check_held_entries(layer, cache, 1, tol=1e-6)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("separate_kv", [True, False])
def test_each_entry_is_computed_once(separate_kv):
    """A prefill of P tokens and n decode steps compute n_compressed(P + n) entries per compressor, not one
    recomputation of every entry per step (which would be about n * S / stride)."""
    l, d = 8, 3
    layer = make(l, d, separate_kv=separate_kv)
    P, n = 20, 30
    x = inputs(2, P + n, seed=3)
    cache = LayerCache(2, P + n)
    counter = EntryCounter(layer)
    with torch.no_grad():
        layer(x[:, :P], cache=cache)
        assert counter.k == counter.v == n_compressed(P, l, d)
        for t in range(P, P + n):
            layer(x[:, t : t + 1], cache=cache)
    counter.remove()
    assert counter.k == counter.v == n_compressed(P + n, l, d)


def test_reset_starts_clean():
    """After reset the held entries are gone; a new sequence (another batch size) decodes as if fresh."""
    layer = make(8, 3)
    cache = LayerCache(3, 30)
    with torch.no_grad():
        for t, xt in enumerate(inputs(2, 25, seed=4).split(1, dim=1)):
            layer(xt, cache=cache)
        assert held_entries(cache)[0].shape[2] == n_compressed(25, 8, 3)
        cache.reset()
        assert held_entries(cache) == (None, None)
        x = inputs(3, 22, seed=5)
        counter = EntryCounter(layer)
        steps = [layer(x[:, :4], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(4, 22)]
        counter.remove()
        check_held_entries(layer, cache, 3, tol=1e-13)
        torch.testing.assert_close(torch.cat(steps, 1), layer(x), rtol=1e-10, atol=1e-11)
    assert counter.k == n_compressed(22, 8, 3)


def test_a_forward_with_gradients_recomputes_every_entry():
    """With gradients the entries are recomputed from all cached tokens (autograd sees them all): the
    compressor's gradients equal those of one forward over the whole sequence, and a later no-grad step
    continues from the recomputed entries."""
    l, d = 8, 3
    layer = make(l, d)
    layer.train()
    P, T = 17, 7
    x = inputs(1, P + T + 1, seed=6)
    cache = LayerCache(1, P + T + 1)
    with torch.no_grad():
        layer(x[:, :P], cache=cache)
    counter = EntryCounter(layer)
    y = layer(x[:, P : P + T], cache=cache)
    assert counter.k == n_compressed(P + T, l, d)  # every entry, not only the new ones
    counter.remove()
    params = list(layer.compress_k.parameters()) + list(layer.compress_v.parameters())
    got = torch.autograd.grad(y.square().sum(), params)
    want = torch.autograd.grad(layer(x[:, : P + T])[:, P:].square().sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    check_held_entries(layer, cache, 1, tol=1e-13)
    with torch.no_grad():
        last = layer(x[:, P + T :], cache=cache)
        torch.testing.assert_close(last, layer(x)[:, P + T :], rtol=1e-10, atol=1e-11)


def test_a_padded_batch_keeps_entries_per_row():
    """A padded batch decodes with one cache per row: each row holds the entries of its own real tokens."""
    l, d = 6, 2
    layer = make(l, d)
    lengths, T, steps = [14, 9, 4], 14, 5
    x = inputs(3, T + steps, seed=7)
    mask = torch.arange(T + steps)[None, :] >= T - torch.tensor(lengths)[:, None]
    cache = layer.make_cache(3, T + steps)
    with torch.no_grad():
        outs = [layer(x[:, :T], cache=cache, attention_mask=mask[:, :T])]
        outs += [layer(x[:, t : t + 1], cache=cache, attention_mask=mask[:, : t + 1]) for t in range(T, T + steps)]
        y = torch.cat(outs, 1)
        for b, n in enumerate(lengths):
            row = cache.rows[b]
            assert row.pos == n + steps
            check_held_entries(layer, row, 1, tol=1e-13)
            torch.testing.assert_close(y[b : b + 1, T - n :], layer(x[b : b + 1, T - n :]), rtol=1e-10, atol=1e-11)
