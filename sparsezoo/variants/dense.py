"""Dense causal GQA attention with RoPE: the baseline and the oracle for "full budget equals dense"."""

from __future__ import annotations

from dataclasses import dataclass

from .. import ops
from ..config import AttentionConfig
from ..registry import register_variant
from .base import AttentionLayer


@dataclass
class DenseConfig(AttentionConfig):
    variant: str = "dense"



@register_variant("dense")
class DenseAttention(AttentionLayer):
    config_class = DenseConfig
    static_decode = True

    def attend(self, x, q, k, v, positions, cache):
        return ops.dense_attention(q, k, v, scale=self.scale, backend=self.config.backend_for("dense_attention"))
