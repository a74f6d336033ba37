"""Moonshot Mixture of Block Attention (MoBA), as docs/variants.md describes.

Parameter-free: block j's score for a query head is <q, mean of block j's keys>. Each query head
keeps its top k-1 earlier blocks plus its own block (always kept, read causally), so the selection
is per query head. Attention is exact over the selected blocks of the main K/V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..cache import LayerCache
from ..config import AttentionConfig
from ..ops.common import compute_dtype, select_from_block_scores
from ..registry import register_variant
from .base import AttentionLayer, selected_blocks_visible, selection_token_mask, summary_buffer, update_entry


@dataclass
class MoBAConfig(AttentionConfig):
    variant: str = "moba"
    block_size: int = 4096
    topk: int = 12  # blocks per query head, the current block included

    select_backend: str = "auto"

    POSITIVE: ClassVar[tuple[str, ...]] = ("block_size", "topk")
    BACKEND_OPS: ClassVar[dict[str, tuple[str, ...]]] = {"backend": ("block_sparse_attention",),
                                                         "select_backend": ("moba_select",)}

    def op_params(self, op: str) -> dict:
        if op == "block_sparse_attention":  # one selection per query head
            return {"block_size": self.block_size, "group": 1, "selection_heads": self.n_heads,
                    "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim}
        return {"block_size": self.block_size, "topk": self.topk, "group": self.n_heads // self.n_kv_heads,
                "head_dim": self.head_dim}


@register_variant("moba")
class MoBAAttention(AttentionLayer):
    config_class = MoBAConfig
    static_decode = True
    static_buffers = ("k", "v")  # + "moba_means" (static_state)

    def __init__(self, config: MoBAConfig):
        super().__init__(config)
        self.last_selection: torch.Tensor | None = None

    def select(self, q, k, means=None):
        c = self.config
        return ops.moba_select(q.detach(), k.detach(), block_size=c.block_size, topk=c.topk, means=means,
                               backend=c.backend_for("moba_select"))

    def cached_means(self, k: torch.Tensor, T: int, cache) -> torch.Tensor:
        """The mean keys of every complete block, kept in the cache: each block's mean is computed once,
        when its last token arrives, so a decode step does not reread the whole K."""
        bs, (B, Hkv, S, D) = self.config.block_size, k.shape
        done, now = (S - T) // bs, S // bs
        means = cache.derived("moba_block_means")
        if means is None or means.shape[0] != B or means.shape[2] < done:
            means, done = k.new_zeros((B, Hkv, 0, D), dtype=torch.float32), 0
        means = means[:, :, :done]
        if now > done:
            new = k[:, :, done * bs:now * bs].detach().float().view(B, Hkv, now - done, bs, D).mean(3)
            means = torch.cat([means, new], dim=2)
        cache.set_derived("moba_block_means", means)
        return means

    def attend(self, x, q, k, v, positions, cache):
        c = self.config
        means = self.cached_means(k, q.shape[2], cache) if cache is not None else None
        sel = self.select(q, k, means)  # [B, Hq, T, topk]: one selection per query head
        self.last_selection = sel
        return ops.block_sparse_attention(q, k, v, sel, block_size=c.block_size, scale=self.scale,
                                          backend=c.backend_for("block_sparse_attention"))

    # -- static decode: the cached block means in a buffer of every block ------------------------------
    def static_state(self, cache: LayerCache) -> dict[str, torch.Tensor]:
        """The K/V buffers and "moba_means" fp32 [B, Hkv, ceil(max_len / block_size), D]: the prefill's
        cached means of its complete blocks, then room for the rest."""
        state = super().static_state(cache)
        B, L = state["k"].shape[0], state["k"].shape[2]
        means = summary_buffer(cache, "moba_block_means", B, -(-L // self.config.block_size))
        return {**state, "moba_means": means}

    def static_slots(self, name, n_tokens):
        return (2, n_tokens // self.config.block_size) if name == "moba_means" else super().static_slots(name, n_tokens)

    def static_visible(self, x, q, pos, cache):
        """Per query head: the cached decode's rule (`select_from_block_scores` over <q, block mean>, then
        the local block) with the means buffer; a block's mean is written in the step that completes it."""
        c = self.config
        k, means = cache.state["k"], cache.state["moba_means"]
        j = pos // c.block_size
        tokens = (j * c.block_size + torch.arange(c.block_size, device=x.device)).clamp(max=k.shape[2] - 1)
        mean = k.index_select(2, tokens).float().mean(2, keepdim=True)  # as cached_means: fp32 of the keys
        update_entry(means, j, mean, (pos + 1) % c.block_size == 0)
        B, Hq, _, D = q.shape
        dt = compute_dtype(q)
        qg = q.to(dt).view(B, self.n_kv_heads, self.group_size, D)
        scores = torch.einsum("bhgd,bhnd->bhgn", qg, means.to(dt)).reshape(B, Hq, 1, -1)
        sel = select_from_block_scores(scores, pos, c.block_size, c.topk)  # [B, Hq, 1, topk]
        visible = selected_blocks_visible(sel[:, :, 0], pos, c.block_size, k.shape[2])  # [B, Hq, max_len]
        return visible.view(B, self.n_kv_heads, self.group_size, -1)

    @torch.no_grad()
    def kv_pattern(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, _ = self.project_qkv(x, torch.arange(T, device=x.device))
        return selection_token_mask(self.select(q, k), T, self.config.block_size, self.n_heads)
