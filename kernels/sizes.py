"""Sizes the Triton kernels share (a leaf: no imports from sparsezoo.ops)."""

import math


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton's block sizes must be powers of two."""
    return 1 << max(0, math.ceil(math.log2(max(int(n), 1))))
