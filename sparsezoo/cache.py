"""A static, contiguous per-layer cache indexed by position (gpt-fast style).

Buffers are named and allocated on first use with `max_seq_len` slots along their sequence dim, so
each variant keeps whatever per-token state it needs (K, V, MSA/DSA index keys, ...). All buffers of
one layer advance together: `append` writes at the current position, `advance` moves it once per
forward. The first append fixes the batch size until `reset`; another batch size raises.

A padded batch (`AttentionLayer.forward(..., attention_mask=...)`) keeps one cache per row instead
(`rows`, made by the layer's `make_cache(1, max_seq_len)`): row b's cache holds only its real tokens,
at positions from 0, while `pos` counts the batch's columns, padding included.
"""

from __future__ import annotations

import torch


class LayerCache:
    def __init__(self, max_batch_size: int, max_seq_len: int):
        if max_batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"cache sizes must be >= 1, got batch {max_batch_size}, length {max_seq_len}")
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.pos = 0
        self.batch: int | None = None  # fixed by the first append of a sequence
        self._buffers: dict[str, tuple[torch.Tensor, int]] = {}
        self._derived: dict[str, torch.Tensor] = {}
        self.rows: list | None = None  # per-row caches of a padded batch

    def append(self, name: str, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
        """Write x's T new tokens at the current position; return the buffer up to pos + T."""
        B, T = x.shape[0], x.shape[seq_dim]
        if self.rows is not None:
            raise ValueError("this cache holds a padded batch in per-row caches (cache.rows); reset() it first")
        if B > self.max_batch_size:
            raise ValueError(f"batch {B} exceeds the cache's max_batch_size {self.max_batch_size}")
        self._check_batch(B)
        self.batch = B
        if self.pos + T > self.max_seq_len:
            raise ValueError(f"cache overflow: {self.pos} + {T} tokens > max_seq_len {self.max_seq_len}")
        if name not in self._buffers:
            shape = list(x.shape)
            shape[0], shape[seq_dim] = self.max_batch_size, self.max_seq_len
            self._buffers[name] = (torch.zeros(shape, dtype=x.dtype, device=x.device), seq_dim)
        buf, dim = self._buffers[name]
        if dim != seq_dim or buf.dtype != x.dtype or buf.device != x.device or \
                [s for i, s in enumerate(buf.shape) if i not in (0, dim)] != [s for i, s in enumerate(x.shape) if i not in (0, dim)]:
            raise ValueError(f"cache buffer {name!r} holds {tuple(buf.shape)} {buf.dtype} on {buf.device} "
                             f"(seq dim {dim}); got {tuple(x.shape)} {x.dtype} on {x.device} (seq dim {seq_dim})")
        buf[:B].narrow(dim, self.pos, T).copy_(x.detach())
        return buf[:B].narrow(dim, 0, self.pos + T)

    def get(self, name: str, batch: int, length: int | None = None) -> torch.Tensor:
        self._check_batch(batch)
        buf, dim = self._buffers[name]
        return buf[:batch].narrow(dim, 0, self.pos if length is None else length)

    def buffer(self, name: str) -> torch.Tensor:
        """The whole preallocated buffer [max_batch_size, ..., max_seq_len, ...] (a static decode step
        writes into it at a position tensor)."""
        if name not in self._buffers:
            raise KeyError(f"cache buffer {name!r} is not allocated yet (present: {sorted(self._buffers)})")
        return self._buffers[name][0]

    def derived(self, name: str) -> torch.Tensor | None:
        """A summary a variant stored with set_derived and can rebuild from the buffers (per-block mean
        keys, say); None after reset()."""
        return self._derived.get(name)

    def set_derived(self, name: str, x: torch.Tensor) -> None:
        self._derived[name] = x

    def has(self, name: str) -> bool:
        return name in self._buffers

    def advance(self, T: int) -> None:
        self.pos += T

    def reset(self) -> None:
        self.pos = 0
        self.batch = None
        self._derived = {}
        self.rows = None

    def _check_batch(self, B: int) -> None:
        if self.batch is not None and B != self.batch:
            raise ValueError(f"this cache holds a batch of {self.batch}, got {B}; reset() it to start a new "
                             f"sequence with another batch size")
