"""Linear attention with a fixed exponential decay per head (MiniMax-01's Lightning Attention)."""

from .api import OP, lightning_attention

__all__ = ["OP", "lightning_attention"]
