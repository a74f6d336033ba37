"""How fast can MSA's decode indexer stream fp8 index-key pages? A stripped split kernel (score dot, per-page
max, a running maximum instead of the top-k) over the 1M-token, batch-8 point, with the pages loaded through
pointers (as sparsezoo/kernels/decode_indexer.py does) or through a tensor descriptor (TMA, straight to shared memory).

    python scripts/probes/index_page_loads.py [--len 1048576] [--batch 8]
"""

import argparse

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _pages_kernel(q_ptr, k_ptr, k_desc, pt_ptr, out_ptr, n_pages, pages_per_split,
                  ROWS: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, TMA: tl.constexpr):
    b = tl.program_id(0)
    s = tl.program_id(1)
    r = tl.arange(0, ROWS)
    d = tl.arange(0, D)
    tok = tl.arange(0, PAGE)
    q = tl.load(q_ptr + (b * ROWS + r[:, None]) * D + d[None, :])
    best = tl.full([ROWS], float("-inf"), tl.float32)
    lo = s * pages_per_split
    for j in range(lo, tl.minimum(lo + pages_per_split, n_pages)):
        page = tl.load(pt_ptr + b * n_pages + j)
        if TMA:
            k = k_desc.load([page * PAGE, 0])
        else:
            k = tl.load(k_ptr + (page.to(tl.int64) * PAGE + tok[:, None]) * D + d[None, :])
        sc = tl.dot(q, tl.trans(k))
        best = tl.maximum(best, tl.max(sc, axis=1))
    tl.store(out_ptr + ((b * tl.num_programs(1) + s) * ROWS) + r, best)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--len", type=int, default=1048576)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    B, S, D, PAGE = args.batch, args.len, 128, 128
    n_pages = S // PAGE
    dev = "cuda"
    keys = torch.randn(B * n_pages * PAGE, D, device=dev).to(torch.float8_e4m3fn)
    table = torch.randperm(B * n_pages, device=dev, dtype=torch.int32).view(B, n_pages)
    desc = TensorDescriptor.from_tensor(keys, [PAGE, D])
    gb = keys.numel() / 1e9
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for rows in (16, 64):
        q = torch.randn(B * rows, D, device=dev).to(torch.float8_e4m3fn)
        for tma in (False, True):
            for per_sm in (2, 3, 4):
                for stages in (2, 3, 4):
                    splits = triton.cdiv(sms * per_sm, B)
                    per = triton.cdiv(n_pages, splits)
                    out = torch.empty(B * splits * rows, device=dev)
                    fn = lambda: _pages_kernel[(B, splits)](q, keys, desc, table, out, n_pages, per, ROWS=rows, D=D,
                                                            PAGE=PAGE, TMA=tma, num_warps=4, num_stages=stages)
                    try:
                        ms = triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
                        print(f"rows {rows} tma {tma} programs/SM {per_sm} stages {stages}: {ms * 1e3:.1f} us, "
                              f"{gb / ms:.2f} TB/s", flush=True)
                    except Exception as exc:
                        print(f"rows {rows} tma {tma} programs/SM {per_sm} stages {stages}: {type(exc).__name__}: "
                              f"{str(exc)[:100]}", flush=True)


if __name__ == "__main__":
    main()
