"""Backend choice and the record of which implementation actually ran.

`auto` resolves to one named implementation per call, logged the first time it runs and recorded
in `implementations_used()`. An explicitly requested backend that cannot run raises: nothing falls
back silently.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging

import torch

log = logging.getLogger("sparsezoo")

BACKENDS = ("auto", "reference", "flex", "sdpa", "triton")
_last: dict[str, str] = {}
_announced: set[tuple[str, str]] = set()
_trackers: list[dict[str, str]] = []


def record(op: str, impl: str) -> None:
    _last[op] = impl
    for tracker in _trackers:
        tracker[op] = impl
    if (op, impl) not in _announced:
        _announced.add((op, impl))
        log.info("sparsezoo: %s ran the %r implementation", op, impl)


def implementations_used() -> dict[str, str]:
    """The implementation that ran last, per op, e.g. {'block_sparse_attention': 'flex'}."""
    return dict(_last)


@contextlib.contextmanager
def track_implementations():
    """`with track_implementations() as used:` collects {op: implementation} of calls inside."""
    used: dict[str, str] = {}
    _trackers.append(used)
    try:
        yield used
    finally:
        _trackers.remove(used)


def last_implementation(op: str) -> str | None:
    return _last.get(op)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve(op: str, backend: str, supported: tuple[str, ...], device: torch.device,
            needs_grad: bool, auto_order: tuple[str, ...]) -> str:
    """Pick the implementation for one call, or raise naming the valid choices."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} for {op}; choose one of {list(BACKENDS)}")
    if backend != "auto" and backend not in supported:
        raise ValueError(f"{op} has no {backend!r} backend; choose one of {['auto', *supported]}")
    candidates = auto_order if backend == "auto" else (backend,)
    reasons = []
    for impl in candidates:
        why = unavailable_reason(impl, device, needs_grad)
        if why is None:
            return impl
        reasons.append(f"{impl}: {why}")
    raise RuntimeError(f"{op}: no usable backend for request {backend!r} ({'; '.join(reasons)})")


def unavailable_reason(impl: str, device: torch.device, needs_grad: bool) -> str | None:
    if impl == "flex" and device.type == "cpu" and needs_grad:
        return "compiled FlexAttention on the CPU runs forward only; use backend='reference' for gradients"
    if impl == "triton":
        if not triton_available():
            return "triton is not installed"
        if device.type != "cuda" and not _interpreting():
            return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for testing)"
    return None


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"
