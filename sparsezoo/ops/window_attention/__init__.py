"""Causal sliding-window attention (NSA's window branch, CSA's raw window)."""

from .api import OP, window_attention

__all__ = ["OP", "window_attention"]
