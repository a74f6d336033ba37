"""Every plain-PyTorch reference in one namespace: the oracle the fast paths are tested against.

They run anywhere torch runs, support fp64 and autograd, and work in query chunks (recomputed in the
backward), so memory stays bounded. Each also sits beside its op as `<op>/reference.py`.
"""

from .block_sparse_attention.reference import block_sparse_attention_reference
from .common import full_selection, query_positions, select_from_block_scores
from .compressed_attention.reference import compressed_attention_reference
from .dense_attention.reference import dense_attention_reference
from .gated_delta_rule.reference import gated_delta_rule_reference
from .gather_attention.reference import gather_attention_reference
from .index_kl.dsa_reference import index_kl_reference
from .index_kl.msa_reference import msa_index_kl_reference
from .indexer_topk.reference import index_logits, indexer_topk_reference
from .lightning_attention.reference import lightning_attention_reference
from .moba_select.reference import moba_select_reference
from .msa_select.reference import block_scores, msa_select_reference
from .nsa_select.reference import nsa_select_reference
from .window_attention.reference import window_attention_reference

__all__ = [
    "block_scores", "block_sparse_attention_reference", "compressed_attention_reference",
    "dense_attention_reference", "full_selection", "gated_delta_rule_reference", "gather_attention_reference",
    "index_kl_reference", "index_logits", "indexer_topk_reference", "lightning_attention_reference",
    "moba_select_reference", "msa_index_kl_reference",
    "msa_select_reference", "nsa_select_reference", "query_positions", "select_from_block_scores",
    "window_attention_reference",
]
