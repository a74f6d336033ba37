"""Sizes the Triton kernels share (a leaf: no imports from sparsezoo.ops)."""

import math


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton's block sizes must be powers of two."""
    return 1 << max(0, math.ceil(math.log2(max(int(n), 1))))


def key_tile(block_size: int, want: int, who: str, hint: str = "") -> int:
    """Keys per sub-tile of a block: the block itself when it is a power of two no larger than `want`,
    else `want` when it divides the block; otherwise a ValueError naming `who` (and `hint`)."""
    if block_size & (block_size - 1) == 0:
        return min(block_size, want)
    if block_size % want == 0:
        return want
    raise ValueError(f"{who} needs block_size to be a power of two or a multiple of {want}, got {block_size}{hint}")
