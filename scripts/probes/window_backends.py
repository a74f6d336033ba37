"""NSA's window branch at the zoo's prefill points (m3 heads, bf16, window 512): each backend of
`ops.window_attention` timed forward and forward plus backward, with the largest output difference from the first
backend and the implementation each call recorded. 'triton:BLOCK[:TM[:WARPS]]' runs the Triton path with blocks of
BLOCK keys (its WINDOW_BLOCK) and TM tokens per tile on WARPS warps (the kernels' WINDOW_CONFIG).

    python scripts/probes/window_backends.py [--lengths 32768,131072] [--backends triton,triton:128,triton:64:8:8,flex]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import zoo  # noqa: E402

from sparsezoo import ops  # noqa: E402
from sparsezoo.kernels import sparse_attention_triton as sat  # noqa: E402
from sparsezoo.ops.window_attention import triton as window_triton  # noqa: E402


def probe(T: int, backends: list[str], backward: bool = True) -> None:
    var = zoo.Variant("nsa", zoo.CONFIGS["nsa"]["published"], 1, T, T, True)
    leaves = (var.q, var.k, var.v)
    first = None
    default_block, default_config = window_triton.WINDOW_BLOCK, sat.WINDOW_CONFIG
    for name in backends:
        backend, *tiling = name.split(":")
        window_triton.WINDOW_BLOCK = int(tiling[0]) if tiling else default_block
        sat.WINDOW_CONFIG = {**default_config, **dict(zip(("TM", "num_warps"), map(int, tiling[1:])))}
        run = lambda: ops.window_attention(*leaves, window=var.cfg["w"], backend=backend)
        try:
            with torch.no_grad(), ops.track_implementations() as used:
                out = run()
                ms = zoo.bench(run)
        except Exception as exc:  # a tiling that does not compile or fit: say so, go on
            print(f"T {T} {name}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        grad = torch.randn_like(out)
        train_ms = "not timed"
        try:
            if backward:
                train_ms = f"{zoo.bench(lambda: torch.autograd.grad(run(), leaves, grad)):.2f} ms"
        except Exception as exc:  # a tiling whose backward does not fit: say so, go on
            train_ms = f"{type(exc).__name__}: {str(exc)[:90]}"
        diff = ""
        if first is None:
            first = (name, out)
        else:
            diff = f", max |out - {first[0]}| {(out.float() - first[1].float()).abs().max().item():.3g}"
        print(f"T {T} {name} ({used}): forward {ms:.2f} ms, forward + backward {train_ms}{diff}", flush=True)
    window_triton.WINDOW_BLOCK, sat.WINDOW_CONFIG = default_block, default_config
    torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--backends", default="triton,flex")
    p.add_argument("--forward-only", action="store_true", help="time the forward alone")
    args = p.parse_args()
    for T in (int(x) for x in args.lengths.split(",")):
        probe(T, args.backends.split(","), not args.forward_only)


if __name__ == "__main__":
    main()
