"""`SparseSelfAttention`: a transformers decoder layer's self-attention, computed by a sparsezoo variant.

From the model it keeps the q/k/v/o projections (biases included), Qwen3's per-head q/k RMSNorms, the
attention scale and the rotary embedding: the (cos, sin) the decoder layer passes in, applied by the
model's own `apply_rotary_pos_emb`. From the variant it takes `attend` (selection + sparse attention)
and the variant's own weights (index branch, gates, compressors), built and initialised by the
variant's constructor; the variant's own q/k/v/o projections are dropped (`attention_core`).

With a cache, K/V go through `cache.update` as usual and the variant's per-token state goes into the
same cache layer (`cache.SparseCacheLayer`), so prefill, chunked prefill and decode agree.
Attention masks: none or plain causal (one batched `attend`), or padded / packed batches, read back
from the mask transformers passes (`sequences`): each sequence is attended alone, zeros at padding.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

import sparsezoo
from sparsezoo import AttentionConfig, AttentionLayer

from .cache import sparse_cache_layer
from .sequences import attend_segments, segments

MAIN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def attention_core(config: AttentionConfig, like: torch.Tensor | None = None) -> AttentionLayer:
    """The variant's module without its q/k/v/o projections (a converted layer reuses the model's), on
    `like`'s device and dtype. Its remaining weights are initialised as the variant initialises them.
    Only its `attend` runs (its `forward`, which projects, cannot)."""
    if not getattr(sparsezoo.variant_class(config.variant), "reuses_dense_projections", True):
        raise ValueError(f"{config.variant!r} is a linear-attention layer with its own projections and a recurrent "
                         f"state: it cannot reuse a model's q/k/v/o and K/V cache, as this integration does")
    core = sparsezoo.create_attention(config)
    for name in MAIN_PROJECTIONS:
        delattr(core, name)
    return core if like is None else core.to(device=like.device, dtype=like.dtype)


class SparseSelfAttention(nn.Module):
    """Drop-in for a Llama-family attention module (same forward arguments and `(output, None)` return)."""

    def __init__(self, original: nn.Module, variant: AttentionLayer):
        super().__init__()
        self.config = original.config
        self.layer_idx = original.layer_idx
        self.head_dim = original.head_dim
        self.num_key_value_groups = original.num_key_value_groups
        self.scaling = original.scaling
        self.attention_dropout = getattr(original, "attention_dropout", 0.0)
        self.is_causal = True
        for name in MAIN_PROJECTIONS:
            setattr(self, name, getattr(original, name))
        self.q_norm = getattr(original, "q_norm", None)  # Qwen3: RMSNorm over each head, before RoPE
        self.k_norm = getattr(original, "k_norm", None)
        self.apply_rotary = model_rotary_function(original)
        self.variant = variant
        self.variant.scale = self.scaling

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, cache=None, position_ids=None, **kwargs):
        cache = cache if cache is not None else past_key_values  # transformers 5 renamed past_key_values
        if position_embeddings is None:
            raise ValueError("SparseSelfAttention needs the (cos, sin) position_embeddings of the decoder layer")
        if self.training and self.attention_dropout:
            raise ValueError("sparsezoo variants apply no attention dropout; set config.attention_dropout = 0")
        B, T, _ = hidden_states.shape
        q, k, v = self.project_qkv(hidden_states, position_embeddings)
        state, past = None, 0
        if cache is not None:
            state = sparse_cache_layer(cache, self.layer_idx)
            past = state.get_seq_length()
        segs = segments(attention_mask, T, past + T, B, kwargs)  # None: plain causal
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=hidden_states.device)
        self.variant.aux_loss = None
        if segs is None:
            out = self.variant.attend(hidden_states, q, k, v, position_ids, state)  # [B, Hq, T, D]
        else:
            out = attend_segments(self.variant, hidden_states, q, k, v, position_ids, state, segs)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), None

    def project_qkv(self, x: torch.Tensor, position_embeddings):
        """q [B, Hq, T, D], k/v [B, Hkv, T, D] with the model's norms and RoPE, as the original module does."""
        shape = (*x.shape[:-1], -1, self.head_dim)
        q, k = self.q_proj(x).view(shape), self.k_proj(x).view(shape)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = self.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v


def model_rotary_function(original: nn.Module):
    """The `apply_rotary_pos_emb(q, k, cos, sin)` of the module that defines the model's attention class."""
    fn = getattr(sys.modules[type(original).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise TypeError(f"{type(original).__name__}'s module defines no apply_rotary_pos_emb: not a Llama-family "
                        f"attention")
    return fn
