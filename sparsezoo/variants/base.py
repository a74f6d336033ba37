"""The module contract every variant follows.

    layer = sparsezoo.create_attention(config)
    y = layer(x, positions=None, cache=None)      # x, y: [B, T, d_model]
    layer.aux_loss                                # auxiliary loss of the last training forward, or None

- An empty batch (B = 0) gives an empty output [0, T, d_model]; T = 0 raises a ValueError.
- `positions` ([T] or [B, T]) feed RoPE; by default they continue from the cache's position.
- `cache` is what `layer.make_cache(batch, max_len, device)` returns (a `sparsezoo.LayerCache`, or
  for MSA on a GPU a paged cache that decodes with the Triton kernels); with it the same module
  serves prefill, chunked prefill and decode: the T new tokens are the last T of S = pos + T tokens.
- `aux_loss` is set by every variant (None when it has none), so trainers collect it the same way
  for all: `sparsezoo.aux_loss(model)`.
- `kv_pattern(x)` returns the boolean [B, Hq, T, S] map of which keys each query reads (small inputs
  only: it is O(T x S)), used for pictures and KV-fraction reports.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..cache import LayerCache
from ..config import AttentionConfig
from ..rope import apply_rope


class AttentionLayer(nn.Module):
    config_class = AttentionConfig
    variant_name = "base"

    def __init__(self, config: AttentionConfig):
        super().__init__()
        self.config = config
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.group_size = c.n_heads // c.n_kv_heads
        self.scale = 1.0 / math.sqrt(c.head_dim)
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)
        self.aux_loss: torch.Tensor | None = None

    # -- the contract -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"{self.variant_name}: x must be [B, T, d_model={self.config.d_model}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        if T == 0:
            raise ValueError(f"{self.variant_name}: x must hold at least one token (T >= 1), got {tuple(x.shape)}")
        if B == 0:  # an empty batch: an empty output, the cache untouched
            self.aux_loss = None
            return self.o_proj(x.new_zeros(0, T, self.n_heads * self.head_dim))
        start = cache.pos if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=x.device)
        q, k, v = self.project_qkv(x, positions)
        if cache is not None:
            k, v = self.cache_kv(cache, k, v)
        self.aux_loss = None
        out = self.attend(x, q, k, v, positions, cache)
        if cache is not None:
            cache.advance(T)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, x, q, k, v, positions, cache) -> torch.Tensor:
        """q [B, Hq, T, D], k/v [B, Hkv, S, D] (cache included) -> [B, Hq, T, D]."""
        raise NotImplementedError

    # -- caches -------------------------------------------------------------------------------
    def make_cache(self, max_batch_size: int, max_seq_len: int, device: torch.device | str | None = None):
        """The decode cache this layer wants (a contiguous LayerCache unless a variant says otherwise)."""
        return LayerCache(max_batch_size, max_seq_len)

    def cache_kv(self, cache, k: torch.Tensor, v: torch.Tensor):
        """Add the new tokens' K/V to the cache; return the K/V the attention reads (cache included)."""
        return cache.append("k", k, seq_dim=2), cache.append("v", v, seq_dim=2)

    # -- shared pieces ------------------------------------------------------------------------
    def project_qkv(self, x: torch.Tensor, positions: torch.Tensor):
        B, T, _ = x.shape
        shape = lambda t, h: t.view(B, T, h, self.head_dim).transpose(1, 2)
        q = shape(self.q_proj(x), self.n_heads)
        k = shape(self.k_proj(x), self.n_kv_heads)
        v = shape(self.v_proj(x), self.n_kv_heads)
        theta = self.config.rope_theta
        return apply_rope(q, positions, theta), apply_rope(k, positions, theta), v

    def kv_pattern(self, x: torch.Tensor) -> torch.Tensor:
        """Causal by default: query t reads keys 0..t."""
        B, T, _ = x.shape
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        return causal.expand(B, self.n_heads, T, T)


class WarmupRouting:
    """Dense warm-up, then sparse routing: for variants whose index branch trains by KL (MSA, DSA)."""

    routing: str = "sparse"

    def set_routing(self, routing: str) -> None:
        """"dense" (warm-up: dense attention, the index branch still trains) or "sparse"."""
        if routing not in ("dense", "sparse"):
            raise ValueError(f"routing must be 'dense' or 'sparse', got {routing!r}")
        self.routing = routing


def selection_token_mask(block_idx: torch.Tensor, S: int, block_size: int, n_heads: int) -> torch.Tensor:
    """int32 [B, Hsel, T, k] selections -> bool [B, n_heads, T, S] causal token map (small inputs)."""
    B, Hs, T, _ = block_idx.shape
    blocks = torch.arange(S, device=block_idx.device) // block_size
    hit = (block_idx.long()[..., None] == blocks).any(-2)
    pos = torch.arange(S - T, S, device=block_idx.device)
    hit &= torch.arange(S, device=block_idx.device)[None, :] <= pos[:, None]
    return hit.repeat_interleave(n_heads // Hs, dim=1)


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the auxiliary losses every attention layer of `model` set in its last forward."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, AttentionLayer) and m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None
