"""Block-sparse attention through the Triton kernels (sparsezoo.kernels.sparse_attention_triton)."""

from __future__ import annotations


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(req) -> str | None:
    Hs, Hkv = req.get("selection_heads"), req.get("n_kv_heads")
    if Hs is not None and Hkv is not None and Hs % Hkv:
        return f"the Triton kernel needs the selection heads ({Hs}) to be a multiple of Hkv ({Hkv})"
    if not _pow2(req["group"]):
        return f"the Triton kernel needs a power-of-two GQA group, got {req['group']}"
    bs = req["block_size"]
    if bs < 16 and req.device != "cpu":  # the interpreter (CPU) accepts smaller dots than the GPU
        return f"the Triton kernel's tensor-core tiles need block_size >= 16 on a GPU, got {bs}"
    if not (_pow2(bs) or bs % 128 == 0):
        return f"the Triton kernel needs block_size to be a power of two or a multiple of 128, got {bs}"
    if bs > 512:
        return f"the Triton kernel unrolls a block's 128-key sub-tiles and fits blocks of <= 512 keys, got {bs}"
    if req.get("head_dim", 0) > 256:
        return f"the Triton kernel supports head_dim <= 256, got {req['head_dim']}"
    return None


def run(q, k, v, block_idx, block_size: int, scale: float, return_lse: bool = False):
    from sparsezoo.kernels import sparse_attention_triton

    return sparse_attention_triton.block_sparse_attention_triton(q, k, v, block_idx, block_size, scale, return_lse)
