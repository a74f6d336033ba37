"""Backend choice, capability rules, and the record of which implementation ran.

Every public op is an `Op`: an ordered list of implementations (modules beside its api module),
each exposing `supports(request) -> reason | None` and `run(...)`. The same `supports` rule serves
`auto`, explicit requests (which raise with the reason instead of falling back) and config
validation (where the device and dtype are not known yet). `Op.run` records the implementation that
ran, once per call: `implementations_used()` and `track_implementations()` read that record.

torch.compile traces this dispatch: the choice is plain Python over static shapes, dtypes and
devices, so it is made once at trace time and guarded. Nothing here may import a module at call
time (`importlib` breaks the graph): implementation modules are imported with their package
(`load_implementations`), and the record is skipped while compiling.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger("sparsezoo")

BACKENDS = ("auto", "reference", "flex", "sdpa", "triton")
FAST = ("flex", "triton")  # `auto` considers these on CUDA devices only
_last: dict[str, str] = {}
_announced: set[tuple[str, str]] = set()
_trackers: list[dict[str, str]] = []


def compiling() -> bool:
    """True while torch.compile traces the caller: the Triton paths then call their custom ops."""
    return torch.compiler.is_compiling()


def record(op: str, impl: str) -> None:
    """Note that `impl` ran for `op` (logged at INFO the first time each pair runs)."""
    if compiling():  # a traced call records nothing (and logs nothing): the record is eager-only
        return
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


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def kernel_built(module: str) -> bool:
    """Whether sparsezoo.kernels.<module> ships with this install (implementations ask once, at import:
    a traced call cannot look for a module)."""
    try:
        return importlib.util.find_spec(f"sparsezoo.kernels.{module}") is not None
    except ModuleNotFoundError:
        return False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def needs_grad(*ts: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


@dataclass(frozen=True)
class Request:
    """What an implementation needs to know to say whether it can run a call.

    device / dtype are None during config validation (not known yet): rules skip what they need
    them for. `params` holds the op's static arguments (block_size, group, head_dim, ...).
    """

    device: str | None = None
    dtype: torch.dtype | None = None
    needs_grad: bool = False
    params: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.params[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.params.get(name, default)

    @classmethod
    def of(cls, x: torch.Tensor, grad: bool = False, **params) -> Request:
        return cls(x.device.type, x.dtype, grad, params)


def platform_reason(impl: str, req: Request) -> str | None:
    """Limits shared by every op's implementation of one kind."""
    if impl == "triton":
        if not triton_available():
            return "triton is not installed"
        if req.device is not None and req.device != "cuda" and not interpreting():
            return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for testing)"
        if req.dtype == torch.float64:
            return "the Triton kernels run fp32/fp16/bf16, not fp64"
    if impl == "flex":
        if req.device == "cpu" and req.needs_grad:
            return "compiled FlexAttention on the CPU runs forward only; use backend='reference' for gradients"
        if req.device == "cpu" and req.get("return_lse"):
            return "compiled FlexAttention on the CPU returns no LSE; use backend='reference'"
    return None


class Op:
    """One public op: its implementations in `auto` preference order, fastest first. grad_order: another order
    for calls with gradients, where the fastest forward is not the fastest forward plus backward."""

    def __init__(self, name: str, package: str, implementations: tuple[str, ...], module_prefix: str = "",
                 grad_order: tuple[str, ...] | None = None):
        if grad_order is not None and sorted(grad_order) != sorted(implementations):
            raise ValueError(f"{name}: grad_order {grad_order} must order the implementations {implementations}")
        self.name = name
        self.package = package
        self.implementations = implementations
        self.grad_order = grad_order
        self.module_prefix = module_prefix  # for packages holding several ops: `{prefix}{impl}.py`
        self._modules: dict[str, Any] = {}

    def load_implementations(self) -> None:
        """Import every implementation module now, so that no call (traced or not) imports one."""
        for impl in self.implementations:
            self._modules[impl] = importlib.import_module(f"{self.package}.{self.module_prefix}{impl}")

    def module(self, impl: str):
        if impl not in self._modules:
            self.load_implementations()
        return self._modules[impl]

    def reason(self, impl: str, req: Request) -> str | None:
        """Why `impl` cannot run `req`, or None when it can."""
        why = platform_reason(impl, req)
        if why is None:
            why = self.module(impl).supports(req)
        return why

    def choose(self, backend: str, req: Request) -> str:
        """The implementation for one call, or an error naming the valid choices and the reasons."""
        self.check_backend_name(backend)
        if backend != "auto":
            why = self.reason(backend, req)
            if why is not None:
                raise ValueError(f"{self.name}: backend {backend!r} cannot run this call: {why}")
            return backend
        reasons = []
        for impl in self.grad_order if req.needs_grad and self.grad_order else self.implementations:
            why = "auto picks fast paths on CUDA devices only" if impl in FAST and req.device != "cuda" else None
            why = why or self.reason(impl, req)
            if why is None:
                return impl
            reasons.append(f"{impl}: {why}")
        raise ValueError(f"{self.name}: no implementation can run this call ({'; '.join(reasons)})")

    def check_backend_name(self, backend: str) -> None:
        if backend not in ("auto", *self.implementations):
            raise ValueError(f"{self.name} has no {backend!r} backend; choose one of "
                             f"{['auto', *self.implementations]}")

    def run(self, backend: str, req: Request, *args, **kwargs):
        """Choose, run, and record the implementation."""
        impl = self.choose(backend, req)
        out = self.module(impl).run(*args, **kwargs)
        record(self.name, impl)
        return out
