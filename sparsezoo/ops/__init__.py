"""The functional layer beneath every variant module.

Layout, once for the whole library:
- q, k, v are [B, H, T, D] (batch, heads, tokens, head dim); k/v may have fewer heads (GQA).
- Queries are the last T of S key positions: query t sits at position S - T + t and sees key s
  exactly when s <= S - T + t (prefill T = S, chunked prefill T < S, decode T = 1..16).
- Block selections are int32 [B, Hkv, T, k]: valid block ids first (unique, causal, any order),
  then -1 padding. Index heads (MSA) select for their KV group; all G = Hq / Hkv query heads of a
  group share that selection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import checks, reference
from .dispatch import implementations_used, last_implementation, record, resolve, track_implementations

__all__ = [
    "msa_select", "block_sparse_attention", "dense_attention", "msa_index_kl",
    "implementations_used", "last_implementation", "track_implementations",
]


def _needs_grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def msa_select(q_idx: torch.Tensor, k_idx: torch.Tensor, *, block_size: int, topk: int,
               scale: float | None = None, backend: str = "auto", check: bool = False) -> torch.Tensor:
    """MSA index-branch selection (msa_spec.md).

    q_idx [B, H_i, T, D_i] (one index head per KV group), k_idx [B, S, D_i] (one shared index-key
    head); queries are the last T of S positions. Returns int32 [B, H_i, T, topk]: the best
    topk - 1 blocks before the local block by max-pooled score (ties to the smaller id), then the
    local block, then -1 padding. `check=True` also rejects NaN/Inf inputs.
    """
    checks.check_rank("q_idx", q_idx, 4, "[B, H_i, T, D_i]")
    checks.check_rank("k_idx", k_idx, 3, "[B, S, D_i]")
    checks.check_float("q_idx", q_idx)
    checks.check_same("q_idx", q_idx, "k_idx", k_idx)
    checks.check_positive_int("block_size", block_size)
    checks.check_positive_int("topk", topk)
    B, H, T, Di = q_idx.shape
    if k_idx.shape[0] != B or k_idx.shape[2] != Di:
        raise ValueError(f"k_idx must be [B={B}, S, D_i={Di}], got {tuple(k_idx.shape)}")
    S = k_idx.shape[1]
    if T > S:
        raise ValueError(f"queries are the last T of S positions, so T ({T}) must be <= S ({S})")
    if check:
        checks.check_finite("q_idx", q_idx)
        checks.check_finite("k_idx", k_idx)
    scale = 1.0 / math.sqrt(Di) if scale is None else scale
    impl = resolve("msa_select", backend, ("reference", "triton"), q_idx.device, False,
                   auto_order=_select_auto_order(q_idx, block_size))
    if impl == "triton":
        from sparsezoo.kernels import select_triton

        out = select_triton.msa_select_triton(q_idx, k_idx, block_size, topk, scale)
    else:
        with torch.no_grad():
            out = reference.msa_select_reference(q_idx, k_idx, block_size, topk, scale)
    record("msa_select", impl)
    return out


def _select_auto_order(q_idx: torch.Tensor, block_size: int) -> tuple[str, ...]:
    if _triton_fits(q_idx, block_size) and _has_kernel("select_triton"):
        return ("triton", "reference")
    return ("reference",)


def _triton_fits(x: torch.Tensor, block_size: int, group: int = 1, device_type: str | None = None) -> bool:
    """The Triton prefill kernels serve CUDA fp32/fp16/bf16, power-of-two (or multiple-of-128)
    blocks and power-of-two GQA groups; other inputs take the next backend under `auto`."""
    from .dispatch import triton_available

    pow2 = lambda n: n > 0 and n & (n - 1) == 0
    device_type = device_type or x.device.type
    return (device_type == "cuda" and triton_available() and x.dtype != torch.float64 and pow2(group)
            and (pow2(block_size) or block_size % 128 == 0))


def _has_kernel(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(f"sparsezoo.kernels.{name}") is not None


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor, *,
                           block_size: int, scale: float | None = None, backend: str = "auto",
                           return_lse: bool = False, check: bool = False):
    """Exact softmax attention of q [B, Hq, T, D] over the selected blocks of k, v [B, Hkv, S, D].

    block_idx is int32 [B, Hkv, T, k] in the selection format above; causal with queries as the
    last T of S positions. Returns [B, Hq, T, D] (and the natural-log LSE [B, Hq, T] when
    return_lse). A query with no visible selected key gets output 0 and LSE -inf.
    `check=True` validates the selection values and rejects NaN/Inf inputs.
    """
    B, Hq, Hkv, T, S, D = checks.check_qkv(q, k, v)
    checks.check_positive_int("block_size", block_size)
    checks.check_block_idx(block_idx, B, Hkv, T, S, block_size, values=check)
    if check:
        for name, t in (("q", q), ("k", k), ("v", v)):
            checks.check_finite(name, t)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    impl = resolve("block_sparse_attention", backend, ("reference", "flex", "triton"), q.device,
                   _needs_grad(q, k, v), auto_order=_sparse_auto_order(q, Hq // Hkv, block_size))
    if impl == "flex":
        from . import flex

        out = flex.block_sparse_attention_flex(q, k, v, block_idx, block_size, scale, return_lse)
    elif impl == "triton":
        from sparsezoo.kernels import sparse_attention_triton

        out = sparse_attention_triton.block_sparse_attention_triton(q, k, v, block_idx, block_size, scale, return_lse)
    else:
        out = reference.block_sparse_attention_reference(q, k, v, block_idx, block_size, scale, return_lse)
    record("block_sparse_attention", impl)
    return out


def _sparse_auto_order(q: torch.Tensor, group: int, block_size: int,
                       device_type: str | None = None) -> tuple[str, ...]:
    device_type = device_type or q.device.type
    if device_type != "cuda":
        return ("reference",)
    order = ("reference",)
    if block_size % 128 == 0 or 128 % block_size == 0:  # flex's BlockMask tiling (ops/flex.py)
        order = ("flex",) + order
    if _triton_fits(q, block_size, group, device_type) and _has_kernel("sparse_attention_triton"):
        order = ("triton",) + order
    return order


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                    backend: str = "auto", return_lse: bool = False):
    """Causal GQA attention, queries the last T of S. Backends: reference, sdpa, flex."""
    B, Hq, Hkv, T, S, D = checks.check_qkv(q, k, v)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if return_lse and backend == "sdpa":
        raise ValueError("the sdpa backend cannot return the LSE; use 'reference' or 'flex'")
    auto = ("flex", "reference") if return_lse else ("sdpa",)
    impl = resolve("dense_attention", backend, ("reference", "sdpa", "flex"), q.device,
                   _needs_grad(q, k, v), auto_order=auto)
    if impl == "sdpa":
        out = _dense_sdpa(q, k, v, scale)
    elif impl == "flex":
        from . import flex

        out = flex.dense_attention_flex(q, k, v, scale, return_lse)
    else:
        out = reference.dense_attention_reference(q, k, v, scale, return_lse)
    record("dense_attention", impl)
    return out


def _dense_sdpa(q, k, v, scale):
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, S), scale=scale,
                                          enable_gqa=gqa)


def msa_index_kl(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor,
                 block_idx: torch.Tensor | None, *, block_size: int, scale: float | None = None,
                 index_scale: float | None = None, coeff: float = 1.0, temperature: float = 1.0,
                 backend: str = "auto") -> torch.Tensor:
    """MSA's sparse KL loss for the index branch (msa_spec.md, "Training the index branch").

    Teacher: group-mean main attention over the selected tokens (detached). Student: softmax of the
    index logits over the same tokens. block_idx=None uses every visible token (dense warm-up).
    Its gradient w.r.t. an index logit is coeff * (Q - P) / (B * H_i * T); q, k get none.
    """
    B, Hq, Hkv, T, S, D = checks.check_qkv(q, k, k)
    checks.check_rank("q_idx", q_idx, 4, "[B, H_i, T, D_i]")
    checks.check_rank("k_idx", k_idx, 3, "[B, S, D_i]")
    if tuple(q_idx.shape[:3]) != (B, Hkv, T):
        raise ValueError(f"q_idx must be [B={B}, H_i=Hkv={Hkv}, T={T}, D_i], got {tuple(q_idx.shape)}")
    if tuple(k_idx.shape[:2]) != (B, S) or k_idx.shape[2] != q_idx.shape[3]:
        raise ValueError(f"k_idx must be [B={B}, S={S}, D_i={q_idx.shape[3]}], got {tuple(k_idx.shape)}")
    if block_idx is not None:
        checks.check_block_idx(block_idx, B, Hkv, T, S, block_size)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    index_scale = 1.0 / math.sqrt(q_idx.shape[3]) if index_scale is None else index_scale
    impl = resolve("msa_index_kl", backend, ("reference", "triton"), q.device, False,
                   auto_order=_kl_auto_order(q, Hkv, block_size))
    if impl == "triton":
        from sparsezoo.kernels import index_kl_triton

        out = index_kl_triton.msa_index_kl_triton(q, k, q_idx, k_idx, block_idx, block_size, scale,
                                                  index_scale, coeff=coeff, temperature=temperature)
    else:
        out = reference.msa_index_kl_reference(q, k, q_idx, k_idx, block_idx, block_size, scale,
                                               index_scale, coeff, temperature)
    record("msa_index_kl", impl)
    return out


def _kl_auto_order(q: torch.Tensor, n_kv_heads: int, block_size: int) -> tuple[str, ...]:
    if _triton_fits(q, block_size, q.shape[1] // n_kv_heads) and _has_kernel("index_kl_triton"):
        return ("triton", "reference")
    return ("reference",)
