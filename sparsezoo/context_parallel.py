"""Context parallelism: one sequence split over the ranks of a process group (all-gather CP).

Layout (zig-zag, for causal load balance): the T tokens are cut into 2R chunks whose lengths differ by
at most one (the first T % 2R chunks are a token longer), and rank r of R holds chunks r and 2R-1-r, in
that order. Every rank then has about the same causal work: an early chunk with few keys before it and
a late chunk with many.

    cp = ContextParallel(seq_len=T, group=group)       # collective-free; every rank of `group` makes one
    logits, loss = model(cp.shard(idx), cp.shard(targets), context_parallel=cp)

Each attention layer projects its own tokens, then runs its queries chunk by chunk as a chunked prefill
over the gathered prefix: whatever a layer keeps per token in a decode cache (K, V, index keys, a
compressor's inputs) is all-gathered from the group instead (`GatheredPrefix`). The backward
reduce-scatters those tensors' gradients. Selection, sparse attention and the index losses are each
query's own computation over exactly the keys it would see in one process, so outputs, losses and
gradients equal the single-process run's up to floating-point summation order.

Losses under context parallelism are shares: `layer.aux_loss` and GPT's loss on each rank hold that
rank's tokens' part of the sequence mean, so their sum over the group is the single-process loss.

The first chunk's gathers run in turn as the layer needs them; the second chunk's K/V gathers start
before the first chunk's attention, on a second process group where one is given (`prefetch_group`,
another communicator, so they overlap that work rather than queue before it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch 2.13 renamed it
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class ZigzagLayout:
    """Where each rank's tokens sit in a sequence of `seq_len` tokens split over `world` ranks."""

    seq_len: int
    world: int

    def __post_init__(self) -> None:
        if not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"context parallelism needs a world size >= 1, got {self.world!r}")
        if not isinstance(self.seq_len, int) or self.seq_len < 2 * self.world:
            raise ValueError(f"a sequence split over {self.world} ranks needs at least {2 * self.world} tokens "
                             f"(two chunks per rank), got {self.seq_len!r}")

    def chunk_bounds(self) -> list[tuple[int, int]]:
        """(start, stop) of the 2R chunks in sequence order."""
        n = 2 * self.world
        base, extra = divmod(self.seq_len, n)
        bounds, start = [], 0
        for c in range(n):
            stop = start + base + (c < extra)
            bounds.append((start, stop))
            start = stop
        return bounds

    def rank_chunks(self, rank: int) -> tuple[int, int]:
        """The two chunk ids rank `rank` holds: (early, late)."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank must be in [0, {self.world}), got {rank}")
        return rank, 2 * self.world - 1 - rank

    def local_len(self, rank: int) -> int:
        bounds = self.chunk_bounds()
        return sum(bounds[c][1] - bounds[c][0] for c in self.rank_chunks(rank))

    def local_positions(self, rank: int, device=None) -> torch.Tensor:
        """The sequence positions of rank `rank`'s tokens, in the order it holds them."""
        bounds = self.chunk_bounds()
        return torch.cat([torch.arange(*bounds[c], device=device) for c in self.rank_chunks(rank)])

    def shard(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """Rank `rank`'s tokens of a whole sequence tensor (sequence along `dim`)."""
        if x.shape[dim] != self.seq_len:
            raise ValueError(f"shard expects {self.seq_len} tokens along dim {dim}, got {tuple(x.shape)}")
        bounds = self.chunk_bounds()
        return torch.cat([x.narrow(dim, bounds[c][0], bounds[c][1] - bounds[c][0]) for c in self.rank_chunks(rank)],
                         dim=dim)

    def unshard(self, pieces: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The whole sequence from every rank's tokens (`pieces[r]` from rank r), the inverse of shard."""
        if len(pieces) != self.world:
            raise ValueError(f"unshard expects one piece per rank ({self.world}), got {len(pieces)}")
        bounds = self.chunk_bounds()
        chunks: list[torch.Tensor | None] = [None] * (2 * self.world)
        for r, piece in enumerate(pieces):
            if piece.shape[dim] != self.local_len(r):
                raise ValueError(f"rank {r}'s piece holds {piece.shape[dim]} tokens along dim {dim}, expected "
                                 f"{self.local_len(r)}")
            early, late = self.rank_chunks(r)
            n_early = bounds[early][1] - bounds[early][0]
            chunks[early], chunks[late] = piece.narrow(dim, 0, n_early), piece.narrow(dim, n_early, piece.shape[dim] - n_early)
        return torch.cat(chunks, dim=dim)


@dataclass(frozen=True)
class Slot:
    """One of a rank's two chunks: its tokens in the rank's local tensors, and its place in the sequence."""

    index: int  # 0: the early chunk, 1: the late one
    local: slice
    start: int
    stop: int


class ContextParallel:
    """One sequence split over `group` (default: the default process group) in the zig-zag layout.

    `prefetch_group`, optional, spans the same ranks in the same order: the second chunk's K/V gathers
    run there so they overlap the first chunk's work instead of queueing before its index-key gathers."""

    def __init__(self, seq_len: int, group: dist.ProcessGroup | None = None,
                 prefetch_group: dist.ProcessGroup | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("context parallelism runs inside an initialised process group "
                               "(torch.distributed.init_process_group)")
        self.group, self.prefetch_group = group, prefetch_group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        if prefetch_group is not None and dist.get_world_size(prefetch_group) != self.world:
            raise ValueError(f"prefetch_group must span the same {self.world} ranks as group, "
                             f"got {dist.get_world_size(prefetch_group)}")
        self.layout = ZigzagLayout(seq_len, self.world)
        bounds, offset, self.slots = self.layout.chunk_bounds(), 0, []
        for i, c in enumerate(self.layout.rank_chunks(self.rank)):
            start, stop = bounds[c]
            self.slots.append(Slot(i, slice(offset, offset + stop - start), start, stop))
            offset += stop - start
        self.local_len = offset

    @property
    def seq_len(self) -> int:
        return self.layout.seq_len

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a whole sequence tensor."""
        return self.layout.shard(x, self.rank, dim)

    def local_positions(self, device=None) -> torch.Tensor:
        return self.layout.local_positions(self.rank, device)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over the group (no gradient; counts and logging)."""
        t = t.detach().clone()
        dist.all_reduce(t, group=self.group)
        return t

    def gather_sequence(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole sequence from every rank's local tensor (no gradient): logits, pictures, tests."""
        x = x.detach().movedim(dim, 0).contiguous()
        pad = max(self.layout.local_len(r) for r in range(self.world))
        padded = x.new_zeros((pad, *x.shape[1:]))
        padded[: x.shape[0]] = x
        out = x.new_empty((self.world * pad, *x.shape[1:]))
        _all_gather(out, padded, group=self.group)
        pieces = [out[r * pad: r * pad + self.layout.local_len(r)] for r in range(self.world)]
        return self.layout.unshard(pieces, dim=0).movedim(0, dim)

    def prefix(self) -> "GatheredPrefix":
        """A fresh cache-like view for one layer call."""
        return GatheredPrefix(self)

    def check_input(self, who: str, T: int) -> None:
        if T != self.local_len:
            raise ValueError(f"{who}: under context parallelism x holds this rank's {self.local_len} tokens of the "
                             f"{self.seq_len}-token sequence (ContextParallel.shard), got {T}")


# -- the gathers: all-gather forward, reduce-scatter backward -------------------------------------------
class _PendingGather:
    """An all-gather of one chunk slot's tokens, started (maybe asynchronously) and not yet read."""

    def __init__(self, cp: ContextParallel, x: torch.Tensor, seq_dim: int, slot: int, async_op: bool):
        self.cp, self.seq_dim, self.slot = cp, seq_dim, slot
        layout = cp.layout
        chunk_ids = [layout.rank_chunks(r)[slot] for r in range(cp.world)]
        bounds = layout.chunk_bounds()
        self.sizes = [bounds[c][1] - bounds[c][0] for c in chunk_ids]
        self.pad = max(self.sizes)
        local = x.detach().movedim(seq_dim, 0)
        padded = local.new_zeros((self.pad, *local.shape[1:]))
        padded[: local.shape[0]] = local
        self.buffer = local.new_empty((cp.world * self.pad, *local.shape[1:]))
        group = cp.prefetch_group if async_op and cp.prefetch_group is not None else cp.group
        self.padded = padded  # alive until the gather is read
        self.work = _all_gather(self.buffer, padded, group=group, async_op=async_op)

    def sequence_span(self) -> torch.Tensor:
        """The slot's chunks from every rank in sequence order, sequence along dim 0: slot 0 holds chunks
        0..R-1 (ranks in order), slot 1 chunks R..2R-1 (ranks in reverse)."""
        if self.work is not None:
            self.work.wait()
            self.work, self.padded = None, None
        pieces = [self.buffer[r * self.pad: r * self.pad + n] for r, n in enumerate(self.sizes)]
        return torch.cat(pieces if self.slot == 0 else pieces[::-1])


class _Gathered(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, pending: _PendingGather) -> torch.Tensor:
        ctx.pending = pending
        return pending.sequence_span().movedim(0, pending.seq_dim).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p: _PendingGather = ctx.pending
        g = grad.movedim(p.seq_dim, 0)
        order = range(p.cp.world) if p.slot == 0 else range(p.cp.world - 1, -1, -1)
        starts, offset = {}, 0
        for r in order:  # where each rank's chunk sits in the span
            starts[r], offset = offset, offset + p.sizes[r]
        send = g.new_zeros((p.cp.world * p.pad, *g.shape[1:]))
        for r in range(p.cp.world):
            send[r * p.pad: r * p.pad + p.sizes[r]] = g[starts[r]: starts[r] + p.sizes[r]]
        mine = g.new_empty((p.pad, *g.shape[1:]))
        _reduce_scatter(mine, send, group=p.cp.group)
        return mine[: p.sizes[p.cp.rank]].movedim(0, p.seq_dim), None


class GatheredPrefix:
    """What an attention layer sees as its cache under context parallelism, one per layer call.

    The layer runs its two chunks in turn (`enter(slot)`); `append(name, x, seq_dim)` takes this rank's
    tokens of the current chunk and returns the sequence's tokens from 0 up to the chunk's end, gathered
    from the group, exactly what a cache returns in a chunked prefill. Nothing is kept between calls."""

    rows = None  # never a padded batch

    def __init__(self, cp: ContextParallel):
        self.cp = cp
        self.max_seq_len = cp.seq_len
        self.pos = 0
        self.slot: Slot | None = None
        self._spans: dict[str, list[torch.Tensor]] = {}
        self._started: dict[tuple[str, int], _PendingGather] = {}
        self._prefetching: list[tuple[str, torch.Tensor, int]] | None = None
        self._seen: set[str] = set()

    def prefetch(self, collect) -> None:
        """Start the gathers of the late chunk of everything `collect()` appends (given this rank's whole
        local tensors), asynchronously, before the early chunk runs."""
        self._prefetching = []
        try:
            collect()
            requests = self._prefetching
        finally:
            self._prefetching = None
        late = self.cp.slots[1]
        for name, x, seq_dim in requests:
            chunk = x.narrow(seq_dim, late.local.start, late.stop - late.start)
            self._started[(name, 1)] = _PendingGather(self.cp, chunk, seq_dim, 1, async_op=True)

    def enter(self, slot: Slot) -> None:
        self.slot, self.pos, self._seen = slot, slot.start, set()

    def append(self, name: str, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
        seq_dim = seq_dim % x.dim()
        if self._prefetching is not None:
            if x.shape[seq_dim] != self.cp.local_len:
                raise ValueError(f"prefetch of {name!r}: expected this rank's {self.cp.local_len} tokens along dim "
                                 f"{seq_dim}, got {tuple(x.shape)}")
            self._prefetching.append((name, x, seq_dim))
            return x
        slot = self.slot
        if slot is None:
            raise RuntimeError("GatheredPrefix.append outside a chunk: call enter(slot) first")
        if x.shape[seq_dim] != slot.stop - slot.start:
            raise ValueError(f"{name!r}: this chunk holds {slot.stop - slot.start} tokens, got {tuple(x.shape)} "
                             f"(sequence dim {seq_dim})")
        if name in self._seen:
            raise ValueError(f"{name!r} appended twice in one chunk")
        self._seen.add(name)
        spans = self._spans.setdefault(name, [])
        if len(spans) != slot.index:
            raise RuntimeError(f"{name!r} was not gathered for the early chunk; every rank must append the same "
                               f"names in both chunks")
        pending = self._started.pop((name, slot.index), None)
        if pending is None:
            pending = _PendingGather(self.cp, x, seq_dim, slot.index, async_op=False)
        elif pending.seq_dim != seq_dim:
            raise ValueError(f"{name!r} was prefetched along dim {pending.seq_dim}, appended along {seq_dim}")
        spans.append(_Gathered.apply(x, pending))
        whole = spans[0] if len(spans) == 1 else torch.cat(spans, dim=seq_dim)
        return whole.narrow(seq_dim, 0, slot.stop)

    # the rest of the cache interface: nothing derived is kept, nothing advances
    def derived(self, name: str) -> None:
        return None

    def set_derived(self, name: str, x: torch.Tensor) -> None:
        pass

    def has(self, name: str) -> bool:
        return name in self._spans

    def advance(self, T: int) -> None:
        pass

    def finish(self) -> None:
        """Every prefetched gather was read (a layer that prefetched what it never appends is a bug)."""
        if self._started:
            raise RuntimeError(f"prefetched gathers never read: {sorted(n for n, _ in self._started)}")
