"""Properties of the NSA, DSA, MoBA and CSA variants (issue 3), beyond the registry-wide tests.

Oracles are brute-force fp64 computations on small inputs (full T x S maps are fine here).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsezoo import ConfigError, LayerCache, create_attention, list_variants
from sparsezoo import ops
from sparsezoo.ops import entry_pooling
from sparsezoo.ops import references as reference
from sparsezoo.ops.compressed_attention import n_compressed

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VARIANTS = ("nsa", "dsa", "moba", "csa")
F64 = torch.float64


def make(name: str, dtype=F64, **overrides):
    torch.manual_seed(0)
    return create_attention(CONFIGS / f"{name}.yaml", **overrides).to(dtype)


def dense_like(layer):
    dense = create_attention(CONFIGS / "dense.yaml").to(layer.q_proj.weight.dtype)
    missing, _ = dense.load_state_dict(layer.state_dict(), strict=False)
    assert not missing
    return dense.eval()


def brute_causal(T: int, S: int) -> torch.Tensor:
    pos = torch.arange(S - T, S)
    return torch.arange(S)[None, :] <= pos[:, None]


def brute_attention(q, k, v, allowed, scale):
    """allowed [T, S] or [B, H, T, S] bool; GQA by repeating k/v."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def test_registered():
    assert set(VARIANTS) <= set(list_variants())


@pytest.mark.parametrize("name", VARIANTS)
def test_yaml_builds_and_trains(name):
    layer = make(name, dtype=torch.float32).train()
    x = torch.randn(2, 150, 256)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    loss = y.square().mean() + (layer.aux_loss if layer.aux_loss is not None else 0)
    loss.backward()
    assert (layer.aux_loss is not None) == (name in ("dsa", "csa"))  # the variants with a learned indexer
    assert layer.q_proj.weight.grad.abs().sum() > 0


# -- budgets that cover everything reduce to dense ------------------------------------------------
@settings(max_examples=6, deadline=None)
@given(T=st.integers(1, 140), B=st.integers(1, 2), seed=st.integers(0, 99))
def test_nsa_full_budget_equals_dense(T, B, seed):
    layer = make("nsa", sel_topk=64, window=256).eval()
    layer.fixed_gates = (0.0, 1.0, 0.0)
    torch.manual_seed(seed)
    x = torch.randn(B, T, 256, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_like(layer)(x), rtol=1e-9, atol=1e-10)


@settings(max_examples=6, deadline=None)
@given(T=st.integers(1, 120), seed=st.integers(0, 99), per=st.sampled_from(["layer", "group"]))
def test_dsa_topk_covering_all_equals_dense(T, seed, per):
    layer = make("dsa", topk=128, select_per=per).eval()
    torch.manual_seed(seed)
    x = torch.randn(2, T, 256, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_like(layer)(x), rtol=1e-9, atol=1e-10)


@settings(max_examples=6, deadline=None)
@given(T=st.integers(1, 150), seed=st.integers(0, 99))
def test_moba_topk_covering_all_equals_dense(T, seed):
    layer = make("moba", topk=8).eval()
    torch.manual_seed(seed)
    x = torch.randn(1, T, 256, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_like(layer)(x), rtol=1e-9, atol=1e-10)


def test_sparse_budgets_differ_from_dense():
    """The reductions above can fail: with the YAML budgets the outputs differ from dense."""
    x = torch.randn(1, 200, 256, dtype=F64)
    for name in ("dsa", "moba"):
        layer = make(name).eval()
        with torch.no_grad():
            assert (layer(x) - dense_like(layer)(x)).abs().max() > 1e-4


# -- selections: forced blocks, scores, group sharing ---------------------------------------------
def brute_nsa_importance(q, kc, S, l, d, lsel, scale):
    """[B, Hkv, T, n_blocks] from the full compression probabilities and an explicit overlap map."""
    B, Hq, T, D = q.shape
    Hkv, Sc = kc.shape[1], kc.shape[2]
    ends = torch.arange(Sc) * d + l - 1
    pos = torch.arange(S - T, S)
    ok = ends[None, :] <= pos[:, None]
    s = (q @ kc.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) * scale).masked_fill(~ok, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0).view(B, Hkv, Hq // Hkv, T, Sc).sum(2)
    n_blocks = math.ceil(S / lsel)
    start = torch.arange(Sc) * d
    j = torch.arange(n_blocks)
    overlap = (start[:, None] < (j[None, :] + 1) * lsel) & (start[:, None] + l > j[None, :] * lsel)
    return p @ overlap.to(p.dtype)


@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 90), extra=st.integers(0, 60), topk=st.integers(3, 6), seed=st.integers(0, 999),
       geometry=st.sampled_from([(16, 8, 32), (32, 16, 64), (8, 8, 16), (12, 4, 16)]))
