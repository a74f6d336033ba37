"""Where an MSA decode step's time goes: each kernel's device time against the step's CUDA-graph time.

    python benchmarks/decode_kernels.py --points 1048576:1,131072:1,1048576:8 [--index bf16,fp8_q8] [--pdl auto,off,on]
        [--index-configs '[{}, {"merge_warps": 8}]']

Per point (m3 heads, one layer): the step captured in a CUDA graph and replayed (median ms, decode.py's
`bench`), then 20 replays under torch.profiler: the mean device time per step of each kernel. The step
time minus the kernels' sum is what launches and the gaps between kernels cost; `timeline_us` lists the last
replay's kernels with their start and end. Prints one JSON line per point; writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import PDL_MODES, SHAPES, bench, make_caches  # noqa: E402

REPLAYS = 20


def profile_point(S: int, B: int, index: str, pdl: bool | None = None, index_config: dict | None = None) -> dict:
    from sparsezoo.paged_cache import MSADecoder

    sh, dev = SHAPES["m3"], torch.device("cuda")
    caches, caches8, table = make_caches(sh, S, B, 1, dev, index != "bf16", seed=S + B)
    cache = caches[0] if index == "bf16" else caches8[0]
    g = torch.Generator(device=dev).manual_seed(2)
    q = torch.randn(B, sh["hq"], 1, sh["d"], device=dev, dtype=torch.bfloat16, generator=g)
    q_idx = torch.randn(B, sh["hkv"], 1, sh["di"], device=dev, dtype=torch.bfloat16, generator=g)
    dec = MSADecoder(num_q_heads=sh["hq"], num_kv_heads=sh["hkv"], head_dim=sh["d"], index_dim=sh["di"],
                     block_size=sh["block"], topk=sh["topk"], fp8_index_queries=index == "fp8_q8", pdl=pdl,
                     index_config=index_config)
    dec.plan(torch.full((B,), S, dtype=torch.int32, device=dev), table, 1, num_pages=cache.num_pages)
    out = torch.empty_like(q)
    step = lambda: dec.run(q, q_idx, cache, out=out)
    step_ms, graphed = bench(step)
    prof = profile_replays(step, REPLAYS)
    kernels = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" and getattr(ev, "device_time_total", 0) > 0:
            kernels[ev.key[:50]] = round(ev.device_time_total / REPLAYS / 1e3, 4)
    total = sum(kernels.values())
    rec = dict(card=torch.cuda.get_device_name(), seq_len=S, batch=B, index_dtype=index, pdl=dec.pdl,
               index_config=index_config or {},
               step_ms=round(step_ms, 4),
               graphed=graphed, kernels_ms=kernels, kernels_sum_ms=round(total, 4),
               launch_and_gaps_ms=round(step_ms - total, 4), index_splits=list(dec.index_split),
               attn_splits=list(dec.attn_split), timeline_us=last_replay(prof, len(kernels)))
    print(json.dumps(rec), flush=True)
    return rec


def profile_replays(fn, reps: int):
    """The CUDA profile of `reps` replays of fn captured in a CUDA graph (fn already warmed up, e.g. by bench)."""
    from torch.profiler import ProfilerActivity, profile

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    return prof


def last_replay(prof, n_kernels: int) -> list:
    """The last replay's kernels as [name, start, end] in us from its first kernel's start (when each began
    and ended, so the gaps between them show, and how much consecutive ones overlap under pdl)."""
    evs = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    last = evs[-n_kernels:] if n_kernels else []
    t0 = last[0].time_range.start if last else 0
    return [[e.name[:30], round(e.time_range.start - t0, 1), round(e.time_range.end - t0, 1)] for e in last]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", default="1048576:1,131072:1,1048576:8", help="seq_len:batch, comma-separated")
    p.add_argument("--index", default="bf16,fp8_q8", help="index key modes: bf16, fp8, fp8_q8")
    p.add_argument("--pdl", default="auto", help="auto, off, on, or a list (off,on): MSADecoder's programmatic "
                   "dependent launches (auto: the decoder's default, on at batch 1)")
    p.add_argument("--index-configs", default="[{}]", help="JSON list of MSADecoder index_config overrides")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/decode_kernels.py needs a CUDA GPU")
    points = [tuple(int(x) for x in pt.split(":")) for pt in args.points.split(",")]
    pdls = [PDL_MODES[x] for x in args.pdl.split(",")]
    configs = json.loads(args.index_configs)
    recs = [profile_point(S, B, idx, pdl, cfg) for S, B in points for idx in args.index.split(",") for pdl in pdls
            for cfg in configs]
    print_registers()
    return recs


def print_registers() -> None:
    """Registers and spills per thread of every compiled variant of the indexer's split kernels (what
    bounds how many programs an SM keeps resident). Reads Triton's per-device kernel caches."""
    from sparsezoo.kernels import decode_indexer as idx

    for name in ("_index_split_kernel", "_index_split_deferred_kernel"):
        fn = getattr(idx, name)
        for cache in getattr(fn, "device_caches", {}).values():
            for kernel in cache[0].values():
                print(json.dumps(dict(kernel=name, n_regs=getattr(kernel, "n_regs", None),
                                      n_spills=getattr(kernel, "n_spills", None),
                                      num_warps=kernel.metadata.num_warps,
                                      shared=kernel.metadata.shared)), flush=True)


if __name__ == "__main__":
    main()
