"""DSA/CSA lightning indexer: weighted-ReLU index logits and token (or compressed-entry) top-k."""

from .api import OP, indexer_topk

__all__ = ["OP", "indexer_topk"]
