"""Fused MSA prefill indexer (Triton): scores -> block max -> streaming top-k, in one kernel.

One program owns a tile of rows = (HG index heads) x (TM query tokens). All index heads share the
single index-key head, so one key-block load serves every row. For each key block j before the
tile's last local block it computes the [rows, block] scores with tl.dot, max-pools them in
registers and folds the block score into a per-row top-(k-1) list kept in registers (insert when
strictly better than the worst entry; the worst is the lowest score, ties -> the larger id, so ties
go to the smaller id, as docs/variants.md asks). No score matrix and no [T, n_blocks] buffer ever reach
memory: the extra memory is the int32 output alone.

Only blocks j < L(t) are ranked and they are complete and fully visible, so the causal mask never
cuts a ranked block; the local block L(t) is appended after ranking. A NaN score counts as +inf: the
block max keeps NaN (a NaN-propagating max, one instruction, where the GPU's plain max would drop it)
and the block's score becomes +inf, so it ranks first, as in the reference (docs/ops.md, non-finite
values).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsezoo.kernels.nonfinite import max_keep_nan
from sparsezoo.kernels.sizes import key_tile
from sparsezoo.kernels.sizes import pow2 as _pow2


_BIG = tl.constexpr(1 << 30)

# Tiling for the GPU (rows = HEADS x TOKENS). Tuned on H100 (docs/prefill.md).
SELECT_CONFIG = {"HG": 4, "TM": 64, "BN": 128, "num_warps": 8, "num_stages": 3}
# Shared memory a tiling may plan for: the query tile plus num_stages key tiles (sm_90 grants 227 KB
# per program; the margin covers Triton's own scratch). fp32 inputs at D_i = 128 need smaller tiles.
SMEM_BUDGET = 160 * 1024


def fit_tiling(HG: int, TM: int, BN: int, stages: int, BD: int, elem: int) -> tuple[int, int]:
    """(TM, num_stages) within SMEM_BUDGET: drop pipeline stages to 2, then halve TM (>= 16), then
    drop to one stage. bf16 at the GPU defaults fits as it is."""
    def need():
        return (HG * TM * BD + stages * BN * BD) * elem

    while need() > SMEM_BUDGET:
        if stages > 2:
            stages -= 1
        elif TM > 16:
            TM //= 2
        elif stages > 1:
            stages -= 1
        else:
            break
    return TM, stages


@triton.jit
def _select_kernel(Q, K, OUT, T, S, H, scale,
                   sqb, sqh, sqt, sqd, skb, sks, skd, sob, soh, sot, sok,
                   HG: tl.constexpr, TM: tl.constexpr, BLOCK: tl.constexpr, BN: tl.constexpr,
                   D: tl.constexpr, BD: tl.constexpr, KR: tl.constexpr, KP: tl.constexpr,
                   KOUT: tl.constexpr, KOP: tl.constexpr, DO_TOPK: tl.constexpr):
    n_tiles = tl.num_programs(0)
    tile = n_tiles - 1 - tl.program_id(0)  # longest (latest) tiles first
    hg0 = tl.program_id(1) * HG
    b = tl.program_id(2).to(tl.int64)
    BM: tl.constexpr = HG * TM
    r = tl.arange(0, BM)
    head = (hg0 + r // TM).to(tl.int64)
    t = tile * TM + r % TM
    row_ok = (t < T) & (head < H)
    pos = S - T + t
    local = pos // BLOCK
    d = tl.arange(0, BD)
    t64 = t.to(tl.int64)  # token * stride overflows int32 at long lengths
    q = tl.load(Q + b * sqb + head[:, None] * sqh + t64[:, None] * sqt + d[None, :] * sqd,
                mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
    t_last = tl.minimum(tile * TM + TM, T) - 1
    n_rank_blocks = (S - T + t_last) // BLOCK  # ranked blocks are j < L(t) <= this
    slot = tl.arange(0, KP)
    pad = slot >= KR  # slots beyond k-1: never evicted, dropped at the end
    top_s = tl.where(pad[None, :], float("inf"), float("-inf")) + tl.zeros([BM, KP], tl.float32)
    top_i = tl.where(pad[None, :], -2, _BIG + slot[None, :]) + tl.zeros([BM, KP], tl.int32)
    probe = tl.zeros([BM], tl.float32) + float("-inf")
    kn = tl.arange(0, BN)
    k_base = K + b * skb + d[None, :] * skd
    for j in range(0, n_rank_blocks):
        bmax = tl.zeros([BM], tl.float32) + float("-inf")
        for sub in tl.static_range(BLOCK // BN):
            keys = j * BLOCK + sub * BN + kn
            kt = tl.load(k_base + keys[:, None] * sks, mask=d[None, :] < D, other=0.0)
            s = tl.dot(q, tl.trans(kt))
            bmax = tl.maximum(bmax, tl.reduce(s, 1, max_keep_nan), propagate_nan=tl.PropagateNan.ALL)
        bmax = tl.where(bmax == bmax, bmax, float("inf"))  # a NaN score ranks first
        score = tl.where(j < local, bmax * scale, float("-inf"))
        if DO_TOPK:
            worst = tl.min(top_s, axis=1)
            evict = tl.max(tl.where(top_s == worst[:, None], top_i, -3), axis=1)
            repl = (top_i == evict[:, None]) & (score > worst)[:, None]
            top_s = tl.where(repl, score[:, None], top_s)
            top_i = tl.where(repl, j, top_i)
        else:
            probe = tl.maximum(probe, score)
    o_base = OUT + b * sob + head * soh + t64 * sot
    if DO_TOPK:
        valid = (top_i >= 0) & (top_i < _BIG)
        rs = tl.where(valid, top_s, float("-inf"))
        ri = tl.where(valid, top_i, _BIG + _BIG // 2)
        rank = tl.zeros([BM, KP], tl.int32)
        for c in tl.static_range(KP):  # rank = number of entries better than this one
            cs = tl.max(tl.where(slot[None, :] == c, rs, float("-inf")), axis=1)
            ci = tl.min(tl.where(slot[None, :] == c, ri, _BIG + _BIG // 2), axis=1)
            better = (cs[:, None] > rs) | ((cs[:, None] == rs) & (ci[:, None] < ri))
            rank += better.to(tl.int32)
        tl.store(o_base[:, None] + rank * sok, top_i, mask=row_ok[:, None] & valid)
        n_valid = tl.sum(valid.to(tl.int32), axis=1)
        c = tl.arange(0, KOP)
        tail = tl.where(c[None, :] == n_valid[:, None], local[:, None], -1)
        tl.store(o_base[:, None] + c[None, :] * sok, tail,
                 mask=row_ok[:, None] & (c[None, :] >= n_valid[:, None]) & (c[None, :] < KOUT))
    else:
        tl.store(o_base, (probe > 0).to(tl.int32), mask=row_ok)


def msa_select_triton(q_idx: torch.Tensor, k_idx: torch.Tensor, block_size: int, topk: int,
                      scale: float, *, do_topk: bool = True, config: dict | None = None) -> torch.Tensor:
    """q_idx [B, H_i, T, D_i], k_idx [B, S, D_i] -> int32 [B, H_i, T, topk] (MSA's selection, docs/variants.md).

    do_topk=False runs scores + block max only (a timing probe for the top-k share; its output is
    meaningless).
    """
    if scale <= 0:
        raise ValueError(f"the triton indexer needs scale > 0 (max-pooling commutes with it), got {scale}")
    if q_idx.dtype == torch.float64:
        raise ValueError("the triton indexer runs fp32/fp16/bf16; use backend='reference' for fp64")
    cfg = dict(SELECT_CONFIG, **(config or {}))
    B, H, T, D = q_idx.shape
    S = k_idx.shape[1]
    HG = min(cfg["HG"], _pow2(H))
    TM = cfg["TM"]
    if q_idx.device.type != "cuda":  # interpreter: small tiles keep the CPU tests quick
        HG, TM = min(HG, 2), min(TM, 8)
    BN = key_tile(block_size, cfg["BN"], "the triton indexer", "; use backend='reference'")
    TM, stages = fit_tiling(HG, TM, BN, cfg["num_stages"], max(_pow2(D), 16), q_idx.element_size())
    KR = topk - 1
    out = torch.empty((B, H, T, topk), dtype=torch.int32, device=q_idx.device)
    grid = (triton.cdiv(T, TM), triton.cdiv(H, HG), B)
    _select_kernel[grid](
        q_idx, k_idx, out, T, S, H, float(scale),
        *q_idx.stride(), *k_idx.stride(), *out.stride(),
        HG=HG, TM=TM, BLOCK=block_size, BN=BN, D=D, BD=max(_pow2(D), 16), KR=KR, KP=max(_pow2(KR), 2),
        KOUT=topk, KOP=max(_pow2(topk), 2), DO_TOPK=do_topk,
        num_warps=cfg["num_warps"], num_stages=stages)
    return out


def msa_index_lse_triton(q_idx: torch.Tensor, k_idx: torch.Tensor, block_idx: torch.Tensor,
                         block_size: int, scale: float) -> torch.Tensor:
    """Natural-log LSE over each query's selected tokens M of the index logits scale * q_idx.k_idx.

    q_idx [B, H_i, T, D_i], k_idx [B, S, D_i], block_idx [B, H_i, T, k] -> fp32 [B, H_i, T]
    (-inf for an empty M). For a temperature pass scale = index_scale / temperature.
    """
    from sparsezoo.kernels import sparse_attention_triton as sat

    B, H, T, D = q_idx.shape
    k_heads = k_idx[:, None].expand(B, H, k_idx.shape[1], D)
    return sat.sparse_lse(q_idx, k_heads, block_idx, block_size, scale)
