"""The DSA/CSA indexer KL (ops.index_kl): the Triton kernel against the chunked plain-PyTorch reference, loss
plus gradients (what a training step pays), at the quality study's shape and at DSA's published size.

    python benchmarks/index_kl.py --out examples/results

Each point: median ms of forward + backward per implementation (zoo.py's `bench`), the loss of each, and the
relative error of the kernel's gradients against the reference's. Writes index_kl_<card>.{json,md}, named
after the GPU that ran it. The reference is skipped where it would take too long (--ref-max-len).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sparsezoo import ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cards import card_tag  # noqa: E402
from zoo import bench  # noqa: E402  (median of event-timed runs after a warm-up, as the zoo times)

# (name, B, Hq, Hkv, Hs, T, D, J, D_i, topk): the quality study's DSA layer, then DSA's published indexer
# (64 index heads of 128 dims, top-2048) on the m3 attention heads, one selection per token
SHAPES = [
    ("quality_8k", 1, 4, 2, 1, 8192, 64, 4, 32, 1024),
    ("m3_32k", 1, 64, 4, 1, 32768, 128, 64, 128, 2048),
    ("m3_128k", 1, 64, 4, 1, 131072, 128, 64, 128, 2048),
]


def inputs(B, Hq, Hkv, Hs, T, D, J, Di, topk, device, dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)
    q, k = rnd(B, Hq, T, D), rnd(B, Hkv, T, D)
    q_i, w, k_i = rnd(B, Hs, T, J, Di), rnd(B, Hs, T, J), rnd(B, T, Di)
    key_end = torch.arange(T, device=device)
    sel = ops.indexer_topk(q_i, w, k_i, key_end, S=T, topk=topk, scale=Di**-0.5)
    return q, k, q_i, w, k_i, key_end, sel


def step(backend, q, k, q_i, w, k_i, key_end, sel):
    leaves = [t.detach().requires_grad_(True) for t in (q_i, w, k_i)]
    loss = ops.index_kl(q, k, *leaves, key_end, sel, S=q.shape[2], scale=q.shape[-1] ** -0.5,
                        index_scale=q_i.shape[-1] ** -0.5, backend=backend)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("examples/results"))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--ref-max-len", type=int, default=32768, help="longest T the reference is timed at")
    p.add_argument("--shapes", default=None, help="comma list of shape names (default: all)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/index_kl.py times GPU kernels: it needs a CUDA device")
    card = torch.cuda.get_device_name()
    tag = card_tag(card)  # result files are named as zoo.py and scale.py name theirs
    picked = args.shapes.split(",") if args.shapes else [s[0] for s in SHAPES]
    records = []
    for name, *shape in (s for s in SHAPES if s[0] in picked):
        x = inputs(*shape, device="cuda")
        rec = {"card": card, "torch": torch.__version__, "shape": name,
               **dict(zip(("B", "Hq", "Hkv", "Hs", "T", "D", "J", "D_i", "topk"), shape))}
        with ops.track_implementations() as used:
            loss, grads = step("triton", *x)
        rec["implementation"] = used["index_kl"]
        rec["triton_ms"] = bench(lambda: step("triton", *x), args.reps)
        rec["loss"] = loss.item()
        if shape[4] <= args.ref_max_len:
            ref_loss, ref_grads = step("reference", *x)
            rec["reference_ms"] = bench(lambda: step("reference", *x), max(1, args.reps // 2))
            rec["reference_loss"] = ref_loss.item()
            rec["grad_rel_err"] = [((a.float() - b.float()).norm() / b.float().norm()).item()
                                   for a, b in zip(grads, ref_grads)]
        records.append(rec)
        print(json.dumps(rec), flush=True)
        del x
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / f"index_kl_{tag}"
    prefix.with_suffix(".json").write_text(json.dumps(records, indent=1))
    lines = [f"# ops.index_kl forward + backward on {card}", "",
             "Command: `python benchmarks/index_kl.py`", "",
             "| shape | T | topk | triton ms | reference ms | speedup | loss (triton / reference) | grad rel err |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        ref = r.get("reference_ms")
        ref_ms, speedup = ("—", "—") if ref is None else (f"{ref:.2f}", f"{ref / r['triton_ms']:.1f}x")
        errs = ", ".join(f"{e:.1e}" for e in r.get("grad_rel_err", [])) or "—"
        lines.append(
            f"| {r['shape']} | {r['T']} | {r['topk']} | {r['triton_ms']:.2f} | {ref_ms} | {speedup} | "
            f"{r['loss']:.4f} / {r.get('reference_loss', float('nan')):.4f} | {errs} |")
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return records


if __name__ == "__main__":
    main()
