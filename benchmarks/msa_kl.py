"""MSA's sparse KL (the index branch's training loss) on one GPU: the query-major Triton kernels
(`sparsezoo/kernels/index_kl_triton.py`, what training runs today) against the key-major ones
(`sparsezoo/kernels/index_kl_keys.py`), loss plus both gradients, m3 heads, bf16, batch 1, MSA's own selections of
correlated index queries (as benchmarks/prefill.py builds them), the main LSE given (as the model passes it).

    python benchmarks/msa_kl.py --out examples/results [--lengths 32,128] [--tune]

Each point: median ms of each schedule (zoo.py's `bench`), the loss of each, the largest relative
difference of their gradients, the peak memory beyond the inputs, and the CUDA time of each kernel of
the key-major call (torch.profiler). --tune also times key-major configs (KL_KEYS_CONFIG overrides) at
the last length. Writes msa_kl_<card>.{json,md}, named after the GPU that ran it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cards import card_tag  # noqa: E402
from prefill import KB, SHAPES, kernel_times, make_inputs  # noqa: E402
from zoo import bench  # noqa: E402


def run_length(T: int, sh: dict, tune: bool = False) -> dict:
    from sparsezoo.kernels import index_kl_keys, index_kl_triton, select_triton
    from sparsezoo.kernels.sparse_attention_keys import block_sparse_attention_keys

    q, k, _, q_idx, k_idx = make_inputs(T, sh)
    scale, iscale = 1 / math.sqrt(sh["D"]), 1 / math.sqrt(sh["Di"])
    sel = select_triton.msa_select_triton(q_idx, k_idx, sh["block"], sh["topk"], iscale)
    lse = block_sparse_attention_keys(q, k, k, sel, sh["block"], scale, True)[1]
    args = (q, k, q_idx, k_idx, sel, sh["block"], scale, iscale, 1.0, 1.0, lse)
    rec = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, shape="m3", seq_len=T, batch=1)
    outs = {}
    for name, fn in (("query_major", index_kl_triton.index_kl_forward),
                     ("key_major", index_kl_keys.index_kl_keys_forward)):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        outs[name] = fn(*args)
        torch.cuda.synchronize()
        rec[f"{name}_peak_extra_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
        rec[f"{name}_ms"] = round(bench(lambda fn=fn: fn(*args)), 3)
        rec[f"{name}_loss"] = float(outs[name][0])
    for i, grad in ((2, "dq_idx"), (3, "dk_idx")):
        a, b = outs["query_major"][i], outs["key_major"][i]
        rec[f"{grad}_rel_diff"] = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
    rec["speedup"] = round(rec["query_major_ms"] / rec["key_major_ms"], 2)
    rec["key_major_kernels_ms"] = kernel_times(lambda: index_kl_keys.index_kl_keys_forward(*args))
    print(json.dumps(rec), flush=True)
    if tune:
        rec["tune"] = tune_configs(args)
    return rec


TUNE = [dict(), dict(num_warps=8), dict(R=8), dict(R=32), dict(num_stages=2), dict(BM=256), dict(BM=256, num_warps=8),
        dict(BM=64), dict(TI=32), dict(EI=128)]


def tune_configs(args) -> list[dict]:
    from sparsezoo.kernels import index_kl_keys

    rows = []
    for cfg in TUNE:
        try:
            ms = bench(lambda cfg=cfg: index_kl_keys.index_kl_keys_forward(*args, True, cfg))
        except Exception as e:  # noqa: BLE001 (a config that does not compile is recorded, not fatal)
            ms, cfg = float("inf"), {**cfg, "error": f"{type(e).__name__}: {str(e)[:120]}"}
        rows.append({"config": cfg, "ms": round(ms, 3)})
        print(f"  tune {cfg}: {ms:.3f} ms", flush=True)
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--lengths", default="32,128", help="sequence lengths in k tokens")
    p.add_argument("--tune", action="store_true", help="time key-major configs at the last length")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/msa_kl.py needs a CUDA GPU")
    lengths = [int(x) * KB for x in args.lengths.split(",")]
    records = [run_length(T, SHAPES["m3"], args.tune and T == lengths[-1]) for T in lengths]
    card = records[0]["card"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"msa_kl_{card_tag(card)}"
    stem.with_suffix(".json").write_text(json.dumps(records, indent=1))
    lines = [f"# MSA sparse KL, query-major against key-major, on {card}", "",
             "Command: `python benchmarks/msa_kl.py " + " ".join(sys.argv[1:] if argv is None else argv) + "`", "",
             "| length | query-major ms | key-major ms | speedup | loss (q / k) | dq_idx / dk_idx rel. diff | "
             "peak extra GiB (q / k) |", "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['seq_len'] // KB}k | {r['query_major_ms']} | {r['key_major_ms']} | {r['speedup']}x | "
                     f"{r['query_major_loss']:.5g} / {r['key_major_loss']:.5g} | "
                     f"{r['dq_idx_rel_diff']:.2g} / {r['dk_idx_rel_diff']:.2g} | "
                     f"{r['query_major_peak_extra_gib']} / {r['key_major_peak_extra_gib']} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return records


if __name__ == "__main__":
    main()
