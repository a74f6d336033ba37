"""Compressed attention of a whole prefill as one square causal cuDNN attention over folded queries.

A query at position p sees entries 0..m, m = (p - block_len + 1) // stride (none before block_len - 1).
So the `stride` queries p = block_len - 1 + m * stride + u (lane u < stride) see exactly entries 0..m.
Query head h, lane u becomes head h * stride + u, row m: every folded row m sees entries 0..m, the
square causal mask over the Sc entries, which cuDNN runs with GQA ratio G * stride (folded head
h * stride + u reads key head h // G). The queries before block_len - 1 get output 0 and LSE -inf; the
last row is padded to whole lanes. The fold and unfold are one copy each of q and of the output, in 8-byte
words.

Only for prefill from position 0 (T == S) with Sc = n_compressed(S) entries, bf16/fp16 on CUDA: a chunk
of a longer sequence would need a bottom-right causal mask. Non-finite values: the pre-pass of
sparsezoo.ops.nonfinite, as the flex path (docs/ops.md).
"""

from __future__ import annotations

import torch

from ..dispatch import compiling, needs_grad
from ..nonfinite import clean_qkv, finish, rows_seeing_key_ranges
from .api import n_compressed, n_visible

DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128


def _cudnn_reason() -> str | None:
    if not torch.backends.cudnn.is_available():
        return "cuDNN is not available"
    if not hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"):
        return "this torch has no cuDNN attention op"
    return None


CUDNN_REASON = _cudnn_reason()  # asked once, at import: torch.compile cannot trace the question


def supports(req) -> str | None:
    if req.device is not None and req.device != "cuda":
        return "the folded cuDNN attention runs on CUDA devices only"
    if req.dtype is not None and req.dtype not in DTYPES:
        return f"cuDNN attention runs fp16/bf16, got {req.dtype}"
    D = req.get("head_dim")
    if D is not None and (D % 8 or D > MAX_HEAD_DIM):
        return f"cuDNN attention needs a head dim that is a multiple of 8 and at most {MAX_HEAD_DIM}, got {D}"
    T, S, Sc = req.get("T"), req.get("S"), req.get("Sc")
    if T is not None and T != S:
        return f"it folds a prefill from position 0 only (T == S), got T={T}, S={S}; chunks and decode run flex"
    if Sc is not None and Sc != n_compressed(S, req["block_len"], req["stride"]):
        return f"it needs the Sc = n_compressed(S) entries of the sequence, got {Sc}"
    if req.device == "cuda":
        return CUDNN_REASON
    return None


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x with its last dim viewed as 8-byte words where it can be (a copy then moves 8 bytes per element: torch's
    copy of a permuted bf16 view moves 2 and ran at a third of the copy bandwidth on an H200)."""
    if compiling():  # Inductor writes its own copy kernel (and Dynamo cannot trace storage_offset)
        return x
    if x.shape[-1] * x.element_size() % 8 or x.stride(-1) != 1 or x.storage_offset() * x.element_size() % 8 \
            or any(st * x.element_size() % 8 for st in x.stride()[:-1]):
        return x
    return x.view(torch.int64)


def _fold(x: torch.Tensor, start: int, stride: int, rows: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, H * stride, rows, D]: x[:, h, start + m * stride + u] at head h * stride + u, row m
    (zeros past T)."""
    B, H, T, D = x.shape
    full = min(rows, (T - start) // stride)  # rows whose lanes all hold a query
    folded = x.new_empty(B, H, stride, rows, D)
    _wide(folded[:, :, :, :full]).copy_(
        _wide(x[:, :, start:start + full * stride]).unflatten(2, (full, stride)).transpose(2, 3))
    if full < rows:
        rest = x[:, :, start + full * stride:start + rows * stride]
        folded[:, :, :rest.shape[2], full] = rest
        folded[:, :, rest.shape[2]:, full] = 0
        folded[:, :, :, full + 1:] = 0
    return folded.flatten(1, 2)


def _unfold(y: torch.Tensor, heads: int, T: int, start: int, stride: int, fill: float) -> torch.Tensor:
    """_fold's inverse: [B, heads * stride, rows, *E] -> [B, heads, T, *E] (contiguous), `fill` before start."""
    B, rows, rest = y.shape[0], y.shape[2], y.shape[3:]
    full = min(rows, (T - start) // stride)
    lanes = y.unflatten(1, (heads, stride))
    out = y.new_empty(B, heads, T, *rest)
    out[:, :, :start] = fill
    part = out[:, :, start:start + full * stride].unflatten(2, (full, stride))
    src = lanes[:, :, :, :full].transpose(2, 3)
    if rest:
        part, src = _wide(part), _wide(src)
    part.copy_(src)
    tail = T - start - full * stride
    if tail:
        out[:, :, T - tail:] = lanes[:, :, :tail, full]
    return out


class _FoldQueries(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, start: int, stride: int, rows: int):
        ctx.geometry = (x.shape[1], x.shape[2], start, stride)
        return _fold(x, start, stride, rows)

    @staticmethod
    def backward(ctx, grad):
        heads, T, start, stride = ctx.geometry
        return _unfold(grad, heads, T, start, stride, 0.0), None, None, None


class _UnfoldRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, heads: int, T: int, start: int, stride: int):
        ctx.geometry = (start, stride, y.shape[2])
        return _unfold(y, heads, T, start, stride, 0.0)

    @staticmethod
    def backward(ctx, grad):
        start, stride, rows = ctx.geometry
        return _fold(grad, start, stride, rows), None, None, None, None


def fold_queries(q: torch.Tensor, block_len: int, stride: int, rows: int) -> torch.Tensor:
    """[B, H, T, D] -> [B, H * stride, rows, D]: query block_len - 1 + m * stride + u at head h * stride + u,
    row m (zeros past T). Differentiable."""
    return _FoldQueries.apply(q, block_len - 1, stride, rows)


def unfold_rows(y: torch.Tensor, heads: int, T: int, block_len: int, stride: int) -> torch.Tensor:
    """fold_queries's inverse for an output [B, heads * stride, rows, D] -> [B, heads, T, D], zeros for the
    queries before block_len - 1. Differentiable."""
    return _UnfoldRows.apply(y, heads, T, block_len - 1, stride)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Square causal attention with grouped key heads through cuDNN: (out, natural-log LSE [B, H, S] fp32)."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False,
                                                                   scale=scale)[:2]
    return out, lse.reshape(q.shape[:3])


def compressed_attention_sdpa(q, kc, vc, S: int, block_len: int, stride: int, scale: float,
                              return_lse: bool = False):
    Hq, T, rows = q.shape[1], q.shape[2], kc.shape[2]
    q, kc, vc, q_bad, kv_bad = clean_qkv(q, kc, vc, zero_q=needs_grad(q, kc, vc))
    out, lse = causal_attention(fold_queries(q, block_len, stride, rows), kc, vc, scale)
    out = unfold_rows(out, Hq, T, block_len, stride)
    pos = torch.arange(T, device=q.device)
    bad = q_bad | rows_seeing_key_ranges(kv_bad, torch.zeros_like(pos), n_visible(pos, rows, block_len, stride), Hq)
    if not return_lse:
        return finish(out, bad)
    return finish(out, bad, lse=_unfold(lse.detach(), Hq, T, block_len - 1, stride, float("-inf")))


run = compressed_attention_sdpa
