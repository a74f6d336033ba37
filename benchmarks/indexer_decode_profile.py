"""Where the decode indexer's time goes (DSA and CSA at the zoo's 128k batch-8 decode point): per-kernel
device times (torch.profiler, five warm calls) with the select's end fused into the partition and as its
own launch, and how many candidates each row's boundary histogram bin holds.

    python benchmarks/indexer_decode_profile.py
"""

from __future__ import annotations

import math

import torch

import zoo
from sparsezoo.kernels import indexer_decode_triton as idk

T = 131072


def kernel_times(fn) -> str:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    return "  ".join(f"{e.key[:20]} {e.device_time_total / e.count:.1f}us" for e in events)


def boundary_bins(run, topk: int, rows: int = 4) -> None:
    """Prints, for the first rows, the keys in bins above the boundary bin and the candidates in it."""
    select = idk._select_decode

    def spy(buf, ws, out, k, cfg):
        select(buf, ws, out, k, cfg)
        hist = ws[:, idk._WS_HIST.value:].cpu()
        for r in range(min(rows, hist.shape[0])):
            from_top = hist[r].flip(0)
            at_least = from_top.cumsum(0)
            best = int((at_least < topk).sum())
            above = int(at_least[best - 1]) if best else 0
            print(f"  row {r}: visible {int(ws[r, idk._WS_NVIS.value])}, above the boundary bin {above}, "
                  f"in it {int(from_top[best])}", flush=True)

    idk._select_decode = spy
    try:
        run()
    finally:
        idk._select_decode = select


def main() -> None:
    for name in ("dsa", "csa"):
        var = zoo.Variant(name, zoo.CONFIGS[name]["published"], 8, 1, T, False)
        e, c = var.extra, var.cfg

        def run(cfg=None):
            return idk.indexer_topk_decode_triton(e["q_i"], e["w"], e["k_i"], e["key_end"], T, c["topk"],
                                                  1 / math.sqrt(c["Di"]), config=cfg)

        for cfg in ({"finish": "kernel"}, {}):
            print(f"{name} {cfg}: {kernel_times(lambda: run(cfg))}", flush=True)
        boundary_bins(run, c["topk"])
        del var, e


if __name__ == "__main__":
    main()
