"""Gated DeltaNet (arXiv 2412.06464) as in Qwen3-Next's linear-attention layers (its public modeling code).

- Heads as Qwen3-Next's grouped values: `n_kv_heads` query/key heads (its linear_num_key_heads) and
  `n_heads` value heads (linear_num_value_heads), each value head with its own [D, D] state; value head
  h reads query/key head h // (n_heads / n_kv_heads). One `head_dim` for keys and values.
- q, k, v pass a causal depthwise convolution of `conv_size` taps (no bias), then SiLU; q and k are
  L2-normalised and q is scaled by 1/sqrt(head_dim). No RoPE.
- Gates per value head: beta = sigmoid(x W_b) (how strongly a token writes), decay
  g = -exp(A_log) * softplus(x W_a + dt_bias) (Mamba-2 style, with its initialisation).
- The gated delta rule (ops.gated_delta_rule), then a per-head RMSNorm (one weight shared by the heads)
  gated by SiLU(x W_z), then o_proj.
The decode cache keeps the recurrent state and the last conv_size - 1 inputs of the convolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import AttentionConfig
from ..registry import register_variant
from ._linear import LinearAttentionLayer


@dataclass
class GatedDeltaNetConfig(AttentionConfig):
    variant: str = "gdn"
    conv_size: int = 4  # taps of the short causal convolution on q, k, v
    norm_eps: float = 1e-6

    POSITIVE: ClassVar[tuple[str, ...]] = ("conv_size", "norm_eps")
    BACKEND_OPS: ClassVar[dict[str, tuple[str, ...]]] = {"backend": ("gated_delta_rule",)}

    def op_params(self, op: str) -> dict:
        return {"head_dim": self.head_dim}


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(|x|^2 + eps) over the last dim (fla's and Qwen3-Next's form), in x's dtype: CUDA autocast
    runs the sum in fp32, and q, k must keep v's dtype for the kernels."""
    return (x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


@register_variant("gdn")
class GatedDeltaNet(LinearAttentionLayer):
    config_class = GatedDeltaNetConfig
    recurrent_states = ("linear_state", "conv_state")

    def __init__(self, config: GatedDeltaNetConfig):
        super().__init__(config)
        c = config
        qk_dim, v_dim = c.n_kv_heads * c.head_dim, c.n_heads * c.head_dim
        self.q_proj = nn.Linear(c.d_model, qk_dim, bias=False)  # the base class's q_proj has n_heads heads
        self.v_proj = nn.Linear(c.d_model, v_dim, bias=False)
        self.g_proj = nn.Linear(c.d_model, v_dim, bias=False)  # output gate z
        self.b_proj = nn.Linear(c.d_model, c.n_heads, bias=False)  # beta
        self.a_proj = nn.Linear(c.d_model, c.n_heads, bias=False)  # decay input
        self.conv_channels = 2 * qk_dim + v_dim
        self.conv = nn.Conv1d(
            self.conv_channels, self.conv_channels, c.conv_size, groups=self.conv_channels, bias=False
        )
        self.A_log = nn.Parameter(torch.empty(c.n_heads).uniform_(1e-2, 16).log())
        dt = torch.exp(torch.empty(c.n_heads).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.norm_weight = nn.Parameter(torch.ones(c.head_dim))

    def project(self, x, cache):
        B, T, _ = x.shape
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1).transpose(1, 2)  # [B, C, T]
        past = self.state(cache, "conv_state")  # the conv_size - 1 inputs before these tokens
        if past is None:
            past = qkv.new_zeros(B, self.conv_channels, self.config.conv_size - 1)
        qkv = torch.cat([past.to(qkv.dtype), qkv], dim=-1)
        self.keep(cache, "conv_state", qkv[:, :, qkv.shape[-1] - (self.config.conv_size - 1) :])
        qkv = F.silu(self.conv(qkv)).transpose(1, 2)  # [B, T, C]
        qk_dim = self.n_kv_heads * self.head_dim
        heads = lambda t, h: t.reshape(B, T, h, self.head_dim).transpose(1, 2)
        q = l2_normalize(heads(qkv[..., :qk_dim], self.n_kv_heads))
        k = l2_normalize(heads(qkv[..., qk_dim : 2 * qk_dim], self.n_kv_heads))
        return q, k, heads(qkv[..., 2 * qk_dim :], self.n_heads)

    def attend(self, x, q, k, v, positions, cache):
        precise = torch.float64 if x.dtype == torch.float64 else torch.float32
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)  # [B, H, T]
        # [B, H, T] before the softplus: AOTAutograd (torch 2.13) mispredicts the strides of softplus's
        # gradient on a transposed input, and the traced backward then fails to view it
        a = (self.a_proj(x).to(precise) + self.dt_bias.to(precise)).transpose(1, 2).contiguous()
        g = -self.A_log.to(precise).exp()[:, None] * F.softplus(a)
        out, state = ops.gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            scale=self.head_dim**-0.5,
            initial_state=self.state(cache, "linear_state"),
            output_final_state=cache is not None,
            backend=self.backend("gated_delta_rule", cache),
        )
        self.keep(cache, "linear_state", state)
        return out

    def output(self, x, out):
        B, H, T, D = out.shape
        precise = torch.float64 if out.dtype == torch.float64 else torch.float32
        o = out.transpose(1, 2).to(precise)  # [B, T, H, D]
        o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + self.config.norm_eps)
        z = self.g_proj(x).view(B, T, H, D).to(precise)
        return (o.to(out.dtype) * self.norm_weight * F.silu(z).to(out.dtype)).reshape(B, T, H * D)
