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


# Per-query-head selections (MoBA) for at most this many new queries per request run the token-gather
# kernel, whose split-K decode fills the GPU; the block kernel's one-token tiles would run the selected
# blocks one after another per head (measured on an H200: 0.17 ms against dense's 0.53 ms at 128k, batch 8).
GATHER_DECODE_T = 4


def run(q, k, v, block_idx, block_size: int, scale: float, return_lse: bool = False):
    from sparsezoo.kernels import gather_attention_triton, sparse_attention_triton

    if block_idx.shape[1] == q.shape[1] != k.shape[1] and q.shape[2] <= GATHER_DECODE_T:
        ids = block_tokens(block_idx, block_size, q.shape[2], k.shape[2])
        return gather_attention_triton.gather_attention_triton(q, k, v, ids, scale, return_lse)
    return sparse_attention_triton.block_sparse_attention_triton(q, k, v, block_idx, block_size, scale, return_lse)


def block_tokens(block_idx, block_size: int, T: int, S: int):
    """Selected blocks [B, H, T, k] -> int32 token ids [B, H, T, k * block_size] each query may see (causal,
    inside S), -1 elsewhere; ids outside [0, n_blocks) select nothing."""
    import torch

    n_blocks = -(-S // block_size)
    blk = block_idx.long()
    blk = torch.where((blk >= 0) & (blk < n_blocks), blk, -1)
    tok = blk[..., None] * block_size + torch.arange(block_size, device=blk.device)
    pos = torch.arange(S - T, S, device=blk.device).view(T, 1, 1)
    tok = torch.where((blk[..., None] >= 0) & (tok <= pos), tok, -1)
    return tok.flatten(-2).to(torch.int32)