def test_nsa_select_matches_brute_force_and_forces_blocks(T, extra, topk, seed, geometry):
    l, d, lsel = geometry
    S = T + extra
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, T, 8, generator=g, dtype=F64)
    Sc = n_compressed(S, l, d)
    kc = torch.randn(2, 2, Sc, 8, generator=g, dtype=F64)
    sel = ops.nsa_select(q, kc, S=S, block_len=l, stride=d, sel_block=lsel, topk=topk, scale=0.3)
    imp = brute_nsa_importance(q, kc, S, l, d, lsel, 0.3)
    pos = torch.arange(S - T, S)
    for b, h, t in [(b, h, t) for b in range(2) for h in range(2) for t in range(T)]:
        local = int(pos[t]) // lsel
        ids = [int(i) for i in sel[b, h, t] if i >= 0]
        forced = {0, local, max(local - 1, 0)}
        assert forced <= set(ids), "block 0 and the 2 local blocks are always selected"
        assert len(ids) == len(set(ids)) == min(topk, local + 1)
        assert all(i <= local for i in ids)
        rest = sorted(set(range(local + 1)) - forced, key=lambda j: (-float(imp[b, h, t, j]), j))
        assert set(ids) == forced | set(rest[:len(ids) - len(forced)])
        assert all(i == -1 for i in sel[b, h, t, len(ids):].tolist())


def test_nsa_selection_shared_by_group():
    """Permuting the query heads inside a group leaves the group's selection unchanged."""
    q = torch.randn(1, 8, 50, 16, dtype=F64)
    kc = torch.randn(1, 2, 20, 16, dtype=F64)
    args = dict(S=170, block_len=16, stride=8, sel_block=32, topk=5, scale=0.25)
    sel = ops.nsa_select(q, kc, **args)
    perm = torch.tensor([3, 1, 0, 2, 7, 4, 6, 5])
    assert torch.equal(sel, ops.nsa_select(q[:, perm], kc, **args))
    assert not torch.equal(sel, ops.nsa_select(q[:, [4, 5, 6, 7, 0, 1, 2, 3]], kc, **args))


