"""NSA's whole attention for a few new queries (decode): compressed branch, selection, selected blocks and
window, and their gated sum, in one op (fused Triton kernels on a GPU)."""

from .api import DECODE_T, OP, nsa_decode

__all__ = ["DECODE_T", "OP", "nsa_decode"]
