"""NSA's selected-blocks branch at the zoo's prefill point (m3 heads, bf16, the paper config, the selection the
zoo's step makes): the block-sparse Triton kernel's time under each tiling config (over ATTN_CONFIG), and the
largest output difference from the default config's.

    python scripts/probes/nsa_selected_tiles.py [--lengths 131072] [--configs '{"TM": 2}' ...]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import zoo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep  # noqa: E402

from sparsezoo.kernels import sparse_attention_triton as sat  # noqa: E402


def probe(T: int, configs: list[dict]) -> None:
    var = zoo.Variant("nsa", zoo.CONFIGS["nsa"]["published"], 1, T, T, False)
    with torch.no_grad():
        sel = var.select().to(torch.int32)
        run = lambda cfg: sat.block_sparse_attention_triton(var.q, var.k, var.v, sel, var.cfg["lsel"], var.scale,
                                                            config=cfg)
        want = run({})
        for cfg in [{}] + configs:
            try:
                diff = (run(cfg).float() - want.float()).abs().max().item()
                print(f"T {T} {cfg}: {zoo.bench(lambda: run(cfg)):.2f} ms, max |out - default| {diff:.3g}", flush=True)
            except Exception as exc:  # a tiling that does not compile or fit: say so, go on
                print(f"T {T} {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)


if __name__ == "__main__":
    sweep.main(probe, "131072", "JSON configs over ATTN_CONFIG")
