"""The functional layer beneath every variant: one package per primitive.

Layout, once for the whole library:
- q, k, v are [B, H, T, D] (batch, heads, tokens, head dim); k/v may have fewer heads (GQA).
- Queries are the last T of S key positions: query t sits at position S - T + t and sees key s
  exactly when s <= S - T + t (prefill T = S, chunked prefill T < S, decode T = 1..16).
- Block selections are int32 [B, Hs, T, k]: valid block ids first (unique, causal, any order),
  then -1 padding. Hs selection heads: Hkv (shared by the G = Hq / Hkv query heads of a group, as
  MSA and NSA select) or Hq (one per query head, as MoBA selects).
- Token selections (DSA, CSA) are int [B, Hs, T, K] ids into the keys, Hs in {1, Hkv}, -1 padding.
- The linear-attention ops (lightning_attention, gated_delta_rule) read no keys of earlier calls: they
  take the T new tokens and the recurrent state [B, H, K, V] of the tokens before, and return the new one.

Each primitive is a package with an `api` module (validation and dispatch) and its implementations
beside it (`reference`, `flex`, `triton`, `sdpa`), each stating what it supports in one
`supports(request)` rule used by `auto`, explicit requests and config validation alike. Every
public op records the implementation that ran: `implementations_used()`.
"""

from __future__ import annotations

from . import checks, references
from .block_sparse_attention import block_sparse_attention
from .branch_sum import branch_sum
from .compressed_attention import compressed_attention
from .dense_attention import dense_attention
from .dispatch import implementations_used, last_implementation, record, track_implementations
from .gated_delta_rule import gated_delta_rule
from .gather_attention import gather_attention
from .index_kl import index_kl, msa_index_kl
from .indexer_topk import indexer_topk
from .lightning_attention import lightning_attention
from .moba_select import moba_select
from .msa_select import msa_select
from .nsa_decode import nsa_decode
from .nsa_select import nsa_select
from .window_attention import window_attention

OPS = {
    "dense_attention": "dense_attention",
    "branch_sum": "branch_sum",
    "block_sparse_attention": "block_sparse_attention",
    "gather_attention": "gather_attention",
    "window_attention": "window_attention",
    "compressed_attention": "compressed_attention",
    "msa_select": "msa_select",
    "nsa_select": "nsa_select",
    "nsa_decode": "nsa_decode",
    "indexer_topk": "indexer_topk",
    "moba_select": "moba_select",
    "msa_index_kl": "index_kl",
    "index_kl": "index_kl",
    "lightning_attention": "lightning_attention",
    "gated_delta_rule": "gated_delta_rule",
}

__all__ = [
    "block_sparse_attention", "branch_sum", "checks", "compressed_attention", "dense_attention", "gated_delta_rule",
    "gather_attention", "implementations_used", "index_kl", "indexer_topk", "last_implementation",
    "lightning_attention", "moba_select", "msa_index_kl", "msa_select", "nsa_decode", "nsa_select", "op", "record",
    "references", "track_implementations", "window_attention",
]


def _op_object(name: str):
    import importlib

    pkg = importlib.import_module(f"{__name__}.{OPS[name]}")
    return {"msa_index_kl": getattr(pkg, "MSA_OP", None), "index_kl": getattr(pkg, "DSA_OP", None)}.get(name) or pkg.OP


_OP_OBJECTS = {name: _op_object(name) for name in OPS}
for _op in _OP_OBJECTS.values():  # import every implementation now: torch.compile cannot trace an import
    _op.load_implementations()
del _op


def op(name: str):
    """The `Op` object of a public op (its implementations and `supports` rules), by op name."""
    if name not in _OP_OBJECTS:
        raise ValueError(f"unknown op {name!r}; choose one of {sorted(OPS)}")
    return _OP_OBJECTS[name]
