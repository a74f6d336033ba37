"""Device helpers for the non-finite rule (docs/ops.md, "Non-finite values"): output row (b, h, t) is NaN
(all of it, and its LSE) iff q[b, h, t] holds a NaN/inf or a key the row attends to holds one in k or v;
every other row is what it would be with those values replaced by finite ones.

Two ways to track it inside an attention kernel, for two kinds of tiles:

- Every loaded key is attended by every row of the tile (gather_attention_triton, decode_attention: the
  rows are the G heads of one query, and keys a row may not see are never loaded, or loaded as 0): the
  bad values stay in the bad rows, so no zeroing is needed. Flag a row when one of its attended scores
  is non-finite (`saw_nonfinite`, on the [BM, BN] score tile before the -inf masking: a k row holding a
  NaN/inf makes its whole score column NaN/inf), and at the end when its accumulator is non-finite
  (`nonfinite_rows`: a v row holding a NaN/inf reaches every row that weighs it, even with weight 0,
  and stays non-finite through the online-softmax rescaling) or its q is; then `poison_rows`. A score
  that overflows fp32 from finite inputs counts as non-finite (the reference's softmax gives NaN there too).
- A tile holds keys some rows must not see (block-sparse tiles: unions of several tokens' blocks, the
  causal diagonal): zero the bad k/v rows before the dots (`nonfinite_rows` on the [BN, D] tiles, then
  `zero_rows`), flag a row that attends to a bad key ([BM, BN] where on the visibility mask, one max),
  flag its own q (`nonfinite_rows` once), and poison at the end.

Backward kernels: a poisoned row has a NaN LSE; treat it as a row that attends to nothing (p = 0, its q and
dO zeroed, dQ = 0), so gradients stay finite and equal the reference's (torch.where masking).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def nonfinite_rows(x):
    """[N, D] tile -> [N] bool: the row holds a NaN or an infinity (|x| < inf is false for both)."""
    return tl.min((tl.abs(x.to(tl.float32)) < float("inf")).to(tl.int32), axis=1) == 0


@triton.jit
def saw_nonfinite(s, attended):
    """[BM, BN] scores and which of them each row attends to -> [BM] bool: an attended score is NaN/inf."""
    return tl.max((attended & ~(tl.abs(s) < float("inf"))).to(tl.int32), axis=1) > 0


@triton.jit
def zero_rows(x, bad):
    """x [N, D] with the rows bad [N] set to 0."""
    return tl.where(bad[:, None], 0.0, x)


@triton.jit
def poison_rows(x, bad):
    """x [N, D] with the rows bad [N] set to NaN."""
    return tl.where(bad[:, None], float("nan"), x)


@triton.jit
def poison(x, bad):
    """x [N] with the entries bad [N] set to NaN (an LSE)."""
    return tl.where(bad, float("nan"), x)


@triton.jit
def max_keep_nan(a, b):
    """Combine function for tl.reduce: max that returns NaN if either side is NaN (the GPU's plain max
    drops NaN; this is one max.NaN instruction, no extra compare)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


# ----------------------------------------------------------------------------- whole tensors (host callable)
# For the ops that run FlexAttention or SDPA, which cannot track bad rows inside: the rows' flags in one read
# of x, and the bad output rows set to NaN in place with writes to those rows only (torch's broadcast
# where / vector_norm took 2.5-2.9 ms each on a [1, 64, 128k, 128] bf16 tensor of an H200).

_ROWS_PER_PROGRAM = 32


@triton.jit
def _row_offsets(r, H, T, sb, sh, st):
    """Element offsets of rows r of a [B, H, T, D] tensor (row = (b * H + h) * T + t)."""
    b = (r // (H * T)).to(tl.int64)
    h = ((r // T) % H).to(tl.int64)
    t = (r % T).to(tl.int64)
    return b * sb + h * sh + t * st


@triton.jit
def _row_flags_kernel(X, FLAGS, n_rows, H, T, sb, sh, st, sd, D: tl.constexpr, BD: tl.constexpr,
                      BR: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = r < n_rows
    d = tl.arange(0, BD)
    x = tl.load(X + _row_offsets(r, H, T, sb, sh, st)[:, None] + d[None, :] * sd, mask=ok[:, None] & (d[None, :] < D),
                other=0.0)
    tl.store(FLAGS + r, nonfinite_rows(x).to(tl.int8), mask=ok)


@triton.jit
def _poison_rows_kernel(X, BAD, n_rows, H, T, sb, sh, st, sd, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    bad = tl.load(BAD + r, mask=r < n_rows, other=0) != 0
    if tl.max(bad.to(tl.int32)) > 0:
        d = tl.arange(0, BD)
        ptr = X + _row_offsets(r, H, T, sb, sh, st)[:, None] + d[None, :] * sd
        tl.store(ptr, tl.full([BR, BD], float("nan"), tl.float32).to(X.dtype.element_ty),
                 mask=bad[:, None] & (d[None, :] < D))


def _geometry(x):
    B, H, T, D = x.shape
    return B * H * T, dict(D=D, BD=max(16, triton.next_power_of_2(D)), BR=_ROWS_PER_PROGRAM)


def row_flags(x):
    """x [B, H, T, D] (any strides) -> bool [B, H, T]: the row holds a NaN or an infinity."""
    import torch

    n, consts = _geometry(x)
    flags = torch.empty(x.shape[:3], dtype=torch.int8, device=x.device)
    if n:
        _row_flags_kernel[(triton.cdiv(n, consts["BR"]),)](x, flags, n, x.shape[1], x.shape[2], *x.stride(), **consts)
    return flags.view(torch.bool)


def poison_rows_(x, bad):
    """Set the rows bad [B, H, T] (bool) of x [B, H, T, D] to NaN, in place; returns x."""
    n, consts = _geometry(x)
    if n:
        bad = bad.expand(x.shape[:3]).contiguous()
        _poison_rows_kernel[(triton.cdiv(n, consts["BR"]),)](x, bad, n, x.shape[1], x.shape[2], *x.stride(), **consts)
    return x
