"""Small modules the DeepSeek variants share: norms computed in fp32 (fp64 for fp64 inputs), the lightning
indexer (DSA, CSA) and DeepSeek-V4's KV compressor (CSA). Not a variant: the registry skips this module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..ops import entry_pooling, low_precision
from ..ops.common import compute_dtype
from ..ops.indexer_topk.reference import indexer_topk_reference
from ..rope import apply_rope_part

NORM_EPS = 1e-6  # DeepSeek-V3.2 / V4


def rms_normalize(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """x / rms(x) over the last axis, without a weight (V4's per-head query normalisation)."""
    xf = x.to(compute_dtype(x))
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm computed in fp32 (fp64 for fp64 inputs) whatever the input dtype, as DeepSeek's."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = compute_dtype(x)
        return (rms_normalize(x.to(dt), self.eps) * self.weight.to(dt)).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (weight and bias) computed in fp32 (fp64 for fp64 inputs), as V3.2's index-key norm."""

    def __init__(self, dim: int, eps: float = NORM_EPS):
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = compute_dtype(x)
        return F.layer_norm(x.to(dt), self.normalized_shape, self.weight.to(dt), self.bias.to(dt), self.eps).to(x.dtype)


def half_rope_dims(dim: int) -> int:
    """Half of `dim` rounded down to an even count (at least 2 when dim allows): V3.2/V4's 64 of 128."""
    return min(dim - dim % 2, max(2, dim // 4 * 2))


def check_index_options(c) -> None:
    """The index RoPE width (read only with index_rope) and low-precision options of a DSA or CSA config."""
    name = type(c).__name__
    if c.index_rope_dim is not None and (c.index_rope_dim % 2 or c.index_rope_dim > c.index_dim):
        raise ConfigError(
            f"{name}.index_rope_dim must be even and <= index_dim ({c.index_dim}), got {c.index_rope_dim}"
        )
    dim = c.index_dim
    if c.index_quant != "none" and dim & (dim - 1):
        raise ConfigError(
            f"{name}.index_quant = {c.index_quant!r} rotates by a Hadamard transform, which needs a "
            f"power-of-two index_dim, got {dim}"
        )


def round_index(x: torch.Tensor, quant: str) -> torch.Tensor:
    """The indexers' low-precision path (Hadamard rotation + block-scaled rounding), or x for "none"."""
    return x if quant == "none" else low_precision.rotate_and_round(x, quant)


def static_indexer_topk(q_i, w, k_i, ends: torch.Tensor, pos: torch.Tensor, length: int, topk: int, scale: float):
    """The reference indexer top-k (the cached decode's rule) of one query at the position tensor pos over whole
    index-key buffers k_i [B, N, D_i] whose keys end at `ends` [N] (< length): a key ending past pos gets the
    end `length`, past the reference's query (at length - 1), so it ranks nowhere. -> int32 [B, Hs, 1, topk]."""
    hidden = torch.where(ends <= pos, ends, length)
    return indexer_topk_reference(q_i, w, k_i, hidden, S=length, topk=topk, scale=scale)


class LightningIndexer(nn.Module):
    """Index queries [B, Hs, T, J, D_i] and weights [B, Hs, T, J] (J = n_heads / n_select_heads per
    selection head), and with `key` the shared per-token index key [B, T, D_i] (else None).

    rope_dim dims of the queries (and key) get RoPE at their positions: the first ones (V3.2) or, with
    rope_last, the last (V4). key_norm: LayerNorm on the key (V3.2). quant: "none", or the rounding of
    queries and key through fp8 / fp4 after a Hadamard rotation (the production indexers)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dim: int,
        n_select_heads: int,
        theta: float,
        *,
        rope_dim: int = 0,
        rope_last: bool = False,
        key: bool = True,
        key_norm: bool = False,
        quant: str = "none",
    ):
        super().__init__()
        self.n_heads, self.dim, self.n_select_heads = n_heads, dim, n_select_heads
        self.theta, self.rope_dim, self.rope_last, self.quant = theta, rope_dim, rope_last, quant
        self.q = nn.Linear(d_model, n_heads * dim, bias=False)
        self.k = nn.Linear(d_model, dim, bias=False) if key else None
        self.k_norm = LayerNorm(dim) if key and key_norm else None
        self.w = nn.Linear(d_model, n_heads, bias=False)

    def rotary(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return apply_rope_part(x, positions, self.theta, self.rope_dim, last=self.rope_last)

    def forward(self, x: torch.Tensor, positions: torch.Tensor):
        B, T, _ = x.shape
        Hs, J = self.n_select_heads, self.n_heads // self.n_select_heads
        q_i = self.rotary(self.q(x).view(B, T, self.n_heads, self.dim).transpose(1, 2), positions)
        q_i = round_index(q_i, self.quant).view(B, Hs, J, T, self.dim).transpose(2, 3)
        k_i = None
        if self.k is not None:
            k_i = self.k(x)
            if self.k_norm is not None:
                k_i = self.k_norm(k_i)
            k_i = round_index(self.rotary(k_i[:, None], positions)[:, 0], self.quant)
        w = (self.w(x) * self.n_heads**-0.5).view(B, T, Hs, J).transpose(1, 2)
        return q_i, w, k_i


class Compressor(nn.Module):
    """DeepSeek-V4's KV compressor: every `ratio` tokens become one entry per head.

    Per token t: values kv_t = W_kv x_t and gate scores z_t = W_gate x_t, both [H, C * dim] (C = 2 with
    overlap: the first half serves the next entry's window, the second the token's own entry). Entry i
    pools, per channel, with softmax weights over its slots of z + ape (`ape` [H, ratio, C * dim], a
    learned bias per slot and channel; entry_pooling.pool_channels), then (with `norm`) RMSNorm, then
    RoPE on its last rope_dim dims at position i * ratio (its own block's first token)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dim: int,
        ratio: int,
        overlap: bool,
        *,
        rope_dim: int = 0,
        theta: float = 10000.0,
        norm: bool = True,
    ):
        super().__init__()
        self.n_heads, self.dim, self.ratio, self.overlap = n_heads, dim, ratio, overlap
        self.rope_dim, self.theta = rope_dim, theta
        width = (2 if overlap else 1) * dim
        self.wkv = nn.Linear(d_model, n_heads * width, bias=False)
        self.wgate = nn.Linear(d_model, n_heads * width, bias=False)
        self.ape = nn.Parameter(torch.zeros(n_heads, ratio, width))
        self.norm = RMSNorm(dim) if norm else None

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token values and gate scores [B, H, T, C * dim] (what a cache keeps)."""
        B, T, _ = x.shape
        shape = lambda t: t.view(B, T, self.n_heads, -1).transpose(1, 2)
        return shape(self.wkv(x)), shape(self.wgate(x))

    def pool(self, kv: torch.Tensor, score: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Per-token values and scores of tokens first * ratio .. -> entries first, first + 1, ... [B, H, n, dim]
        (n = S // ratio for S tokens; RoPE at each entry's own position). With overlap and first > 0 the
        first of them misses its previous block (the caller drops it)."""
        out = entry_pooling.pool_channels(kv, score, self.ape, self.ratio, self.overlap)
        if self.norm is not None:
            out = self.norm(out)
        starts = entry_pooling.entry_starts(out.shape[2], self.ratio, out.device) + first * self.ratio
        return apply_rope_part(out, starts, self.theta, self.rope_dim)
