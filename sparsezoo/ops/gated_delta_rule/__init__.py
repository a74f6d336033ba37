"""The gated delta rule (Gated DeltaNet, as in Qwen3-Next's linear-attention layers)."""

from .api import OP, gated_delta_rule

__all__ = ["OP", "gated_delta_rule"]
