"""MSA's index-branch block selection: max-pooled index scores, top-k blocks plus the local block."""

from .api import OP, msa_select

__all__ = ["OP", "msa_select"]
