"""Sizes the Triton kernels share (a leaf: no imports from sparsezoo.ops)."""

import math

SMEM_BUDGET = 200 * 1024  # bytes of pipelined tiles per program (Hopper: 227 KB of shared memory per block)


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton's block sizes must be powers of two."""
    return 1 << max(0, math.ceil(math.log2(max(int(n), 1))))


def key_tile(block_size: int, want: int, who: str, hint: str = "", gpu: bool = False) -> int:
    """Keys per sub-tile of a block: the block itself when it is a power of two no larger than `want`,
    else `want` when it divides the block; otherwise a ValueError naming `who` (and `hint`). gpu: the
    tile is the K of a tensor-core dot (p @ v), which needs 16 keys or more on a GPU (the interpreter
    takes fewer), so smaller tiles raise there too."""
    if block_size & (block_size - 1) == 0:
        tile = min(block_size, want)
    elif block_size % want == 0:
        tile = want
    else:
        raise ValueError(f"{who} needs block_size to be a power of two or a multiple of {want}, got {block_size}{hint}")
    if gpu and tile < 16:
        raise ValueError(f"{who} needs block_size >= 16 on a GPU (tensor-core tiles), got {block_size}{hint}")
    return tile


def with_overrides(defaults: dict, config: dict | None, what: str) -> dict:
    """defaults updated by config; a key defaults lacks raises a ValueError naming `what` and the valid keys."""
    unknown = set(config or {}) - set(defaults)
    if unknown:
        raise ValueError(f"unknown {what} config keys {sorted(unknown)}; valid: {sorted(defaults)}")
    return {**defaults, **(config or {})}


def fit_tiles(tile: int, stages: int, bytes_per_row: int, budget: int = SMEM_BUDGET) -> tuple[int, int]:
    """(rows per tile, tiles in flight): `tile` halved (down to 16) until one tile of bytes_per_row-byte rows fits
    the budget, then at most `stages` tiles that fit (at least one)."""
    while tile > 16 and tile * bytes_per_row > budget:
        tile //= 2
    return tile, max(1, min(stages, budget // (tile * bytes_per_row)))
