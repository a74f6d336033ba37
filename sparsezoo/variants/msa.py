"""MiniMax Sparse Attention (MSA v1), as docs/variants.md defines it.

Index branch: one index query per GQA group (H_i = Hkv heads of dim D_i) and one shared index-key
head; scores are max-pooled per KV block and each query token keeps its top k-1 earlier blocks plus
its local block. Sparse branch: exact softmax attention over the selected real K/V blocks; all heads
of a group share the selection. The index branch learns only from the sparse KL (`aux_loss`); its
input is detached by default so no index gradient reaches the main branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import ops
from ..config import AttentionConfig
from ..registry import register_variant
from ..ops.common import compute_dtype, select_from_block_scores
from ..ops.msa_select.reference import block_scores
from ..rope import apply_rope
from .base import AttentionLayer, WarmupRouting, selected_blocks_visible, selection_token_mask


@dataclass
class MSAConfig(AttentionConfig):
    variant: str = "msa"
    block_size: int = 128
    topk: int = 16
    index_dim: int = 128
    index_scale: float | None = None  # default 1 / sqrt(index_dim)
    index_rope: bool = False
    index_norm: bool = False
    routing: str = "sparse"  # "dense" = warm-up: dense attention, index branch trains by KL
    warmup_steps: int = 0  # trainer switches routing to "sparse" after this many steps
    kl_coeff: float = 1.0
    kl_temperature: float = 1.0
    detach_index_input: bool = True
    select_backend: str = "auto"
    decode_backend: str = "auto"  # triton: paged cache + Triton decode kernels (auto: on CUDA)
    decode_index_dtype: str = "model"  # index keys in the paged cache: model dtype, or fp8 e4m3 + scale

    CHOICES: ClassVar[dict[str, tuple]] = {
        "routing": ("sparse", "dense"),
        "decode_backend": ("auto", "reference", "triton"),
        "decode_index_dtype": ("model", "fp8"),
    }
    POSITIVE: ClassVar[tuple[str, ...]] = ("block_size", "topk", "index_dim", "index_scale", "kl_temperature")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("warmup_steps", "kl_coeff")
    BACKEND_OPS: ClassVar[dict[str, tuple[str, ...]]] = {"backend": ("block_sparse_attention", "msa_index_kl"),
                                                         "select_backend": ("msa_select",)}

    def op_params(self, op: str) -> dict:
        G = self.n_heads // self.n_kv_heads
        if op == "block_sparse_attention":
            return {"block_size": self.block_size, "group": G, "selection_heads": self.n_kv_heads,
                    "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim}
        if op == "msa_select":
            return {"block_size": self.block_size, "scale": self.index_scale or 1.0, "index_dim": self.index_dim}
        return {"block_size": self.block_size, "group": G}


@register_variant("msa")
class MSAAttention(WarmupRouting, AttentionLayer):
    config_class = MSAConfig
    static_decode = True
    static_buffers = ("k", "v", "k_idx")

    def __init__(self, config: MSAConfig):
        super().__init__(config)
        c = config
        self.index_q = nn.Linear(c.d_model, c.n_kv_heads * c.index_dim, bias=False)
        self.index_k = nn.Linear(c.d_model, c.index_dim, bias=False)
        self.index_q_norm = nn.RMSNorm(c.index_dim) if c.index_norm else None
        self.index_k_norm = nn.RMSNorm(c.index_dim) if c.index_norm else None
        self.index_scale = c.index_scale or 1.0 / math.sqrt(c.index_dim)
        self.routing = c.routing
        self.last_selection: torch.Tensor | None = None

    def index_projections(self, x, positions, cache):
        """q_idx [B, H_i, T, D_i] for the new tokens, k_idx [B, S, D_i] including the cache."""
        c = self.config
        B, T, _ = x.shape
        xi = x.detach() if c.detach_index_input else x
        q_idx = self.index_q(xi).view(B, T, c.n_kv_heads, c.index_dim).transpose(1, 2)
        k_idx = self.index_k(xi)
        if self.index_q_norm is not None:
            q_idx, k_idx = self.index_q_norm(q_idx), self.index_k_norm(k_idx)
        if c.index_rope:
            q_idx = apply_rope(q_idx, positions, c.rope_theta)
            k_idx = apply_rope(k_idx[:, None], positions, c.rope_theta)[:, 0]
        if cache is not None:
            k_idx = cache.append("k_idx", k_idx, seq_dim=1)
        return q_idx, k_idx

    def select(self, q_idx, k_idx):
        c = self.config
        return ops.msa_select(q_idx, k_idx, block_size=c.block_size, topk=c.topk, scale=self.index_scale,
                              backend=c.backend_for("msa_select"))

    # -- decode cache: paged + Triton kernels where they can run ---------------------------------
    def paged_decode_unsupported(self, device: torch.device) -> str | None:
        """Why the Triton decode path cannot serve this layer on `device` (None when it can)."""
        from ..ops.dispatch import Request, platform_reason

        c = self.config
        why = platform_reason("triton", Request(device.type))
        if why:
            return why
        pow2 = lambda n: n >= 16 and n & (n - 1) == 0
        if self.q_proj.weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"the paged cache holds fp16, bf16 or fp32, not {self.q_proj.weight.dtype}"
        if not all(pow2(n) for n in (c.head_dim, c.index_dim, c.block_size)) or c.topk < 2:
            return (f"the decode kernels need head_dim, index_dim and block_size to be powers of two >= 16 "
                    f"and topk >= 2, got {c.head_dim}, {c.index_dim}, {c.block_size}, {c.topk}")
        return None

    def make_cache(self, max_batch_size: int, max_seq_len: int, device=None):
        c = self.config
        device = torch.device(device if device is not None else self.q_proj.weight.device)
        why = self.paged_decode_unsupported(device)
        if c.decode_backend == "triton" and why:
            raise ValueError(f"decode_backend='triton' cannot run here: {why}")
        contiguous = c.decode_backend == "reference" or why or (c.decode_backend == "auto" and device.type != "cuda")
        fp8 = c.decode_index_dtype == "fp8"
        if contiguous and fp8:
            raise ValueError("decode_index_dtype='fp8' lives in the paged Triton decode cache, which does not "
                             f"serve this layer on {device} ({why or 'decode_backend=' + c.decode_backend}); "
                             "use decode_index_dtype='model'")
        if contiguous:
            return super().make_cache(max_batch_size, max_seq_len, device)
        from ..paged_cache import FP8, MSAPagedLayerCache

        return MSAPagedLayerCache(c, max_batch_size, max_seq_len, index_dtype=FP8 if fp8 else None,
                                  index_scale="token" if fp8 else None)

    def cache_kv(self, cache, k, v):
        from ..paged_cache import MSAPagedLayerCache

        if isinstance(cache, MSAPagedLayerCache):
            return k, v  # written with the index keys in attend()
        return super().cache_kv(cache, k, v)

    def attend(self, x, q, k, v, positions, cache):
        from ..paged_cache import MSAPagedLayerCache

        c = self.config
        paged = isinstance(cache, MSAPagedLayerCache)
        q_idx, k_idx = self.index_projections(x, positions, None if paged else cache)
        if paged:
            cache.write(k, v, k_idx)
            if cache.is_decode_step(q.shape[2]) and self.routing == "sparse":
                out = cache.decode(q, q_idx)
                self.last_selection = cache.decoder.selection
                return out
            if cache.pos > 0:  # a later prefill chunk reads the earlier tokens back from the pages
                k, v, k_idx = cache.gather(cache.pos + q.shape[2])
        with torch.no_grad():
            sel = self.select(q_idx.detach(), k_idx.detach())
        self.last_selection = sel
        train_index = self.training and torch.is_grad_enabled()
        lse = None
        if self.routing == "dense":
            out = ops.dense_attention(q, k, v, scale=self.scale)
        elif train_index:  # the KL's teacher normaliser is the attention's LSE over the same selection
            out, lse = ops.block_sparse_attention(q, k, v, sel, block_size=c.block_size, scale=self.scale,
                                                  backend=c.backend_for("block_sparse_attention"), return_lse=True)
        else:
            out = ops.block_sparse_attention(q, k, v, sel, block_size=c.block_size, scale=self.scale,
                                             backend=c.backend_for("block_sparse_attention"))
        if train_index:
            self.aux_loss = ops.msa_index_kl(
                q, k, q_idx, k_idx, None if self.routing == "dense" else sel, block_size=c.block_size,
                scale=self.scale, index_scale=self.index_scale, coeff=c.kl_coeff, temperature=c.kl_temperature,
                main_lse=None if lse is None else lse.detach(), backend=c.backend_for("msa_index_kl"))
        return out

    # -- static decode: the reference selection over the whole index-key buffer --------------------
    def static_visible(self, x, q, pos, cache):
        """Sparse routing: the keys of the selected blocks up to pos, per KV head (the eager rule,
        `select_from_block_scores`, over block scores of the whole buffer, tokens past pos at -inf).
        Dense routing: causal. The token's index key is written at pos either way, as the cached decode does."""
        c = self.config
        q_idx, k_idx = self.index_projections(x, pos, cache)  # k_idx: the whole buffer [B, max_len, D_i]
        if self.routing == "dense":
            return super().static_visible(x, q, pos, cache)
        dt = compute_dtype(q_idx)
        scores = block_scores(q_idx.to(dt), k_idx.to(dt), pos, c.block_size, self.index_scale)
        sel = select_from_block_scores(scores, pos, c.block_size, c.topk)[:, :, 0]  # [B, Hkv, topk], -1 = none
        return selected_blocks_visible(sel, pos, c.block_size, k_idx.shape[1])

    @torch.no_grad()
    def kv_pattern(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device)
        q_idx, k_idx = self.index_projections(x, positions, None)
        sel = self.select(q_idx, k_idx)
        return selection_token_mask(sel, T, self.config.block_size, self.n_heads)
