"""The module contract every variant follows.

    layer = sparsezoo.create_attention(config)
    y = layer(x, positions=None, cache=None)      # x, y: [B, T, d_model]
    layer.aux_loss                                # auxiliary loss of the last training forward, or None

- An empty batch (B = 0) gives an empty output [0, T, d_model]; T = 0 raises a ValueError.
- `positions` ([T] or [B, T]) feed RoPE; by default they continue from the cache's position.
- Padded and packed batches: `layer(x, attention_mask=m)` (m [B, pos + T], 1 = real token, left
  padding only) or `layer(x, cu_seqlens=c)` (documents packed into one row, `sparsezoo.sequences`).
  Each sequence runs alone, positions from 0, so it gives exactly its outputs (and gradients) on its
  own; padding gives zeros and no gradient. A cache then keeps one cache per row (`cache.rows`), and
  later calls without a mask add real tokens to every row. `aux_loss` is the token-weighted mean of
  the sequences' losses. The dispatch record notes it: `implementations_used()["varlen"] ==
  "per_sequence"` (`"batched"` when the mask holds no padding and the batch ran as one).
- `cache` is what `layer.make_cache(batch, max_len, device)` returns (a `sparsezoo.LayerCache`, or
  for MSA on a GPU a paged cache that decodes with the Triton kernels); with it the same module
  serves prefill, chunked prefill and decode: the T new tokens are the last T of S = pos + T tokens.
- `aux_loss` is set by every variant (None when it has none), so trainers collect it the same way
  for all: `sparsezoo.aux_loss(model)`.
- Static decode (`static_decode = True`: every built-in variant): `decode_static(x, pos, state)`
  decodes one token per row at a position held in a tensor over `static_state(cache)` (the prefilled
  cache's preallocated [B, Hkv, max_len, D] buffers, plus fixed-size compressed entries, block means or
  recurrent states), with static shapes and no host reads, so one compiled graph (and one CUDA graph)
  serves every position (`GPT.generate(..., compile=True)`). It equals the cached decode.
- Context parallelism (`supports_context_parallel`): `layer(cp.shard(x), context_parallel=cp)` with
  a `sparsezoo.context_parallel.ContextParallel` runs this rank's tokens of a sequence split over a
  process group; each of its two chunks runs as a chunked prefill over the keys gathered from the group
  (the layer's cache appends become all-gathers), so outputs and gradients equal one process's.
  `aux_loss` is then this rank's share: its sum over the group is the whole sequence's loss.
- `kv_pattern(x)` returns the boolean [B, Hq, T, S] map of which keys each query reads (small inputs
  only: it is O(T x S)), used for pictures and KV-fraction reports.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import sequences
from ..cache import LayerCache
from ..config import AttentionConfig
from ..context_parallel import ContextParallel
from ..ops.common import compute_dtype, masked_softmax_lse
from ..ops.dispatch import record
from ..rope import apply_rope

CONTEXT_PARALLEL_OP = "context_parallel"  # dispatch record of a context-parallel forward


class AttentionLayer(nn.Module):
    config_class = AttentionConfig
    variant_name = "base"
    static_decode = False  # True: decode_static works (GPT.generate(compile=...))
    static_buffers = ("k", "v")  # the cache buffers decode_static reads and writes (static_state)
    supports_context_parallel = True  # forward(..., context_parallel=cp) (softmax attention over gathered keys)

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
    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: LayerCache | None = None, *,
                attention_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                context_parallel: ContextParallel | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"{self.variant_name}: x must be [B, T, d_model={self.config.d_model}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        if T == 0:
            raise ValueError(f"{self.variant_name}: x must hold at least one token (T >= 1), got {tuple(x.shape)}")
        if B == 0:  # an empty batch: an empty output, the cache untouched
            self.aux_loss = None
            return self.o_proj(x.new_zeros(0, T, self.n_heads * self.head_dim))
        if context_parallel is not None:
            self.check_context_parallel(x, positions, cache, attention_mask, cu_seqlens, context_parallel)
            return self.forward_context_parallel(x, context_parallel)
        if attention_mask is not None or cu_seqlens is not None or getattr(cache, "rows", None) is not None:
            pieces = self.sequence_pieces(x, positions, cache, attention_mask, cu_seqlens)
            if pieces is not None:
                return self.forward_pieces(x, pieces, cache)
        return self.forward_batch(x, positions, cache)

    def forward_batch(self, x: torch.Tensor, positions: torch.Tensor | None, cache) -> torch.Tensor:
        """One batch of equal-length sequences (no padding), B >= 1, T >= 1: project, cache, attend."""
        B, T, _ = x.shape
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

    # -- context parallelism: this rank's two chunks over the gathered prefix ------------------------
    def check_context_parallel(self, x, positions, cache, attention_mask, cu_seqlens, cp) -> None:
        if not self.supports_context_parallel:
            from ..registry import context_parallel_variants

            raise ValueError(f"{self.variant_name} has no context-parallel forward; variants that have one: "
                             f"{context_parallel_variants()}")
        if cache is not None or positions is not None or attention_mask is not None or cu_seqlens is not None:
            raise ValueError("context_parallel runs one whole sequence per row (training or a prefill): it takes no "
                             "cache, positions, attention_mask or cu_seqlens")
        cp.check_input(self.variant_name, x.shape[1])

    def forward_context_parallel(self, x: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
        """Project this rank's tokens once, start the late chunk's K/V gathers, then run each chunk as a
        chunked prefill whose cache is the gathered prefix."""
        B, T, _ = x.shape
        positions = cp.local_positions(x.device)
        q, k, v = self.project_qkv(x, positions)
        prefix = cp.prefix()
        prefix.prefetch(lambda: self.cache_kv(prefix, k, v))
        outs, shares = [], []
        for slot in cp.slots:
            prefix.enter(slot)
            sl = slot.local
            ks, vs = self.cache_kv(prefix, k[:, :, sl], v[:, :, sl])
            self.aux_loss = None
            outs.append(self.attend(x[:, sl], q[:, :, sl], ks, vs, positions[sl], prefix))
            if self.aux_loss is not None:  # a mean over the chunk's tokens -> its share of the sequence mean
                shares.append(self.aux_loss * ((slot.stop - slot.start) / cp.seq_len))
        prefix.finish()
        self.aux_loss = torch.stack(shares).sum() if shares else None
        record(CONTEXT_PARALLEL_OP, "all_gather")
        out = torch.cat([o.transpose(1, 2) for o in outs], dim=1)  # [B, T, H, D]: the reshape is a view, no copy
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim))

    # -- padded and packed batches: each sequence alone --------------------------------------------
    def sequence_pieces(self, x, positions, cache, attention_mask, cu_seqlens) -> list[sequences.Piece] | None:
        """The sequences' new tokens, or None when the batch has no padding and runs as one."""
        B, T, _ = x.shape
        if attention_mask is not None and cu_seqlens is not None:
            raise ValueError("pass attention_mask (a padded batch) or cu_seqlens (packed documents), not both")
        if positions is not None:
            raise ValueError("with attention_mask or cu_seqlens each sequence takes positions from 0 (continuing "
                             "its cache): leave positions=None")
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("cu_seqlens packs documents for a forward without a cache; a cache takes a padded "
                                 "batch (attention_mask)")
            pieces = sequences.pieces_from_cu_seqlens(cu_seqlens, B, T)
            return None if pieces == [sequences.Piece(0, 0, T)] else pieces
        rows = getattr(cache, "rows", None)
        past = cache.pos if cache is not None else 0
        if cache is not None and past + T > cache.max_seq_len:
            raise ValueError(f"cache overflow: {past} + {T} tokens > max_seq_len {cache.max_seq_len}")
        if rows is not None and len(rows) != B:
            raise ValueError(f"this cache holds a padded batch of {len(rows)} rows, got {B}; reset() it to start a "
                             f"new one")
        if attention_mask is None:  # a padded cache continues: every row gets T real tokens
            return [sequences.Piece(b, 0, T) for b in range(B)]
        real = sequences.real_token_mask(attention_mask, B, past + T)
        if rows is None:
            if bool(real.all()):
                record(sequences.LAYOUT_OP, "batched")
                return None
            if past > 0:
                raise ValueError("this cache holds a batch without padding; pass the attention_mask from the first "
                                 "forward on (or reset() the cache)")
            if cache is not None:
                if B > cache.max_batch_size:
                    raise ValueError(f"batch {B} exceeds the cache's max_batch_size {cache.max_batch_size}")
                cache.rows = [self.make_cache(1, cache.max_seq_len, x.device) for _ in range(B)]
        elif real[:, :past].sum(1).tolist() != [row.pos for row in rows]:
            raise ValueError(f"attention_mask's first {past} columns do not match the cache's rows (real tokens per "
                             f"row: {[row.pos for row in rows]})")
        return sequences.pieces_from_mask(real, T)

    def forward_pieces(self, x: torch.Tensor, pieces: list[sequences.Piece], cache) -> torch.Tensor:
        """Run each piece alone (with its row's cache) and put the outputs back; padding gives zeros."""
        B, T, _ = x.shape
        rows = getattr(cache, "rows", None)
        outs, losses = [], []
        for p in pieces:
            out = self.forward(x[p.row:p.row + 1, p.start:p.stop], cache=None if rows is None else rows[p.row])
            outs.append((p, out))
            if self.aux_loss is not None:
                losses.append((self.aux_loss, p.stop - p.start))
        if cache is not None:
            cache.advance(T)
        record(sequences.LAYOUT_OP, "per_sequence")
        self.aux_loss = sequences.token_weighted_loss(losses)
        if not outs:  # nothing but padding
            return self.o_proj(x.new_zeros(B, T, self.n_heads * self.head_dim))
        return sequences.scatter_pieces(outs, B, T, dim=1)

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

    # -- static decode (torch.compile, CUDA graphs) --------------------------------------------
    def static_state(self, cache: LayerCache) -> dict[str, torch.Tensor]:
        """The tensors decode_static reads and updates in place, from a LayerCache after its eager prefill:
        the cache's whole preallocated buffers `static_buffers` ([B, ..., max_len, ...]); variants that keep
        summaries in the cache (compressed entries, block means, recurrent states) add fixed-size tensors
        holding them, sized for the cache's whole length."""
        return {name: cache.buffer(name) for name in self.static_buffers}

    def static_slots(self, name: str, n_tokens: int) -> tuple[int, int] | None:
        """Where static tensor `name` keeps its entries: (its sequence dim, the slots that hold data once
        n_tokens tokens are in), or None for a fixed-size state. decode_static never reads a slot past
        them, so whatever they hold changes nothing. Token buffers keep one slot per token, at dim 2
        ([B, H, max_len, ...]) or, for the index keys "k_idx" [B, max_len, D_i], at dim 1."""
        return (1 if name == "k_idx" else 2), n_tokens

    def decode_static(self, x: torch.Tensor, pos: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """x [B, 1, d_model], the token at position pos (long [1]) -> [B, 1, d_model].

        state is `static_state(cache)`: "k", "v" [B, Hkv, max_len, D] and whatever the variant keeps.
        The step writes the token's entries at pos (in place; through a `StaticCache`, so the code that
        appends to a LayerCache serves here too) and attends over the whole buffers, reading no slot past
        pos (`attend_static`). Shapes never depend on pos and nothing reads the device, so torch.compile
        traces one graph for every position. The result equals the cached decode's (`forward(x,
        cache=...)` one token at a time): the same selections, the same entries.
        """
        if not self.static_decode:
            raise NotImplementedError(f"{self.variant_name} has no static decode step")
        B = x.shape[0]
        cache = StaticCache(state, pos)
        q, k, v = self.project_qkv(x, pos)
        k, v = self.cache_kv(cache, k, v)
        out = self.attend_static(x, q, k, v, pos, cache)
        return self.o_proj(out.transpose(1, 2).reshape(B, 1, self.n_heads * self.head_dim))

    def attend_static(self, x, q, k, v, pos, cache: StaticCache) -> torch.Tensor:
        """q [B, Hq, 1, D], the whole buffers k, v [B, Hkv, max_len, D] -> [B, Hq, 1, D] (attend's twin):
        softmax over the keys `static_visible` allows."""
        return buffer_attention(q, k, v, self.static_visible(x, q, pos, cache), self.scale)[0]

    def static_visible(self, x, q, pos: torch.Tensor, cache: StaticCache) -> torch.Tensor:
        """The keys the token at pos reads, bool [B or 1, Hkv or 1, max_len] (or [B, Hkv, G, max_len] per
        query head): causal (key_pos <= pos)."""
        return causal_slots(cache.state["k"].shape[2], pos).view(1, 1, -1)

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


# -- static decode helpers: whole preallocated buffers, positions as tensors -------------------------
class StaticCache:
    """A LayerCache's stand-in inside decode_static, for the code written for one: `append` writes the token's
    entries at the position tensor into the whole preallocated buffer of that name (`state`) and returns the
    buffer, every slot of it (the reader masks those past pos). It has no Python position and nothing else of
    a LayerCache: code that needs more raises."""

    def __init__(self, state: dict[str, torch.Tensor], pos: torch.Tensor):
        self.state, self.pos = state, pos

    def append(self, name: str, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
        write_at(self.state[name], self.pos, x, seq_dim)
        return self.state[name]


def summary_buffer(cache: LayerCache, name: str, batch: int, length: int) -> torch.Tensor:
    """A summary a cached prefill left in the cache (derived `name` [B, H, n, ...]: compressed entries, block
    means) copied into a zero buffer [batch, H, length, ...] that has room for the whole sequence's."""
    held = cache.derived(name)
    if held is None:
        raise ValueError(f"static_state reads the {name!r} a cached forward keeps: prefill the cache first")
    out = held.new_zeros((batch, held.shape[1], length, *held.shape[3:]))
    out[: held.shape[0], :, : held.shape[2]] = held
    return out


def write_at(buffer: torch.Tensor, pos: torch.Tensor, x: torch.Tensor, dim: int = 2) -> None:
    """Write x (one slot along `dim`) into buffer at the position tensor pos, in place."""
    buffer.index_copy_(dim, pos, x.to(buffer.dtype))


def causal_slots(length: int, pos: torch.Tensor) -> torch.Tensor:
    """bool [length]: slot <= pos."""
    return torch.arange(length, device=pos.device) <= pos


def update_entry(buffer: torch.Tensor, j: torch.Tensor, entry: torch.Tensor, complete: torch.Tensor) -> None:
    """buffer[:, :, j] = entry [B, H, 1, ...] where `complete` (bool [1]), else unchanged, in place: a summary
    (a compressed entry, a block mean) is written in the step that brings its last token. Computed in
    every step (a graph cannot branch on pos); the where keeps an entry built from slots past pos out."""
    kept = buffer.index_select(2, j)
    buffer.index_copy_(2, j, torch.where(complete, entry.to(buffer.dtype), kept))


def selected_blocks_visible(sel: torch.Tensor, pos: torch.Tensor, block_size: int, length: int) -> torch.Tensor:
    """Block selections [..., k] (ids, -1 = none) -> bool [..., length]: the slots of the selected blocks
    up to pos (block_size 1: token ids)."""
    n_blocks = -(-length // block_size)
    ids = torch.where(sel >= 0, sel.long(), n_blocks)
    hit = torch.zeros(*sel.shape[:-1], n_blocks + 1, dtype=torch.bool, device=sel.device).scatter(-1, ids, True)
    slots = torch.arange(length, device=sel.device)
    return hit[..., slots // block_size] & (slots <= pos)


def buffer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float):
    """Softmax attention of one query per head q [B, Hq, 1, D] over whole buffers k, v [B, Hkv, L, D],
    restricted to `visible` (bool, broadcastable to [B, Hkv, L] as [B or 1, Hkv or 1, L], or per query head
    [B, Hkv, G, L]). Returns (out [B, Hq, 1, D] in q's dtype, probabilities [B, Hkv, G, L] in the compute
    dtype). A slot no head sees is never read (NaN there changes nothing); a head that sees no slot gives 0."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    dt = compute_dtype(q)
    if visible.dim() == 3:
        visible = visible[:, :, None]
    qg = q.to(dt).view(B, Hkv, Hq // Hkv, D)
    scores = torch.einsum("bhgd,bhld->bhgl", qg, k.to(dt)) * scale
    probs = masked_softmax_lse(scores, visible)[0]
    read = visible.any(2) if visible.shape[2] > 1 else visible[:, :, 0]  # [B or 1, Hkv or 1, L]
    values = torch.where(read[..., None], v.to(dt), 0.0)  # 0 * NaN past pos would leak
    out = torch.einsum("bhgl,bhld->bhgd", probs, values)
    return out.reshape(B, Hq, 1, D).to(q.dtype), probs


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the auxiliary losses every attention layer of `model` set in its last forward."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, AttentionLayer) and m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None
