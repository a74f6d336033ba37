"""Padded and packed batches: which tokens of a forward belong to which sequence.

A variant's `attend` sees one causal sequence per batch row. A padded or packed batch is cut into
`Piece`s, each the new tokens of one sequence, and every piece runs alone (`AttentionLayer.forward`),
so it gives exactly what that sequence gives on its own, positions from 0, block alignment and
compressed entries counted from its first token. Two ways to say where the sequences are:

- attention_mask [B, N] (bool, or integers 0/1; N = the tokens so far, a cache's included): 1 marks a
  real token. Left padding only: each row is zeros, then ones. A row may be all padding (its outputs
  are zeros); right or inner padding raises.
- cu_seqlens [n_docs + 1] (integers 0 = c_0 <= c_1 <= ... <= c_n = T) over a batch of one row:
  document i is tokens c_i .. c_{i+1} - 1 and attends only within itself.

Reading either costs one host sync (the piece bounds are Python ints).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUT_OP = "varlen"  # the dispatch record's entry: "per_sequence" when a padded/packed batch ran piece by piece


@dataclass(frozen=True)
class Piece:
    """Tokens start .. stop - 1 of batch row `row` (of this forward's T new tokens): one sequence's new tokens."""

    row: int
    start: int
    stop: int


def real_token_mask(attention_mask, B: int, n_total: int) -> torch.Tensor:
    """The [B, n_total] bool mask of real tokens, checked: bool or 0/1 integers, left padding only."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise ValueError(
            f"attention_mask must be bool or integer (1 = real token, 0 = padding), got "
            f"{attention_mask.dtype}; additive float masks are not read"
        )
    if tuple(attention_mask.shape) != (B, n_total):
        raise ValueError(
            f"attention_mask must be [B={B}, {n_total}] (one column per token so far, the cache's "
            f"included), got {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype != torch.bool:
        if ((attention_mask != 0) & (attention_mask != 1)).any():
            raise ValueError("attention_mask holds values other than 0 and 1")
        attention_mask = attention_mask != 0
    if n_total > 1 and (attention_mask[:, :-1] & ~attention_mask[:, 1:]).any():
        rows = torch.nonzero((attention_mask[:, :-1] & ~attention_mask[:, 1:]).any(1)).flatten().tolist()
        raise ValueError(
            f"attention_mask rows {rows} have padding after a real token: only left padding is "
            f"supported (zeros, then ones); pack documents with cu_seqlens instead"
        )
    return attention_mask


def pieces_from_mask(real: torch.Tensor, T: int) -> list[Piece]:
    """The new tokens (the last T columns) of each row of a checked real-token mask."""
    n_new = real[:, real.shape[1] - T :].sum(1).tolist()
    return [Piece(b, T - n, T) for b, n in enumerate(n_new) if n > 0]


def pieces_from_cu_seqlens(cu_seqlens, B: int, T: int) -> list[Piece]:
    """One piece per non-empty document of a packed batch of one row."""
    if B != 1:
        raise ValueError(f"cu_seqlens describes documents packed into one row: the batch must be 1, got {B}")
    cu = torch.as_tensor(cu_seqlens)
    if cu.dim() != 1 or cu.numel() < 2 or cu.is_floating_point() or cu.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [n_docs + 1], got {tuple(cu.shape)} {cu.dtype}")
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != T or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T} without going down, got {bounds}")
    return [Piece(0, a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def scatter_pieces(parts: list[tuple[Piece, torch.Tensor]], B: int, T: int, dim: int) -> torch.Tensor:
    """Piece outputs (batch 1, stop - start tokens along `dim`) -> one [B, ..., T, ...] tensor, zeros
    elsewhere. Built by concatenation, so gradients flow to each piece and padding gets none."""
    like = parts[0][1]

    def zeros(n: int) -> torch.Tensor:
        shape = list(like.shape)
        shape[dim] = n
        return like.new_zeros(shape)

    rows = []
    for b in range(B):
        chunks, at = [], 0
        for piece, out in sorted(((p, o) for p, o in parts if p.row == b), key=lambda po: po[0].start):
            if piece.start > at:
                chunks.append(zeros(piece.start - at))
            chunks.append(out)
            at = piece.stop
        if at < T:
            chunks.append(zeros(T - at))
        rows.append(torch.cat(chunks, dim) if len(chunks) > 1 else chunks[0])
    return torch.cat(rows, 0) if B > 1 else rows[0]


def token_weighted_loss(losses: list[tuple[torch.Tensor, int]]) -> torch.Tensor | None:
    """Per-piece auxiliary losses (each a mean over its n query tokens) -> the mean over all their tokens,
    the value one batched call over the same tokens gives (padding counts nothing)."""
    if not losses:
        return None
    total = sum(n for _, n in losses)
    return sum(loss * (n / total) for loss, n in losses)
