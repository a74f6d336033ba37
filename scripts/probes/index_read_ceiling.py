"""How fast the H200 streams MSA's index-key cache at 1M tokens, batch 1: the ceiling of the decode indexer's
split kernel.

The split kernel (`sparsezoo/kernels/decode_indexer.py`) reads every page of bf16 index keys (1M tokens x 128
dims = 256 MiB) once per step. This probe times, on the same shuffled-page cache and under the same flushes as
`decode_flush.py` (a zeroing write of 256 MiB, a read of it, none):
- `torch_sum`: torch's own reduction over the whole cache (no page table);
- `stream`: the split kernel's page loop without its top-k (the same grid, page-table loads, score dot and
  block max; each program writes one number), for a few launch settings;
- `stream_in_order`: the same over pages in storage order (no page-table load before each key load);
- `stream_evict_first`, `stream_in_order_evict_first`: the same with the keys loaded under the L2 policy
  evict_first (the stream then replaces its own lines, not the flush's dirty ones);
- `tma`, `tma_in_order`, `tma_ids_first`: the same loop with each page fetched by a tensor-memory-access copy
  (through the page table, in storage order, or with the split's page ids read before the loop);
- `chain`: the stream followed by 1 or 3 programmatic dependent launches that only wait, read one value and
  write one (what a step's merge, attention and output merge cost at the least, beyond their work).

    python scripts/probes/index_read_ceiling.py [--len 1048576] [--reps 100] [--only tma]

Prints one JSON line per (variant, flush): median us and GB/s of index keys.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import SHAPES, flushes, make_caches, median_after  # noqa: E402
from decode_flush import graphed  # noqa: E402

from sparsezoo.kernels.decode_indexer import plan_splits  # noqa: E402
from sparsezoo.kernels.pdl import gdc_launch_dependents, gdc_wait  # noqa: E402


@triton.jit
def stream_step(q, k_ptr, pt_ptr, j0, end, best, stride_kp, D: tl.constexpr, PAGE: tl.constexpr,
                NB: tl.constexpr, IN_ORDER: tl.constexpr = False, EVICT_FIRST: tl.constexpr = False):
    """One step of the split kernel's page loop without its top-k: pages [j0, j0 + NB) below `end` (through the
    page table, or in storage order), one score dot, the running max per query row."""
    jj = j0 + tl.arange(0, NB)
    ok = jj < end
    if IN_ORDER:
        pages = jj.to(tl.int64)
    else:
        pages = tl.load(pt_ptr + jj, mask=ok, other=0).to(tl.int64)
    offs = pages[:, None, None] * stride_kp + tl.arange(0, PAGE)[None, :, None] * D + tl.arange(0, D)[None, None, :]
    if EVICT_FIRST:
        k = tl.load(k_ptr + offs, mask=ok[:, None, None], other=0.0, eviction_policy="evict_first")
    else:
        k = tl.load(k_ptr + offs, mask=ok[:, None, None], other=0.0)
    sc = tl.dot(q, tl.trans(tl.reshape(k, [NB * PAGE, D])))
    return tl.maximum(best, tl.max(sc, axis=1))


@triton.jit
def _stream_kernel(q_ptr, k_ptr, pt_ptr, out_ptr, blocks_per_split, n_blocks, stride_kp,
                   ROWS: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, NB: tl.constexpr,
                   IN_ORDER: tl.constexpr, PDL: tl.constexpr = False, EVICT_FIRST: tl.constexpr = False):
    if PDL:  # a dependent launch may start at once (as after the decode indexer's split kernel)
        gdc_launch_dependents()
    s = tl.program_id(0)
    start = s * blocks_per_split
    end = tl.minimum(start + blocks_per_split, n_blocks)
    q = tl.load(q_ptr + tl.arange(0, ROWS)[:, None] * D + tl.arange(0, D)[None, :])
    best = tl.full([ROWS], float("-inf"), tl.float32)
    for j0 in range(start, end, NB):
        best = stream_step(q, k_ptr, pt_ptr, j0, end, best, stride_kp, D, PAGE, NB, IN_ORDER, EVICT_FIRST)
    tl.store(out_ptr + s * ROWS + tl.arange(0, ROWS), best)


@triton.jit
def _stream_tma_kernel(q_ptr, k_desc, pt_ptr, out_ptr, blocks_per_split, n_blocks,
                       ROWS: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, IN_ORDER: tl.constexpr,
                       MAXB: tl.constexpr = 64):
    """The same loop with each page fetched by a tensor-memory-access copy (one descriptor over the cache
    viewed as [pages * PAGE, D]). IN_ORDER 0: page ids through the table, 1: storage order, 2: the table
    read before the loop."""
    s = tl.program_id(0)
    start = s * blocks_per_split
    end = tl.minimum(start + blocks_per_split, n_blocks)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + tl.arange(0, ROWS)[:, None] * D + d[None, :])
    best = tl.full([ROWS], float("-inf"), tl.float32)
    if IN_ORDER == 2:  # the split's page ids loaded up front, so no load feeds a copy's address in the loop
        slot = tl.arange(0, MAXB)
        ids = tl.load(pt_ptr + start + slot, mask=start + slot < end, other=0)
    for j in range(start, end):
        if IN_ORDER == 1:
            page = j
        elif IN_ORDER == 2:
            page = tl.sum(tl.where(slot == j - start, ids, 0), axis=0)
        else:
            page = tl.load(pt_ptr + j)
        k = k_desc.load([page * PAGE, 0])
        sc = tl.dot(q, tl.trans(k))
        best = tl.maximum(best, tl.max(sc, axis=1))
    tl.store(out_ptr + s * ROWS + tl.arange(0, ROWS), best)


@triton.jit
def _null_kernel(src_ptr, dst_ptr):
    """The least a dependent step kernel does: wait for the kernel before it, read one of its values,
    write one."""
    gdc_wait()
    gdc_launch_dependents()
    i = tl.program_id(0)
    tl.store(dst_ptr + i, tl.load(src_ptr + i) + 1.0)


def stream_setup(length: int):
    """The probes' cache: `length` tokens of bf16 index keys, batch 1, on shuffled pages. Returns (shape, keys
    [P, page, D_i], page table, full blocks, their bytes, SM count, a 16-row bf16 query)."""
    dev = torch.device("cuda")
    sh = SHAPES["m3"]
    caches, _, table = make_caches(sh, length, 1, 1, dev, False, seed=1)
    kidx = caches[0].k_idx  # [P, page, D_i] bf16
    n_blocks = (length - 1) // sh["block"]
    nbytes = n_blocks * sh["block"] * sh["di"] * kidx.element_size()
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    q = torch.randn(16, sh["di"], device=dev, dtype=torch.bfloat16)
    return sh, kidx, table, n_blocks, nbytes, sms, q


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--len", type=int, default=1 << 20)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--only", default="", help="time only the variants whose names start with this")
    args = p.parse_args()
    dev = torch.device("cuda")
    sh, kidx, table, n_blocks, nbytes, sms, q = stream_setup(args.len)
    variants = {"torch_sum": lambda: kidx[:n_blocks].sum(dtype=torch.float32)}
    for ppsm, nb, warps, stages in [(2, 2, 4, 3), (2, 1, 4, 3), (2, 4, 4, 2), (1, 2, 4, 3), (4, 1, 4, 2),
                                    (2, 2, 8, 3)]:
        per, n = plan_splits(1, n_blocks, sms, min_blocks=8, programs_per_sm=ppsm)
        out = torch.empty(n * 16, dtype=torch.float32, device=dev)
        for in_order, evict in [(False, False), (True, False), (False, True), (True, True)]:
            if evict and (ppsm, warps) != (2, 4):
                continue
            name = (f"stream{'_in_order' if in_order else ''}{'_evict_first' if evict else ''} ppsm={ppsm} nb={nb} "
                    f"warps={warps} stages={stages}")
            variants[name] = (lambda per=per, n=n, out=out, nb=nb, warps=warps, stages=stages, in_order=in_order,
                              evict=evict:
                              _stream_kernel[(n,)](q, kidx, table, out, per, n_blocks, kidx.stride(0), ROWS=16,
                                                   D=sh["di"], PAGE=sh["block"], NB=nb, IN_ORDER=in_order,
                                                   EVICT_FIRST=evict, num_warps=warps, num_stages=stages))
    per, n = plan_splits(1, n_blocks, sms, min_blocks=8, programs_per_sm=2)
    chain_out = [torch.zeros(n * 16, dtype=torch.float32, device=dev) for _ in range(4)]

    def chain(links: int, programs: int):
        _stream_kernel[(n,)](q, kidx, table, chain_out[0], per, n_blocks, kidx.stride(0), ROWS=16, D=sh["di"],
                             PAGE=sh["block"], NB=2, IN_ORDER=False, PDL=links > 0, num_warps=4, num_stages=3)
        for i in range(links):
            _null_kernel[(programs,)](chain_out[i], chain_out[i + 1], num_warps=4, launch_pdl=True)

    for links in (1, 3):
        for programs in (4, 64):
            variants[f"chain stream + {links} dependent launches of {programs} programs"] = (
                lambda links=links, programs=programs: chain(links, programs))
    variants["chain stream alone"] = lambda: chain(0, 1)

    from triton.tools.tensor_descriptor import TensorDescriptor

    flat = kidx.view(-1, sh["di"])
    desc = TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [sh["block"], sh["di"]])
    for ppsm, warps, stages in [(2, 4, 3), (2, 4, 4), (1, 4, 4), (3, 4, 3), (4, 4, 2)]:
        per, n = plan_splits(1, n_blocks, sms, min_blocks=8, programs_per_sm=ppsm)
        out = torch.empty(n * 16, dtype=torch.float32, device=dev)
        for in_order in (0, 1, 2):
            name = f"tma{['', '_in_order', '_ids_first'][in_order]} ppsm={ppsm} warps={warps} stages={stages}"
            variants[name] = (lambda per=per, n=n, out=out, warps=warps, stages=stages, in_order=in_order:
                              _stream_tma_kernel[(n,)](q, desc, table, out, per, n_blocks, ROWS=16, D=sh["di"],
                                                       PAGE=sh["block"], IN_ORDER=in_order,
                                                       MAXB=triton.next_power_of_2(per), num_warps=warps,
                                                       num_stages=stages))
    for name, fn in variants.items():
        if not name.startswith(args.only):
            continue
        try:
            replay = graphed(fn)
        except Exception as exc:  # a variant this Triton cannot build: said, not hidden
            print(json.dumps(dict(variant=name, error=f"{type(exc).__name__}: {str(exc)[:200]}")), flush=True)
            continue
        for mode, flush in flushes().items():
            ms = median_after(replay, flush, args.reps)
            print(json.dumps(dict(card=torch.cuda.get_device_name(), variant=name, flush=mode, us=round(ms * 1e3, 2),
                                  gb_s=round(nbytes / (ms * 1e-3) / 1e9))), flush=True)
    print(f"index keys {nbytes / 2**20:.0f} MiB over {n_blocks} pages; {args.reps} replays per median")


if __name__ == "__main__":
    main()
