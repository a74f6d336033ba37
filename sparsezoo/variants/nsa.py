"""DeepSeek Native Sparse Attention (NSA, arXiv 2502.11089), as docs/variants.md describes.

o = g_cmp * Attn(q, K_cmp, V_cmp) + g_slc * Attn(q, K_slc, V_slc) + g_win * Attn(q, K_win, V_win)
- compression: blocks of l keys at stride d, each mapped to one key/value by a learnable MLP with an
  intra-block position encoding; a query sees compressed blocks that end at or before it.
- selection: blocks of l' tokens scored by the compression probabilities of overlapping compressed
  blocks, summed over the GQA group (the group shares the selection); top n with block 0 and the two
  local blocks forced. Exact attention over the selected raw blocks (the main K/V).
- sliding window of w tokens. Gates: per-head sigmoid of a linear map of the hidden state, or with
  `gate_mlp_hidden` > 0 of a 2-layer MLP (the paper's "MLP and sigmoid activation"; its width is not
  published).
With `separate_kv` the compression and window branches own their K/V projections (the paper's
choice). With a cache, the compressed entries are kept in it: each is computed once, in the call that
brings its last token, from the cached per-token keys (the same ops on the same tokens as one prefill,
so prefill, chunked prefill and decode agree); a forward that needs gradients recomputes them all. No
auxiliary loss: selection learns through the compression branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import ops
from ..cache import LayerCache
from ..config import AttentionConfig, ConfigError
from ..ops.compressed_attention import compressed_visible, n_compressed
from ..ops.dispatch import needs_grad
from ..ops.nsa_decode import DECODE_T
from ..ops.nsa_select.reference import add_overlaps, select_with_forced_blocks
from ..registry import register_variant
from ..rope import apply_rope
from .base import (AttentionLayer, buffer_attention, causal_slots, selected_blocks_visible, selection_token_mask,
                   summary_buffer, update_entry)


@dataclass
class NSAConfig(AttentionConfig):
    variant: str = "nsa"
    cmp_block: int = 32  # l
    cmp_stride: int = 16  # d
    sel_block: int = 64  # l'
    sel_topk: int = 16  # n (includes block 0 and the 2 local blocks)
    window: int = 512  # w
    compressor_hidden: int = 128
    gate_mlp_hidden: int = 0  # > 0: the paper's gate MLP (d_model -> this -> 3 Hq, GELU) + sigmoid; 0: one Linear
    separate_kv: bool = True
    select_backend: str = "auto"

    BACKEND_OPS: ClassVar[dict[str, tuple[str, ...]]] = {
        "backend": ("compressed_attention", "block_sparse_attention", "window_attention", "nsa_decode"),
        "select_backend": ("nsa_select",)}
    POSITIVE: ClassVar[tuple[str, ...]] = ("cmp_block", "cmp_stride", "sel_block", "sel_topk", "window",
                                           "compressor_hidden")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("gate_mlp_hidden",)

    def validate(self) -> None:
        super().validate()
        if self.cmp_stride > self.cmp_block:
            raise ConfigError(f"cmp_stride ({self.cmp_stride}) must be <= cmp_block ({self.cmp_block})")
        if self.sel_topk < 3:
            raise ConfigError(f"sel_topk must be >= 3 (block 0 and the 2 local blocks are forced), got {self.sel_topk}")

    def op_params(self, op: str) -> dict:
        G = self.n_heads // self.n_kv_heads
        if op == "block_sparse_attention":
            return {"block_size": self.sel_block, "group": G, "selection_heads": self.n_kv_heads,
                    "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim}
        if op == "nsa_select":
            return {"block_len": self.cmp_block, "stride": self.cmp_stride, "sel_block": self.sel_block,
                    "topk": self.sel_topk, "group": G, "head_dim": self.head_dim}
        if op == "nsa_decode":
            return {"block_len": self.cmp_block, "stride": self.cmp_stride, "sel_block": self.sel_block,
                    "topk": self.sel_topk, "window": self.window, "group": G, "head_dim": self.head_dim}
        return {"window": self.window, "group": G, "head_dim": self.head_dim}


class BlockCompressor(nn.Module):
    """[B, H, S, D] per-token keys (or values) -> [B, H, Sc, D]: each block of `block` tokens at
    `stride`, plus a learned intra-block position encoding, through a 2-layer MLP."""

    def __init__(self, block: int, stride: int, dim: int, hidden: int):
        super().__init__()
        self.block, self.stride = block, stride
        self.pos_emb = nn.Parameter(torch.randn(block, dim) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(block * dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, S, D = x.shape
        if n_compressed(S, self.block, self.stride) == 0:
            return x.new_zeros(B, H, 0, D)
        blocks = x.unfold(2, self.block, self.stride).transpose(-1, -2) + self.pos_emb  # [B, H, Sc, l, D]
        return self.mlp(blocks.flatten(-2))


@register_variant("nsa")
class NSAAttention(AttentionLayer):
    config_class = NSAConfig
    static_decode = True

    def __init__(self, config: NSAConfig):
        super().__init__(config)
        c = config
        D = c.head_dim
        self.compress_k = BlockCompressor(c.cmp_block, c.cmp_stride, D, c.compressor_hidden)
        self.compress_v = BlockCompressor(c.cmp_block, c.cmp_stride, D, c.compressor_hidden)
        if c.gate_mlp_hidden:
            self.gate_proj = nn.Sequential(nn.Linear(c.d_model, c.gate_mlp_hidden), nn.GELU(),
                                           nn.Linear(c.gate_mlp_hidden, 3 * c.n_heads))
        else:
            self.gate_proj = nn.Linear(c.d_model, 3 * c.n_heads)
        if c.separate_kv:
            kv = lambda: nn.Linear(c.d_model, c.n_kv_heads * D, bias=False)
            self.k_cmp, self.v_cmp, self.k_win, self.v_win = kv(), kv(), kv(), kv()
        self.fixed_gates: tuple[float, float, float] | None = None  # (cmp, slc, win) override for ablations
        self.last_selection: torch.Tensor | None = None

    def branch_kv(self, x, positions, cache, name: str, k, v):
        """The (k, v) a branch reads: its own projections with `separate_kv`, else the main ones."""
        if not self.config.separate_kv:
            return k, v
        B, T, _ = x.shape
        shape = lambda t: t.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        kb = apply_rope(shape(getattr(self, f"k_{name}")(x)), positions, self.config.rope_theta)
        vb = shape(getattr(self, f"v_{name}")(x))
        if cache is not None:
            kb = cache.append(f"k_{name}", kb, seq_dim=2)
            vb = cache.append(f"v_{name}", vb, seq_dim=2)
        return kb, vb

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """[3, B, Hq, T, 1]: compression, selection, window gates per head and token."""
        B, T, _ = x.shape
        if self.fixed_gates is not None:
            g = torch.tensor(self.fixed_gates, dtype=x.dtype, device=x.device)
            return g.view(3, 1, 1, 1, 1).expand(3, B, self.n_heads, T, 1)
        g = torch.sigmoid(self.gate_proj(x)).view(B, T, self.n_heads, 3)
        return g.permute(3, 0, 2, 1)[..., None]

    def branches(self, x, q, k, v, positions, cache):
        """Compressed keys/values and the window branch's keys/values, shared by attend() and kv_pattern()."""
        k_c, v_c = self.branch_kv(x, positions, cache, "cmp", k, v)
        k_w, v_w = self.branch_kv(x, positions, cache, "win", k, v)
        return *self.compressed(k_c, v_c, q.shape[2], cache), k_w, v_w

    def compressed(self, k_c: torch.Tensor, v_c: torch.Tensor, T: int, cache):
        """Compressed keys and values [B, Hkv, n_compressed(S), D] of the S branch tokens, the last T new.
        With a cache and no gradients they are kept in the cache: entry j (tokens [j*d, j*d + l)) is
        computed once, in the call that brings token j*d + l - 1, so a decode step costs O(1) compressor
        work, not O(S). The same ops on the same tokens as one prefill, but a matmul over fewer rows may round
        differently (about an ulp). A forward that needs gradients recomputes every entry, for autograd."""
        if cache is None or needs_grad(k_c, v_c, *self.compress_k.parameters(), *self.compress_v.parameters()):
            kc, vc = self.compress_k(k_c), self.compress_v(v_c)
            if cache is not None:  # a later no-grad step continues from these
                cache.set_derived("nsa_cmp_k", kc.detach())
                cache.set_derived("nsa_cmp_v", vc.detach())
            return kc, vc
        l, d, S = self.config.cmp_block, self.config.cmp_stride, k_c.shape[2]
        done, now = n_compressed(S - T, l, d), n_compressed(S, l, d)
        kc, vc = cache.derived("nsa_cmp_k"), cache.derived("nsa_cmp_v")
        fits = lambda held, x: (held is not None and held.shape[:2] == x.shape[:2] and held.shape[2] >= done
                                and held.dtype == x.dtype and held.device == x.device)
        if not (fits(kc, k_c) and fits(vc, v_c)):
            done = 0  # nothing usable held (a new sequence, or a cache that was reshaped): start over
        if now > done:  # the entries not held: those whose last token arrived in this call (all, starting over)
            tokens = slice(done * d, (now - 1) * d + l)
            new_k, new_v = self.compress_k(k_c[:, :, tokens]), self.compress_v(v_c[:, :, tokens])
            kc = new_k if done == 0 else torch.cat([kc[:, :, :done], new_k], dim=2)
            vc = new_v if done == 0 else torch.cat([vc[:, :, :done], new_v], dim=2)
        elif done == 0:
            kc, vc = self.compress_k(k_c), self.compress_v(v_c)  # no complete block yet: empty
        else:
            kc, vc = kc[:, :, :done], vc[:, :, :done]
        cache.set_derived("nsa_cmp_k", kc)
        cache.set_derived("nsa_cmp_v", vc)
        return kc, vc

    def select(self, q, kc, S: int, lse=None):
        c = self.config
        return ops.nsa_select(q.detach(), kc.detach(), S=S, block_len=c.cmp_block, stride=c.cmp_stride,
                              sel_block=c.sel_block, topk=c.sel_topk, scale=self.scale, lse=lse,
                              backend=c.backend_for("nsa_select"))

    def attend(self, x, q, k, v, positions, cache):
        c = self.config
        S = k.shape[2]
        kc, vc, k_w, v_w = self.branches(x, q, k, v, positions, cache)
        if cache is not None and q.shape[2] <= DECODE_T and not needs_grad(q, kc, vc, k_w, v_w):
            # a decode step (inference only): the branches, selection and gated sum in one op (fused on a GPU)
            out, self.last_selection = ops.nsa_decode(
                q, kc, vc, k, v, k_w, v_w, block_len=c.cmp_block, stride=c.cmp_stride, sel_block=c.sel_block,
                topk=c.sel_topk, window=c.window, scale=self.scale, gates=self.gates(x)[..., 0],
                backend=c.backend_for("nsa_decode"))
            return out
        # on a GPU the compressed branch also returns its LSE, so the selection need not recompute it
        # (compiled flex cannot return it on the CPU, where the selection computes its own)
        o_cmp = ops.compressed_attention(q, kc, vc, S=S, block_len=c.cmp_block, stride=c.cmp_stride,
                                         scale=self.scale, return_lse=q.is_cuda,
                                         backend=c.backend_for("compressed_attention"))
        o_cmp, lse = o_cmp if q.is_cuda else (o_cmp, None)
        sel = self.select(q, kc, S, lse)
        self.last_selection = sel
        o_slc = ops.block_sparse_attention(q, k, v, sel, block_size=c.sel_block, scale=self.scale,
                                           backend=c.backend_for("block_sparse_attention"))
        o_win = ops.window_attention(q, k_w, v_w, window=c.window, scale=self.scale,
                                     backend=c.backend_for("window_attention"))
        return ops.branch_sum([o_cmp, o_slc, o_win], self.gates(x)[..., 0])

    # -- static decode: compressed entries in a buffer of every entry, the branches over whole buffers ---
    @property
    def static_buffers(self) -> tuple[str, ...]:
        """The main K/V, the branches' own with `separate_kv` (+ "nsa_cmp_k", "nsa_cmp_v": static_state)."""
        return ("k", "v", "k_cmp", "v_cmp", "k_win", "v_win") if self.config.separate_kv else ("k", "v")

    def static_state(self, cache: LayerCache) -> dict[str, torch.Tensor]:
        """The token buffers and "nsa_cmp_k", "nsa_cmp_v" [B, Hkv, n_compressed(max_len), D]: the prefill's
        cached compressed entries, then room for the rest."""
        state = super().static_state(cache)
        c, B, L = self.config, state["k"].shape[0], state["k"].shape[2]
        for name in ("nsa_cmp_k", "nsa_cmp_v"):
            state[name] = summary_buffer(cache, name, B, n_compressed(L, c.cmp_block, c.cmp_stride))
        return state

    def static_slots(self, name, n_tokens):
        if name in ("nsa_cmp_k", "nsa_cmp_v"):
            return 2, n_compressed(n_tokens, self.config.cmp_block, self.config.cmp_stride)
        return super().static_slots(name, n_tokens)

    def static_compressed(self, k_c, v_c, pos, cache):
        """compressed()'s twin: the entry that ends at pos (if one does), compressed from the whole branch
        buffers k_c, v_c as the cached decode does, is written into the entry buffers, which are returned."""
        c = self.config
        kc, vc = cache.state["nsa_cmp_k"], cache.state["nsa_cmp_v"]
        if kc.shape[2]:
            start = pos - c.cmp_block + 1  # the first token of the entry that ends at pos
            j = start.clamp(min=0) // c.cmp_stride
            complete = (start >= 0) & (start % c.cmp_stride == 0)
            tokens = j * c.cmp_stride + torch.arange(c.cmp_block, device=pos.device)
            update_entry(kc, j, self.compress_k(k_c.index_select(2, tokens)), complete)
            update_entry(vc, j, self.compress_v(v_c.index_select(2, tokens)), complete)
        return kc, vc

    def attend_static(self, x, q, k, v, pos, cache):
        """The cached decode (nsa_decode's branch ops) over whole buffers: compressed attention over the
        entries that end by pos, whose probabilities score the selection blocks (the reference rule, forced
        blocks first), attention over the selected blocks and over the window, and the gated sum."""
        c = self.config
        kc, vc = self.static_compressed(*self.branch_kv(x, pos, cache, "cmp", k, v), pos, cache)
        k_w, v_w = self.branch_kv(x, pos, cache, "win", k, v)
        B, L = q.shape[0], k.shape[2]
        ok = compressed_visible(pos, kc.shape[2], c.cmp_block, c.cmp_stride)[None]  # [1, 1, n]
        o_cmp, p = buffer_attention(q, kc, vc, ok, self.scale)
        imp = q.new_zeros((B, self.n_kv_heads, 1, -(-L // c.sel_block)), dtype=p.dtype)
        imp = add_overlaps(imp, p.sum(2)[:, :, None], c.cmp_block, c.cmp_stride, c.sel_block)
        sel = select_with_forced_blocks(imp, pos, c.sel_block, c.sel_topk)[:, :, 0]  # [B, Hkv, topk]
        o_slc = buffer_attention(q, k, v, selected_blocks_visible(sel, pos, c.sel_block, L), self.scale)[0]
        slots = torch.arange(L, device=x.device)
        window = causal_slots(L, pos) & (slots > pos - c.window)
        o_win = buffer_attention(q, k_w, v_w, window.view(1, 1, L), self.scale)[0]
        return ops.branch_sum([o_cmp, o_slc, o_win], self.gates(x)[..., 0])

    @torch.no_grad()
    def kv_pattern(self, x: torch.Tensor) -> torch.Tensor:
        """Raw keys each query reads at full resolution: its selected blocks and its window. The
        compression branch reads every visible compressed entry (about S / cmp_stride of them, dense
        over the compressed sequence) and is left out, so the map shows the sparse reads."""
        c = self.config
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device)
        q, k, v = self.project_qkv(x, positions)
        sel = self.select(q, self.branches(x, q, k, v, positions, None)[0], T)
        hit = selection_token_mask(sel, T, c.sel_block, self.n_heads)
        pos = torch.arange(T, device=x.device)
        window = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - c.window)
        return hit | window
