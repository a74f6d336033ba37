"""Gather attention through the Triton kernels (sparsezoo.kernels.gather_attention_triton).

Eager calls go straight to the launcher. Under torch.compile the call goes through the custom op
sparsezoo::gather_attention_triton (opaque to the compiler; its fake gives the output shapes), whose
autograd formula calls sparsezoo::gather_attention_triton_backward. The launcher's argument handling
(int32 ids, an empty pool dropped, the no-key case) runs as traced torch code before the op.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import compiling, kernel_built

_KERNEL_BUILT = kernel_built("gather_attention_triton")


def supports(req) -> str | None:
    if not _KERNEL_BUILT:
        return "the Triton gather-attention kernel is not built into this install"
    if req.get("head_dim", 0) > 256:
        return f"the Triton kernel supports head_dim <= 256, got {req['head_dim']}"
    return None


def run(q, k, v, idx, scale: float, return_lse: bool = False, k_extra=None, v_extra=None, window: int = 0,
        sink=None, extra_ids: bool = False):
    """A sink is applied in the kernels' epilogue; its gradient is computed beside the kernel's backward.
    extra_ids: the kernels add the first pool's rows to every listed id (no rewrite of idx)."""
    from sparsezoo.kernels import gather_attention_triton

    N, N2 = k.shape[2], 0 if k_extra is None else k_extra.shape[2]
    window = window if N > 0 else 0  # as the launcher: no raw token, no window
    if not compiling() or q.numel() == 0 or N + N2 == 0 or window + idx.shape[-1] == 0:  # (no key: traceable)
        return gather_attention_triton.gather_attention_triton(q, k, v, idx, scale, return_lse, k2=k_extra,
                                                               v2=v_extra, window=window, sink=sink,
                                                               extra_ids=extra_ids)
    base = N if extra_ids else 0
    if idx.dtype == torch.int64:  # as the launcher: ids past int32 must not wrap into range
        idx = idx.clamp(-1, N + N2 - base)
    if N == 0:  # only the second pool holds keys: its ids already start at 0
        k, v, k_extra, v_extra = k_extra, v_extra, None, None
    elif N2 == 0:
        k_extra = v_extra = None
    out, lse = torch.ops.sparsezoo.gather_attention_triton(q, k, v, idx.to(torch.int32), float(scale), k_extra,
                                                           v_extra, int(window), sink, base)
    return (out, lse) if return_lse else out


# -- the custom ops torch.compile sees ------------------------------------------------------------------
def _config(device: torch.device) -> dict:
    """The launcher's tiling: its GPU config, with the interpreter's small tiles on the CPU."""
    from sparsezoo.kernels import gather_attention_triton as gat

    return {**gat.GATHER_CONFIG, **(gat._INTERPRET_CONFIG if device.type != "cuda" else {})}


@torch.library.custom_op("sparsezoo::gather_attention_triton", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, scale: float, k2: Tensor | None,
                v2: Tensor | None, window: int, sink: Tensor | None, base: int) -> tuple[Tensor, Tensor]:
    """(out, lse) for int32 ids (each listed id >= 0 counts from base), a non-empty first pool and a second
    pool that is None or non-empty."""
    from sparsezoo.kernels import gather_attention_triton as gat

    sink = None if sink is None else sink.float().contiguous()
    return gat._forward(q, k, v, k2, v2, idx, scale, window, _config(q.device), sink, base)


@_forward_op.register_fake
def _forward_fake(q, k, v, idx, scale, k2, v2, window, sink, base):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("sparsezoo::gather_attention_triton_backward", mutates_args=())
def _backward_op(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                 dlse: Tensor | None, scale: float, k2: Tensor | None, v2: Tensor | None, window: int,
                 sink: Tensor | None, base: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dk2, dv2, dsink); without a second pool dk2, dv2 are empty, without a sink dsink."""
    from sparsezoo.kernels import gather_attention_triton as gat

    sink32 = None if sink is None else sink.float().contiguous()
    dq, dk, dv, dk2, dv2, dsink = gat._backward(q, k, v, k2, v2, idx, out, lse, dout, dlse, scale, window,
                                                _config(q.device), sink32, base)
    dsink = q.new_empty(0) if sink is None else dsink.to(sink.dtype)
    if dk2 is None:
        return dq, dk, dv, q.new_empty(0), q.new_empty(0), dsink
    # with two pools the kernel returns slices of one buffer: outputs of an op may not alias each other
    return dq, dk.contiguous(), dv.contiguous(), dk2.contiguous(), dv2.contiguous(), dsink


@_backward_op.register_fake
def _backward_fake(q, k, v, idx, out, lse, dout, dlse, scale, k2, v2, window, sink, base):
    extra = (q.new_empty(0), q.new_empty(0)) if k2 is None else (k2.new_empty(k2.shape), v2.new_empty(v2.shape))
    dsink = q.new_empty(0) if sink is None else sink.new_empty(sink.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *extra, dsink


def _setup_context(ctx, inputs, output):
    q, k, v, idx, scale, k2, v2, window, sink, base = inputs
    ctx.save_for_backward(q, k, v, idx, *output, k2, v2, sink)
    ctx.scale, ctx.window, ctx.base = scale, window, base


def _backward(ctx, dout, dlse):
    q, k, v, idx, out, lse, k2, v2, sink = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dk2, dv2, dsink = torch.ops.sparsezoo.gather_attention_triton_backward(
        q, k, v, idx, out, lse, dout, dlse, ctx.scale, k2, v2, ctx.window, sink, ctx.base)
    if k2 is None:
        dk2 = dv2 = None
    return dq, dk, dv, None, None, dk2, dv2, None, None if sink is None else dsink, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)
