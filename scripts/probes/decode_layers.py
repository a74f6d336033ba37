"""MSA decode and dense per layer when L layers (each with its own cache) run back to back in one CUDA graph, as
in a model's decode step, at 1M tokens, batch 1, bf16 index keys: the graph's launch is paid once per L layers and
only the first layer starts from the flushed L2; the others find what the layer before them left.

    python scripts/probes/decode_layers.py [--len 1048576] [--layers 1,2,4] [--reps 60]

Prints one JSON line per (L, flush): per-layer ms of dense (the fastest of SDPA's flash, cuDNN and efficient paths,
each folded and with enable_gqa, as `decode_flush.py` times them) and of the MSA step, and their ratio.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import SHAPES, contiguous, flushes, make_caches, median_after, sdpa_decode_candidates  # noqa: E402
from decode_flush import graphed  # noqa: E402

from sparsezoo.paged_cache import MSADecoder  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--len", type=int, default=1 << 20)
    p.add_argument("--layers", default="1,2,4")
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--index-config", default="{}", metavar="JSON", help="MSADecoder index_config overrides")
    args = p.parse_args()
    index_config = json.loads(args.index_config)
    sh, dev, S = SHAPES["m3"], torch.device("cuda"), args.len
    counts = [int(x) for x in args.layers.split(",")]
    n = max(counts)
    caches, _, table = make_caches(sh, S, 1, n, dev, False, seed=S)
    g = torch.Generator(device=dev).manual_seed(2)
    qs = [torch.randn(1, sh["hq"], 1, sh["d"], device=dev, dtype=torch.bfloat16, generator=g) for _ in range(n)]
    qis = [torch.randn(1, sh["hkv"], 1, sh["di"], device=dev, dtype=torch.bfloat16, generator=g) for _ in range(n)]
    outs = [torch.empty_like(x) for x in qs]
    kv = [contiguous(c, table, S) for c in caches]
    dense_fns = [sdpa_decode_candidates(qs[i], *kv[i], 1) for i in range(n)]
    dec = MSADecoder(num_q_heads=sh["hq"], num_kv_heads=sh["hkv"], head_dim=sh["d"], index_dim=sh["di"],
                     block_size=sh["block"], topk=sh["topk"], index_config=index_config)
    dec.plan(torch.full((1,), S, dtype=torch.int32, device=dev), table, 1, num_pages=caches[0].num_pages)
    fl = flushes()
    for L in counts:
        msa = graphed(lambda L=L: [dec.run(qs[i], qis[i], caches[i], out=outs[i]) for i in range(L)])
        dense = {}
        for name in dense_fns[0]:
            try:
                dense[name] = graphed(lambda L=L, name=name: [dense_fns[i][name]() for i in range(L)])
            except RuntimeError as exc:  # a backend that does not take these inputs; said, not hidden
                print(f"dense {name}: unavailable ({str(exc)[:80]})", flush=True)
        for mode in ("zero", "read"):
            d_ms = {name: median_after(fn, fl[mode], args.reps) / L for name, fn in dense.items()}
            best = min(d_ms, key=d_ms.get)
            m_ms = median_after(msa, fl[mode], args.reps) / L
            print(json.dumps(dict(card=torch.cuda.get_device_name(), seq_len=S, batch=1, layers=L, flush=mode,
                                  dense_impl=best, dense_ms_per_layer=round(d_ms[best], 4),
                                  msa_ms_per_layer=round(m_ms, 4), speedup=round(d_ms[best] / m_ms, 3),
                                  index_config=index_config)), flush=True)


if __name__ == "__main__":
    main()
