"""Exact softmax attention over a per-query list of key ids (DSA's tokens, CSA's window + entries)."""

from .api import OP, gather_attention

__all__ = ["OP", "gather_attention"]
