"""The CSA, DSA and NSA modules against the published equations (issue 11, item 1), on tiny fp64 inputs.

Each oracle is a direct transcription written here in plain torch, independent of the library's code:
- CSA: DeepSeek-V4's inference/model.py (Compressor, Indexer, Attention with its sparse_attn and
  attn_sink), the whole layer end to end;
- DSA: DeepSeek-V3.2-Exp's Indexer (LayerNorm index key, RoPE on the first dims, Hadamard + fp8);
- NSA: the paper's gate, an MLP with a sigmoid.
RoPE is written rotate-half (pairs j, j + d/2), the library's convention (V4 pairs adjacent dims: the
same map up to a fixed permutation of the rotated dims), with fp32 angles as both codes compute them.
Also: with every option off CSA and DSA compute what they computed before (a frozen copy of the earlier
code below), the attention sink of ops.gather_attention (reference, Triton under the interpreter, flex),
the simulated low-precision rounding, fp64 entry pooling, decode = prefill for the options, the
published configs and the option errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sparsezoo
from sparsezoo import ConfigError, LayerCache, create_attention, ops
from sparsezoo.config import published_config_names
from sparsezoo.ops import entry_pooling, low_precision
from sparsezoo.rope import apply_rope

F64 = torch.float64
EPS = 1e-6
CSA_TINY = dict(
    variant="csa",
    d_model=32,
    n_heads=4,
    n_kv_heads=1,
    head_dim=16,
    compress_ratio=4,
    topk=3,
    window=6,
    n_index_heads=4,
    index_dim=8,
    rope_dim=4,
    index_rope_dim=4,
)
DSA_TINY = dict(
    variant="dsa",
    d_model=32,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    topk=5,
    n_index_heads=8,
    index_dim=16,
    index_rope_dim=8,
)
CSA_OLD = dict(
    attn_sink=False, shared_kv=False, q_norm=False, compressor="scalar_gate", index_compressor="mean", index_rope=False
)


def build(config: dict, seed: int = 0, **overrides):
    """A module with every parameter random (zero-initialised biases, ape and sinks would hide terms)."""
    torch.manual_seed(seed)
    layer = create_attention({**config, **overrides}).double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() < 2 else 1.0 / math.sqrt(p.shape[-1])))
    return layer


# -- plain transcriptions ---------------------------------------------------------------------------
def rope(x, pos, theta, inverse=False):
    """Rotate-half RoPE over all of x's last dim at positions pos [T] (x [..., T, d])."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos.float()[:, None] * inv
    c, s = ang.cos().double(), ang.sin().double() * (-1 if inverse else 1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def rope_last(x, pos, theta, rd, inverse=False):  # V4: x[..., -rd:]
    return torch.cat([x[..., :-rd], rope(x[..., -rd:], pos, theta, inverse)], -1)


def rope_first(x, pos, theta, rd):  # V3.2's indexer: q_pe, q_nope = split(q, [rd, d - rd])
    return torch.cat([rope(x[..., :rd], pos, theta), x[..., rd:]], -1)


def rms_norm(x, weight=None):
    x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + EPS)
    return x if weight is None else x * weight


def linear(x, lin):
    return x @ lin.weight.T + (0 if lin.bias is None else lin.bias)


def v4_compressor(comp, x, theta):
    """V4 Compressor.forward at start_pos 0 (prefill) -> entries [B, n, H, d]."""
    B, T, _ = x.shape
    m, H, d = comp.ratio, comp.n_heads, comp.dim
    coff = 2 if comp.overlap else 1
    n = T // m
    kv = linear(x, comp.wkv).view(B, T, H, coff * d)[:, : n * m].unflatten(1, (n, m))  # [B, n, m, H, coff*d]
    score = linear(x, comp.wgate).view(B, T, H, coff * d)[:, : n * m].unflatten(1, (n, m))
    score = score + comp.ape.transpose(0, 1)  # ape [H, m, coff*d] -> per slot
    if comp.overlap:  # overlap_transform: slots m.. the block's second half, slots ..m the block before's first
        new_kv, new_s = kv.new_zeros(B, n, 2 * m, H, d), kv.new_full((B, n, 2 * m, H, d), float("-inf"))
        new_kv[:, :, m:], new_s[:, :, m:] = kv[..., d:], score[..., d:]
        new_kv[:, 1:, :m], new_s[:, 1:, :m] = kv[:, :-1, ..., :d], score[:, :-1, ..., :d]
        kv, score = new_kv, new_s
    out = (kv * score.softmax(dim=2)).sum(2)  # [B, n, H, d]
    if comp.norm is not None:
        out = rms_norm(out, comp.norm.weight)
    if comp.rope_dim:
        out = rope_last(out.transpose(1, 2), torch.arange(n) * m, theta, comp.rope_dim).transpose(1, 2)
    return out


