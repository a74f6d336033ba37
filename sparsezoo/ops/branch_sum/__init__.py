"""The gated sum of attention branches (NSA's compressed, selected and window outputs)."""

from .api import OP, branch_sum

__all__ = ["OP", "branch_sum"]
