"""Kernel-level breakdown of one zoo point (benchmarks/zoo.py's inputs), for finding where time goes.

    python benchmarks/zoo_profile.py --variant dsa --mode decode --batch 8
    python benchmarks/zoo_profile.py --variant moba --mode prefill --len 131072 --config equal_budget

Prints the CUDA kernels of the selection and of the attention (torch.profiler, one warm run each),
longest first, and in decode the whole step as the zoo times it (NSA's fused op), with its CUDA-graph time and
the timeline of one graph replay: each kernel's start and end and the idle gap before it, so the cost of the
launches between kernels shows beside the kernels' own time. --ops adds the step's torch ops by device time.
--gaps profiles one eager step (as the zoo times prefill) and lists the longest idle gaps between its CUDA
kernels, each with the kernels on either side, the idle total, and the step's own kernels by time (the step
may run kernels that the selection and attention tables, profiled apart, do not).
"""

from __future__ import annotations

import argparse

import torch

import zoo
from decode_kernels import last_replay, profile_replays

REPLAYS = 5


def profile_once(fn, with_ops: bool = False):
    """The profile of one call of fn after a warm-up call (with_ops: the torch ops too, with input shapes)."""
    fn()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if with_ops else [])
    with torch.profiler.profile(activities=acts, record_shapes=with_ops) as prof:
        fn()
        torch.cuda.synchronize()
    return prof


def kernel_table(fn, label: str, rows: int) -> None:
    prof = profile_once(fn)
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events) / 1e3
    print(f"-- {label}: {total:.3f} ms of kernels", flush=True)
    for e in events[:rows]:
        print(f"   {e.device_time_total / 1e3:9.3f} ms  x{e.count:<4d} {e.key[:110]}", flush=True)


def op_table(fn, label: str, rows: int) -> None:
    """The device time of fn's torch ops (self time, grouped by op and input shapes), longest first: which
    call launched the elementwise kernels of kernel_table."""
    prof = profile_once(fn, with_ops=True)
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_device_time_total > 0]
    events = [e for e in events if e.device_type.name == "CPU"]  # the ops, not their kernels again
    events.sort(key=lambda e: -e.self_device_time_total)
    print(f"-- {label}: ops by device time", flush=True)
    for e in events[:rows]:
        print(f"   {e.self_device_time_total / 1e3:9.3f} ms  x{e.count:<4d} {e.key[:40]:40s} {str(e.input_shapes)[:90]}",
              flush=True)


def graph_timeline(fn) -> None:
    """One CUDA-graph replay of fn (already warmed up), kernel by kernel (us from the first kernel's start)."""
    prof = profile_replays(fn, REPLAYS)
    n = sum(e.device_type.name == "CUDA" for e in prof.events()) // REPLAYS
    timeline = last_replay(prof, n)
    print(f"-- one replay: {n} kernels, {timeline[-1][2]:.1f} us from the first start to the last end", flush=True)
    prev_end = 0.0
    for name, start, end in timeline:
        print(f"   {start:7.1f} -> {end:7.1f} us  ({end - start:5.1f} us, idle {start - prev_end:4.1f} us before)  "
              f"{name}", flush=True)
        prev_end = max(prev_end, end)
    busy = sum(end - start for _, start, end in timeline)
    print(f"-- kernels busy {busy:.1f} us; idle between them {timeline[-1][2] - busy:.1f} us (negative: overlap)",
          flush=True)


def step_gaps(fn, rows: int) -> None:
    """One eager call of fn (after a warm-up call): its kernels in time order, the `rows` longest idle gaps
    between consecutive kernels (with the kernels either side), and the idle total from first start to last
    end."""
    prof = profile_once(fn)
    evs = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    if not evs:
        print("-- no CUDA kernels in the step", flush=True)
        return
    t0 = evs[0].time_range.start
    gaps, end = [], evs[0].time_range.end
    for prev, ev in zip(evs, evs[1:]):
        end = max(end, prev.time_range.end)
        if ev.time_range.start > end:
            gaps.append((ev.time_range.start - end, (end - t0) / 1e3, prev.name[:40], ev.name[:40]))
    end = max(end, evs[-1].time_range.end)
    idle = sum(g[0] for g in gaps)
    print(f"-- one eager step: {len(evs)} kernels, {(end - t0) / 1e3:.3f} ms from the first start to the last end, "
          f"{idle / 1e3:.3f} ms idle in {len(gaps)} gaps", flush=True)
    for us, at, before, after in sorted(gaps, reverse=True)[:rows]:
        print(f"   {us / 1e3:8.3f} ms idle at {at:8.3f} ms  after {before:40s}  before {after}", flush=True)
    totals = {}
    for e in evs:
        n, t = totals.get(e.name, (0, 0.0))
        totals[e.name] = (n + 1, t + e.time_range.end - e.time_range.start)
    print("-- the same step's kernels by time", flush=True)
    for name, (n, t) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:rows]:
        print(f"   {t / 1e3:9.3f} ms  x{n:<4d} {name[:110]}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", required=True, choices=sorted(zoo.CONFIGS))
    p.add_argument("--mode", default="prefill", choices=("prefill", "decode"))
    p.add_argument("--config", default="equal_budget")
    p.add_argument("--len", type=int, default=131072, help="sequence length (the cache length in decode)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--ops", action="store_true", help="also the whole step's torch ops by device time")
    p.add_argument("--gaps", action="store_true", help="also one eager step's idle gaps between kernels")
    args = p.parse_args(argv)
    cfg = zoo.CONFIGS[args.variant].get(args.config, zoo.CONFIGS[args.variant]["published"])
    T = 1 if args.mode == "decode" else args.len
    var = zoo.Variant(args.variant, cfg, args.batch, T, args.len, False)
    with torch.no_grad():
        sel = var.select()
        kernel_table(lambda: var.select(), f"{args.variant} {args.mode} selection", args.rows)
        kernel_table(lambda: var.attend(sel), f"{args.variant} {args.mode} attention", args.rows)
        if args.ops:
            op_table(var.step, f"{args.variant} {args.mode} step", args.rows)
        if args.gaps:
            step_gaps(var.step, args.rows)
        if args.mode == "decode":
            kernel_table(var.step, f"{args.variant} {args.mode} step", args.rows)
            ms, graphed = zoo.bench_graph(var.step)
            print(f"-- step {ms:.4f} ms, CUDA graph: {graphed}", flush=True)
            if graphed:  # (bench_graph warmed the step up, or said why a capture failed)
                graph_timeline(var.step)


if __name__ == "__main__":
    main()