@settings(max_examples=8, deadline=None)
@given(T=st.integers(1, 80), extra=st.integers(0, 80), topk=st.integers(1, 5), seed=st.integers(0, 999))
def test_moba_select_brute_force_keeps_local_block(T, extra, topk, seed):
    S, bs = T + extra, 16
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, T, 8, generator=g, dtype=F64)
    k = torch.randn(1, 2, S, 8, generator=g, dtype=F64)
    sel = ops.moba_select(q, k, block_size=bs, topk=topk)
    pos = torch.arange(S - T, S)
    for h in range(4):
        for t in range(T):
            local = int(pos[t]) // bs
            ids = [int(i) for i in sel[0, h, t] if i >= 0]
            assert local in ids and len(ids) == min(topk, local + 1)
            score = {j: float(q[0, h, t] @ k[0, h // 2, j * bs:(j + 1) * bs].mean(0)) for j in range(local)}
            best = sorted(score, key=lambda j: (-score[j], j))[:len(ids) - 1]
            assert set(ids) == set(best) | {local}


@settings(max_examples=8, deadline=None)
@given(T=st.integers(1, 60), extra=st.integers(0, 60), topk=st.integers(1, 40), seed=st.integers(0, 999),
       hs=st.sampled_from([1, 2]))
def test_indexer_topk_brute_force(T, extra, topk, seed, hs):
    S = T + extra
    g = torch.Generator().manual_seed(seed)
    q_i = torch.randn(1, hs, T, 3, 8, generator=g, dtype=F64)
    w = torch.randn(1, hs, T, 3, generator=g, dtype=F64)
    k_i = torch.randn(1, S, 8, generator=g, dtype=F64)
    sel = ops.indexer_topk(q_i, w, k_i, torch.arange(S), S=S, topk=topk, scale=0.5)
    logits = torch.einsum("bhtj,bhtjs->bhts", w, torch.relu(torch.einsum("bhtjd,bsd->bhtjs", q_i, k_i)))
    for h in range(hs):
        for t in range(T):
            p = S - T + t
            ids = [int(i) for i in sel[0, h, t] if i >= 0]
            order = sorted(range(p + 1), key=lambda s: (-float(logits[0, h, t, s]), s))
            assert ids == order[:min(topk, p + 1)]


def test_indexer_agrees_with_attn_gym():
    """Second opinion: attn-gym's reference lightning indexer picks the same sets at prefill,
    for tokens (DSA) and for compressed entries with ratio m (CSA)."""
    from attn_gym.sparse import lightning_indexer

    torch.manual_seed(1)
    T, J, Di = 96, 4, 16
    q_i = torch.randn(2, T, J, Di)
    w = torch.randn(2, T, J)
    for ratio in (1, 4):
        k_i = torch.randn(2, T // ratio, Di)
        ends = entry_pooling.entry_ends(T // ratio, ratio, "cpu")
        ours = ops.indexer_topk(q_i.transpose(1, 2)[:, None].transpose(2, 3).reshape(2, 1, T, J, Di),
                                    w[:, None], k_i, ends, S=T, topk=10, scale=1.0)[:, 0]
        theirs = lightning_indexer(q_i, k_i, w, 10, causal=True, compress_ratio=ratio, impl="reference")
        # Ties (e.g. several all-ReLU-zero scores) may break differently: compare the chosen scores.
        z = torch.einsum("btj,btjs->bts", w, torch.relu(torch.einsum("btjd,bsd->btjs", q_i, k_i)))
        z = torch.cat([z, torch.full_like(z[..., :1], float("-inf"))], -1)
        picked = lambda s: torch.sort(torch.gather(z, -1, torch.where(s >= 0, s, z.shape[-1] - 1).long()), -1).values
        assert torch.equal(ours < 0, theirs < 0)
        torch.testing.assert_close(picked(ours), picked(theirs))


# -- the ops against brute force ------------------------------------------------------------------
@settings(max_examples=8, deadline=None)
@given(T=st.integers(1, 70), extra=st.integers(0, 70), window=st.integers(1, 90), seed=st.integers(0, 999))
def test_window_attention_brute_force(T, extra, window, seed):
    S = T + extra
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, T, 8, generator=g, dtype=F64)
    k, v = torch.randn(2, 1, 2, S, 8, generator=g, dtype=F64)
    pos = torch.arange(S - T, S)[:, None]
    allowed = brute_causal(T, S) & (torch.arange(S)[None, :] > pos - window)
    out = ops.window_attention(q, k, v, window=window, scale=0.3, backend="reference")
    torch.testing.assert_close(out, brute_attention(q, k, v, allowed, 0.3))


@settings(max_examples=8, deadline=None)
@given(T=st.integers(1, 70), extra=st.integers(0, 70), seed=st.integers(0, 999),
       geometry=st.sampled_from([(16, 8), (32, 16), (4, 4)]))
def test_compressed_attention_brute_force(T, extra, seed, geometry):
    l, d = geometry
    S = T + extra
    g = torch.Generator().manual_seed(seed)
    Sc = n_compressed(S, l, d)
    q = torch.randn(1, 4, T, 8, generator=g, dtype=F64)
    kc, vc = torch.randn(2, 1, 2, Sc, 8, generator=g, dtype=F64)
    ends = torch.arange(Sc) * d + l - 1
    allowed = ends[None, :] <= torch.arange(S - T, S)[:, None]
    out = ops.compressed_attention(q, kc, vc, S=S, block_len=l, stride=d, scale=0.3, backend="reference")
    torch.testing.assert_close(out, brute_attention(q, kc, vc, allowed, 0.3))


@settings(max_examples=8, deadline=None)
@given(T=st.integers(1, 50), extra=st.integers(0, 50), K=st.integers(1, 30), seed=st.integers(0, 999))
def test_gather_attention_brute_force(T, extra, K, seed):
    S = T + extra
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, T, 8, generator=g, dtype=F64)
    k, v = torch.randn(2, 2, 2, S, 8, generator=g, dtype=F64)
    idx = torch.rand(2, 2, T, S, generator=g).argsort(-1)[..., :K]  # unique ids, as selections are
    idx = torch.where(torch.rand(idx.shape, generator=g) < 0.2, -1, idx)
    allowed = torch.zeros(2, 2, T, S + 1, dtype=torch.bool)
    allowed.scatter_(-1, torch.where(idx >= 0, idx, S), True)
    allowed = allowed[..., :S].repeat_interleave(2, 1)
    out = ops.gather_attention(q, k, v, idx, scale=0.3, backend="reference")
    torch.testing.assert_close(out, brute_attention(q, k, v, allowed, 0.3))
    # Second opinion: token selections are block selections with block_size 1 (valid ids first).
    idx_sorted = torch.sort(torch.where(idx >= 0, idx, S + 1), -1).values
    idx_sorted = torch.where(idx_sorted <= S, idx_sorted, -1).to(torch.int32)
    keep = idx_sorted <= torch.arange(S - T, S)[:, None]
    causal_idx = torch.sort(torch.where(keep & (idx_sorted >= 0), idx_sorted, S + 1), -1).values
    causal_idx = torch.where(causal_idx <= S, causal_idx, -1).to(torch.int32)
    torch.testing.assert_close(ops.gather_attention(q, k, v, causal_idx, scale=0.3),
                               reference.block_sparse_attention_reference(q, k, v, causal_idx, 1, 0.3))


def brute_index_kl(q, k, q_i, w, k_i, allowed, scale, index_scale):
    """Layer-shared selection: teacher = sum over all heads of softmax, L1-normalised."""
    G = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(G, 1).transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    P = torch.softmax(s, -1).nan_to_num(0.0).sum(1)
    P = P / P.sum(-1, keepdim=True)
    z = torch.einsum("btj,btjs->bts", w[:, 0], torch.relu(torch.einsum("btjd,bsd->btjs", q_i[:, 0], k_i))) * index_scale
    logq = torch.log_softmax(z.masked_fill(~allowed[:, 0], float("-inf")), -1)
    return (torch.xlogy(P, P) - torch.where(allowed[:, 0], P * logq, 0)).sum() / (q.shape[0] * q.shape[2])


@pytest.mark.parametrize("sparse", [False, True])
def test_index_kl_brute_force(sparse):
    torch.manual_seed(3)
    B, T, S, D = 2, 20, 30, 8
    q = torch.randn(B, 4, T, D, dtype=F64)
    k = torch.randn(B, 2, S, D, dtype=F64)
    q_i = torch.randn(B, 1, T, 3, 8, dtype=F64, requires_grad=True)
    w = torch.randn(B, 1, T, 3, dtype=F64)
    k_i = torch.randn(B, S, 8, dtype=F64)
    ends = torch.arange(S)
    idx = ops.indexer_topk(q_i, w, k_i, ends, S=S, topk=7, scale=0.3) if sparse else None
    loss = ops.index_kl(q, k, q_i, w, k_i, ends, idx, S=S, scale=0.35, index_scale=0.3)
    allowed = brute_causal(T, S).expand(B, 1, T, S)
    if sparse:
        m = torch.zeros(B, 1, T, S + 1, dtype=torch.bool)
        m.scatter_(-1, torch.where(idx.long() >= 0, idx.long(), S), True)
        allowed = m[..., :S]
    torch.testing.assert_close(loss, brute_index_kl(q, k, q_i, w, k_i, allowed, 0.35, 0.3))
    loss.backward()
    assert q_i.grad.abs().sum() > 0


# -- causality, decode, kv patterns ---------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_causal(name):
    layer = make(name).eval()
    x = torch.randn(1, 180, 256, dtype=F64)
    x2 = x.clone()
    x2[:, 97:] = torch.randn(1, 83, 256, dtype=F64)
    with torch.no_grad():
        a, b = layer(x), layer(x2)
    torch.testing.assert_close(a[:, :97], b[:, :97], rtol=0, atol=1e-12)
    assert (a[:, 97:] - b[:, 97:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", VARIANTS)
@settings(max_examples=3, deadline=None)
@given(first=st.integers(1, 60), chunk=st.integers(1, 30), seed=st.integers(0, 99))
def test_cached_decode_equals_prefill(name, first, chunk, seed):
    """Prefill `first` tokens, two chunks of `chunk`, 20 single-token decode steps, then the rest as
    one chunk: equals one prefill of all T tokens."""
    layer = make(name).eval()
    torch.manual_seed(seed)
    T = 140
    x = torch.randn(2, T, 256, dtype=F64)
    cache = LayerCache(2, 150)
    outs, t = [], 0
    with torch.no_grad():
        full = layer(x)
        for size in [first, chunk, chunk] + [1] * 20 + [T]:
            outs.append(layer(x[:, t:min(T, t + size)], cache=cache))
            t += outs[-1].shape[1]
    assert t == T and cache.pos == T
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-10)


def test_decode_float32_step_by_step():
    for name in VARIANTS:
        layer = make(name, dtype=torch.float32).eval()
        x = torch.randn(1, 100, 256)
        cache = LayerCache(1, 100)
        with torch.no_grad():
            full = layer(x)
            steps = torch.cat([layer(x[:, :75], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(75, 100)], 1)
        torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_pattern(name):
    layer = make(name).eval()
    x = torch.randn(2, 140, 256, dtype=F64)
    pat = layer.kv_pattern(x)
    assert pat.shape == (2, 8, 140, 140) and pat.dtype == torch.bool
    assert not (pat & ~brute_causal(140, 140)).any(), "no query reads a future key"
    assert pat.any(-1).all(), "every query reads some key"
    if name != "dsa":  # DSA's indexer need not pick the query's own token
        assert pat.diagonal(dim1=-2, dim2=-1).all(), "every query reads itself (local block / window)"
    assert pat.float().mean() < brute_causal(140, 140).float().mean(), "the YAML budgets are sparse"


def test_kv_pattern_group_sharing():
    x = torch.randn(1, 160, 256, dtype=F64)
    for name, per_group in (("nsa", True), ("dsa", False), ("csa", False)):
        pat = make(name).kv_pattern(x)
        shared = pat.view(1, 2, 4, 160, 160) if per_group else pat.view(1, 1, 8, 160, 160)
        assert (shared == shared[:, :, :1]).all(), name
    pat = make("dsa", select_per="group").kv_pattern(x).view(1, 2, 4, 160, 160)
    assert (pat == pat[:, :, :1]).all() and not (pat[:, 0] == pat[:, 1]).all()
    pat = make("moba").kv_pattern(x)
    assert not (pat == pat[:, :1]).all(), "MoBA selects per query head"


# -- gradients ------------------------------------------------------------------------------------
def grads(layer, loss):
    layer.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad is not None and bool(p.grad.abs().sum() > 0)) for n, p in layer.named_parameters()}


def test_nsa_gradients_reach_gates_compressor_and_branch_kv():
    layer = make("nsa").train()
    x = torch.randn(1, 150, 256, dtype=F64)
    got = grads(layer, layer(x).square().sum())
    assert all(got.values()), [n for n, ok in got.items() if not ok]
    assert layer.aux_loss is None


def test_dsa_indexer_learns_only_from_kl():
    layer = make("dsa").train()
    x = torch.randn(1, 150, 256, dtype=F64)
    main = grads(layer, layer(x).square().sum())
    assert not any(v for n, v in main.items() if n.startswith("indexer."))
    assert all(v for n, v in main.items() if not n.startswith("indexer."))
    for routing in ("dense", "sparse"):
        layer.set_routing(routing)
        layer(x)
        kl = grads(layer, layer.aux_loss)
        assert all(v for n, v in kl.items() if n.startswith("indexer.")), routing
        assert not any(v for n, v in kl.items() if not n.startswith("indexer.")), routing
    with pytest.raises(ValueError, match="dense"):
        layer.set_routing("warm")


def test_dsa_dense_routing_is_dense_attention():
    layer = make("dsa", routing="dense").eval()
    x = torch.randn(1, 130, 256, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_like(layer)(x))


@pytest.mark.parametrize("compressor, prefix", [("v4", "compressor."), ("scalar_gate", "cmp_")])
def test_csa_gradients_reach_compressor_and_indexer_kl(compressor, prefix):
    layer = make("csa", index_kl=False, compressor=compressor).train()
    x = torch.randn(1, 150, 256, dtype=F64)
    got = grads(layer, layer(x).square().sum())
    assert any(n.startswith(prefix) for n in got) and all(v for n, v in got.items() if n.startswith(prefix)), got
    assert got["attn_sink"] and got["kv_norm.weight"]
    assert layer.aux_loss is None
    layer = make("csa", compressor=compressor).train()  # index_kl is on by default
    layer(x)
    kl = grads(layer, layer.aux_loss)
    assert all(v for n, v in kl.items() if n.startswith("indexer.")), kl
    assert kl["indexer.compressor.ape"] and not any(v for n, v in kl.items() if not n.startswith("indexer."))


def test_csa_pooling_brute_force():
    torch.manual_seed(5)
    x = torch.randn(1, 2, 23, 4, dtype=F64)
    logits = torch.randn(1, 2, 23, dtype=F64)
    bias = torch.randn(8, dtype=F64)
    out = entry_pooling.pool_windows(x, logits, bias, 4)
    assert out.shape == (1, 2, 5, 4)
    for i in range(5):
        toks = [t for t in range((i + 1) * 4 - 8, (i + 1) * 4) if t >= 0]
        slots = [t - ((i + 1) * 4 - 8) for t in toks]
        a = torch.softmax(logits[0, :, toks] + bias[slots], -1)
        torch.testing.assert_close(out[0, :, i], torch.einsum("hw,hwd->hd", a, x[0, :, toks]))


# -- configs and errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,bad", [
    ("nsa", {"sel_topk": 2}), ("nsa", {"cmp_stride": 64}), ("nsa", {"select_backend": "flex"}),
    ("dsa", {"select_per": "head"}), ("dsa", {"n_index_heads": 3, "select_per": "group"}), ("dsa", {"topk": 0}),
    ("moba", {"backend": "flex", "block_size": 24}), ("csa", {"compress_ratio": 0}), ("csa", {"routing": "x"}),
])
def test_bad_configs_raise(name, bad):
    with pytest.raises(ConfigError):
        create_attention(CONFIGS / f"{name}.yaml", **bad)


@pytest.mark.parametrize("name", VARIANTS)
def test_flex_with_grad_on_cpu_raises_clearly(name):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    layer = create_attention(CONFIGS / f"{name}.yaml", backend="flex").train()
    with pytest.raises((RuntimeError, ValueError), match="reference"):
        layer(torch.randn(1, 40, 256))


# -- flex against the reference -------------------------------------------------------------------
def flex_pair(name, device, dtype=torch.float32):
    ref = make(name, dtype=dtype, backend="reference").to(device)
    fl = make(name, dtype=dtype, backend="flex").to(device)
    fl.load_state_dict(ref.state_dict())
    return ref, fl


@pytest.mark.compile
@pytest.mark.parametrize("name", VARIANTS)
def test_flex_forward_equals_reference_cpu(name):
    """One fixed shape per variant (each new shape recompiles flex on the CPU)."""
    ref, fl = flex_pair(name, "cpu")
    torch.manual_seed(7)
    x = torch.randn(1, 160, 256)
    with torch.no_grad():
        torch.testing.assert_close(fl.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", VARIANTS)
def test_flex_forward_backward_equals_reference_gpu(name):
    torch.backends.cuda.matmul.allow_tf32 = False
    ref, fl = flex_pair(name, "cuda")
    torch.manual_seed(7)
    x = torch.randn(2, 400, 256, device="cuda")
    outs, gs = [], []
    for layer in (ref, fl):
        layer.train()
        y = layer(x)
        loss = y.square().mean() + (layer.aux_loss if layer.aux_loss is not None else 0)
        layer.zero_grad(set_to_none=True)
        loss.backward()
        outs.append(y)
        gs.append({n: p.grad for n, p in layer.named_parameters()})
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-3, atol=2e-4)
    # some gradients are exactly zero in theory (a bias added to every compressed key shifts each
    # softmax row by a constant): measure errors against the layer's largest gradient as a floor
    floor = 1e-3 * max(g.abs().max() for g in gs[0].values() if g is not None)
    for n, g in gs[0].items():
        if g is None:
            assert gs[1][n] is None, n
            continue
        err = (gs[1][n] - g).abs().max() / torch.maximum(g.abs().max(), floor)
        assert err < 5e-3, (n, float(err))


@pytest.mark.gpu
@pytest.mark.parametrize("name", VARIANTS)
def test_flex_chunked_prefill_and_decode_gpu(name):
    ref, fl = flex_pair(name, "cuda")
    torch.manual_seed(8)
    x = torch.randn(1, 300, 256, device="cuda")
    cache = LayerCache(1, 300)
    with torch.no_grad():
        full = ref.eval()(x)
        fl.eval()
        steps = [fl(x[:, :200], cache=cache), fl(x[:, 200:290], cache=cache)]
        steps += [fl(x[:, t:t + 1], cache=cache) for t in range(290, 300)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=2e-3, atol=2e-4)
