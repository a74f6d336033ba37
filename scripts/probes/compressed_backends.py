"""NSA's compressed branch at the zoo's prefill points (m3 heads, bf16, l 32 / d 16: NSA's one config, which
is also its equal-budget one): each backend of `ops.compressed_attention` timed forward with its LSE (as NSA's
step runs it) and forward plus backward, with the largest output and LSE differences from the first backend.

    python scripts/probes/compressed_backends.py [--lengths 32768,131072] [--backends sdpa,flex]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import zoo  # noqa: E402

from sparsezoo import ops  # noqa: E402


def probe(T: int, backends: list[str]) -> None:
    var = zoo.Variant("nsa", zoo.CONFIGS["nsa"]["published"], 1, T, T, True)
    c, e = var.cfg, var.extra
    kw = dict(S=T, block_len=c["l"], stride=c["d"], scale=var.scale)
    leaves = (var.q, e["kc"], e["vc"])
    first = None
    for backend in backends:
        with torch.no_grad():
            fwd = lambda: ops.compressed_attention(*leaves, return_lse=True, backend=backend, **kw)
            out, lse = fwd()
            ms = zoo.bench(fwd)
        grad = torch.randn_like(out)

        def train():
            o = ops.compressed_attention(*leaves, backend=backend, **kw)
            torch.autograd.grad(o, leaves, grad)

        train_ms = zoo.bench(train)
        diff = ""
        if first is None:
            first = (backend, out, lse)
        else:
            seen = torch.isfinite(first[2])
            diff = (f", max |out - {first[0]}| {(out.float() - first[1].float()).abs().max().item():.3g}, "
                    f"max |lse - {first[0]}| {(lse - first[2])[seen].abs().max().item():.3g}")
        print(f"T {T} {backend}: forward with LSE {ms:.2f} ms, forward + backward {train_ms:.2f} ms{diff}", flush=True)
    torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--backends", default="sdpa,flex")
    args = p.parse_args()
    for T in (int(x) for x in args.lengths.split(",")):
        probe(T, args.backends.split(","))


if __name__ == "__main__":
    main()
