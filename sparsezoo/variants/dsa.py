"""DeepSeek Sparse Attention (DSA, DeepSeek-V3.2-Exp), as docs/variants.md describes.

Lightning indexer: I[t, s] = sum_j w[t, j] * ReLU(<q_I[t, j], k_I[s]>) with H_I index heads, per-head
weights w from the hidden state and one shared index key per token (cached as "k_idx"). Each query
keeps its top-k visible tokens (token level) and attends exactly to them. `select_per` = "layer"
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
from torch import nn

from .. import ops
from ..config import AttentionConfig, ConfigError
from ..registry import register_variant
from ..rope import apply_rope
from .base import AttentionLayer, WarmupRouting


@dataclass
class DSAConfig(AttentionConfig):
    variant: str = "dsa"
    topk: int = 2048
    n_index_heads: int = 64
    index_dim: int = 128
    index_scale: float | None = None  # default 1 / sqrt(index_dim)
    index_rope: bool = False
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
    }
    POSITIVE: ClassVar[tuple[str, ...]] = ("topk", "n_index_heads", "index_dim", "index_scale", "kl_temperature")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("warmup_steps", "kl_coeff")

    def validate(self) -> None:
        super().validate()
        if self.select_per == "group" and self.n_index_heads % self.n_kv_heads:
            raise ConfigError(f"select_per 'group' splits the index heads over the KV groups: n_index_heads "
                              f"({self.n_index_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")


class LightningIndexer(nn.Module):
    """Index queries [B, Hs, T, J, D_i], weights [B, Hs, T, J] and the shared index key [B, T, D_i]."""

    def __init__(self, d_model: int, n_heads: int, dim: int, n_select_heads: int, rope: bool, theta: float):
        super().__init__()
        self.n_heads, self.dim, self.n_select_heads = n_heads, dim, n_select_heads
        self.rope, self.theta = rope, theta
        self.q = nn.Linear(d_model, n_heads * dim, bias=False)
        self.k = nn.Linear(d_model, dim, bias=False)
        self.w = nn.Linear(d_model, n_heads, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor):
        B, T, _ = x.shape
        Hs, J = self.n_select_heads, self.n_heads // self.n_select_heads
        q_i = self.q(x).view(B, T, self.n_heads, self.dim)
        k_i = self.k(x)
        if self.rope:
            q_i = apply_rope(q_i.transpose(1, 2), positions, self.theta).transpose(1, 2)
            k_i = apply_rope(k_i[:, None], positions, self.theta)[:, 0]
        q_i = q_i.view(B, T, Hs, J, self.dim).transpose(1, 2)
        w = (self.w(x) * self.n_heads ** -0.5).view(B, T, Hs, J).transpose(1, 2)
        return q_i, w, k_i


@register_variant("dsa")
class DSAAttention(WarmupRouting, AttentionLayer):
    config_class = DSAConfig

    def __init__(self, config: DSAConfig):
        super().__init__(config)
        c = config
        n_sel = 1 if c.select_per == "layer" else c.n_kv_heads
        self.indexer = LightningIndexer(c.d_model, c.n_index_heads, c.index_dim, n_sel, c.index_rope, c.rope_theta)
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

    @torch.no_grad()
    def kv_pattern(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device)
        sel = self.select(*self.index_projections(x, positions, None)).long()
        hit = torch.zeros(*sel.shape[:3], T + 1, dtype=torch.bool, device=x.device)
        hit.scatter_(-1, torch.where(sel >= 0, sel, T), True)
        return hit[..., :T].repeat_interleave(self.n_heads // sel.shape[1], dim=1)
