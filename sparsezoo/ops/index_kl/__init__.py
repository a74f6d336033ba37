"""Index-branch KL losses: MSA's sparse KL over selected blocks, DSA/CSA's indexer KL over tokens."""

from .api import DSA_OP, MSA_OP, index_kl, msa_index_kl

__all__ = ["DSA_OP", "MSA_OP", "index_kl", "msa_index_kl"]
