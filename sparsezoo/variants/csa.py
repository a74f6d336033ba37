"""DeepSeek-V4 compressed sparse attention (CSA), as docs/variants.md describes.

By default the layer has V4's structure (inference/model.py of DeepSeek-V4):
- Queries: per-head RMS normalisation (`q_norm`), RoPE on their last `rope_dim` dims.
- Raw tokens: one shared K = V entry per token and KV head (`shared_kv`; V4 is MQA, n_kv_heads 1):
  RMSNorm(W_kv x) with RoPE on its last `rope_dim` dims. Values carry those rotated dims, so the output
  is rotated back to the query's position (inverse RoPE on the same dims).
- Compression (`compressor: v4`): every m = compress_ratio tokens become one entry (_layers.Compressor):
  per-token values and gate scores, a softmax per channel over the entry's slots of scores plus a learned
  per-slot, per-channel bias (`ape`); with `overlap` the entry also pools the previous block through the
  first half of the per-token channels, its own block through the second. RMSNorm, then RoPE at the
  entry's position i * m (token indices, as every op's layout) on the last `rope_dim` dims. The entry is
  the shared K = V.
- Selection: a lightning indexer with its own compressor (`index_compressor: v4`, the same structure at
  index_dim, RoPE on its last `index_rope_dim` dims, like the index queries) scores the visible entries
  (last token at or before the query) and keeps the top-k; one selection per query for the whole layer.
  `index_quant` simulates the production indexer's Hadamard rotation + low-precision rounding.
- Attention: one softmax over the selected entries, the last `window` raw tokens and a learned
  per-head sink logit with a zero value (`attn_sink`).
RoPE pairs dims rotate-half style (the library's convention); V4 pairs adjacent dims, the same map up to
a fixed permutation of the rotated dims, which the projections absorb.

Each option also offers the simpler design this layer had before (all of them off: the earlier layer):
attn_sink false (no sink), shared_kv false (separate K and V, full RoPE: rope_dim defaults to head_dim),
q_norm false, compressor "scalar_gate" (one gate logit per token and KV head plus a per-slot bias,
shared by the channels; K and V pooled separately after RoPE per token), index_compressor "mean"
(mean-pooled per-token index keys) and index_rope false.
Per-token compressor inputs and index inputs are cached, and with them the compressed entries: each is
pooled once, in the call that brings its last token, from the cached inputs (the same ops on the same
tokens as one prefill, so prefill, chunked prefill and decode agree); a forward that needs gradients
pools them all again. aux_loss: the indexer KL when `index_kl` (default on; KL
from the main attention over the selected entries to the indexer, as DSA's sparse phase).
A layer converted from a transformers model keeps the model's K and V (docs/transformers.md), whose
values carry no RoPE: convert with shared_kv false there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import ops
from ..cache import LayerCache
from ..config import AttentionConfig, ConfigError
from ..ops import entry_pooling, low_precision
from ..ops.dispatch import needs_grad
from ..ops.gather_attention.reference import gather_attention_reference
from ..registry import register_variant
from ..rope import apply_rope_part
from ._layers import (Compressor, LightningIndexer, RMSNorm, check_index_options, half_rope_dims, rms_normalize,
                      round_index, static_indexer_topk)
from .base import AttentionLayer, StaticCache, summary_buffer, update_entry


@dataclass
class CSAConfig(AttentionConfig):
    variant: str = "csa"
    compress_ratio: int = 4  # m
    overlap: bool = True  # each entry pools 2m tokens
    topk: int = 512  # compressed entries per query
    window: int = 128  # raw tokens
    n_index_heads: int = 64
    index_dim: int = 128
    index_scale: float | None = None  # default 1 / sqrt(index_dim)
    index_kl: bool = True  # train the indexer by KL (aux_loss); off: it never learns and aux_loss is None
    kl_coeff: float = 1.0
    kl_temperature: float = 1.0
    detach_index_input: bool = True
    select_backend: str = "auto"
    # V4's structure; each switch restores the earlier, simpler design (module docstring)
    attn_sink: bool = True  # a learned per-head sink logit in the softmax
    shared_kv: bool = True  # one K = V entry per token / compressed entry (MQA in V4)
    rope_dim: int | None = None  # RoPE on the last rope_dim dims of q/k; None: head_dim // 8 with shared_kv
    q_norm: bool = True  # per-head RMS normalisation of the queries
    compressor: str = "v4"  # "v4" | "scalar_gate"
    index_compressor: str = "v4"  # "v4" (the indexer's own compressor) | "mean" (mean-pooled index keys)
    index_rope: bool = True  # RoPE on index_rope_dim dims of the index queries and keys
    index_rope_dim: int | None = None  # None: half of index_dim (V4: 64 of 128)
    index_quant: str = "none"  # "fp4" (V4's production indexer) | "fp8": Hadamard + rounding, simulated

    BACKEND_OPS: ClassVar[dict[str, tuple[str, ...]]] = {"backend": ("gather_attention", "index_kl"),
                                                         "select_backend": ("indexer_topk",)}
    CHOICES: ClassVar[dict[str, tuple]] = {
        "compressor": ("v4", "scalar_gate"),
        "index_compressor": ("v4", "mean"),
        "index_quant": ("none", *low_precision.FORMATS),
    }
    POSITIVE: ClassVar[tuple[str, ...]] = ("compress_ratio", "topk", "window", "n_index_heads", "index_dim",
                                           "index_scale", "kl_temperature")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("kl_coeff", "rope_dim", "index_rope_dim")

    def validate(self) -> None:
        super().validate()
        if self.rope_dim is not None and (self.rope_dim % 2 or self.rope_dim > self.head_dim):
            raise ConfigError(f"CSAConfig.rope_dim must be even and <= head_dim ({self.head_dim}), got {self.rope_dim}")
        check_index_options(self)

    @property
    def rope_dims(self) -> int:
        """The q/k dims RoPE rotates: rope_dim, else head_dim // 8 with shared_kv (V4: 64 of 512), else all."""
        if self.rope_dim is not None:
            return self.rope_dim
        return min(self.head_dim, max(2, self.head_dim // 16 * 2)) if self.shared_kv else self.head_dim

    @property
    def index_rope_dims(self) -> int:
        if not self.index_rope:
            return 0
        return half_rope_dims(self.index_dim) if self.index_rope_dim is None else self.index_rope_dim


def cached_entries(cache, name: str, pool, tokens: tuple[torch.Tensor, ...], T: int, ratio: int, context: int,
                   params) -> torch.Tensor:
    """Compressed entries [B, H, S // ratio, D] of per-token tensors `tokens` ([B, H, S, ...], S tokens, the
    last T new). `pool(*tokens, first)` pools tokens from first * ratio on into entries first, first + 1, ...;
    entry j pools its own block and the `context` blocks before it (tokens [(j - context) * ratio, (j + 1) *
    ratio), none before token 0).

    With a cache and no gradients the entries are kept in it (derived `name`): entry j is pooled once, in
    the call that brings its last token, from the same tokens through the same ops as pooling them all (a
    matmul over fewer rows may round differently, about an ulp); nothing usable held (a new sequence, a
    reshaped cache, a context-parallel prefix): all are pooled. A forward that needs gradients pools every
    entry, for autograd, and keeps them detached. In decode_static (a StaticCache): `static_entries`."""
    if isinstance(cache, StaticCache):
        return static_entries(cache, name, pool, tokens, ratio, context)
    if cache is None or needs_grad(*tokens, *params):
        out = pool(*tokens, 0)
        if cache is not None:  # a later no-grad step continues from these
            cache.set_derived(name, out.detach())
        return out
    ref, S = tokens[0], tokens[0].shape[2]
    done, now = (S - T) // ratio, S // ratio
    held = cache.derived(name)
    if held is None or held.shape[:2] != ref.shape[:2] or held.shape[2] < done or held.dtype != ref.dtype \
            or held.device != ref.device:
        done = 0  # start over
    if now > done:  # the entries whose last token arrived in this call, from their first token's block on
        first = max(0, done - context)
        new = pool(*(t[:, :, first * ratio:now * ratio] for t in tokens), first)[:, :, done - first:]
        out = new if done == 0 else torch.cat([held[:, :, :done], new], dim=2)
    elif done == 0:
        out = pool(*tokens, 0)  # no complete entry yet: empty
    else:
        out = held[:, :, :done]
    cache.set_derived(name, out)
    return out


def static_entries(cache: StaticCache, name: str, pool, tokens: tuple[torch.Tensor, ...], ratio: int,
                   context: int) -> torch.Tensor:
    """cached_entries' twin in decode_static: `tokens` are whole buffers [B, H, max_len, ...] and the entries live
    in the buffer `name` [B, H, max_len // ratio, D] (returned, every slot). The entry whose last token is at
    cache.pos, if one is, is pooled as cached_entries pools it (from its own block and the `context` blocks
    before it, none before token 0) and written there; in the other steps the entry pooled (from slots past
    pos) is dropped."""
    entries, pos = cache.state[name], cache.pos
    n = entries.shape[2]
    if n:
        blocks = min(context + 1, n)  # pooled together: the entry's own block and those before it
        j = (pos // ratio).clamp(max=n - 1)
        first = (j - context).clamp(min=0, max=n - blocks)
        ids = first * ratio + torch.arange(blocks * ratio, device=pos.device)
        pooled = pool(*(t.index_select(2, ids) for t in tokens), first)  # entries first .. first + blocks - 1
        update_entry(entries, j, pooled.index_select(2, j - first), (pos + 1) % ratio == 0)
    return entries


@register_variant("csa")
class CSAAttention(AttentionLayer):
    config_class = CSAConfig
    static_decode = True

    def __init__(self, config: CSAConfig):
        super().__init__(config)
        c = config
        D, Hkv, m = c.head_dim, c.n_kv_heads, c.compress_ratio
        self.rope_dim = c.rope_dims
        if c.shared_kv:  # k_proj makes the shared K = V entry; there is no separate value projection
            self.v_proj = None
            self.kv_norm = RMSNorm(D)
        self.attn_sink = nn.Parameter(torch.zeros(c.n_heads)) if c.attn_sink else None
        if c.compressor == "v4":  # `compressor` makes the keys (or the shared K = V), `compressor_v` the values
            make = lambda rope, norm: Compressor(c.d_model, Hkv, D, m, c.overlap, rope_dim=rope, theta=c.rope_theta,
                                                 norm=norm)
            self.compressor = make(self.rope_dim, True)
            self.compressor_v = None if c.shared_kv else make(0, False)
        else:  # one gate logit per token and KV head, a bias per window slot
            self.cmp_k = nn.Linear(c.d_model, Hkv * D, bias=False)  # the keys, or the shared K = V
            self.cmp_v = None if c.shared_kv else nn.Linear(c.d_model, Hkv * D, bias=False)
            self.cmp_gate = nn.Linear(c.d_model, Hkv, bias=False)
            self.cmp_slot_bias = nn.Parameter(torch.zeros(2 * m if c.overlap else m))
        # the indexer: index queries and weights, and its own compressor (v4) or per-token keys (mean)
        v4_index = c.index_compressor == "v4"
        self.indexer = LightningIndexer(c.d_model, c.n_index_heads, c.index_dim, 1, c.rope_theta,
                                        rope_dim=c.index_rope_dims, rope_last=True, key=not v4_index,
                                        quant=c.index_quant)
        if v4_index:
            self.indexer.compressor = Compressor(c.d_model, 1, c.index_dim, m, c.overlap, rope_dim=c.index_rope_dims,
                                                 theta=c.rope_theta)
        self.index_scale = c.index_scale or 1.0 / math.sqrt(c.index_dim)
        self.last_selection: torch.Tensor | None = None

    # -- raw tokens ---------------------------------------------------------------------------------
    def project_qkv(self, x: torch.Tensor, positions: torch.Tensor):
        c = self.config
        B, T, _ = x.shape
        shape = lambda t, h: t.view(B, T, h, self.head_dim).transpose(1, 2)
        rope = lambda t: apply_rope_part(t, positions, c.rope_theta, self.rope_dim)
        q = shape(self.q_proj(x), self.n_heads)
        q = rope(rms_normalize(q) if c.q_norm else q)
        if c.shared_kv:
            kv = rope(self.kv_norm(shape(self.k_proj(x), self.n_kv_heads)))
            return q, kv, kv
        return q, rope(shape(self.k_proj(x), self.n_kv_heads)), shape(self.v_proj(x), self.n_kv_heads)

    def cache_kv(self, cache, k: torch.Tensor, v: torch.Tensor):
        if not self.config.shared_kv:
            return super().cache_kv(cache, k, v)
        kv = cache.append("k", k, seq_dim=2)  # K = V: one buffer
        return kv, kv

    # -- compressed entries and the indexer ---------------------------------------------------------
    def compressed(self, x, positions, cache):
        """Compressed keys/values [B, Hkv, Sc, D] (one tensor twice with shared_kv), index keys
        [B, Sc, D_i], index queries and weights. With a cache, the per-token inputs of every pooling are
        kept there and the entries too (cached_entries)."""
        c = self.config
        T = x.shape[1]
        if c.compressor == "v4":
            kc = self.v4_entries(self.compressor, "cmp", x, cache)
            vc = kc if self.compressor_v is None else self.v4_entries(self.compressor_v, "cmp_v", x, cache)
        else:
            kc, vc = self.scalar_gate_entries(x, positions, cache)
        xi = x.detach() if c.detach_index_input else x
        q_i, w, ki_tok = self.indexer(xi, positions)
        if c.index_compressor == "v4":
            ki = self.v4_entries(self.indexer.compressor, "idx", xi, cache, quant=c.index_quant)[:, 0]
        else:  # mean pooling of the per-token index keys (rounded per token by the indexer)
            if cache is not None:
                ki_tok = cache.append("k_idx", ki_tok, seq_dim=1)
            mean = lambda k, first: entry_pooling.pool_windows(k, k.new_zeros(k.shape[:3]),
                                                              k.new_zeros(self.pool_width), c.compress_ratio)
            ki = cached_entries(cache, "csa_idx", mean, (ki_tok[:, None],), T, c.compress_ratio, self.context_blocks,
                                ())[:, 0]
        return kc, vc, ki, q_i, w

    def v4_entries(self, compressor: Compressor, name: str, x, cache, quant: str = "none"):
        """A V4 compressor's entries [B, H, S // m, dim] (through the index rounding `quant`); with a cache,
        its per-token inputs are kept there (`name`_kv, `name`_score) and its entries as `csa_<name>`."""
        kv, score = compressor.tokens(x)
        if cache is not None:
            kv = cache.append(f"{name}_kv", kv, seq_dim=2)
            score = cache.append(f"{name}_score", score, seq_dim=2)
        pool = lambda kv, score, first: round_index(compressor.pool(kv, score, first), quant)
        return cached_entries(cache, f"csa_{name}", pool, (kv, score), x.shape[1], self.config.compress_ratio,
                              self.context_blocks, list(compressor.parameters()))

    def scalar_gate_entries(self, x, positions, cache):
        """The simpler compressor: per-token keys (RoPE per token on the last rope_dim dims) and values,
        pooled by a softmax over the window's slots of one gate logit per token and KV head plus a per-slot
        bias, the same weights for every channel (entry_pooling.pool_windows)."""
        c = self.config
        B, T, _ = x.shape
        shape = lambda t: t.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        k_tok = apply_rope_part(shape(self.cmp_k(x)), positions, c.rope_theta, self.rope_dim)
        g_tok = self.cmp_gate(x).transpose(1, 2)  # [B, Hkv, T]
        v_tok = None if self.cmp_v is None else shape(self.cmp_v(x))
        if cache is not None:
            k_tok = cache.append("cmp_kv" if v_tok is None else "cmp_k", k_tok, seq_dim=2)
            g_tok = cache.append("cmp_gate", g_tok, seq_dim=2)
            v_tok = None if v_tok is None else cache.append("cmp_v", v_tok, seq_dim=2)
        m, bias = c.compress_ratio, self.cmp_slot_bias
        pool = lambda t, g, first: entry_pooling.pool_windows(t, g, bias, m)
        entries = lambda name, t: cached_entries(cache, name, pool, (t, g_tok), T, m, self.context_blocks, [bias])
        kc = entries("csa_cmp", k_tok)
        return kc, kc if v_tok is None else entries("csa_cmp_v", v_tok)

    @property
    def pool_width(self) -> int:
        """Tokens each entry pools: 2m with overlap, else m."""
        return (2 if self.config.overlap else 1) * self.config.compress_ratio

    @property
    def context_blocks(self) -> int:
        """Blocks before its own that an entry pools: 1 with overlap, else 0."""
        return 1 if self.config.overlap else 0

    def select(self, q_i, w, ki, S: int):
        ends = entry_pooling.entry_ends(ki.shape[1], self.config.compress_ratio, ki.device)
        return ops.indexer_topk(q_i.detach(), w.detach(), ki.detach(), ends, S=S, topk=self.config.topk,
                                scale=self.index_scale, backend=self.config.backend_for("indexer_topk"))

    # -- attention ----------------------------------------------------------------------------------
    def attend(self, x, q, k, v, positions, cache):
        c = self.config
        S = k.shape[2]
        kc, vc, ki, q_i, w = self.compressed(x, positions, cache)
        sel = self.select(q_i, w, ki, S)  # [B, 1, T, topk] entry ids
        self.last_selection = sel
        out = ops.gather_attention(q, k, v, sel, scale=self.scale, window=c.window, extra_ids=True,
                                   backend=c.backend_for("gather_attention"), k_extra=kc, v_extra=vc,
                                   sink=self.attn_sink)
        if c.shared_kv:  # the values' rotated dims: back to the query's own position
            out = apply_rope_part(out, positions, c.rope_theta, self.rope_dim, inverse=True)
        if c.index_kl and self.training and torch.is_grad_enabled() and kc.shape[2] == 0:
            self.aux_loss = q_i.new_zeros(())  # T < compress_ratio: no entry to select, the KL is empty
        elif c.index_kl and self.training and torch.is_grad_enabled():
            ends = entry_pooling.entry_ends(kc.shape[2], c.compress_ratio, k.device)
            self.aux_loss = ops.index_kl(q, kc, q_i, w, ki, ends, sel, S=S, scale=self.scale,
                                         index_scale=self.index_scale, coeff=c.kl_coeff,
                                         temperature=c.kl_temperature, backend=c.backend_for("index_kl"))
        return out

    # -- static decode: per-token inputs and entries in whole buffers ---------------------------------
    @property
    def static_buffers(self) -> tuple[str, ...]:
        """The cache buffers of this layer's options: raw K (= V) or K and V, the compressor's per-token
        inputs, the indexer's (+ the entry buffers, static_state)."""
        c = self.config
        names = ["k"] if c.shared_kv else ["k", "v"]
        if c.compressor == "v4":
            names += ["cmp_kv", "cmp_score"] + ([] if c.shared_kv else ["cmp_v_kv", "cmp_v_score"])
        else:
            names += ["cmp_kv", "cmp_gate"] if c.shared_kv else ["cmp_k", "cmp_gate", "cmp_v"]
        return (*names, *(["idx_kv", "idx_score"] if c.index_compressor == "v4" else ["k_idx"]))

    @property
    def entry_names(self) -> tuple[str, ...]:
        """The cached entries: compressed keys (or K = V), values, index keys."""
        return ("csa_cmp", "csa_idx") if self.config.shared_kv else ("csa_cmp", "csa_cmp_v", "csa_idx")

    def static_state(self, cache: LayerCache) -> dict[str, torch.Tensor]:
        """The token buffers, and each kind of entry [B, H, max_len // compress_ratio, D]: the prefill's
        cached entries, then room for the rest."""
        state = super().static_state(cache)
        B, L = state["k"].shape[0], state["k"].shape[2]
        for name in self.entry_names:
            state[name] = summary_buffer(cache, name, B, L // self.config.compress_ratio)
        return state

    def static_slots(self, name, n_tokens):
        if name in self.entry_names:
            return 2, n_tokens // self.config.compress_ratio
        return super().static_slots(name, n_tokens)

    def attend_static(self, x, q, k, v, pos, cache):
        """The cached decode over whole buffers: the entries as compressed() keeps them (static_entries), the
        reference indexer over the entries that end by pos, and the reference gather attention over the
        window's raw tokens and the selected entries, with the sink."""
        c = self.config
        B, L = q.shape[0], k.shape[2]
        kc, vc, ki, q_i, w = self.compressed(x, pos, cache)
        ends = entry_pooling.entry_ends(ki.shape[1], c.compress_ratio, x.device)
        sel = static_indexer_topk(q_i, w, ki, ends, pos, L, c.topk, self.index_scale)  # [B, 1, 1, topk]
        window = pos - c.window + 1 + torch.arange(c.window, device=x.device)  # the window's ids, as window_ids
        window = torch.where(window >= 0, window, -1).to(torch.int32).expand(B, 1, 1, c.window)
        ids = torch.cat([window, entry_pooling.entry_ids(sel, L)], dim=-1)
        out = gather_attention_reference(q, k, v, ids, self.scale, k_extra=kc, v_extra=vc, sink=self.attn_sink)
        if c.shared_kv:
            out = apply_rope_part(out, pos, c.rope_theta, self.rope_dim, inverse=True)
        return out

    @torch.no_grad()
    def kv_pattern(self, x: torch.Tensor) -> torch.Tensor:
        """Raw tokens each query reads: its window, plus the tokens pooled into its selected entries."""
        c = self.config
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device)
        kc, vc, ki, q_i, w = self.compressed(x, positions, None)
        sel = self.select(q_i, w, ki, T).long()  # [B, 1, T, k]
        s = torch.arange(T, device=x.device)
        first = (sel + 1) * c.compress_ratio - self.pool_width  # pooled tokens [first, (i+1)m)
        last = (sel + 1) * c.compress_ratio - 1
        inside = (s >= first[..., None]) & (s <= last[..., None]) & (sel[..., None] >= 0)
        hit = inside.any(-2)
        window = (s[None, :] <= s[:, None]) & (s[None, :] > s[:, None] - c.window)
        return (hit | window).expand(B, self.n_heads, T, T)
