"""Small, independent oracles and input makers shared by the tests."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def rand_qkv(B, Hq, Hkv, T, S, D, dtype=torch.float64, device="cpu", requires_grad=False, seed=None):
    g = torch.Generator(device="cpu")
    if seed is not None:
        g.manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device).requires_grad_(requires_grad)
    return make(B, Hq, T, D), make(B, Hkv, S, D), make(B, Hkv, S, D)


def naive_select(q_idx, k_idx, block_size, topk, scale):
    """Per-query loop, written independently of the library: rank earlier blocks by max score
    (ties to the smaller id), keep k-1, add the local block. Returns a list of sets per (b, g, t)."""
    B, H, T, _ = q_idx.shape
    S = k_idx.shape[1]
    out = {}
    for b in range(B):
        z = torch.einsum("htd,sd->hts", q_idx[b].double(), k_idx[b].double()) * scale
        for h in range(H):
            for t in range(T):
                pos = S - T + t
                local = pos // block_size
                scores = [z[h, t, j * block_size:(j + 1) * block_size].max().item() for j in range(local)]
                ranked = sorted(range(local), key=lambda j: (-scores[j], j))[:topk - 1]
                out[(b, h, t)] = ranked + [local]
    return out


def explicit_mask_attention(q, k, v, allowed, scale=None):
    """Dense softmax attention under an explicit bool mask allowed [B, Hq, T, S] (fp64)."""
    Hq, Hkv = q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kk = k.double().repeat_interleave(Hq // Hkv, dim=1)
    vv = v.double().repeat_interleave(Hq // Hkv, dim=1)
    s = torch.einsum("bhtd,bhsd->bhts", q.double(), kk) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhts,bhsd->bhtd", p, vv)


def causal_allowed(B, Hq, T, S, device="cpu"):
    pos = torch.arange(S - T, S, device=device)
    return (torch.arange(S, device=device)[None, :] <= pos[:, None]).expand(B, Hq, T, S)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_torchrun(args: list[str], cwd: Path, timeout: int = 300, nproc: int = 2) -> str:
    """torchrun --standalone (its rendezvous binds a free port of its own) on `nproc` gloo processes; on a
    non-zero exit or a timeout, fail with the command's output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers (their own session)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout}s\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-3000:]}")
    if proc.returncode != 0 or "terminate called" in stderr:
        pytest.fail(f"torchrun exited with {proc.returncode}\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-3000:]}")
    return stdout
