"""MiniMax-01 Lightning Attention (arXiv 2501.08313): linear attention with a fixed decay per head.

As MiniMax-01's lightning layers (its public modeling code):
- q, k, v = SiLU of their projections; no RoPE and no 1/sqrt(d) scale.
- S_t = exp(-s_h) S_{t-1} + k_t^T v_t, o_t = q_t S_t, with ALiBi-like rates that weaken with depth:
  s_h = 2^(-8 (h + 1) / H) * (1 - layer_index / (n_layers - 1 + 1e-5) + 1e-5).
- RMSNorm over the concatenated heads, then an output gate sigmoid(x W_g), then o_proj.
`layer_index` and `n_layers` place the layer in its model (the example GPT fills them in). K/V heads:
`n_kv_heads` < `n_heads` shares each K/V head by a group of query heads (MiniMax-01 itself uses
n_kv_heads = n_heads in these layers); every query head keeps its own state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import AttentionConfig, ConfigError
from ..registry import register_variant
from ._linear import LinearAttentionLayer


@dataclass
class LightningConfig(AttentionConfig):
    variant: str = "lightning"
    layer_index: int = 0  # this layer's place in the model (0-based) ...
    n_layers: int = 1  # ... of this many: the decay weakens from the first layer to the last
    norm_eps: float = 1e-6

    POSITIVE: ClassVar[tuple[str, ...]] = ("n_layers", "norm_eps")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("layer_index",)
    BACKEND_OPS: ClassVar[dict[str, tuple[str, ...]]] = {"backend": ("lightning_attention",)}

    def validate(self) -> None:
        super().validate()
        if self.layer_index >= self.n_layers:
            raise ConfigError(f"layer_index ({self.layer_index}) must be < n_layers ({self.n_layers})")

    def op_params(self, op: str) -> dict:
        return {"head_dim": self.head_dim}


def lightning_log_decay(
    n_heads: int, layer_index: int, n_layers: int, device=None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Per-head log decay -s_h [H] of MiniMax-01's lightning layers."""
    rates = 2.0 ** (-8.0 * torch.arange(1, n_heads + 1, device=device, dtype=dtype) / n_heads)
    return -rates * (1 - layer_index / (n_layers - 1 + 1e-5) + 1e-5)


@register_variant("lightning")
class LightningAttention(LinearAttentionLayer):
    config_class = LightningConfig

    def __init__(self, config: LightningConfig):
        super().__init__(config)
        c = config
        self.g_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)  # output gate
        self.norm = nn.RMSNorm(c.n_heads * c.head_dim, eps=c.norm_eps)

    def log_decay(self, like: torch.Tensor) -> torch.Tensor:
        """Built for each call (no buffer, so casting the model to bf16 cannot round the rates)."""
        c = self.config
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return lightning_log_decay(c.n_heads, c.layer_index, c.n_layers, like.device, dtype)

    def project(self, x, cache):
        B, T, _ = x.shape
        heads = lambda t, h: F.silu(t).view(B, T, h, self.head_dim).transpose(1, 2)
        q = heads(self.q_proj(x), self.n_heads)
        k = heads(self.k_proj(x), self.n_kv_heads).repeat_interleave(self.group_size, dim=1)
        v = heads(self.v_proj(x), self.n_kv_heads).repeat_interleave(self.group_size, dim=1)
        return q, k, v

    def attend(self, x, q, k, v, positions, cache):
        out, state = ops.lightning_attention(
            q,
            k,
            v,
            self.log_decay(q),
            scale=1.0,
            initial_state=self.state(cache, "linear_state"),
            output_final_state=cache is not None,
            backend=self.backend("lightning_attention", cache),
        )
        self.keep(cache, "linear_state", state)
        return out

    def output(self, x, out):
        B, H, T, D = out.shape
        return self.norm(out.transpose(1, 2).reshape(B, T, H * D)) * torch.sigmoid(self.g_proj(x))
