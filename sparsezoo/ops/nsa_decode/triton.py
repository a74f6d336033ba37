"""nsa_decode through the fused Triton decode kernels (sparsezoo.kernels.nsa_decode_triton): four launches, no
host syncs (CUDA-graph capturable), no backward (decode is inference-only; training runs the branch ops).

Eager calls go straight to the launcher; under torch.compile the call goes through the custom op
sparsezoo::nsa_decode_triton (opaque to the compiler; its fake gives the output shapes)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import compiling, kernel_built, record
from .api import DECODE_T

_KERNEL_BUILT = kernel_built("nsa_decode_triton")


def supports(req) -> str | None:
    if not _KERNEL_BUILT:
        return "the Triton NSA decode kernels are not built into this install"
    if req.needs_grad:
        return "the fused NSA decode kernels have no backward (decode is inference-only); the branch ops train"
    T = req.get("queries")
    if T is not None and T > DECODE_T:
        return f"the fused NSA decode kernels serve at most {DECODE_T} new queries per request, got {T}"
    if req.get("head_dim", 0) > 256:
        return f"the fused NSA decode kernels support head_dim <= 256, got {req['head_dim']}"
    from sparsezoo.kernels import nsa_decode_triton as kernel

    pow2 = lambda n: 1 << max(0, (n - 1).bit_length())
    group = req.get("group", 1)
    if pow2(T or 1) * pow2(group) > kernel.MAX_ROWS:
        return (f"the fused NSA decode kernels hold the new queries x the padded GQA group in <= {kernel.MAX_ROWS} "
                f"rows, got {T or 1} x {group}")
    if None in (req.get("block_len"), req.get("stride"), req.get("sel_block")):
        return None
    try:  # the kernels' chunk geometry decides which (block_len, stride, sel_block) they tile
        kernel.chunk_geometry(req["block_len"], req["stride"], req["sel_block"], kernel.CONFIG["NB"],
                              kernel.CONFIG["BE"])
    except ValueError as exc:
        return str(exc)
    return None


BLOCK_SUMS_OP = "nsa_decode_block_sums"  # the dispatch record's entry: the kernel's block sums, "reshape" or "dot"
LAUNCH_OP = "nsa_decode_launch"  # and how kernels 2-4 launch: "pdl" (programmatic dependent launches) or "plain"


def run(q, kc, vc, k, v, k_win, v_win, block_len: int, stride: int, sel_block: int, topk: int, window: int,
        scale: float, gates=None):
    from sparsezoo.kernels import nsa_decode_triton

    record(BLOCK_SUMS_OP, nsa_decode_triton.block_sums_for(block_len, stride, sel_block, q.device))
    record(LAUNCH_OP, nsa_decode_triton.launch_mode_for(q.device))
    if compiling():
        return torch.ops.sparsezoo.nsa_decode_triton(q, kc, vc, k, v, k_win, v_win, block_len, stride, sel_block,
                                                     topk, window, float(scale), gates)
    return _launch(q, kc, vc, k, v, k_win, v_win, block_len, stride, sel_block, topk, window, scale, gates)


def _launch(q: Tensor, kc: Tensor, vc: Tensor, k: Tensor, v: Tensor, k_win: Tensor, v_win: Tensor, block_len: int,
            stride: int, sel_block: int, topk: int, window: int, scale: float,
            gates: Tensor | None) -> tuple[Tensor, Tensor]:
    from sparsezoo.kernels import nsa_decode_triton

    out, sel, _ = nsa_decode_triton.nsa_decode_triton(q, kc, vc, k, v, k_win, v_win, block_len, stride, sel_block,
                                                      topk, window, scale, gates=gates)
    return out, sel


_op = torch.library.custom_op("sparsezoo::nsa_decode_triton", _launch, mutates_args=())


@_op.register_fake
def _fake(q, kc, vc, k, v, k_win, v_win, block_len, stride, sel_block, topk, window, scale, gates):
    return torch.empty_like(q), q.new_empty((q.shape[0], k.shape[1], q.shape[2], topk), dtype=torch.int32)
