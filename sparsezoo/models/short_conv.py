"""A short causal convolution on every attention layer's input (`GPTConfig.short_conv`).

    h = attn_norm(x);  h = h + conv(h);  x = x + attn(h)

`conv` is depthwise (one filter of `width` taps per channel, no bias) and causal: the output at token t
mixes the inputs at t - width + 1 .. t, with zeros before a sequence's first token. This is the short
convolution of H3, Mamba and Gated DeltaNet (and the "Canon layers" of Physics of Language Models), put in
front of the attention so that every variant gets the same one. It hands each token its predecessors'
features, so a single attention layer can match "the token after this one" (an induction head needs two
layers without it).

Sequences: a cached forward continues from the last width - 1 inputs (`ShortConvCache`), so prefill,
chunked prefill and decode equal one full forward. A padded batch (left padding, `attention_mask`) zeroes
the padding's inputs, which is what each row sees alone; packed documents (`cu_seqlens`) each start from
zeros. Context parallelism is refused (a shard would need its predecessor's last inputs).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsezoo import sequences


# The one statement of what short_conv cannot do, raised by the model and by the trainer's setup alike.
CONTEXT_PARALLEL_REFUSAL = ("model.short_conv does not run context-parallel (a rank's shard would need the inputs "
                            "just before it): set model.short_conv = 0 or train.context_parallel = 1")


class ShortConvCache:
    """One layer's convolution state in a cached forward: its last width - 1 inputs [B, width - 1, C] and
    the number of tokens it has seen (which must follow the attention cache's position)."""

    def __init__(self) -> None:
        self.tail: torch.Tensor | None = None
        self.pos = 0

    def reset(self) -> None:
        self.tail, self.pos = None, 0


class ShortConv(nn.Module):
    def __init__(self, d_model: int, width: int):
        super().__init__()
        if width < 1:
            raise ValueError(f"short_conv width must be >= 1, got {width}")
        self.width = width
        bound = 1 / math.sqrt(width)  # nn.Conv1d's default init for a depthwise filter
        self.weight = nn.Parameter(torch.empty(d_model, width).uniform_(-bound, bound))

    def step(self, x: torch.Tensor, past: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C] and the width - 1 inputs before it (None: a sequence's start, zeros) -> (x + conv(x),
        the last width - 1 inputs [B, width - 1, C], the next call's `past`). Static shapes: the static decode
        step calls it too."""
        B, T, C = x.shape
        if past is None:
            past = x.new_zeros(B, self.width - 1, C)
        window = torch.cat([past.to(x.dtype), x], dim=1)  # [B, width - 1 + T, C]
        w = self.weight.to(x.dtype)
        out = x
        for tap in range(self.width):  # tap width - 1 is the token itself, tap 0 the oldest input
            out = out + window[:, tap : tap + T] * w[:, tap]
        return out, window[:, T:]

    def forward(
        self,
        x: torch.Tensor,
        cache: ShortConvCache | None = None,
        cache_pos: int = 0,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, C], the T new tokens -> x + conv(x). With a cache, cache_pos is the attention cache's
        position before these tokens (the conv state must match it; at 0 the state starts afresh)."""
        B, T, _ = x.shape
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("cu_seqlens packs documents for a forward without a cache")
            pieces = sequences.pieces_from_cu_seqlens(cu_seqlens, B, T)
            return torch.cat([self.step(x[:, p.start : p.stop])[0] for p in pieces], dim=1)
        if attention_mask is not None:  # left padding: zero inputs are what a row sees before its start
            real = sequences.real_token_mask(attention_mask, B, cache_pos + T)
            x = x * real[:, cache_pos:, None].to(x.dtype)
        if cache is None:
            return self.step(x)[0]
        if cache.pos != cache_pos:
            if cache_pos != 0:
                raise ValueError(
                    f"the short_conv state has seen {cache.pos} tokens but the attention cache {cache_pos}: "
                    f"reset the caches together (GPT.setup_cache)"
                )
            cache.reset()  # the attention caches were reset: a new sequence
        if cache.tail is not None and cache.tail.shape[0] != B:
            raise ValueError(
                f"the short_conv state holds a batch of {cache.tail.shape[0]}, got {B}; call GPT.setup_cache for "
                f"a new batch"
            )
        out, cache.tail = self.step(x, cache.tail)
        cache.tail = cache.tail.detach()
        cache.pos = cache_pos + T
        return out
