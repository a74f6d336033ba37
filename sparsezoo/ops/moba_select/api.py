"""moba_select: validation and dispatch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import checks
from ..dispatch import Op, Request

OP = Op("moba_select", __package__, ("triton", "reference"))


def block_mean_keys(k: torch.Tensor, block_size: int) -> torch.Tensor:
    """k [B, Hkv, S, D] -> [B, Hkv, n_blocks, D]; a trailing partial block averages its own keys."""
    B, H, S, D = k.shape
    n_blocks = math.ceil(S / block_size)
    kp = F.pad(k, (0, 0, 0, n_blocks * block_size - S)).view(B, H, n_blocks, block_size, D)
    counts = torch.clamp(S - torch.arange(n_blocks, device=k.device) * block_size, max=block_size)
    return kp.sum(3) / counts.to(kp.dtype)[:, None]


@torch.no_grad()
def moba_select(q: torch.Tensor, k: torch.Tensor, *, block_size: int, topk: int, means: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """q [B, Hq, T, D] (the last T of S), k [B, Hkv, S, D] -> int32 [B, Hq, T, topk] per query head:
    the best topk - 1 blocks before the local one by <q, block mean key> (ties to the smaller id),
    then the local block, then -1 padding.

    means: optional fp32 [B, Hkv, n, D] mean keys of blocks 0 .. n - 1 (`block_mean_keys`), with
    n >= (S - 1) // block_size (every complete block the queries rank). Means of complete blocks never
    change as a sequence grows, so a decode loop passes its cached means and k is not read."""
    checks.check_qkv(q, k, k)
    checks.check_positive_int("block_size", block_size)
    checks.check_positive_int("topk", topk)
    if means is not None:
        check_means(means, k, block_size)
    req = Request.of(q, block_size=block_size, topk=topk, group=q.shape[1] // k.shape[1], head_dim=q.shape[-1])
    return OP.run(backend, req, q, k, block_size, topk, means)


def check_means(means: torch.Tensor, k: torch.Tensor, block_size: int) -> None:
    B, Hkv, S, D = k.shape
    need = (S - 1) // block_size if S else 0
    if means.dim() != 4 or means.shape[0] != B or means.shape[1] != Hkv or means.shape[3] != D \
            or means.shape[2] < need:
        raise ValueError(f"means must be [B, Hkv, n, D] = [{B}, {Hkv}, >= {need}, {D}] (the complete blocks' mean "
                         f"keys), got {tuple(means.shape)}")
    if means.dtype != torch.float32:
        raise ValueError(f"means must be fp32 (block_mean_keys(k.float(), block_size)), got {means.dtype}")
