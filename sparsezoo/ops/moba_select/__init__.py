"""MoBA's parameter-free block gate: <q, mean key of block j>, top-k per query head plus its own block."""

from .api import OP, block_mean_keys, moba_select

__all__ = ["OP", "block_mean_keys", "moba_select"]
