"""DSA / CSA decode steps (indexer top-k, then gather attention) at 128k with and without programmatic dependent
launches at every batch, CUDA-graph timed as benchmarks/zoo.py times them (best of 3). With --zoo DIR, the zoo's
dsa and csa decode points then run into DIR with the default (pdl at batch 1 only; the sixteenth session's run
chose it in-process: pdl off unless it saved >= 0.5 us at batch 8 on both variants).

    python scripts/probes/indexer_gather_pdl.py [--zoo DIR]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import zoo  # noqa: E402
from zoo import CONFIGS, Variant, bench_graph  # noqa: E402

from sparsezoo.kernels import gather_attention_triton as gat  # noqa: E402
from sparsezoo.kernels import indexer_decode_triton as idk  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--zoo", default=None, help="settle pdl, then run the zoo's dsa/csa decode points here")
args = parser.parse_args()


def set_pdl(pdl):
    idk.CONFIG["pdl"] = pdl
    gat.GATHER_CONFIG["pdl"] = pdl


for name in ("csa", "dsa"):
    for B in (8, 1):
        var = Variant(name, CONFIGS[name]["published"], B, 1, 131072, False)
        times = {}
        for pdl in (False, True, False, True):
            set_pdl(pdl)
            us = min(bench_graph(var.step)[0] for _ in range(3)) * 1e3
            times[pdl] = min(times.get(pdl, us), us)
        print(f"{name} b{B} 128k decode step: pdl off {times[False]:.1f} us, on {times[True]:.1f} us", flush=True)
        var = None
set_pdl(None)
if args.zoo:
    zoo.main(
        [
            *"--variants dsa,csa --configs equal_budget --modes decode --decode-batches 1,8,32 --no-peers --reps 3".split(),
            "--out",
            args.zoo,
        ]
    )
