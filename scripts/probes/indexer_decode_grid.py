"""The DSA/CSA decode indexer's logits grids at 128k, batch 8 (DSA tokens, CSA entries): each config's whole op,
CUDA-graph timed (best of 3), and each kernel's device time. With --zoo DIR, the config with the best summed op
time (if >= 1 us better than the default) is adopted in-process, then benchmarks/zoo.py's dsa and csa decode points
run into DIR.

    python scripts/probes/indexer_decode_grid.py [--zoo DIR] [--configs JSON] [--gather-config JSON] [--batches 1,8,32]
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import zoo  # noqa: E402
from indexer_decode_profile import kernel_times  # noqa: E402
from zoo import CONFIGS, Variant, bench_graph, copy_bandwidth  # noqa: E402  (copy_bandwidth: bytes/s)

from sparsezoo.kernels import indexer_decode_triton as idk  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--zoo", default=None, help="adopt the best config, then run the zoo's dsa/csa decode points here")
parser.add_argument("--configs", default=None, type=json.loads, help="JSON list of indexer configs (default: the grid)")
parser.add_argument("--gather-config", default="{}", type=json.loads,
                    help="GATHER_CONFIG overrides (the gather attention's) for the zoo run (e.g. '{\"SPLITS\": 1}')")
parser.add_argument("--batches", default="1,8,32", help="the zoo run's decode batches")
args = parser.parse_args()

bw = copy_bandwidth()
W = {"whole_wave": True, "programs_per_sm": 1}  # one wave of one program per SM
D = {"whole_wave": False, "BN": 64, "num_stages": 4}  # the default before: 33 splits of 64-key tiles per request
configs = [
    {},
    D,
    {**D, **W},
    {**D, **W, "num_stages": 6},
    {**D, **W, "num_stages": 8},
    {**W, "BN": 128, "num_stages": 3},
    {**W, "BN": 128, "num_stages": 4},
    {**D, **W, "num_stages": 8, "num_warps": 8},
    {**D, "num_stages": 6},
    {**D, "whole_wave": True, "num_stages": 6},
    {**D, "BN": 128},
]
if args.configs is not None:
    configs = [{}] + [c for c in args.configs if c]  # the default first: the baseline of the adoption rule
total = {}
for name in ("csa", "dsa"):
    var = Variant(name, CONFIGS[name]["published"], 8, 1, 131072, False)
    e, c = var.extra, var.cfg
    floor_us = e["k_i"].numel() * e["k_i"].element_size() / bw * 1e6
    print(
        f"{name}: index keys {e['k_i'].numel() * 2 / 1e6:.1f} MB, {floor_us:.1f} us at {bw / 1e12:.2f} TB/s", flush=True
    )
    for i, cfg in enumerate(configs):
        fn = lambda: idk.indexer_topk_decode_triton(
            e["q_i"], e["w"], e["k_i"], e["key_end"], 131072, c["topk"], 1 / math.sqrt(c["Di"]), config=cfg
        )
        try:
            us = min(bench_graph(fn)[0] for _ in range(3)) * 1e3
            total[i] = total.get(i, 0.0) + us
            print(f"{name} {json.dumps(cfg)}: op {us:.1f} us; kernels {kernel_times(fn)}", flush=True)
        except Exception as exc:
            total[i] = total.get(i, 0.0) + 1e9
            print(f"{name} {json.dumps(cfg)}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
    var = e = None  # frees the inputs
    torch.cuda.empty_cache()
best = min(total, key=total.get)
print(f"best {configs[best]}: {total[best]:.1f} us (csa + dsa) against {total[0]:.1f} us", flush=True)
if args.zoo:
    if best and total[0] - total[best] >= 1.0:
        idk.CONFIG.update(configs[best])
        print("adopted", configs[best], flush=True)
    if args.gather_config:
        from sparsezoo.kernels import gather_attention_triton as gat

        gat.GATHER_CONFIG.update(args.gather_config)
        print("gather attention", args.gather_config, flush=True)
    zoo.main(
        [
            *"--variants dsa,csa --configs equal_budget --modes decode --no-peers --reps 3".split(),
            "--decode-batches",
            args.batches,
            "--out",
            args.zoo,
        ]
    )
