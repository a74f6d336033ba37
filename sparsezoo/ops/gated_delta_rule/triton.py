"""The gated delta rule through fla-core's Triton kernels (sparsezoo.ops.fla_kernels): the chunk kernel
for prefill and training, the recurrent kernel for decode-sized calls without gradients. Both take the
grouped value heads as they are (no repeat of q/k)."""

from __future__ import annotations

from .. import fla_kernels
from ..dispatch import needs_grad


def supports(req) -> str | None:
    if req.needs_grad and req.device == "cuda":
        reason = fla_kernels.gated_backward_refused()
        if reason:
            return reason
    return fla_kernels.supports(req)


def run(q, k, v, g, beta, scale: float, initial_state=None, output_final_state: bool = False):
    fla = fla_kernels.load()
    grad = needs_grad(q, k, v, g, beta, initial_state)
    kernel = (
        fla.fused_recurrent_gated_delta_rule
        if fla_kernels.uses_recurrent_kernel(q.shape[2], grad)
        else fla.chunk_gated_delta_rule
    )
    seq = lambda t: t.transpose(1, 2).contiguous()  # fla's layout: [B, T, H, ...]
    state = None if initial_state is None else initial_state.float()
    out, final = kernel(
        seq(q),
        seq(k),
        seq(v),
        g=seq(g.float()),
        beta=seq(beta.to(q.dtype)),
        scale=scale,
        initial_state=state,
        output_final_state=output_final_state,
    )
    return out.transpose(1, 2), final
