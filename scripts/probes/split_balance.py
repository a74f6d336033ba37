"""Whether the decode indexer's split kernel ends unevenly at 1M tokens, batch 1, and whether claiming the last
blocks at run time evens it out.

The split kernel (`sparsezoo/kernels/decode_indexer.py`) gives each program a fixed range of pages. The step's
next kernel starts only when the last program ends, so programs that end late cost the step time even when the
others are done. This probe runs the split kernel's page loop without its top-k (as `index_read_ceiling.py`'s
`stream`) on a shuffled-page bf16 cache and
- stamps each program's start and end (`%globaltimer`) in one replay after a read flush and prints how the ends
  spread (the first start is 0);
- times, under the zeroing and the read flush, the split kernel's equal static ranges (`static`) against
  - ranges cut short by a tail that programs claim NB pages at a time with an atomic counter (`tail` = the share
    of pages claimed);
  - many short ranges that the hardware hands out as programs end (`waves`);
  - one long range per program slot, then short ranges for whichever slot frees first (`taper`).

    python scripts/probes/split_balance.py [--len 1048576] [--reps 100]

Prints one JSON line per variant.
"""

import argparse
import json
import sys
from itertools import accumulate
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import flushes, median_after  # noqa: E402
from decode_flush import graphed  # noqa: E402
from index_read_ceiling import stream_setup, stream_step  # noqa: E402

from sparsezoo.kernels.decode_indexer import plan_splits  # noqa: E402


@triton.jit
def _now():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _sm_id():
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _balance_kernel(q_ptr, k_ptr, pt_ptr, out_ptr, stamp_ptr, ctr_ptr, starts_ptr, static_end, n_blocks, stride_kp,
                    ROWS: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, NB: tl.constexpr,
                    TAIL: tl.constexpr, STAMP: tl.constexpr):
    """Program s streams pages [starts[s], starts[s + 1]), then (TAIL) claims NB pages at a time from
    [static_end, n_blocks) until none are left."""
    if STAMP:
        t0 = _now()
    s = tl.program_id(0)
    q = tl.load(q_ptr + tl.arange(0, ROWS)[:, None] * D + tl.arange(0, D)[None, :])
    best = tl.full([ROWS], float("-inf"), tl.float32)
    start = tl.load(starts_ptr + s)
    end = tl.load(starts_ptr + s + 1)
    for j0 in range(start, end, NB):
        best = stream_step(q, k_ptr, pt_ptr, j0, end, best, stride_kp, D, PAGE, NB)
    if TAIL:
        j0 = static_end + tl.atomic_add(ctr_ptr, 1, sem="relaxed") * NB
        while j0 < n_blocks:
            nxt = static_end + tl.atomic_add(ctr_ptr, 1, sem="relaxed") * NB  # the next claim, in flight now
            best = stream_step(q, k_ptr, pt_ptr, j0, n_blocks, best, stride_kp, D, PAGE, NB)
            j0 = nxt
    tl.store(out_ptr + s * ROWS + tl.arange(0, ROWS), best)
    if STAMP:
        t1 = _now()
        tl.store(stamp_ptr + s * 3, t0)
        tl.store(stamp_ptr + s * 3 + 1, t1)
        tl.store(stamp_ptr + s * 3 + 2, _sm_id().to(tl.int64))


def spread(stamps: torch.Tensor) -> dict:
    """Percentiles of the programs' ends (us after the first start), the start spread and the ends per SM."""
    st = stamps.view(-1, 3).cpu().double()
    t0 = st[:, 0].min()
    starts, ends = (st[:, 0] - t0) / 1e3, (st[:, 1] - t0) / 1e3
    q = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.99, 1.0], dtype=torch.float64)
    per_sm = {}
    for sm, e in zip(st[:, 2].long().tolist(), ends.tolist()):
        per_sm[sm] = max(per_sm.get(sm, 0.0), e)
    sm_ends = torch.tensor(sorted(per_sm.values()), dtype=torch.float64)
    return dict(start_max_us=round(starts.max().item(), 2),
                end_pct_us={f"p{int(p * 100)}": round(v, 2) for p, v in zip(q.tolist(), ends.quantile(q).tolist())},
                sm_last_end_pct_us={f"p{int(p * 100)}": round(v, 2)
                                    for p, v in zip(q.tolist(), sm_ends.quantile(q).tolist())},
                sms=len(per_sm), programs=st.shape[0])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--len", type=int, default=1 << 20)
    p.add_argument("--reps", type=int, default=100)
    args = p.parse_args()
    dev = torch.device("cuda")
    sh, kidx, table, n_blocks, nbytes, sms, q = stream_setup(args.len)
    ctr = torch.zeros(1, dtype=torch.int32, device=dev)
    flush = flushes()
    per0, n0 = plan_splits(1, n_blocks, sms, min_blocks=8, programs_per_sm=2)

    def ranges(*parts):  # (programs, pages each), ...: consecutive ranges, the last one cut at n_blocks
        return [min(x, n_blocks) for x in accumulate((per for n, per in parts for _ in range(n)), initial=0)]

    variants = {"static": (ranges((n0, per0)), False)}
    for frac in (0.05, 0.1, 0.2):
        per = int(n_blocks * (1 - frac)) // n0
        variants[f"tail {frac}"] = (ranges((n0, per)), True)
    for per in (8, 4):
        variants[f"waves per={per}"] = (ranges((-(-n_blocks // per), per)), False)
    for big, small in ((28, 4), (24, 8), (30, 2)):
        rest = n_blocks - n0 * big
        variants[f"taper {n0}x{big} + {-(-rest // small)}x{small}"] = (ranges((n0, big), (-(-rest // small), small)),
                                                                      False)
    for name, (starts, tail) in variants.items():
        n = len(starts) - 1
        static_end = starts[-1]
        starts_t = torch.tensor(starts, dtype=torch.int32, device=dev)
        out = torch.empty(n * 16, dtype=torch.float32, device=dev)
        stamps = torch.zeros(n * 3, dtype=torch.int64, device=dev)

        def launch(stamp, n=n, static_end=static_end, tail=tail, out=out, stamps=stamps, starts_t=starts_t):
            _balance_kernel[(n,)](q, kidx, table, out, stamps, ctr, starts_t, static_end, n_blocks, kidx.stride(0),
                                  ROWS=16, D=sh["di"], PAGE=sh["block"], NB=2, TAIL=tail, STAMP=stamp,
                                  num_warps=4, num_stages=3)

        for _ in range(3):
            ctr.zero_()
            flush["read"]()
            launch(True)
        torch.cuda.synchronize()
        row = dict(card=torch.cuda.get_device_name(), variant=name, programs=n, static_end=static_end,
                   timeline_read_flush=spread(stamps))
        replay = graphed(lambda: launch(False))
        for mode in ("zero", "read"):
            row[f"us_{mode}"] = round(median_after(replay, lambda mode=mode: (flush[mode](), ctr.zero_()),
                                                   args.reps) * 1e3, 2)
        row["gb_s_read"] = round(nbytes / (row["us_read"] * 1e-6) / 1e9)
        print(json.dumps(row), flush=True)
    print(f"index keys {nbytes / 2**20:.0f} MiB over {n_blocks} pages; {args.reps} replays per median")


if __name__ == "__main__":
    main()
