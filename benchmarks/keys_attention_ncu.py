"""One key-major block-sparse attention call at MoBA's equal-budget prefill (m3 heads, bf16), for Nsight
Compute: `ncu --clock-control none -k regex:_attn_kernel -c 1 --section SpeedOfLight ... python
benchmarks/keys_attention_ncu.py [T]`. Prints the call's time; a warm-up call compiles first."""

import sys

import torch

sys.path.insert(0, "benchmarks")
from zoo import CONFIGS, Variant  # noqa: E402

from sparsezoo.kernels import sparse_attention_keys as sak  # noqa: E402

T = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
var = Variant("moba", CONFIGS["moba"]["equal_budget"], 1, T, T, False)
with torch.no_grad():
    sel = var.select()
    for _ in range(2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        sak.block_sparse_attention_keys(var.q, var.k, var.v, sel, var.cfg["block"], var.scale)
        end.record()
        torch.cuda.synchronize()
        print(f"key-major attention, moba equal budget, T={T}: {start.elapsed_time(end):.3f} ms", flush=True)
