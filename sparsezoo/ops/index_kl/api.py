"""msa_index_kl and index_kl: validation and dispatch."""

from __future__ import annotations

import math

import torch

from .. import checks
from ..dispatch import Op, Request

MSA_OP = Op("msa_index_kl", __package__, ("triton", "reference"), module_prefix="msa_")
DSA_OP = Op("index_kl", __package__, ("triton", "reference"), module_prefix="dsa_")


def _check_temperature(temperature: float) -> None:
    # no math.isfinite: under torch.compile(dynamic=True) a float may be a SymFloat; 0 < t < inf rejects NaN too
    if not isinstance(temperature, (int, float, torch.SymFloat)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def msa_index_kl(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor,
                 block_idx: torch.Tensor | None, *, block_size: int, scale: float | None = None,
                 index_scale: float | None = None, coeff: float = 1.0, temperature: float = 1.0,
                 main_lse: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """MSA's sparse KL loss for the index branch (docs/msa.md, "Index loss").

    Teacher: group-mean main attention over the selected tokens (detached). Student: softmax of the
    index logits over the same tokens. block_idx=None uses every visible token (dense warm-up).
    Its gradient w.r.t. an index logit is coeff * (Q - P) / (B * H_i * T); q, k get none.
    main_lse [B, Hq, T] (natural log, from the attention over the same selection) lets the Triton
    path skip recomputing the teacher's normaliser.
    """
    B, Hq, Hkv, T, S, D = checks.check_qkv(q, k, k)
    checks.check_rank("q_idx", q_idx, 4, "[B, H_i, T, D_i]")
    checks.check_rank("k_idx", k_idx, 3, "[B, S, D_i]")
    checks.check_positive_int("block_size", block_size)
    if tuple(q_idx.shape[:3]) != (B, Hkv, T):
        raise ValueError(f"q_idx must be [B={B}, H_i=Hkv={Hkv}, T={T}, D_i], got {tuple(q_idx.shape)}")
    if tuple(k_idx.shape[:2]) != (B, S) or k_idx.shape[2] != q_idx.shape[3]:
        raise ValueError(f"k_idx must be [B={B}, S={S}, D_i={q_idx.shape[3]}], got {tuple(k_idx.shape)}")
    if block_idx is not None:
        checks.check_block_idx(block_idx, B, Hkv, T, S, block_size)
        block_idx = checks.drop_out_of_range(block_idx, math.ceil(S / block_size))
    if main_lse is not None and tuple(main_lse.shape) != (B, Hq, T):
        raise ValueError(f"main_lse must be [B={B}, Hq={Hq}, T={T}], got {tuple(main_lse.shape)}")
    _check_temperature(temperature)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    index_scale = 1.0 / math.sqrt(q_idx.shape[3]) if index_scale is None else index_scale
    req = Request.of(q, block_size=block_size, group=Hq // Hkv)
    return MSA_OP.run(backend, req, q, k, q_idx, k_idx, block_idx, block_size, scale, index_scale, coeff,
                      temperature, main_lse)


def index_kl(q: torch.Tensor, k: torch.Tensor, q_i: torch.Tensor, w: torch.Tensor, k_i: torch.Tensor,
             key_end: torch.Tensor, idx: torch.Tensor | None, *, S: int, scale: float, index_scale: float,
             coeff: float = 1.0, temperature: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """DSA's indexer loss: coeff * mean over (b, selection head, t) of KL(P || Q) over a key set M.

    P (teacher, detached): the main attention of the query heads that share the selection head,
    summed over those heads and L1-normalised. Q (student): softmax of the index logits / temperature
    over M. idx=None: M = every visible key (dense warm-up); else M = the selected keys (sparse
    training). q, k [B, Hq|Hkv, T|N, D] are the main queries and keys (k indexed like k_i).
    Only q_i, w, k_i receive gradients. Memory stays O(chunk): chunks are recomputed in the backward.
    """
    checks.check_indexer(q_i, w, k_i, key_end)
    checks.check_rank("q", q, 4, "[B, Hq, T, D]")
    checks.check_rank("k", k, 4, "[B, Hkv, N, D]")
    Hkv, Hs = k.shape[1], q_i.shape[1]
    if Hs not in (1, Hkv):
        raise ValueError(f"selection heads must be 1 or Hkv={Hkv}, got {Hs}")
    if k.shape[2] != k_i.shape[1]:
        raise ValueError(f"k and k_i must index the same N keys, got {k.shape[2]} and {k_i.shape[1]}")
    _check_temperature(temperature)
    req = Request.of(q)
    return DSA_OP.run(backend, req, q, k, q_i, w, k_i, key_end, idx, S, scale, index_scale, coeff, temperature)
