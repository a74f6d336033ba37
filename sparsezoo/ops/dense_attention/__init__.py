"""Causal GQA softmax attention (the baseline every variant is compared with)."""

from .api import OP, dense_attention

__all__ = ["OP", "dense_attention"]
