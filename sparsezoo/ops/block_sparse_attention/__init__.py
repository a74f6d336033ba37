"""Exact softmax attention over selected key blocks (MSA, NSA's selection branch, MoBA)."""

from .api import OP, block_sparse_attention

__all__ = ["OP", "block_sparse_attention"]
