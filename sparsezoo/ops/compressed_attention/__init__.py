"""Attention over compressed entries (NSA's compression branch): entry i of a stride-d, length-l
compression covers tokens [i*d, i*d + l) and is visible to a query at p when i*d + l - 1 <= p."""

from .api import OP, compressed_attention, compressed_visible, n_compressed

__all__ = ["OP", "compressed_attention", "compressed_visible", "n_compressed"]
