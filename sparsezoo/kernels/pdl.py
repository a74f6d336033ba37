"""Programmatic dependent launch (PDL) for chains of small kernels (sm_90 and newer).

A kernel launched with `launch_pdl=True` may start while the kernel before it in the stream still runs,
once every program of that kernel has called `gdc_launch_dependents()` (or exited). It must call
`gdc_wait()` before it reads anything the earlier kernel writes; the wait returns when that kernel has
finished and its writes are visible. What runs before the wait (loading the step's inputs, address
arithmetic) then overlaps the earlier kernel, and the launch latency between the two is hidden. Kernels
here call `gdc_launch_dependents()` only after their own wait, so at most two kernels of a chain overlap.
"""

from __future__ import annotations

import torch
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

__all__ = ["check_pdl", "gdc_launch_dependents", "gdc_wait", "pdl_launch", "pdl_supported", "resolve_pdl"]


def pdl_supported(device: torch.device | None) -> bool:
    """Whether the device can run programmatic dependent launches (a CUDA GPU of compute capability 9.0+)."""
    return device is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def check_pdl(pdl: bool, device: torch.device) -> bool:
    """pdl, after checking that the device can run it (a CUDA GPU of compute capability 9.0 or newer)."""
    if pdl and not pdl_supported(device):
        raise ValueError(f"pdl (programmatic dependent launch) needs a CUDA GPU of compute capability 9.0 or "
                         f"newer, got {device}")
    return bool(pdl)


def resolve_pdl(pdl: bool | None, device: torch.device | None, auto: bool = True) -> bool:
    """Whether to launch with pdl: None (automatic) -> `auto` where the device supports it, True -> yes after
    check_pdl (an error where it cannot), False -> no. Another value is an error."""
    if pdl is None:
        return auto and pdl_supported(device)
    if not isinstance(pdl, bool):
        raise ValueError(f"pdl must be None (automatic), True or False, got {pdl!r}")
    return check_pdl(pdl, device)


def pdl_launch(pdl: bool, device: torch.device) -> dict:
    """Launch keywords of a dependent kernel: its PDL constexpr and Triton's `launch_pdl` ({} without pdl)."""
    return {"PDL": True, "launch_pdl": True} if check_pdl(pdl, device) else {}
