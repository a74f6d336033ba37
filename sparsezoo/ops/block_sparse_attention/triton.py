"""Block-sparse attention through the Triton kernels (sparsezoo.kernels.sparse_attention_triton).

Eager calls go straight to the launcher. Under torch.compile the call goes through the custom op
sparsezoo::block_sparse_attention_triton instead (opaque to the compiler; its fake gives the output
shapes), whose autograd formula calls sparsezoo::block_sparse_attention_triton_backward. The forward
op also returns the tile plan (token order, per-tile block unions and bitmasks) that the backward
reads, as the launcher's autograd.Function saves it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import compiling, needs_grad, record


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


# Calls without gradients run the key-major schedule (sparsezoo/kernels/sparse_attention_keys.py: one program per
# key block over the rows that chose it, then an LSE merge) where KEY_MAJOR says so, by selection kind:
# "per_head" (Hs = Hq, MoBA) or "per_group" (Hs = Hkv, MSA), for blocks of at least KEY_MAJOR_MIN_BLOCK
# keys. Each (row, chosen block) pair costs it a partial output row written and read back, so it wins
# where a block gives that row enough work: on an H200 at 128k, blocks of 128 keys (MSA 77.8 -> 57.0 ms,
# MoBA 215 -> 88 ms), not NSA's 64. Calls with gradients run the key-major forward too where
# KEY_MAJOR_TRAIN says so ("key_major_forward": the backward's dQ runs over the query-major tiles, planned
# after the forward, and its dK/dV as KEY_MAJOR_DKDV says); under torch.compile they run the query-major
# kernels, forward and backward. The dispatch record's SCHEDULE_OP entry says which ran.
# KEY_MAJOR_DKDV: that backward's dK/dV key-major too (`sparse_attention_keys.dkdv_keys`: one program per
# key block over the rows that chose it; the query-major dK/dV still runs when the forward flagged a
# NaN/inf key). On an H200 at 128k (MSA): dK/dV 76 against 183 ms, the training step with the index KL
# 337 against 447 ms.
KEY_MAJOR = {"per_head": True, "per_group": True}
KEY_MAJOR_TRAIN = True
KEY_MAJOR_DKDV = True
KEY_MAJOR_MIN_BLOCK = 128
SCHEDULE_OP = "block_sparse_schedule"
# the backward's dK/dV schedule, recorded when a gradient runs: key_major, query_major, or query_major_checked (the
# query-major kernels with queued tiles checked: a NaN/inf key or value, or a row without a finite score)
DKDV_OP = "block_sparse_dkdv_schedule"


def _per_head(q, k, block_idx) -> bool:
    """One selection per query head (Hs = Hq, MoBA) rather than per KV group."""
    return block_idx.shape[1] == q.shape[1] != k.shape[1]


def schedule(q, k, v, block_idx, block_size: int) -> str:
    """The schedule `run` takes for this call after the token-gather decode: "key_major", "key_major_forward"
    (with gradients: the key-major forward and dK/dV, dQ over the query-major tiles) or "query_major"."""
    kind = "per_head" if _per_head(q, k, block_idx) else "per_group"
    if not (KEY_MAJOR[kind] and block_size >= KEY_MAJOR_MIN_BLOCK):
        return "query_major"
    if not needs_grad(q, k, v):
        return "key_major"
    return "key_major_forward" if KEY_MAJOR_TRAIN and not compiling() else "query_major"


def run(q, k, v, block_idx, block_size: int, scale: float, return_lse: bool = False):
    from sparsezoo.kernels import gather_attention_triton, sparse_attention_keys, sparse_attention_triton

    if _per_head(q, k, block_idx) and q.shape[2] <= GATHER_DECODE_T:
        ids = block_tokens(block_idx, block_size, q.shape[2], k.shape[2])
        record(SCHEDULE_OP, "token_gather")
        if compiling():
            out, lse = torch.ops.sparsezoo.gather_attention_triton(q, k, v, ids, float(scale), None, None, 0)
            return (out, lse) if return_lse else out
        return gather_attention_triton.gather_attention_triton(q, k, v, ids, scale, return_lse)
    sched = schedule(q, k, v, block_idx, block_size)
    record(SCHEDULE_OP, sched)
    if sched == "key_major":
        if compiling():
            out, lse = torch.ops.sparsezoo.block_sparse_attention_keys(q, k, v, block_idx, block_size, float(scale))
            return (out, lse) if return_lse else out
        return sparse_attention_keys.block_sparse_attention_keys(q, k, v, block_idx, block_size, scale, return_lse)
    if sched == "key_major_forward":
        return sparse_attention_keys.block_sparse_attention_keys_trainable(q, k, v, block_idx, block_size, scale,
                                                                           return_lse, key_major_dkdv=KEY_MAJOR_DKDV,
                                                                           on_dkdv=_record_dkdv)
    if compiling():
        out, lse, *_plan = torch.ops.sparsezoo.block_sparse_attention_triton(q, k, v, block_idx, block_size,
                                                                             float(scale))
        return (out, lse) if return_lse else out
    return sparse_attention_triton.block_sparse_attention_triton(q, k, v, block_idx, block_size, scale, return_lse,
                                                                 on_dkdv=_record_dkdv)


def _record_dkdv(schedule: str) -> None:
    record(DKDV_OP, schedule)


def block_tokens(block_idx, block_size: int, T: int, S: int):
    """Selected blocks [B, H, T, k] -> int32 token ids [B, H, T, k * block_size] each query may see (causal,
    inside S), -1 elsewhere; ids outside [0, n_blocks) select nothing. One Triton launch outside torch.compile
    (sparsezoo/kernels/block_tokens.py), the torch expression under it."""
    if not compiling():
        from sparsezoo.kernels import block_tokens as kernel

        return kernel.block_tokens_triton(block_idx, block_size, T, S)
    return block_tokens_torch(block_idx, block_size, T, S)


def block_tokens_torch(block_idx, block_size: int, T: int, S: int):
    """block_tokens as torch ops (what torch.compile traces)."""
    n_blocks = -(-S // block_size)
    blk = block_idx.long()
    blk = torch.where((blk >= 0) & (blk < n_blocks), blk, -1)
    tok = blk[..., None] * block_size + torch.arange(block_size, device=blk.device)
    pos = torch.arange(S - T, S, device=blk.device).view(T, 1, 1)
    tok = torch.where((blk[..., None] >= 0) & (tok <= pos), tok, -1)
    return tok.flatten(-2).to(torch.int32)


# -- the custom ops torch.compile sees ------------------------------------------------------------------
@torch.library.custom_op("sparsezoo::block_sparse_attention_triton", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, block_size: int, scale: float,
                window: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, lse, token order, union counts, union ids, token bitmasks, non-finite key flags, checked-tile
    queue). window > 0: a sliding window inside the selected blocks (sparse_attention_triton)."""
    from sparsezoo.kernels import sparse_attention_triton as sat

    out, lse, (tok, counts, ids, bits), (kbad, queue) = sat._forward(q, k, v, block_idx, block_size, scale, False,
                                                                     None, window=window)
    unused = torch.arange(ids.shape[-1], device=ids.device) >= counts[..., None]  # slots past a tile's union:
    ids = ids.masked_fill(unused, -1)  # left unwritten by the kernel; a defined value for the compiler's checks
    bits = ids.new_empty(0) if bits is None else bits.masked_fill(unused, 0)  # no bitmask past BITS_MAX_TM
    return out, lse, tok, counts, ids, bits, kbad, queue


