"""DSA/CSA indexer KL through the Triton kernel (sparsezoo.kernels.index_kl_gather_triton).

Eager calls go straight to the launcher. Under torch.compile the call goes through the custom op
sparsezoo::index_kl_gather_triton (opaque to the compiler), which returns the loss with its gradients
w.r.t. q_i, w and k_i (the kernel computes them in the forward); the autograd formula scales them by the
incoming gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import compiling, kernel_built

_KERNEL_BUILT = kernel_built("index_kl_gather_triton")


def supports(req) -> str | None:
    if not _KERNEL_BUILT:
        return "the Triton indexer-KL kernel is not built into this install"
    return None


def run(q, k, q_i, w, k_i, key_end, idx, S: int, scale: float, index_scale: float, coeff: float = 1.0,
        temperature: float = 1.0):
    idx = None if idx is None else idx.to(torch.int32)
    if compiling():
        with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_i, w, k_i))
        loss, _, _, _ = torch.ops.sparsezoo.index_kl_gather_triton(
            q.detach(), k.detach(), q_i, w, k_i, key_end, idx, int(S), float(scale), float(index_scale),
            float(coeff), float(temperature), with_grad)
        return loss
    from sparsezoo.kernels import index_kl_gather_triton

    return index_kl_gather_triton.index_kl_gather_triton(q, k, q_i, w, k_i, key_end, idx, S, scale, index_scale,
                                                         coeff=coeff, temperature=temperature)


# -- the custom op torch.compile sees -------------------------------------------------------------------
@torch.library.custom_op("sparsezoo::index_kl_gather_triton", mutates_args=())
def _kl_op(q: Tensor, k: Tensor, q_i: Tensor, w: Tensor, k_i: Tensor, key_end: Tensor, idx: Tensor | None,
           S: int, scale: float, index_scale: float, coeff: float, temperature: float,
           with_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss fp32 scalar, d loss / d q_i, d w, d k_i, fp32; empty without with_grad)."""
    from sparsezoo.kernels import index_kl_gather_triton

    loss, dqi, dw, dki = index_kl_gather_triton.index_kl_gather_forward(
        q, k, q_i, w, k_i, key_end, idx, S, scale, index_scale, coeff, temperature, with_grad)
    if not with_grad:
        empty = q.new_empty(0, dtype=torch.float32)
        return loss, empty, empty.clone(), empty.clone()
    return loss, dqi, dw, dki


@_kl_op.register_fake
def _kl_fake(q, k, q_i, w, k_i, key_end, idx, S, scale, index_scale, coeff, temperature, with_grad):
    grad = lambda t: q.new_empty(t.shape if with_grad else (0,), dtype=torch.float32)
    return q.new_empty((), dtype=torch.float32), grad(q_i), grad(w), grad(k_i)


def _setup_context(ctx, inputs, output):
    _, dqi, dw, dki = output
    ctx.save_for_backward(dqi, dw, dki)
    ctx.dtypes = (inputs[2].dtype, inputs[3].dtype, inputs[4].dtype)
    ctx.mark_non_differentiable(dqi, dw, dki)


def _backward(ctx, grad, *_):
    dqi, dw, dki = ctx.saved_tensors
    return (None, None, (dqi * grad).to(ctx.dtypes[0]), (dw * grad).to(ctx.dtypes[1]),
            (dki * grad).to(ctx.dtypes[2]), *([None] * 8))


_kl_op.register_autograd(_backward, setup_context=_setup_context)
