"""fla-core (the kernels of flash-linear-attention): the optional dependency of the linear-attention ops.

Installed with the `linear` extra: pip install "sparsezoo-attn[linear]". fla's Triton kernels back the
`triton` implementation of `lightning_attention` and `gated_delta_rule`:
- the chunk kernels (chunk_simple_gla, chunk_gated_delta_rule) for prefill, chunked prefill and training;
- the recurrent kernels (fused_recurrent_*) for decode: calls without gradients of at most
  RECURRENT_MAX_T new tokens.
fla's chunk kernels do not run under the Triton interpreter (TRITON_INTERPRET=1); its recurrent kernels do.

Importing fla's ops takes seconds (it sets up every kernel's autotuner), so nothing imports it with
sparsezoo: `load()` does, once. The linear variants call it when they are built on a machine with a
CUDA device, so that no call imports a module (torch.compile cannot trace an import); elsewhere the
first call of a kernel does.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

from .dispatch import interpreting

FLA_INSTALLED = importlib.util.find_spec("fla") is not None
INSTALL_HINT = 'pip install "sparsezoo-attn[linear]"'
MISSING = f"fla-core is not installed ({INSTALL_HINT})"
RECURRENT_MAX_T = 64  # no-grad calls of at most this many tokens run the recurrent kernels
MAX_HEAD_DIM = 256  # fla's kernels keep a head's [K, V] state tile on chip

_kernels: SimpleNamespace | None = None


def uses_recurrent_kernel(T: int, grad: bool) -> bool:
    """Decode-sized calls without gradients run fla's recurrent kernel, the others its chunk kernel."""
    return not grad and T <= RECURRENT_MAX_T


def supports(req) -> str | None:
    """The rule the `triton` implementations of both linear ops share (beyond the platform's)."""
    if not FLA_INSTALLED:
        return MISSING
    if req.get("head_dim", 0) > MAX_HEAD_DIM:
        return f"fla's kernels support head_dim <= {MAX_HEAD_DIM}, got {req['head_dim']}"
    if (
        req.device == "cpu"
        and interpreting()
        and req.get("T") is not None
        and not uses_recurrent_kernel(req["T"], req.needs_grad)
    ):
        return (
            f"fla's chunk kernels do not run under the Triton interpreter; only no-grad calls of at most "
            f"{RECURRENT_MAX_T} tokens (its recurrent kernels) do"
        )
    return None


def gated_backward_refused() -> str | None:
    """fla refuses the backward of its gated chunk kernels (chunk_gated_delta_rule) on Hopper GPUs with
    Triton 3.4.0 up to 3.7.1, which compute it wrongly there, unless tilelang is installed (fla issue 640)."""
    import torch
    import triton

    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return None
    version = tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:3])
    if not (3, 4, 0) <= version < (3, 7, 1) or importlib.util.find_spec("tilelang") is not None:
        return None
    return (f"fla's gated chunk backward is wrong on Hopper GPUs with Triton {triton.__version__} (fla issue 640): "
            f"install Triton >= 3.7.1 or tilelang for training on fla's kernels")


def load() -> SimpleNamespace:
    """fla's four kernels this library calls (imported on first use)."""
    global _kernels
    if _kernels is None:
        if not FLA_INSTALLED:
            raise ImportError(MISSING)
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

        _kernels = SimpleNamespace(
            chunk_simple_gla=chunk_simple_gla,
            fused_recurrent_simple_gla=fused_recurrent_simple_gla,
            chunk_gated_delta_rule=chunk_gated_delta_rule,
            fused_recurrent_gated_delta_rule=fused_recurrent_gated_delta_rule,
        )
    return _kernels
