"""Selected blocks -> the token ids they cover (Triton): the token list MoBA's decode hands to the token-gather
attention, in one launch (the torch expression it replaces ran as about a dozen small kernels).

block_idx [B, H, T, k] (any integer dtype and strides; -1 and ids outside [0, n_blocks) select nothing), the T
queries the last T of S positions -> int32 [B, H, T, k * block_size]: slot s * block_size + j holds token
block_idx[..., s] * block_size + j where that block is valid and the token is at or before the query's
position, else -1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsezoo.kernels.nonfinite import _row_offsets

_BLOCK = 1024  # output ids per program


@triton.jit
def _block_tokens_kernel(IDX, OUT, H, T, S, n_blocks, width, sib, sih, sit, sik,
                         BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # (b * H + h) * T + t
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = e < width
    t = row % T
    blk = tl.load(IDX + _row_offsets(row, H, T, sib, sih, sit) + (e // BLOCK_SIZE).to(tl.int64) * sik, mask=ok,
                  other=-1).to(tl.int64)
    tok = blk * BLOCK_SIZE + e % BLOCK_SIZE
    keep = (blk >= 0) & (blk < n_blocks) & (tok <= S - T + t)
    tl.store(OUT + row.to(tl.int64) * width + e, tl.where(keep, tok, -1).to(tl.int32), mask=ok)


def block_tokens_triton(block_idx: torch.Tensor, block_size: int, T: int, S: int) -> torch.Tensor:
    B, H, Tq, k = block_idx.shape
    if Tq != T:
        raise ValueError(f"block_idx holds {Tq} queries, expected T={T}")
    width = k * block_size
    out = torch.empty((B, H, T, width), dtype=torch.int32, device=block_idx.device)
    if out.numel():
        grid = (B * H * T, triton.cdiv(width, _BLOCK))
        _block_tokens_kernel[grid](block_idx, out, H, T, S, -(-S // block_size), width, *block_idx.stride(),
                                   BLOCK_SIZE=block_size, BLOCK=_BLOCK)
    return out
