"""MSA sparse KL through the Triton kernels (sparsezoo.kernels.index_kl_triton).

Eager calls go straight to the launcher. Under torch.compile the call goes through the custom op
sparsezoo::msa_index_kl_triton (opaque to the compiler), which returns the loss together with its
gradients w.r.t. q_idx and k_idx (the kernels compute them in the forward, as the launcher does);
the autograd formula scales them by the incoming gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..common import full_selection
from ..dispatch import compiling, record

# Sparse selections (block_idx given) with blocks of at least KEY_MAJOR_MIN_BLOCK keys run the key-major
# kernels (sparsezoo/kernels/index_kl_keys.py: one program per key sub-tile over exactly the entries that chose it;
# on an H200 at 128k, 62 against 369 ms for the query-major kernels, which visit each tile's union of
# blocks). The dense warm-up (block_idx None) runs the query-major ones. SCHEDULE_OP records which ran.
KEY_MAJOR = True
KEY_MAJOR_MIN_BLOCK = 128
SCHEDULE_OP = "msa_index_kl_schedule"


def schedule(block_idx, block_size: int) -> str:
    """The kernels `run` calls: "key_major" or "query_major"."""
    sparse = block_idx is not None
    return "key_major" if KEY_MAJOR and sparse and block_size >= KEY_MAJOR_MIN_BLOCK else "query_major"


def supports(req) -> str | None:
    G, bs = req["group"], req["block_size"]
    if G & (G - 1):
        return f"the Triton KL kernels need a power-of-two GQA group, got {G}"
    if not (bs & (bs - 1) == 0 or bs % 128 == 0):
        return f"the Triton KL kernels need block_size to be a power of two or a multiple of 128, got {bs}"
    return None


def run(q, k, q_idx, k_idx, block_idx, block_size: int, scale: float, index_scale: float, coeff: float = 1.0,
        temperature: float = 1.0, main_lse=None):
    sched = schedule(block_idx, block_size)
    record(SCHEDULE_OP, sched)
    if compiling():
        if block_idx is None:  # dense warm-up: every visible block, as the launcher builds it
            B, H, T = q_idx.shape[:3]
            block_idx = full_selection(T, k.shape[2], block_size, B, H, q.device).contiguous()
        with_grad = torch.is_grad_enabled() and (q_idx.requires_grad or k_idx.requires_grad)
        loss, _, _ = torch.ops.sparsezoo.msa_index_kl_triton(
            q.detach(), k.detach(), q_idx, k_idx, block_idx, None if main_lse is None else main_lse.detach().float(),
            block_size, float(scale), float(index_scale), float(coeff), float(temperature), with_grad,
            sched == "key_major")
        return loss
    from sparsezoo.kernels import index_kl_triton

    forward = _key_major_forward if sched == "key_major" else None
    return index_kl_triton.msa_index_kl_triton(q, k, q_idx, k_idx, block_idx, block_size, scale, index_scale,
                                               coeff=coeff, temperature=temperature, main_lse=main_lse,
                                               forward=forward)


def _key_major_forward(*args, **kwargs):
    from sparsezoo.kernels import index_kl_keys

    return index_kl_keys.index_kl_keys_forward(*args, **kwargs)


# -- the custom op torch.compile sees -------------------------------------------------------------------
# with_grad builds the key-side work lists with host syncs (boolean indexing): not CUDA-graph capturable
@torch.library.custom_op("sparsezoo::msa_index_kl_triton", mutates_args=(), tags=(torch.Tag.cudagraph_unsafe,))
def _kl_op(q: Tensor, k: Tensor, q_idx: Tensor, k_idx: Tensor, block_idx: Tensor, main_lse: Tensor | None,
           block_size: int, scale: float, index_scale: float, coeff: float, temperature: float,
           with_grad: bool, key_major: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss fp32 scalar, d loss / d q_idx fp32, d loss / d k_idx fp32); the gradients are empty
    without with_grad. key_major: the key-major kernels, else the query-major ones."""
    from sparsezoo.kernels import index_kl_triton

    forward = _key_major_forward if key_major else index_kl_triton.index_kl_forward
    loss, _, dqi, dki = forward(q, k, q_idx, k_idx, block_idx, block_size, scale, index_scale, coeff, temperature,
                                main_lse, with_grad)
    if not with_grad:
        return loss, q.new_empty(0, dtype=torch.float32), q.new_empty(0, dtype=torch.float32)
    return loss, dqi, dki


@_kl_op.register_fake
def _kl_fake(q, k, q_idx, k_idx, block_idx, main_lse, block_size, scale, index_scale, coeff, temperature,
             with_grad, key_major):
    grad = lambda t: q.new_empty(t.shape if with_grad else (0,), dtype=torch.float32)
    return q.new_empty((), dtype=torch.float32), grad(q_idx), grad(k_idx)


def _setup_context(ctx, inputs, output):
    _, dqi, dki = output
    ctx.save_for_backward(dqi, dki)
    ctx.dtypes = (inputs[2].dtype, inputs[3].dtype)
    ctx.mark_non_differentiable(dqi, dki)


def _backward(ctx, grad, *_):
    dqi, dki = ctx.saved_tensors
    return (None, None, (dqi * grad).to(ctx.dtypes[0]), (dki * grad).to(ctx.dtypes[1]),
            None, None, None, None, None, None, None, None, None)


_kl_op.register_autograd(_backward, setup_context=_setup_context)
