"""Padded and packed batches in transformers: the sequences a mask describes, each attended alone.

transformers describes them with the attention mask it builds (a 4D bool or additive float mask, or
the 2D padding mask) and, for packed documents in flash-attention style, `cu_seq_lens_q` /
`cu_seq_lens_k` kwargs. `segments` reads that back into `Segment`s; `attend_segments` runs the
variant's `attend` on each alone (the keys of its own sequence only, its own positions) and puts the
outputs back, zeros at padding. Anything that is not a set of causal sequences raises.

A token is padding when no query may see it, not even itself. Every other query must see exactly
the keys from its sequence's first token up to itself. So left padding (pads first), right padding
(pads last, nothing after them) and packed documents (position_ids that restart) are read; inner
padding, sliding windows and custom masks raise.

In a `SparseCacheLayer` the variant's buffers keep one column per token, padding included (zeros),
beside K/V, so crop, beam reorder and batch select keep working; a segment reads its own columns
through a `SegmentState`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsezoo import sequences
from sparsezoo.ops.dispatch import record


@dataclass(frozen=True)
class Segment:
    """Queries start .. stop - 1 (of the T new tokens) of batch row `row`, one causal sequence whose first
    token is key `key_start` (of the S keys, cache included)."""

    row: int
    key_start: int
    start: int
    stop: int


def unsupported(why: str) -> ValueError:
    return ValueError(
        f"sparsezoo layers cannot honour this attention mask: {why}. They read left padding, right "
        f"padding (without tokens after it) and packed sequences; pass attention_mask=None or a "
        f"2D padding mask"
    )


def segments(mask, n_queries: int, n_keys: int, batch: int, kwargs: dict | None = None) -> list[Segment] | None:
    """The sequences of the mask (and of cu_seq_lens_q kwargs), or None when the batch is plain causal."""
    from_mask = mask_segments(mask, n_queries, n_keys, batch)
    cu = (kwargs or {}).get("cu_seq_lens_q")
    if cu is None:
        return from_mask
    from_cu = cu_segments(cu, (kwargs or {}).get("cu_seq_lens_k"), n_queries, n_keys, batch)
    if from_mask is not None and from_mask != from_cu:
        raise unsupported("cu_seq_lens_q and the attention mask describe different sequences")
    return from_cu


def cu_segments(cu_q, cu_k, n_queries: int, n_keys: int, batch: int) -> list[Segment]:
    if cu_k is not None and not torch.equal(torch.as_tensor(cu_k).cpu(), torch.as_tensor(cu_q).cpu()):
        raise unsupported("cu_seq_lens_k differs from cu_seq_lens_q (packed sequences read no cache)")
    if n_keys != n_queries:
        raise unsupported("packed sequences (cu_seq_lens_q) with a cache holding earlier tokens")
    return [Segment(0, p.start, p.start, p.stop) for p in sequences.pieces_from_cu_seqlens(cu_q, batch, n_queries)]


def mask_segments(mask, n_queries: int, n_keys: int, batch: int) -> list[Segment] | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"sparsezoo layers take no {type(mask).__name__} attention mask: load the model with "
            f"attn_implementation='sdpa' or 'eager'"
        )
    T, S = n_queries, n_keys
    cols = torch.arange(S - T, S, device=mask.device)  # each query's own key column
    if mask.dim() == 2:  # a padding mask over the keys, causal implied
        if tuple(mask.shape) != (batch, S):
            raise ValueError(f"a 2D attention mask must be [B={batch}, {S}], got {tuple(mask.shape)}")
        if mask.is_floating_point():
            raise ValueError("a 2D attention mask must be bool or integer (1 = real token), got a float mask")
        key_real = mask.bool()
        first = key_real.int().argmax(1, keepdim=True).expand(batch, T)
        seen_before = key_real.int().cumsum(1)[:, S - T :]
        real = key_real[:, S - T :]
        exact = seen_before == cols - first + 1  # the query sees every key from the row's first real one
    elif mask.dim() == 4:
        if mask.shape[-2:] != (T, S) or mask.shape[0] not in (1, batch):
            raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not cover {T} queries x {S} keys")
        if mask.shape[1] > 1 and not torch.equal(mask, mask[:, :1].expand_as(mask)):
            raise unsupported("the heads have different masks")
        real, first, exact = read_4d(mask[:, 0].expand(batch, T, S), cols)
    else:
        raise ValueError(f"attention mask must be 2D or 4D, got {tuple(mask.shape)}")
    if bool((real & ~exact).any()):
        raise unsupported("a query does not see exactly the keys from its sequence's start up to itself")
    if bool(real.all()) and bool((first == 0).all()):
        return None  # plain causal
    return causal_runs(real.tolist(), first.tolist(), S - T)


def read_4d(mask: torch.Tensor, cols: torch.Tensor, chunk: int = 1024):
    """From a [B, T, S] bool or additive mask: whether each query is a real token (some query sees it), the
    first key it sees, and whether it sees exactly the keys from there to itself. Read `chunk` queries at a
    time, so nothing larger than [B, chunk, S] is made beside the mask."""
    B, T, S = mask.shape
    seen = torch.zeros(B, S, dtype=torch.bool, device=mask.device)
    firsts, exacts = [], []
    for t0 in range(0, T, chunk):
        visible = mask[:, t0 : t0 + chunk]
        visible = visible if visible.dtype == torch.bool else visible == 0
        own = cols[t0 : t0 + chunk]
        seen |= visible.any(1)
        as_int = visible.to(torch.uint8)
        first = as_int.argmax(-1)
        last = S - 1 - as_int.flip(-1).argmax(-1)
        sees_self = visible.gather(2, own.view(1, -1, 1).expand(B, -1, 1))[..., 0]
        exacts.append(sees_self & (last == own) & (visible.sum(-1) == own - first + 1))
        firsts.append(first)
    return seen.gather(1, cols.expand(B, T)), torch.cat(firsts, 1), torch.cat(exacts, 1)


def causal_runs(real: list[list[bool]], first: list[list[int]], past: int) -> list[Segment]:
    """Group each row's real queries into sequences: a query continues its predecessor's sequence (same
    first key) or starts one at itself; only a row's first query may continue one from the cache."""
    out = []
    for b, (row_real, row_first) in enumerate(zip(real, first)):
        current = None
        for t, (is_real, a) in enumerate(zip(row_real, row_first)):
            col = past + t
            if not is_real:
                current = None
                continue
            if current is not None and a == current[0]:
                current[2] = t + 1
                continue
            if a != col and not (t == 0 and a < past):
                raise unsupported(f"row {b}, query {t} starts its keys at {a}, inside another sequence")
            current = [a, t, t + 1]
            out.append((b, current))
    return [Segment(b, a, start, stop) for b, (a, start, stop) in out]


