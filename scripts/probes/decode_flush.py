"""How the cache flush between timed replays moves MSA's decode step and dense's, at m3, batch 1, bf16 index keys.

`benchmarks/decode.py` times CUDA-graph replays with triton's do_bench, which zeroes a 256 MB buffer before each
replay: the L2 then holds dirty lines of that buffer, and the next kernel that streams more than the L2 pays for
writing them back. This probe times the same replays three ways, one flush before each:
- `zero`: do_bench's flush (256 MB written);
- `read`: the same buffer read (a sum), which leaves the L2 cold and clean, as after a layer that streamed its keys;
- `none`: no flush (at 1M each step streams far more than the L2, so its data is cold anyway; at 128k part of
  it may still be in the L2 from the replay before).
`--then-small` follows each flush with a one-element kernel (`zero+small`, `read+small`), so that the timed call
starts after a short kernel, as a layer's first kernel does in a model, rather than right after the flush.

    python scripts/probes/decode_flush.py [--lens 1048576,131072] [--reps 200] [--index-config JSON] [--then-small]

Prints one JSON line per (length, mode): median ms of the fastest dense SDPA path under that flush (flash, cuDNN and
efficient, each folded and with enable_gqa) and of the MSA step, and the ratio.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from decode import (L2_ROTATE_BYTES, SHAPES, contiguous, flushes, make_caches, median_after,  # noqa: E402
                    sdpa_decode_candidates)

from sparsezoo.paged_cache import MSADecoder  # noqa: E402


def graphed(fn):
    """fn captured in a CUDA graph (warmed up on a side stream first); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def measure(S: int, flush_fns: dict, reps: int, index_config: dict) -> None:
    sh, dev = SHAPES["m3"], torch.device("cuda")
    caches, _, table = make_caches(sh, S, 1, 1, dev, False, seed=S)
    cache = caches[0]
    g = torch.Generator(device=dev).manual_seed(2)
    q = torch.randn(1, sh["hq"], 1, sh["d"], device=dev, dtype=torch.bfloat16, generator=g)
    q_idx = torch.randn(1, sh["hkv"], 1, sh["di"], device=dev, dtype=torch.bfloat16, generator=g)
    dec = MSADecoder(num_q_heads=sh["hq"], num_kv_heads=sh["hkv"], head_dim=sh["d"], index_dim=sh["di"],
                     block_size=sh["block"], topk=sh["topk"], index_config=index_config)
    dec.plan(torch.full((1,), S, dtype=torch.int32, device=dev), table, 1, num_pages=cache.num_pages)
    out = torch.empty_like(q)
    msa = graphed(lambda: dec.run(q, q_idx, cache, out=out))
    k, v = contiguous(cache, table, S)
    dense = {}
    for name, fn in sdpa_decode_candidates(q, k, v, 1).items():
        try:
            dense[name] = graphed(fn)
        except RuntimeError as exc:  # a backend that does not take these inputs; said, not hidden
            print(f"dense {name}: unavailable ({str(exc)[:80]})", flush=True)
    for mode, flush in flush_fns.items():
        dense_ms = {name: median_after(replay, flush, reps) for name, replay in dense.items()}
        best = min(dense_ms, key=dense_ms.get)
        d_ms, m_ms = dense_ms[best], median_after(msa, flush, reps)
        print(json.dumps(dict(card=torch.cuda.get_device_name(), seq_len=S, batch=1, flush=mode, dense_impl=best,
                              dense_ms=round(d_ms, 4), msa_ms=round(m_ms, 4), speedup=round(d_ms / m_ms, 3),
                              pdl=dec.pdl, index_config=index_config)), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lens", default="1048576,131072")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--index-config", default="{}", metavar="JSON", help="MSADecoder index_config overrides")
    p.add_argument("--then-small", action="store_true", help="a one-element kernel after each flush")
    args = p.parse_args()
    index_config = json.loads(args.index_config)
    fl = flushes()
    if args.then_small:  # each flush followed by a one-element kernel, as a layer's kernel follows another one
        small = torch.zeros(1, device="cuda")
        fl = {f"{mode}+small": (lambda f=f: (f(), small.zero_())) for mode, f in fl.items() if mode != "none"}
    for S in (int(x) for x in args.lens.split(",")):
        measure(S, fl, args.reps, index_config)
        torch.cuda.empty_cache()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0)
    print(f"flush buffer {L2_ROTATE_BYTES / 2**20:.0f} MiB; L2 {l2 / 2**20:.0f} MiB; {args.reps} replays per median")


if __name__ == "__main__":
    main()
