"""DeepSeek-V4 compressed sparse attention (CSA), as docs/variants.md describes.

- Compression: every m tokens become one KV entry. A learnable compressor pools per-token keys and
  values with softmax weights (a per-token gate plus a learned per-slot bias); with `overlap` each
  entry pools a window of 2m tokens (its own m and the m before), as in V4.
- Selection: a lightning indexer (as DSA's) scores the visible compressed entries (those whose last
  token is at or before the query) and keeps the top-k; one selection per query for the whole layer.
- Attention: one softmax over the selected compressed entries plus a sliding window of the last
  `window` raw tokens (the main K/V).
Per-token compressor inputs and index keys are cached; compressed entries are recomputed from them,
so prefill, chunked prefill and decode agree. aux_loss: the indexer KL when `index_kl` (default on; KL from the main
attention over the selected entries to the indexer, as DSA's sparse phase).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import AttentionConfig
from .. import ops
from ..ops import entry_pooling
from ..registry import register_variant
from ..rope import apply_rope
from .base import AttentionLayer
from .dsa import LightningIndexer


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

    BACKEND_OPS: ClassVar[dict[str, tuple[str, ...]]] = {"backend": ("gather_attention", "index_kl"),
                                                         "select_backend": ("indexer_topk",)}
    POSITIVE: ClassVar[tuple[str, ...]] = ("compress_ratio", "topk", "window", "n_index_heads", "index_dim",
                                           "index_scale", "kl_temperature")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("kl_coeff",)


@register_variant("csa")
class CSAAttention(AttentionLayer):
    config_class = CSAConfig

    def __init__(self, config: CSAConfig):
        super().__init__(config)
        c = config
        D, Hkv = c.head_dim, c.n_kv_heads
        width = 2 * c.compress_ratio if c.overlap else c.compress_ratio
        self.cmp_k = nn.Linear(c.d_model, Hkv * D, bias=False)
        self.cmp_v = nn.Linear(c.d_model, Hkv * D, bias=False)
        self.cmp_gate = nn.Linear(c.d_model, Hkv, bias=False)
        self.cmp_slot_bias = nn.Parameter(torch.zeros(width))
        self.indexer = LightningIndexer(c.d_model, c.n_index_heads, c.index_dim, 1, False, c.rope_theta)
        self.index_scale = c.index_scale or 1.0 / math.sqrt(c.index_dim)
        self.last_selection: torch.Tensor | None = None

    def compressed(self, x, positions, cache):
        """Compressed keys/values [B, Hkv, Sc, D], index keys [B, Sc, D_i], index queries/weights."""
        c = self.config
        B, T, _ = x.shape
        shape = lambda t, d: t.view(B, T, -1, d).transpose(1, 2)
        k_tok = apply_rope(shape(self.cmp_k(x), c.head_dim), positions, c.rope_theta)
        v_tok = shape(self.cmp_v(x), c.head_dim)
        g_tok = self.cmp_gate(x).transpose(1, 2)  # [B, Hkv, T]
        xi = x.detach() if c.detach_index_input else x
        q_i, w, ki_tok = self.indexer(xi, positions)
        if cache is not None:
            k_tok = cache.append("cmp_k", k_tok, seq_dim=2)
            v_tok = cache.append("cmp_v", v_tok, seq_dim=2)
            g_tok = cache.append("cmp_gate", g_tok, seq_dim=2)
            ki_tok = cache.append("k_idx", ki_tok, seq_dim=1)
        m = c.compress_ratio
        kc = entry_pooling.pool_windows(k_tok, g_tok, self.cmp_slot_bias, m)
        vc = entry_pooling.pool_windows(v_tok, g_tok, self.cmp_slot_bias, m)
        ki = entry_pooling.pool_windows(ki_tok[:, None], torch.zeros_like(ki_tok[:, None, :, 0]),
                                  torch.zeros_like(self.cmp_slot_bias), m)[:, 0]  # mean pooling
        return kc, vc, ki, q_i, w

    def select(self, q_i, w, ki, S: int):
        ends = entry_pooling.entry_ends(ki.shape[1], self.config.compress_ratio, ki.device)
        return ops.indexer_topk(q_i.detach(), w.detach(), ki.detach(), ends, S=S, topk=self.config.topk,
                                scale=self.index_scale, backend=self.config.backend_for("indexer_topk"))

    def attend(self, x, q, k, v, positions, cache):
        c = self.config
        S = k.shape[2]
        kc, vc, ki, q_i, w = self.compressed(x, positions, cache)
        sel = self.select(q_i, w, ki, S)  # [B, 1, T, topk] entry ids
        self.last_selection = sel
        out = ops.gather_attention(q, k, v, entry_pooling.entry_ids(sel, S), scale=self.scale, window=c.window,
                                   backend=c.backend_for("gather_attention"), k_extra=kc, v_extra=vc)
        if c.index_kl and self.training and torch.is_grad_enabled() and kc.shape[2] == 0:
            self.aux_loss = q_i.new_zeros(())  # T < compress_ratio: no entry to select, the KL is empty
        elif c.index_kl and self.training and torch.is_grad_enabled():
            ends = entry_pooling.entry_ends(kc.shape[2], c.compress_ratio, k.device)
            self.aux_loss = ops.index_kl(q, kc, q_i, w, ki, ends, sel, S=S, scale=self.scale,
                                         index_scale=self.index_scale, coeff=c.kl_coeff,
                                         temperature=c.kl_temperature, backend=c.backend_for("index_kl"))
        return out

    @torch.no_grad()
    def kv_pattern(self, x: torch.Tensor) -> torch.Tensor:
        """Raw tokens each query reads: its window, plus the tokens pooled into its selected entries."""
        c = self.config
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device)
        kc, vc, ki, q_i, w = self.compressed(x, positions, None)
        sel = self.select(q_i, w, ki, T).long()  # [B, 1, T, k]
        width = self.cmp_slot_bias.shape[0]
        s = torch.arange(T, device=x.device)
        first = (sel + 1) * c.compress_ratio - width  # pooled tokens [first, (i+1)m)
        last = (sel + 1) * c.compress_ratio - 1
        inside = (s >= first[..., None]) & (s <= last[..., None]) & (sel[..., None] >= 0)
        hit = inside.any(-2)
        window = (s[None, :] <= s[:, None]) & (s[None, :] > s[:, None] - c.window)
        return (hit | window).expand(B, self.n_heads, T, T)