class SegmentState:
    """One segment's view of a `SparseCacheLayer`, speaking the variants' cache protocol: `append`
    returns the segment's own columns (from its first token), the new ones are collected and written
    for the whole batch by `SegmentWriter.flush`."""

    def __init__(self, layer, writer: "SegmentWriter", segment: Segment, past: int):
        self.layer, self.writer, self.segment, self.past = layer, writer, segment, past

    def append(self, name: str, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
        seg = self.segment
        self.writer.add(name, seq_dim, seg, x)
        if seg.key_start >= self.past:
            return x
        if name not in self.layer.extras:
            raise RuntimeError(f"sparsezoo cache buffer {name!r} is missing for tokens already cached")
        held, _ = self.layer.extras[name]
        earlier = held[seg.row : seg.row + 1].narrow(seq_dim, seg.key_start, self.past - seg.key_start)
        return torch.cat([earlier, x], seq_dim)

    def derived(self, name: str):
        return self.layer.derived((name, self.segment.row, self.segment.key_start))

    def set_derived(self, name: str, x: torch.Tensor) -> None:
        self.layer.set_derived((name, self.segment.row, self.segment.key_start), x)


class SegmentWriter:
    """Collects the segments' new per-token state and appends it to the cache layer, zeros at padding."""

    def __init__(self, layer, batch: int, n_new: int):
        self.layer, self.batch, self.n_new = layer, batch, n_new
        self.parts: dict[str, tuple[int, list]] = {}

    def add(self, name: str, seq_dim: int, seg: Segment, x: torch.Tensor) -> None:
        self.parts.setdefault(name, (seq_dim, []))[1].append((sequences.Piece(seg.row, seg.start, seg.stop), x))

    def flush(self) -> None:
        total = self.layer.get_seq_length()
        for name, (dim, parts) in self.parts.items():
            new = sequences.scatter_pieces(parts, self.batch, self.n_new, dim)
            if name not in self.layer.extras and total > self.n_new:  # every earlier token was padding
                new = torch.cat([zeros_like_along(new, dim, total - self.n_new), new], dim)
            self.layer.append(name, new, dim)
        for name, (held, dim) in list(self.layer.extras.items()):
            if name not in self.parts:  # nothing but padding this time
                self.layer.append(name, zeros_like_along(held, dim, self.n_new), dim)


def zeros_like_along(x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = n
    return x.new_zeros(shape)


def attend_segments(core, x, q, k, v, positions, state, segs: list[Segment]) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, S, D] (cache included) -> [B, Hq, T, D]: each segment alone, zeros at
    padding. `state` is the layer's SparseCacheLayer (None without a cache); aux_loss is token-weighted."""
    B, T, S = q.shape[0], q.shape[2], k.shape[2]
    past = S - T
    writer = None if state is None else SegmentWriter(state, B, T)
    outs, losses = [], []
    for seg in segs:
        end = past + seg.stop  # keys up to the segment's last query
        pos = (
            positions[min(seg.row, positions.shape[0] - 1), seg.start : seg.stop]
            if positions.dim() == 2
            else positions[seg.start : seg.stop]
        )
        view = None if state is None else SegmentState(state, writer, seg, past)
        core.aux_loss = None
        out = core.attend(
            None if x is None else x[seg.row : seg.row + 1, seg.start : seg.stop],
            q[seg.row : seg.row + 1, :, seg.start : seg.stop],
            k[seg.row : seg.row + 1, :, seg.key_start : end],
            v[seg.row : seg.row + 1, :, seg.key_start : end],
            pos,
            view,
        )
        outs.append((sequences.Piece(seg.row, seg.start, seg.stop), out))
        if core.aux_loss is not None:
            losses.append((core.aux_loss, seg.stop - seg.start))
    if writer is not None:
        writer.flush()
    record(sequences.LAYOUT_OP, "per_sequence")
    core.aux_loss = sequences.token_weighted_loss(losses)
    return sequences.scatter_pieces(outs, B, T, dim=2) if outs else q.new_zeros(q.shape)
