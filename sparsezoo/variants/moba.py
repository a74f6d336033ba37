"""Moonshot Mixture of Block Attention (MoBA), as ../shared/docs/variants.md describes.

Parameter-free: block j's score for a query head is <q, mean of block j's keys>. Each query head
keeps its top k-1 earlier blocks plus its own block (always kept, read causally), so the selection
is per query head. Attention is exact over the selected blocks of the main K/V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import ops
from ..config import AttentionConfig, ConfigError
from ..ops import moba as moba_ops
from ..registry import register_variant
from .base import AttentionLayer, selection_token_mask


@dataclass
class MoBAConfig(AttentionConfig):
    variant: str = "moba"
    block_size: int = 4096
    topk: int = 12  # blocks per query head, the current block included

    CHOICES: ClassVar[dict[str, tuple]] = {"backend": ("auto", "reference", "flex", "triton")}
    POSITIVE: ClassVar[tuple[str, ...]] = ("block_size", "topk")

    def validate(self) -> None:
        super().validate()
        if self.backend == "flex" and self.block_size % 16:
            raise ConfigError(f"backend 'flex' needs block_size to be a multiple of 16, got {self.block_size}")


@register_variant("moba")
class MoBAAttention(AttentionLayer):
    config_class = MoBAConfig

    def __init__(self, config: MoBAConfig):
        super().__init__(config)
        self.last_selection: torch.Tensor | None = None

    def select(self, q, k):
        c = self.config
        return moba_ops.moba_select(q.detach(), k.detach(), block_size=c.block_size, topk=c.topk)

    def attend(self, x, q, k, v, positions, cache):
        c = self.config
        sel = self.select(q, k)  # [B, Hq, T, topk]
        self.last_selection = sel
        # Per-head selections: give every query head its own copy of its KV head (G = 1).
        G = self.group_size
        k_h, v_h = (k, v) if G == 1 else (k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1))
        return ops.block_sparse_attention(q, k_h, v_h, sel, block_size=c.block_size, scale=self.scale,
                                          backend=c.backend)

    @torch.no_grad()
    def kv_pattern(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, _ = self.project_qkv(x, torch.arange(T, device=x.device))
        return selection_token_mask(self.select(q, k), T, self.config.block_size, self.n_heads)
