"""NSA's block selection: compressed-attention probabilities -> block importance -> top-n, with
block 0 and the two local blocks forced."""

from .api import OP, nsa_select

__all__ = ["OP", "nsa_select"]
