"""NSA selection through the Triton kernels (sparsezoo.kernels.nsa_select_triton)."""

from __future__ import annotations

import importlib.util

import torch


def supports(req) -> str | None:
    if importlib.util.find_spec("sparsezoo.kernels.nsa_select_triton") is None:
        return "the Triton NSA selection kernel is not built into this install"
    if req.device == "cuda" and req.dtype == torch.float32:
        return "fp32 on the GPU gave malformed selections in testing (bf16/fp16 pass); use backend='reference'"
    from sparsezoo.kernels import nsa_select_triton as kernel

    try:  # the kernel's own chunk geometry decides which (block_len, stride, sel_block) it tiles
        kernel.chunk_geometry(req["block_len"], req["stride"], req["sel_block"], kernel.NSA_SELECT_CONFIG["BE"])
    except ValueError as exc:
        return str(exc)
    return None


def run(q, kc, S: int, block_len: int, stride: int, sel_block: int, topk: int, scale: float):
    from sparsezoo.kernels import nsa_select_triton

    return nsa_select_triton.nsa_select_triton(q, kc, S, block_len, stride, sel_block, topk, scale)
