"""How much of the block-sparse kernel's tensor-core work lands on blocks a row did not choose: the tile unions of
the zoo's prefill selections (m3 heads, bf16, the zoo step's selection) for NSA, MSA and MoBA, at several tokens
per tile. A tile of TM tokens visits the union of its tokens' blocks; every row computes every union block, so
each token's rows compute union blocks against the k it chose.

    python scripts/probes/tile_unions.py [--lengths 131072] [--configs '{"variant": "nsa", "TM": [2, 4, 8]}' ...]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import zoo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep  # noqa: E402

from sparsezoo.kernels import sparse_attention_triton as sat  # noqa: E402

DEFAULTS = [{"variant": "nsa", "config": "published", "TM": [1, 2, 4, 8]},
            {"variant": "msa", "config": "published", "TM": [2, 4, 8]},
            {"variant": "moba", "config": "equal_budget", "TM": [16, 32, 64]}]


def probe(T: int, configs: list[dict]) -> None:
    for spec in configs or DEFAULTS:
        name, config = spec["variant"], spec.get("config", "published")
        var = zoo.Variant(name, zoo.CONFIGS[name][config], 1, T, T, False)
        block = var.cfg.get("lsel", var.cfg.get("block"))
        with torch.no_grad():
            sel = var.select().to(torch.int32)
        k = (sel >= 0).sum(-1).float().mean().item()  # blocks per token actually chosen
        n_blocks = -(-T // block)
        for TM in spec["TM"]:
            counts = sat.tile_plan(sel, TM, sat.ATTN_CONFIG["WINDOW"], n_blocks)[1].float()
            q = torch.quantile(counts.flatten()[:1 << 24], torch.tensor([0.5, 0.9], device=counts.device)).tolist()
            print(f"T {T} {name} {config} block {block} TM {TM}: k {k:.2f} per token, union mean {counts.mean():.2f} "
                  f"(p50 {q[0]:.0f}, p90 {q[1]:.0f}): each row computes {counts.mean() / k:.2f}x the blocks it chose",
                  flush=True)
        del var, sel
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sweep.main(probe, "131072", "JSON objects {variant, config, TM: [tokens per tile, ...]}")
