"""NSA's two FlexAttention branches (compressed entries, sliding window) at the zoo's prefill point (m3 heads,
bf16, the paper's config) under FlexAttention kernel options: device time of each, and the largest output
difference against the library's own options (the first row: TMA loads for the compressed branch's forward on
Hopper). Each given option set replaces the library's whole choice; `{}` is flex's plain defaults.

    python scripts/probes/flex_kernel_options.py [--len 131072] [--options '{"USE_TMA": true}' ...]
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import zoo  # noqa: E402

from sparsezoo.ops import flex_utils  # noqa: E402

DEFAULT_OPTIONS = ['{}', '{"USE_TMA": true}', '{"num_stages": 2}', '{"num_stages": 4}', '{"num_warps": 4}',
                   '{"BLOCK_N": 128, "num_stages": 2}']


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--len", type=int, default=131072)
    p.add_argument("--options", nargs="*", default=DEFAULT_OPTIONS, help="JSON kernel_options, one per run")
    args = p.parse_args()
    var = zoo.Variant("nsa", zoo.CONFIGS["nsa"]["published"], 1, args.len, args.len, False)
    base_options = flex_utils._kernel_options
    with torch.no_grad():
        sel = var.select()
        want = {part: var.attend_part(part, sel) for part in ("compressed", "window")}
        for opts in [None] + [json.loads(x) for x in args.options]:
            flex_utils._kernel_options = base_options if opts is None else (lambda q, k, tma=False, o=opts: o or None)
            for part in ("compressed", "window"):
                try:
                    out = var.attend_part(part, sel)
                    diff = (out.float() - want[part].float()).abs().max().item()
                    ms = zoo.bench(lambda: var.attend_part(part, sel))
                    print(f"{part} {args.len} {opts}: {ms:.2f} ms, max |diff| {diff:.2e}", flush=True)
                except Exception as exc:  # an option the kernel cannot take: say so, go on
                    print(f"{part} {args.len} {opts}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)


if __name__ == "__main__":
    main()
