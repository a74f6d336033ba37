"""Lightning attention through fla-core's Triton kernels (sparsezoo.ops.fla_kernels): fla's simple-GLA
kernels with a constant per-head decay `g_gamma`, the chunk kernel for prefill and training, the recurrent
kernel for decode-sized calls without gradients."""

from __future__ import annotations

from .. import fla_kernels
from ..dispatch import needs_grad


def supports(req) -> str | None:
    return fla_kernels.supports(req)


def run(q, k, v, log_decay, scale: float, initial_state=None, output_final_state: bool = False):
    fla = fla_kernels.load()
    grad = needs_grad(q, k, v, initial_state)
    kernel = (
        fla.fused_recurrent_simple_gla if fla_kernels.uses_recurrent_kernel(q.shape[2], grad) else fla.chunk_simple_gla
    )
    seq = lambda t: t.transpose(1, 2).contiguous()  # fla's layout: [B, T, H, D]
    state = None if initial_state is None else initial_state.float()
    out, final = kernel(
        seq(q),
        seq(k),
        seq(v),
        g_gamma=log_decay.float(),
        scale=scale,
        initial_state=state,
        output_final_state=output_final_state,
    )
    return out.transpose(1, 2), final
