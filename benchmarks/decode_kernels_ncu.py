"""The decode kernels of DSA's indexer (both logits dot orientations) and NSA's fused decode at the zoo's
128k batch-8 point, one call each, for Nsight Compute:

    ncu --clock-control none -k regex:'_logits_kernel|_partition_kernel|_compressed_kernel' \
        --section SpeedOfLight --section Occupancy --section LaunchStats python benchmarks/decode_kernels_ncu.py
"""

from __future__ import annotations

import math

import torch

import zoo
from sparsezoo.kernels import indexer_decode_triton as idk
from sparsezoo.kernels import nsa_decode_triton as nd

T = 131072


def main() -> None:
    var = zoo.Variant("dsa", zoo.CONFIGS["dsa"]["published"], 8, 1, T, False)
    e, c = var.extra, var.cfg
    for cfg in ({"key_major": False}, {"key_major": True}):
        idk.indexer_topk_decode_triton(e["q_i"], e["w"], e["k_i"], e["key_end"], T, c["topk"], 1 / math.sqrt(c["Di"]),
                                       config=cfg)
    del var, e
    var = zoo.Variant("nsa", zoo.CONFIGS["nsa"]["published"], 8, 1, T, False)
    e, c = var.extra, var.cfg
    nd.nsa_decode_triton(var.q, e["kc"], e["vc"], var.k, var.v, var.k, var.v, c["l"], c["d"], c["lsel"], c["n"],
                         c["w"], var.scale)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