@_forward_op.register_fake
def _forward_fake(q, k, v, block_idx, block_size, scale, window=0):
    from sparsezoo.kernels import sparse_attention_triton as sat

    B, Hq, T, _ = q.shape
    Hs, K = block_idx.shape[1], block_idx.shape[3]
    TM = sat._tiling(Hq // Hs, block_size, q.device, sat.resolve_config(Hq // Hs, None, window))[0]
    NT = -(-T // TM)
    cap = min(TM * K, -(-k.shape[2] // block_size))
    bits = (B, Hs, NT, cap) if TM <= sat.BITS_MAX_TM else (0,)
    plan = [block_idx.new_empty(shape, dtype=torch.int32)
            for shape in ((B, Hs, NT * TM), (B, Hs, NT), (B, Hs, NT, cap), bits)]
    flags = (k.new_empty(k.shape[:3], dtype=torch.int8), block_idx.new_empty(1 + B * Hs * NT, dtype=torch.int32))
    return torch.empty_like(q), q.new_empty((B, Hq, T), dtype=torch.float32), *plan, *flags


@torch.library.custom_op("sparsezoo::block_sparse_attention_keys", mutates_args=())
def _keys_op(q: Tensor, k: Tensor, v: Tensor, block_idx: Tensor, block_size: int,
             scale: float) -> tuple[Tensor, Tensor]:
    """(out, LSE) of the key-major schedule: forward only (no autograd formula)."""
    from sparsezoo.kernels import sparse_attention_keys

    return sparse_attention_keys.block_sparse_attention_keys(q, k, v, block_idx, block_size, scale, True)


@_keys_op.register_fake
def _keys_fake(q, k, v, block_idx, block_size, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


# the dK/dV work lists are built with host syncs (boolean indexing): not CUDA-graph capturable
@torch.library.custom_op("sparsezoo::block_sparse_attention_triton_backward", mutates_args=(),
                         tags=(torch.Tag.cudagraph_unsafe,))
def _backward_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None,
                 block_idx: Tensor, tok: Tensor, counts: Tensor, ids: Tensor, bits: Tensor, kbad: Tensor,
                 queue: Tensor, block_size: int, scale: float, window: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    from sparsezoo.kernels import sparse_attention_triton as sat

    plan = (tok, counts, ids, bits if bits.numel() else None)
    return sat._backward(q, k, v, out, lse, dout, dlse, block_idx, plan, (kbad, queue), block_size, scale,
                         None, window=window)


@_backward_op.register_fake
def _backward_fake(q, k, v, out, lse, dout, dlse, block_idx, tok, counts, ids, bits, kbad, queue, block_size,
                   scale, window=0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, block_idx, block_size, scale, window = inputs
    ctx.save_for_backward(q, k, v, block_idx, *output)
    ctx.block_size, ctx.scale, ctx.window = block_size, scale, window


def _backward(ctx, dout, dlse, *_plan_grads):
    q, k, v, block_idx, out, lse, *plan = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.sparsezoo.block_sparse_attention_triton_backward(
        q, k, v, out, lse, dout, dlse, block_idx, *plan, ctx.block_size, ctx.scale, ctx.window)
    return dq, dk, dv, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)
