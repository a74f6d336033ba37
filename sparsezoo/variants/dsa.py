"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2-Exp), as docs/variants.md describes.

Lightning indexer: I[t, s] = sum_j w[t, j] * ReLU(<q_I[t, j], k_I[s]>) with H_I index heads, per-head
weights w from the hidden state and one shared index key per token (cached as "k_idx"). As published,
the index key is LayerNorm(W_k x) (`index_norm`), RoPE covers the first `index_rope_dim` dims of the index
queries and key (`index_rope`; rotate-half pairs, as V3.2's indexer), and in production both are rotated
by a Hadamard transform and rounded through fp8 (`index_quant: fp8`, simulated by rounding here). Each
query keeps its top-k visible tokens (token level) and attends exactly to them. `select_per` = "layer"
shares one selection across all heads; "group" gives each KV group its own (the H_I index heads are
split evenly over the groups).
Training (aux_loss, like MSA's): routing "dense" = warm-up, dense attention and KL from the
head-summed, L1-normalised main attention to the indexer over all visible tokens; routing "sparse" =
sparse attention and the same KL over the selected tokens only. The indexer input is detached by
default, so the KL trains only the indexer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..config import AttentionConfig, ConfigError
from ..ops import low_precision
from ..registry import register_variant
from ..ops.gather_attention.reference import gather_attention_reference
from ._layers import LightningIndexer, check_index_options, half_rope_dims, static_indexer_topk
from .base import AttentionLayer, WarmupRouting


@dataclass
class DSAConfig(AttentionConfig):
    variant: str = "dsa"
    topk: int = 2048
    n_index_heads: int = 64
    index_dim: int = 128
    index_scale: float | None = None  # default 1 / sqrt(index_dim)
    index_rope: bool = True  # RoPE on index_rope_dim dims of the index queries and key (false: no position)
    index_rope_dim: int | None = None  # with index_rope; None: half of index_dim (V3.2: 64 of 128); index_dim: all
    index_norm: bool = True  # LayerNorm on the index key (V3.2); false: the raw projection
    index_quant: str = "none"  # "fp8": Hadamard rotation + fp8 rounding of index q/k (V3.2's production path)
    select_per: str = "layer"  # "layer" | "group"
    routing: str = "sparse"  # "dense" = warm-up: dense attention, indexer trains by KL
    warmup_steps: int = 0  # trainer switches routing to "sparse" after this many steps
    kl_coeff: float = 1.0
    kl_temperature: float = 1.0
    detach_index_input: bool = True
    select_backend: str = "auto"

    BACKEND_OPS: ClassVar[dict[str, tuple[str, ...]]] = {"backend": ("gather_attention", "index_kl"),
                                                         "select_backend": ("indexer_topk",)}
    CHOICES: ClassVar[dict[str, tuple]] = {
        "select_per": ("layer", "group"),
        "routing": ("sparse", "dense"),
        "index_quant": ("none", *low_precision.FORMATS),
    }
    POSITIVE: ClassVar[tuple[str, ...]] = ("topk", "n_index_heads", "index_dim", "index_scale", "kl_temperature")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("warmup_steps", "kl_coeff", "index_rope_dim")

    def validate(self) -> None:
        super().validate()
        if self.select_per == "group" and self.n_index_heads % self.n_kv_heads:
            raise ConfigError(f"select_per 'group' splits the index heads over the KV groups: n_index_heads "
                              f"({self.n_index_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        check_index_options(self)

    @property
    def index_rope_dims(self) -> int:
        """The index dims RoPE rotates (0 without index_rope)."""
        if not self.index_rope:
            return 0
        return half_rope_dims(self.index_dim) if self.index_rope_dim is None else self.index_rope_dim


@register_variant("dsa")
class DSAAttention(WarmupRouting, AttentionLayer):
    config_class = DSAConfig
    static_decode = True
    static_buffers = ("k", "v", "k_idx")

    def __init__(self, config: DSAConfig):
        super().__init__(config)
        c = config
        n_sel = 1 if c.select_per == "layer" else c.n_kv_heads
        self.indexer = LightningIndexer(c.d_model, c.n_index_heads, c.index_dim, n_sel, c.rope_theta,
                                        rope_dim=c.index_rope_dims, key_norm=c.index_norm, quant=c.index_quant)
        self.index_scale = c.index_scale or 1.0 / math.sqrt(c.index_dim)
        self.routing = c.routing
        self.last_selection: torch.Tensor | None = None

    def index_projections(self, x, positions, cache):
        xi = x.detach() if self.config.detach_index_input else x
        q_i, w, k_i = self.indexer(xi, positions)
        if cache is not None:
            k_i = cache.append("k_idx", k_i, seq_dim=1)
        return q_i, w, k_i

    def select(self, q_i, w, k_i):
        S = k_i.shape[1]
        return ops.indexer_topk(q_i.detach(), w.detach(), k_i.detach(), torch.arange(S, device=k_i.device),
                                S=S, topk=self.config.topk, scale=self.index_scale,
                                backend=self.config.backend_for("indexer_topk"))

    def attend(self, x, q, k, v, positions, cache):
        c = self.config
        S = k.shape[2]
        q_i, w, k_i = self.index_projections(x, positions, cache)
        sel = self.select(q_i, w, k_i)
        self.last_selection = sel
        if self.routing == "dense":
            out = ops.dense_attention(q, k, v, scale=self.scale)
        else:
            out = ops.gather_attention(q, k, v, sel, scale=self.scale, backend=c.backend_for("gather_attention"))
        if self.training and torch.is_grad_enabled():
            self.aux_loss = ops.index_kl(
                q, k, q_i, w, k_i, torch.arange(S, device=k.device), None if self.routing == "dense" else sel,
                S=S, scale=self.scale, index_scale=self.index_scale, coeff=c.kl_coeff, temperature=c.kl_temperature,
                backend=c.backend_for("index_kl"))
        return out

    # -- static decode: the reference indexer over the whole index-key buffer -------------------------
    def attend_static(self, x, q, k, v, pos, cache):
        """The cached decode's selection over the whole buffers: the reference indexer scores every slot,
        those past pos rank nowhere, and the token attends to its top-k through the reference gather
        attention (which reads only them). Dense routing: causal. The index key is written at pos either way."""
        q_i, w, k_i = self.index_projections(x, pos, cache)  # k_i: the whole buffer [B, max_len, D_i]
        if self.routing == "dense":
            return super().attend_static(x, q, k, v, pos, cache)
        L = k_i.shape[1]
        sel = static_indexer_topk(q_i, w, k_i, torch.arange(L, device=x.device), pos, L, self.config.topk,
                                  self.index_scale)
        return gather_attention_reference(q, k, v, sel, self.scale)

    @torch.no_grad()
    def kv_pattern(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device)
        sel = self.select(*self.index_projections(x, positions, None)).long()
        hit = torch.zeros(*sel.shape[:3], T + 1, dtype=torch.bool, device=x.device)
        hit.scatter_(-1, torch.where(sel >= 0, sel, T), True)
        return hit[..., :T].repeat_interleave(self.n_heads // sel.shape[1], dim=1)