def hadamard_matrix(n):
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def fp8_round(x, block):
    """act_quant + dequant: per block of `block` dims, scale = amax / 448, e4m3 values."""
    xb = x.unflatten(-1, (-1, block))
    scale = xb.abs().amax(-1, keepdim=True) / 448.0
    return ((xb / scale).to(torch.float8_e4m3fn).to(F64) * scale).flatten(-2)


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=F64)


def fp4_round(x, block):
    """fp4_act_quant + dequant: per block, scale = 2^ceil(log2(amax / 6)), nearest e2m1 value (ties to the
    even code: the grid's even index)."""
    xb = x.unflatten(-1, (-1, block))
    scale = torch.exp2(torch.ceil(torch.log2(xb.abs().amax(-1, keepdim=True) / 6.0)))
    dist = ((xb / scale).abs()[..., None] - E2M1).abs()
    nearest = dist == dist.min(-1, keepdim=True).values
    code = torch.where(nearest, (torch.arange(8) % 2).to(F64), 2.0).argmin(-1)  # the e2m1 code is the index
    return (torch.copysign(E2M1[code], xb) * scale).flatten(-2)


def v4_csa(layer, x):
    """DeepSeek-V4's Attention.forward at start_pos 0 for the layer's weights -> (out, selected entries)."""
    c = layer.config
    B, T, _ = x.shape
    H, Hkv, D, m, rd, th = c.n_heads, c.n_kv_heads, c.head_dim, c.compress_ratio, layer.rope_dim, c.rope_theta
    pos = torch.arange(T)
    q = rms_norm(linear(x, layer.q_proj).view(B, T, H, D))  # q *= rsqrt(mean(q^2) + eps)
    q = rope_last(q.transpose(1, 2), pos, th, rd)  # [B, H, T, D]
    kv = rms_norm(linear(x, layer.k_proj).view(B, T, Hkv, D), layer.kv_norm.weight)
    kv = rope_last(kv.transpose(1, 2), pos, th, rd)  # [B, Hkv, T, D]: the window's K = V
    entries = v4_compressor(layer.compressor, x, th).transpose(1, 2)  # [B, Hkv, n, D]
    n = entries.shape[2]
    # the indexer: its own compressor, RoPE on the last dims of the queries, sum_h w_h relu(q_h . k)
    J, Di, rdi = c.n_index_heads, c.index_dim, c.index_rope_dims
    qi = rope_last(linear(x, layer.indexer.q).view(B, T, J, Di).transpose(1, 2), pos, th, rdi)  # [B, J, T, Di]
    ki = v4_compressor(layer.indexer.compressor, x, th)[:, :, 0]  # [B, n, Di]
    w = linear(x, layer.indexer.w) * J**-0.5 * Di**-0.5  # weights_proj(x) * softmax_scale * H^-0.5
    score = torch.einsum("bjtd,bnd->btjn", qi, ki).relu().mul(w[..., None]).sum(2)  # [B, T, n]
    visible = torch.arange(n)[None, :] < (pos[:, None] + 1) // m
    order = torch.sort(score.masked_fill(~visible, float("-inf")), dim=-1, descending=True, stable=True).indices
    chosen = torch.zeros(B, T, n, dtype=torch.bool).scatter_(-1, order[..., : c.topk], True) & visible
    # sparse_attn over the window and the chosen entries, sink in the denominator, K = V
    window = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - c.window)
    keys = torch.cat([kv, entries], 2).repeat_interleave(H // Hkv, 1)  # [B, H, T + n, D]
    allowed = torch.cat([window.expand(B, T, T), chosen], -1)[:, None]
    s = (q @ keys.transpose(-1, -2) * D**-0.5).masked_fill(~allowed, float("-inf"))
    m_ = s.amax(-1, keepdim=True)
    e = torch.exp(s - m_)
    p = e / (e.sum(-1, keepdim=True) + torch.exp(layer.attn_sink.view(1, H, 1, 1) - m_))
    o = rope_last(p @ keys, pos, th, rd, inverse=True)  # apply_rotary_emb(o[..., -rd:], freqs_cis, True)
    return linear(o.transpose(1, 2).reshape(B, T, H * D), layer.o_proj), chosen


# -- CSA ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("T", [3, 17, 24])
def test_v4_compressor_equals_the_published_equations(overlap, T):
    layer = build(CSA_TINY, overlap=overlap)
    x = torch.randn(2, T, 32, dtype=F64)
    comp = layer.compressor
    kv, score = comp.tokens(x)
    got = comp.pool(kv, score)  # [B, H, n, D]
    assert got.shape == (2, 1, T // 4, 16)
    torch.testing.assert_close(got, v4_compressor(comp, x, 10000.0).transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_v4_compressor_overlap_halves_and_ape_matter():
    """The transcription can fail: each published detail changes the entries."""
    layer = build(CSA_TINY)
    x = torch.randn(1, 16, 32, dtype=F64)
    comp = layer.compressor
    ref = comp.pool(*comp.tokens(x))
    kv, score = comp.tokens(x)
    halves_swapped = torch.cat([kv[..., 16:], kv[..., :16]], -1), torch.cat([score[..., 16:], score[..., :16]], -1)
    assert (comp.pool(*halves_swapped) - ref).abs().max() > 1e-3
    with torch.no_grad():
        comp.ape[:, 1] += 1.0  # slot 1's bias, every channel
    assert (comp.pool(kv, score) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("n_kv_heads, T", [(1, 29), (2, 21)])
def test_csa_layer_equals_v4_attention(n_kv_heads, T):
    """The whole layer with its default (V4) structure against V4's Attention.forward, and its selection
    against V4's Indexer."""
    layer = build(CSA_TINY, seed=n_kv_heads, n_kv_heads=n_kv_heads)
    x = torch.randn(2, T, 32, dtype=F64)
    want, chosen = v4_csa(layer, x)
    with torch.no_grad():
        got = layer(x)
    sel = layer.last_selection.long()[:, 0]  # [B, T, topk] entry ids
    got_chosen = torch.zeros(2, T, T // 4 + 1, dtype=torch.bool).scatter_(-1, torch.where(sel >= 0, sel, T // 4), True)
    assert torch.equal(got_chosen[..., : T // 4], chosen)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_csa_attention_sink_is_in_the_softmax():
    layer = build(CSA_TINY)
    x = torch.randn(1, 20, 32, dtype=F64)
    with torch.no_grad():
        ref = layer(x)
        layer.attn_sink.fill_(-1e4)  # a sink that takes no mass: the softmax of the keys alone
        no_sink = layer(x)
        layer.attn_sink.fill_(30.0)  # a sink that takes all of it: every output row goes to 0
        all_sink = layer(x)
    assert (ref - no_sink).abs().max() > 1e-3
    torch.testing.assert_close(all_sink, torch.zeros_like(all_sink), atol=1e-9, rtol=0)


@pytest.mark.parametrize("quant, rnd", [("fp4", fp4_round), ("fp8", fp8_round)])
def test_csa_index_keys_rotate_and_round(quant, rnd):
    layer = build(CSA_TINY, index_quant=quant)
    x = torch.randn(1, 24, 32, dtype=F64)
    want = v4_compressor(layer.indexer.compressor, x, 10000.0)[:, :, 0]
    want = rnd(want @ hadamard_matrix(8), low_precision.block_size(quant, 8))
    with torch.no_grad():
        got = layer.compressed(x, torch.arange(24), None)[2]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def legacy_csa(layer, x):
    """The earlier CSA layer (before the faithful structure), copied: scalar gate + slot bias pooling of
    per-token roped keys and of values, mean-pooled index keys, no sink, separate K/V, full RoPE."""
    c = layer.config
    B, T, _ = x.shape
    pos = torch.arange(T)
    shape = lambda t, d: t.view(B, T, -1, d).transpose(1, 2)
    q = apply_rope(shape(layer.q_proj(x), c.head_dim), pos, c.rope_theta)
    k = apply_rope(shape(layer.k_proj(x), c.head_dim), pos, c.rope_theta)
    v = shape(layer.v_proj(x), c.head_dim)
    k_tok = apply_rope(shape(layer.cmp_k(x), c.head_dim), pos, c.rope_theta)
    v_tok = shape(layer.cmp_v(x), c.head_dim)
    g_tok = layer.cmp_gate(x).transpose(1, 2)
    q_i = layer.indexer.q(x).view(B, T, 1, c.n_index_heads, c.index_dim).transpose(1, 2)
    w = (layer.indexer.w(x) * c.n_index_heads**-0.5).view(B, T, 1, c.n_index_heads).transpose(1, 2)
    ki_tok = layer.indexer.k(x)
    m = c.compress_ratio
    kc = entry_pooling.pool_windows(k_tok, g_tok, layer.cmp_slot_bias, m)
    vc = entry_pooling.pool_windows(v_tok, g_tok, layer.cmp_slot_bias, m)
    ki = entry_pooling.pool_windows(
        ki_tok[:, None], torch.zeros_like(ki_tok[:, None, :, 0]), torch.zeros_like(layer.cmp_slot_bias), m
    )[:, 0]
    ends = entry_pooling.entry_ends(ki.shape[1], m, x.device)
    sel = ops.indexer_topk(q_i, w, ki, ends, S=T, topk=c.topk, scale=1.0 / math.sqrt(c.index_dim))
    out = ops.gather_attention(
        q,
        k,
        v,
        entry_pooling.entry_ids(sel, T),
        scale=1.0 / math.sqrt(c.head_dim),
        window=c.window,
        k_extra=kc,
        v_extra=vc,
    )
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def test_csa_with_every_option_off_is_the_earlier_layer():
    layer = build(CSA_TINY, n_kv_heads=2, rope_dim=None, **CSA_OLD)
    assert layer.rope_dim == 16 and layer.v_proj is not None  # separate K/V: full RoPE by default
    assert {n for n, _ in layer.named_parameters() if n.startswith(("cmp_", "indexer."))} == {
        "cmp_k.weight",
        "cmp_v.weight",
        "cmp_gate.weight",
        "cmp_slot_bias",
        "indexer.q.weight",
        "indexer.k.weight",
        "indexer.w.weight",
    }  # the earlier parameter names: its checkpoints load
    x = torch.randn(2, 37, 32, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), legacy_csa(layer, x), rtol=0, atol=1e-13)


OPTION_SETS = [
    {},
    CSA_OLD,
    dict(shared_kv=False),
    dict(compressor="scalar_gate"),
    dict(index_compressor="mean"),
    dict(index_quant="fp4"),
    dict(overlap=False, attn_sink=False, q_norm=False),
]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "v4")
def test_csa_options_decode_equals_prefill(options):
    layer = build(CSA_TINY, n_kv_heads=2, **options)
    x = torch.randn(2, 30, 32, dtype=F64)
    cache = LayerCache(2, 32)
    with torch.no_grad():
        full = layer(x)
        steps = [layer(x[:, :9], cache=cache), layer(x[:, 9:14], cache=cache)]
        steps += [layer(x[:, t : t + 1], cache=cache) for t in range(14, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-12)


# -- DSA ----------------------------------------------------------------------------------------------
def v32_index_scores(layer, x, quant="none"):
    """DeepSeek-V3.2-Exp's Indexer.forward (the query from the hidden state) -> logits [B, T, S]."""
    c = layer.config
    B, T, _ = x.shape
    J, Di, rd, th = c.n_index_heads, c.index_dim, c.index_rope_dims, c.rope_theta
    pos = torch.arange(T)
    q = rope_first(linear(x, layer.indexer.q).view(B, T, J, Di).transpose(1, 2), pos, th, rd)  # [B, J, T, Di]
    k = linear(x, layer.indexer.k)
    ln = layer.indexer.k_norm
    k = (k - k.mean(-1, keepdim=True)) / torch.sqrt(k.var(-1, unbiased=False, keepdim=True) + EPS) * ln.weight + ln.bias
    k = rope_first(k, pos, th, rd)
    if quant == "fp8":  # rotate_activation, then act_quant (dequantised: fp8_index multiplies the scales back)
        h = hadamard_matrix(Di)
        q, k = fp8_round(q @ h, min(128, Di)), fp8_round(k @ h, min(128, Di))
    w = linear(x, layer.indexer.w) * J**-0.5 * Di**-0.5
    return torch.einsum("bjtd,bsd->btjs", q, k).relu().mul(w[..., None]).sum(2)


def index_logits(q_i, w, k_i, scale):
    return torch.einsum("bhtj,bhtjs->bhts", w, torch.einsum("bhtjd,bsd->bhtjs", q_i, k_i).relu())[:, 0] * scale


@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_dsa_index_scores_equal_v32(quant):
    layer = build(DSA_TINY, index_quant=quant)
    x = torch.randn(2, 40, 32, dtype=F64)
    want = v32_index_scores(layer, x, quant)
    with torch.no_grad():
        q_i, w, k_i = layer.index_projections(x, torch.arange(40), None)
        torch.testing.assert_close(index_logits(q_i, w, k_i, layer.index_scale), want, rtol=1e-10, atol=1e-12)
        layer(x)
    visible = torch.arange(40)[None, :] <= torch.arange(40)[:, None]
    order = torch.sort(want.masked_fill(~visible, float("-inf")), dim=-1, descending=True, stable=True).indices
    sel = layer.last_selection.long()[:, 0]
    for b in range(2):
        for t in (0, 5, 20, 39):
            assert set(sel[b, t].tolist()) - {-1} == set(order[b, t, : min(5, t + 1)].tolist())


def test_dsa_index_norm_and_partial_rope_matter():
    x = torch.randn(1, 24, 32, dtype=F64)
    weights = build(DSA_TINY).state_dict()
    scores = {}
    for name, kw in {
        "v32": {},
        "no_norm": dict(index_norm=False),
        "full_rope": dict(index_rope_dim=16),
        "no_rope": dict(index_rope=False),
    }.items():
        layer = build(DSA_TINY, **kw)
        layer.load_state_dict(weights, strict=False)  # the same weights (no_norm has no k_norm)
        with torch.no_grad():
            scores[name] = index_logits(*layer.index_projections(x, torch.arange(24), None), layer.index_scale)
    for name in ("no_norm", "full_rope", "no_rope"):
        assert (scores[name] - scores["v32"]).abs().max() > 1e-3, name


def test_dsa_with_index_options_off_is_the_earlier_indexer():
    layer = build(DSA_TINY, index_rope=False, index_norm=False)
    assert not any("k_norm" in n for n, _ in layer.named_parameters())
    x = torch.randn(2, 21, 32, dtype=F64)
    with torch.no_grad():
        q_i, w, k_i = layer.indexer(x, torch.arange(21))
        idx = layer.indexer
        torch.testing.assert_close(q_i, idx.q(x).view(2, 21, 1, 8, 16).transpose(1, 2), rtol=0, atol=0)
        torch.testing.assert_close(w, (idx.w(x) * 8**-0.5).view(2, 21, 1, 8).transpose(1, 2), rtol=0, atol=0)
        torch.testing.assert_close(k_i, idx.k(x), rtol=0, atol=0)


@pytest.mark.parametrize("options", [{}, dict(index_quant="fp8", select_per="group")])
def test_dsa_options_decode_equals_prefill(options):
    layer = build(DSA_TINY, **options)
    x = torch.randn(2, 26, 32, dtype=F64)
    cache = LayerCache(2, 26)
    with torch.no_grad():
        full = layer(x)
        steps = [layer(x[:, :11], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(11, 26)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-12)


# -- NSA ----------------------------------------------------------------------------------------------
def test_nsa_mlp_gate_is_an_mlp_with_a_sigmoid():
    cfg = dict(
        variant="nsa",
        d_model=32,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        cmp_block=8,
        cmp_stride=4,
        sel_block=8,
        sel_topk=3,
        window=8,
        compressor_hidden=16,
    )
    layer = build(cfg, gate_mlp_hidden=12).train()
    x = torch.randn(2, 20, 32, dtype=F64)
    fc1, fc2 = layer.gate_proj[0], layer.gate_proj[2]
    want = torch.sigmoid(linear(F.gelu(linear(x, fc1)), fc2)).view(2, 20, 4, 3).permute(3, 0, 2, 1)[..., None]
    torch.testing.assert_close(layer.gates(x), want, rtol=1e-12, atol=1e-12)
    layer(x).square().sum().backward()
    assert fc1.weight.grad.abs().sum() > 0 and fc2.weight.grad.abs().sum() > 0
    linear_gate = build(cfg)  # the default stays one linear map
    assert isinstance(linear_gate.gate_proj, torch.nn.Linear)
    torch.testing.assert_close(
        linear_gate.gates(x),
        torch.sigmoid(linear(x, linear_gate.gate_proj)).view(2, 20, 4, 3).permute(3, 0, 2, 1)[..., None],
    )


# -- ops: the sink, low precision, pooling ----------------------------------------------------------
def sink_inputs(dtype, seed=0, B=2, T=9, N=14, N2=3, D=16, K=4):
    """q [B, 4, T, D], k, v [B, 2, N, D], a second pool kc [B, 2, N2, D], sink [4], ids [B, 1, T, K] into
    both pools (unique per query, some -1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 4, T, D, generator=g, dtype=dtype)
    k, v = torch.randn(2, B, 2, N, D, generator=g, dtype=dtype)
    kc = torch.randn(B, 2, N2, D, generator=g, dtype=dtype)
    sink = torch.randn(4, generator=g, dtype=dtype)
    idx = torch.rand(B, 1, T, N + N2, generator=g).argsort(-1)[..., :K]
    idx = torch.where(torch.rand(idx.shape, generator=g) < 0.25, -1, idx).to(torch.int32)
    idx[0, 0, 0] = -1  # a query with no listed key (its window, if any, still holds keys)
    return q, k, v, kc, sink, idx


def test_gather_sink_reference_is_an_extra_logit():
    q, k, v, kc, sink, idx = sink_inputs(F64)
    out, lse = ops.gather_attention(q, k, v, idx, scale=0.3, sink=sink, return_lse=True, backend="reference")
    K = torch.cat([k, kc], 2).repeat_interleave(2, 1)
    V = torch.cat([v, kc], 2).repeat_interleave(2, 1)  # the second pool is K = V
    ids = idx.long().expand(2, 4, 9, 4)
    allowed = torch.zeros(2, 4, 9, 18, dtype=torch.bool).scatter_(-1, torch.where(ids >= 0, ids, 17), True)[..., :17]
    s = (q @ K.transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf"))
    s = torch.cat([s, sink.view(1, 4, 1, 1).expand(2, 4, 9, 1)], -1)  # the sink's logit, value 0
    p = torch.softmax(s, -1)
    out2 = ops.gather_attention(q, k, v, idx, scale=0.3, sink=sink, backend="reference", k_extra=kc, v_extra=kc)
    torch.testing.assert_close(out2, p[..., :17] @ V[..., :17, :], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(torch.cat([s[..., :14], s[..., 17:]], -1), -1))
    empty = torch.full_like(idx, -1)
    out, lse = ops.gather_attention(q, k, v, empty, scale=0.3, sink=sink, return_lse=True, backend="reference")
    assert out.abs().max() == 0 and torch.equal(lse, sink.view(1, 4, 1).expand(2, 4, 9))


def test_gather_sink_gradcheck():
    q, k, _, kc, sink, idx = sink_inputs(F64, seed=1, B=1, T=3, N=6, N2=2, D=4, K=2)
    leaves = [t.requires_grad_() for t in (q, k, kc, sink)]
    fn = lambda q, k, kc, s: ops.gather_attention(
        q, k, k, idx, scale=0.3, sink=s, k_extra=kc, v_extra=kc, window=2, backend="reference"
    )
    assert torch.autograd.gradcheck(fn, leaves)


def test_gather_sink_triton_matches_the_reference():
    """The Triton path (interpreter, fp32): the sink applied from the kernel's LSE, its gradient through
    the kernel's d(LSE); window, second pool and K = V aliasing together."""
    q, k, _, kc, sink, idx = sink_inputs(torch.float32, seed=2)
    grads = {}
    for backend in ("reference", "triton"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, kc, sink)]
        lq, lk, lkc, ls = leaves
        out, lse = ops.gather_attention(
            lq, lk, lk, idx, scale=0.3, sink=ls, window=4, k_extra=lkc, v_extra=lkc, return_lse=True, backend=backend
        )
        (out * torch.linspace(-1, 1, 16)).sum().add(lse.sin().sum()).backward()
        grads[backend] = [out.detach(), lse.detach()] + [t.grad for t in leaves]
        assert ops.last_implementation("gather_attention") == backend
    for name, a, b in zip(("out", "lse", "dq", "dk", "dkc", "dsink"), grads["reference"], grads["triton"]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.compile
def test_gather_sink_flex_forward_matches_the_reference():
    q, k, v, kc, sink, idx = sink_inputs(torch.float32, seed=3)
    with torch.no_grad():
        ref = ops.gather_attention(
            q, k, v, idx, scale=0.3, sink=sink, window=4, k_extra=kc, v_extra=kc, backend="reference"
        )
        got = ops.gather_attention(q, k, v, idx, scale=0.3, sink=sink, window=4, k_extra=kc, v_extra=kc, backend="flex")
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_gather_sink_is_validated():
    q, k, v, _, sink, idx = sink_inputs(torch.float32)
    with pytest.raises(ValueError, match="one logit per query head"):
        ops.gather_attention(q, k, v, idx, scale=0.3, sink=sink[:2])
    with pytest.raises(ValueError, match="returns no LSE"):  # flex takes a sink, but returns no LSE
        ops.gather_attention(q, k, v, idx, scale=0.3, sink=sink, return_lse=True, backend="flex")


def test_hadamard_and_low_precision_rounding():
    x = torch.randn(3, 5, 64, dtype=F64)
    torch.testing.assert_close(low_precision.hadamard(x), x @ hadamard_matrix(64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(low_precision.fake_quant(x, "fp8"), fp8_round(x, 64), rtol=0, atol=0)
    torch.testing.assert_close(low_precision.fake_quant(x, "fp4"), fp4_round(x, 32), rtol=0, atol=0)
    ties = torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]], dtype=F64)  # amax 6: scale 1
    torch.testing.assert_close(
        low_precision.fake_quant(ties, "fp4"), torch.tensor([[0, 1, 1, 2, 2, 4, 4, 6.0]], dtype=F64)
    )
    leaf = x.clone().requires_grad_()
    low_precision.fake_quant(leaf, "fp8").sum().backward()  # straight through the rounding
    assert torch.equal(leaf.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match="power-of-two"):
        low_precision.hadamard(torch.randn(2, 12))


@pytest.mark.parametrize("width,length", [(4, 9), (8, 12), (12, 5), (12, 13)])
def test_pool_windows_reads_each_window_slot_from_token_zero_on(width, length):
    """Entry i pools tokens (i+1)*4 - width .. (i+1)*4 - 1, those before token 0 left out of the softmax."""
    g = torch.Generator().manual_seed(width + length)
    x = torch.randn(1, 2, length, 3, generator=g, dtype=F64)
    logits = torch.randn(1, 2, length, generator=g, dtype=F64)
    bias = torch.randn(width, generator=g, dtype=F64)
    got = entry_pooling.pool_windows(x, logits, bias, 4)
    assert got.shape == (1, 2, length // 4, 3)
    for i in range(length // 4):
        first = (i + 1) * 4 - width
        toks = [t for t in range(first, (i + 1) * 4) if t >= 0]
        a = torch.softmax(logits[0, :, toks] + bias[[t - first for t in toks]], -1)
        torch.testing.assert_close(got[0, :, i], torch.einsum("hw,hwd->hd", a, x[0, :, toks]), rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="multiple of ratio"):
        entry_pooling.pool_windows(x, logits, torch.zeros(6, dtype=F64), 4)


def test_entry_pooling_fp64_oracle():
    """Logits that differ by 1e-9: an fp32 softmax rounds them together; fp64 pooling keeps them apart."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 12, 3, generator=g, dtype=F64)
    logits = 1.0 + 1e-9 * torch.randn(1, 2, 12, generator=g, dtype=F64)
    bias = 1e-9 * torch.randn(8, generator=g, dtype=F64)
    got = entry_pooling.pool_windows(x * 1e9, logits, bias, 4)
    for i in range(3):
        toks = [t for t in range((i + 1) * 4 - 8, (i + 1) * 4) if t >= 0]
        a = torch.softmax(logits[0, :, toks] + bias[[t - ((i + 1) * 4 - 8) for t in toks]], -1)
        torch.testing.assert_close(got[0, :, i], torch.einsum("hw,hwd->hd", a, x[0, :, toks] * 1e9), rtol=1e-13, atol=0)
    kv = torch.randn(1, 2, 12, 6, generator=g, dtype=F64) * 1e9
    score = 1e-9 * torch.randn(1, 2, 12, 6, generator=g, dtype=F64)
    ape = 1e-9 * torch.randn(2, 4, 6, generator=g, dtype=F64)
    got = entry_pooling.pool_channels(kv, score, ape, 4, overlap=True)
    sb = score.unflatten(2, (3, 4)) + ape[:, None]
    kb = kv.unflatten(2, (3, 4))
    for i in range(3):
        slots_k = kb[:, :, i, :, 3:] if i == 0 else torch.cat([kb[:, :, i - 1, :, :3], kb[:, :, i, :, 3:]], 2)
        slots_s = sb[:, :, i, :, 3:] if i == 0 else torch.cat([sb[:, :, i - 1, :, :3], sb[:, :, i, :, 3:]], 2)
        torch.testing.assert_close(got[:, :, i], (slots_k * slots_s.softmax(2)).sum(2), rtol=1e-13, atol=0)


# -- configs --------------------------------------------------------------------------------------------
def test_published_configs_build_at_their_published_size():
    names = published_config_names()
    assert {
        "published/csa_v4_flash",
        "published/csa_v4_pro",
        "published/dsa_v32_exp",
        "published/nsa_paper",
        "published/msa_m3",
        "published/moba_kimi",
        "published/dense_m3",
    } <= set(names)
    for name in names:
        with torch.device("meta"):
            layer = create_attention(name)
        assert name.split("/")[1].startswith(layer.variant_name)
    flash, pro = (sparsezoo.make_config(f"published/csa_v4_{n}") for n in ("flash", "pro"))
    assert (flash.d_model, flash.n_heads, flash.n_kv_heads, flash.head_dim, flash.topk, flash.window) == (
        4096,
        64,
        1,
        512,
        512,
        128,
    )
    assert (pro.d_model, pro.n_heads, pro.topk) == (7168, 128, 1024)
    assert flash.rope_dims == 64 and flash.index_rope_dims == 64 and flash.attn_sink and flash.shared_kv
    dsa = sparsezoo.make_config("published/dsa_v32_exp")
    assert (dsa.topk, dsa.n_index_heads, dsa.index_dim, dsa.index_rope_dims, dsa.index_norm) == (
        2048,
        64,
        128,
        64,
        True,
    )


@pytest.mark.parametrize(
    "config, bad, match",
    [
        (CSA_TINY, dict(rope_dim=3), "rope_dim must be even"),
        (CSA_TINY, dict(rope_dim=18), "rope_dim must be even and <= head_dim"),
        (CSA_TINY, dict(index_rope_dim=10), "index_rope_dim must be even and <= index_dim"),
        (CSA_TINY, dict(compressor="mlp"), r"choose one of \['v4', 'scalar_gate'\]"),
        (CSA_TINY, dict(index_compressor="max"), r"choose one of \['v4', 'mean'\]"),
        (CSA_TINY, dict(index_quant="int8"), r"choose one of \['none', 'fp8', 'fp4'\]"),
        (CSA_TINY, dict(index_dim=12, index_rope_dim=None, index_quant="fp4"), "power-of-two index_dim"),
        (DSA_TINY, dict(index_norm="yes"), "must be bool"),
        (DSA_TINY, dict(index_rope_dim=-2), ">= 0"),
        (DSA_TINY, dict(n_index_heads=8, index_dim=24, index_rope_dim=None, index_quant="fp8"), "power-of-two"),
    ],
)
def test_option_errors_name_the_problem(config, bad, match):
    with pytest.raises(ConfigError, match=match):
        create_attention({**config, **bad})


# -- GPU (run by the lead on an H200) ---------------------------------------------------------------------
@pytest.mark.gpu
def test_csa_default_layer_fast_path_matches_the_reference_gpu():
    """configs/csa.yaml (V4's structure) on CUDA: auto runs the Triton gather kernel, the sink applied from its
    LSE; against the reference attention on the same selections, forward and every gradient, fp32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    ref = create_attention("csa", backend="reference").cuda()
    fast = create_attention("csa").cuda()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 700, 256, device="cuda")
    outs, grads = [], []
    for layer in (ref, fast):
        with ops.track_implementations() as used:
            y = layer.train()(x)
            (y.square().mean() + layer.aux_loss).backward()
        outs.append(y)
        grads.append({n: p.grad for n, p in layer.named_parameters()})
    assert used["gather_attention"] == "triton"
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-3, atol=2e-4)
    floor = 1e-3 * max(g.abs().max() for g in grads[0].values())
    for n, g in grads[0].items():
        err = (grads[1][n] - g).abs().max() / torch.maximum(g.abs().max(), floor)
        assert err < 5e-3, (n, float(err))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["published/csa_v4_flash", "published/dsa_v32_exp"])
def test_published_layers_prefill_and_decode_on_gpu(name):
    """The published sizes in bf16: prefill then decode steps equal one prefill (CSA's head_dim 512 is
    above the Triton gather kernel's 256: `auto` records what ran instead)."""
    torch.manual_seed(0)
    layer = create_attention(name).to("cuda", torch.bfloat16).eval()
    x = torch.randn(1, 1100, layer.config.d_model, device="cuda", dtype=torch.bfloat16)
    cache = LayerCache(1, 1100)
    with torch.no_grad(), ops.track_implementations() as used:
        full = layer(x)
        steps = torch.cat(
            [layer(x[:, :1090], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(1090, 1100)], 1
        )
    print(name, used)
    assert torch.isfinite(full).all()
    torch.testing.assert_close(steps.float(), full.float(), rtol=5e-2, atol=5e-2)
