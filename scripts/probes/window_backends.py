"""NSA's window branch at the zoo's prefill points (m3 heads, bf16, window 512): each backend of
`ops.window_attention` timed forward and forward plus backward, with the largest output difference from the first
backend and the implementation each call recorded. 'triton:128' runs the Triton path with blocks of 128 keys
(its WINDOW_BLOCK).

    python scripts/probes/window_backends.py [--lengths 32768,131072] [--backends triton,triton:128,flex]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import zoo  # noqa: E402

from sparsezoo import ops  # noqa: E402
from sparsezoo.ops.window_attention import triton as window_triton  # noqa: E402


def probe(T: int, backends: list[str]) -> None:
    var = zoo.Variant("nsa", zoo.CONFIGS["nsa"]["published"], 1, T, T, True)
    leaves = (var.q, var.k, var.v)
    first = None
    default_block = window_triton.WINDOW_BLOCK
    for name in backends:
        backend, _, block = name.partition(":")
        window_triton.WINDOW_BLOCK = int(block or default_block)
        run = lambda: ops.window_attention(*leaves, window=var.cfg["w"], backend=backend)
        with torch.no_grad(), ops.track_implementations() as used:
            out = run()
            ms = zoo.bench(run)
        grad = torch.randn_like(out)
        train_ms = zoo.bench(lambda: torch.autograd.grad(run(), leaves, grad))
        diff = ""
        if first is None:
            first = (name, out)
        else:
            diff = f", max |out - {first[0]}| {(out.float() - first[1].float()).abs().max().item():.3g}"
        print(f"T {T} {name} ({used}): forward {ms:.2f} ms, forward + backward {train_ms:.2f} ms{diff}", flush=True)
    window_triton.WINDOW_BLOCK = default_block
    torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--backends", default="triton,flex")
    args = p.parse_args()
    for T in (int(x) for x in args.lengths.split(",")):
        probe(T, args.backends.split(","))


if __name__ == "__main__":
    main()
