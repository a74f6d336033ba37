"""The main job: run every registered variant on the same inputs and compare them to dense.

    sparsezoo-compare                                   # embedded CPU default, about a minute
    sparsezoo-compare --config configs/compare_gpu.yaml # the same job on a GPU

Every variant is built from its configs/<name>.yaml with the comparison's layer dims, and loads the
dense layer's q/k/v/o weights, so differences come from the attention pattern alone. The linear
variants (lightning, gdn) are other layers altogether (their own projections and gates): they keep
their own weights, and their error against dense only says how far such a layer is from softmax
attention; without fla-core installed they are left out of "every variant". Reported per variant:
relative error against dense, forward time (median and interquartile range over `repeats` timed
blocks), peak extra memory, the fraction of the visible KV each query reads, and which implementation
ran. The notes under the table (NOTES) say how to read each column. Writes a markdown table, JSON, a
summary plot and one attention-pattern PNG per variant (attn-gym's visualiser).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from . import ops
from .config import read_yaml
from .ops import fla_kernels
from .registry import create_attention, list_variants, variant_class
from .variants._linear import LinearAttentionLayer

DEFAULTS = {
    "device": "cpu",
    "dtype": "float32",
    "batch": 1,
    "seq_len": 1024,
    "d_model": 256,
    "n_heads": 8,
    "n_kv_heads": 2,
    "head_dim": 32,
    "repeats": 5,  # timed blocks per variant (median and IQR over them)
    "kv_fraction_len": 1024,  # kv_pattern is O(T^2): measured on a prefix of at most this length
    "pattern_len": 1024,  # tokens shown in the pattern pictures
    "seed": 0,
    "out": "out/compare",
    "variants": None,  # None = every registered variant
    "overrides": {},  # {variant: {field: value}} on top of configs/<variant>.yaml
}
DIMS = ("d_model", "n_heads", "n_kv_heads", "head_dim")


def load_job_config(path: str | None, **cli) -> dict:
    cfg = dict(DEFAULTS)
    if path:
        data = read_yaml(path)
        unknown = sorted(set(data) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"unknown compare field(s) {unknown}; valid fields: {sorted(DEFAULTS)}")
        cfg.update(data)
    cfg.update({k: v for k, v in cli.items() if v is not None})
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the config asks for device 'cuda' but no CUDA device is visible")
    return cfg


def variant_config(name: str, cfg: dict) -> dict:
    path = resources.files("sparsezoo.configs").joinpath(f"{name}.yaml")
    base = yaml.safe_load(path.read_text()) if path.is_file() else {"variant": name}
    return {**base, **{d: cfg[d] for d in DIMS}, **cfg["overrides"].get(name, {})}


def forward_time(fn, repeats: int, device: torch.device) -> dict:
    """Wall time of fn() per call: median and interquartile range (ms) over `repeats` timed blocks (at
    least 2); call fn() once before (compilation, autotuning). A block repeats fn() until it lasts
    >= 10 ms, so timer and CUDA-sync overhead vanish."""

    def block(number: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3 / number

    number = max(1, math.ceil(10.0 / max(block(1), 1e-3)))
    times = [block(number) for _ in range(max(repeats, 2))]
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"median": median, "iqr": q3 - q1, "blocks": len(times), "calls_per_block": number}


# What torch's CPU profiler prints on file descriptor 2 at every start and stop (kineto's `USDT ...
# profiler_start` lines and a one-time allocator warning). No setting turns them off in torch 2.13.
PROFILER_NOISE = re.compile(r"USDT:|STAGE:|profiler_st(art|op)|allocated before the profiling started")


@contextlib.contextmanager
def without_profiler_noise():
    """Hold back the profiler's log lines: file descriptor 2 goes to a temporary file while the block
    runs, and every other line written there is passed on to stderr afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().decode(errors="replace").splitlines()
                    if line.strip() and not PROFILER_NOISE.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr)


def peak_extra_bytes(fn, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with without_profiler_noise(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.name == "[memory]" or e.self_cpu_memory_usage),
                    key=lambda e: e.time_range.start)
    running = peak = 0
    for e in events:
        running += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


def kv_fraction(pattern: torch.Tensor) -> float:
    """Mean over queries (and batch, heads) of (keys read) / (keys visible), for a square causal pattern."""
    T = pattern.shape[-1]
    visible = torch.arange(1, T + 1, device=pattern.device, dtype=torch.float64)
    return (pattern.sum(-1).double() / visible).mean().item()


def pooled_kv_fraction(pattern: torch.Tensor) -> float:
    """All keys read / all keys visible, summed over the queries of a square causal pattern [T, T]: the
    figure the pattern pictures show. Late queries, which see the most keys, dominate it."""
    T = pattern.shape[-1]
    return pattern.sum().item() / (T * (T + 1) / 2)


def run(cfg: dict) -> list[dict]:
    device, dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
    names = cfg["variants"] or [n for n in list_variants() if runnable(n)]
    unknown = sorted(set(names) - set(list_variants()))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list_variants()}")
    names = ["dense"] + [n for n in names if n != "dense"]
    gen = torch.Generator().manual_seed(cfg["seed"])
    x = torch.randn(cfg["batch"], cfg["seq_len"], cfg["d_model"], generator=gen).to(device, dtype)
    torch.manual_seed(cfg["seed"])
    dense = create_attention(variant_config("dense", cfg)).to(device, dtype).eval()
    shared = dense.state_dict()
    rows, reference_out, layers = [], None, {}
    for name in tqdm(names, desc="variants", unit="variant"):
        torch.manual_seed(cfg["seed"] + 1)
        layer = create_attention(variant_config(name, cfg)).to(device, dtype).eval()
        missing = layer.load_state_dict(shared, strict=False).unexpected_keys \
            if getattr(layer, "reuses_dense_projections", True) else []
        if missing:
            raise RuntimeError(f"{name} lacks the shared dense weights {missing}")
        unused = sorted(set(shared) - set(layer.state_dict()))
        if unused and getattr(layer, "reuses_dense_projections", True):  # CSA's shared K = V has no v_proj
            tqdm.write(f"{name} has no place for the dense weights {unused}: left out")
        layers[name] = layer
        with torch.no_grad(), ops.track_implementations() as impls:
            out = layer(x)  # also the warm-up call
            timing = forward_time(lambda: layer(x), cfg["repeats"], device)
            peak = peak_extra_bytes(lambda: layer(x), device)
            n = min(cfg["kv_fraction_len"], cfg["seq_len"])
            frac = kv_fraction(layer.kv_pattern(x[:, :n]))
        if reference_out is None:
            reference_out = out.double()
        err = ((out.double() - reference_out).norm() / reference_out.norm()).item()
        rows.append({"variant": name, "rel_err_vs_dense": err, "forward_ms": timing["median"],
                     "forward_iqr_ms": timing["iqr"], "forward_blocks": timing["blocks"],
                     "peak_extra_mb": peak / 2**20, "kv_read_fraction": frac, "kv_fraction_len": n,
                     "implementations": _ops_used(impls)})
    Path(cfg["out"]).mkdir(parents=True, exist_ok=True)
    save_patterns(layers, x[:, :cfg["pattern_len"]], Path(cfg["out"]))
    return rows


def runnable(name: str) -> bool:
    """False (and says so) for a linear variant while fla-core is missing: its layers cannot be built then."""
    if fla_kernels.FLA_INSTALLED or not issubclass(variant_class(name), LinearAttentionLayer):
        return True
    print(f"left out {name}: {fla_kernels.MISSING}")
    return False


def _ops_used(impls: dict) -> str:
    return ", ".join(f"{op}={impl}" for op, impl in sorted(impls.items()))


def save_patterns(layers: dict, x: torch.Tensor, out: Path) -> None:
    """One attn-gym picture per variant (head 0), plus an overview grid of every variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from attn_gym import visualize_attention_scores

    patterns = {}
    for name, layer in tqdm(layers.items(), desc="patterns", unit="variant"):
        with torch.no_grad():
            pat = layer.kv_pattern(x)[0, 0].cpu()
        patterns[name] = pat

        def mask_mod(b, h, q_idx, kv_idx, pat=pat):
            return pat[q_idx, kv_idx]

        T = pat.shape[0]
        dummy = torch.ones(1, 1, T, 8)
        with contextlib.redirect_stdout(io.StringIO()):  # its "Visualization saved as" lines; main() lists the files
            visualize_attention_scores(dummy, dummy, mask_mod=mask_mod, device="cpu", name=f"{name} pattern",
                                       path=out / f"pattern_{name}")
    cols = min(3, len(patterns))
    rows = -(-len(patterns) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, pat) in zip(axes.flat, patterns.items()):
        ax.imshow(pat.float().numpy(), cmap="Blues", interpolation="nearest")
        ax.set_title(f"{name}: reads {pooled_kv_fraction(pat):.0%} of the visible keys", fontsize=10)
        ax.axis("on")
        ax.set_xlabel("key")
        ax.set_ylabel("query")
    fig.suptitle("Which keys each query reads (head 0, first tokens; keys read / keys visible over all queries)")
    fig.tight_layout()
    fig.savefig(out / "patterns.png", dpi=120)
    plt.close(fig)


NOTES = """How to read it:
- **rel. error vs dense** is ||out - dense out|| / ||dense out|| over the whole layer output, on random
  inputs with random weights (every variant loads the dense layer's q/k/v/o weights). Random weights give
  nearly uniform attention, so the dense output of a query is close to the mean of all the values it can
  see, and a variant that reads a fraction f of those keys returns the mean of a smaller set: about
  sqrt(1/f - 1) times the dense output away from it, whichever keys it picks. The column therefore
  measures how much of the KV a variant skips, not how well it chooses; errors near 1 are expected here
  and say nothing about quality (trained models: docs/models.md). 0 means the same output (a variant
  whose budget covers every key gives ~1e-7). NSA and CSA add branches with weights of their own (gates,
  compressors), which moves them further from dense.
- **KV read, mean per query** is keys read / keys visible for each query, averaged over every query, head
  and sequence of the first {kv_len} tokens. The pattern pictures show head 0 of the first sequence over
  the first {pattern_len} tokens, and their titles give keys read / keys visible summed over all queries
  instead. Early queries see few keys and read most of them; late queries see many and read few. The mean
  per query counts each query once, the summed figure is dominated by the late queries, so the picture's
  figure is the smaller one. NSA's compressed branch (every compressed entry, densely) is in neither;
  CSA counts the tokens pooled into the entries it selects.
- **forward ms** is the median over {repeats} timed blocks after an untimed first call; IQR is the spread between
  the 25th and 75th percentiles. CPU times change with the machine's load: two runs of this job on a
  shared machine have differed several-fold, so compare variants within one run.
"""


def to_markdown(rows: list[dict], cfg: dict, device_name: str) -> str:
    head = (f"Compared on {device_name}, torch {torch.__version__}, {cfg['dtype']}, batch {cfg['batch']}, "
            f"T = {cfg['seq_len']}, d_model {cfg['d_model']}, heads {cfg['n_heads']}/{cfg['n_kv_heads']}, "
            f"head dim {cfg['head_dim']}.\n\n")
    lines = ["| variant | rel. error vs dense | forward ms, median (IQR) | peak extra MB | KV read, mean per query "
             "| implementations |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['rel_err_vs_dense']:.3g} | {r['forward_ms']:.2f} "
                     f"({r['forward_iqr_ms']:.2f}) | {r['peak_extra_mb']:.1f} | "
                     f"{r['kv_read_fraction']:.3f} (T={r['kv_fraction_len']}) | {r['implementations']} |")
    notes = NOTES.format(kv_len=min(cfg["kv_fraction_len"], cfg["seq_len"]),
                         pattern_len=min(cfg["pattern_len"], cfg["seq_len"]), repeats=max(cfg["repeats"], 2))
    return head + "\n".join(lines) + "\n\n" + notes


def plot_summary(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    panels = [("rel_err_vs_dense", "relative error vs dense"), ("forward_ms", "forward time (ms)"),
              ("peak_extra_mb", "peak extra memory (MB)"), ("kv_read_fraction", "fraction of KV read")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, label) in zip(axes, panels):
        ax.bar(names, [r[key] for r in rows], color="tab:blue")
        ax.set_title(label, fontsize=10)
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML job config (fields: %s)" % ", ".join(sorted(DEFAULTS)))
    p.add_argument("--out", help="output folder (default out/compare)")
    p.add_argument("--seq-len", type=int, dest="seq_len")
    p.add_argument("--device", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    cfg = load_job_config(args.config, out=args.out, seq_len=args.seq_len, device=args.device)
    rows = run(cfg)
    out, name = Path(cfg["out"]), device_name(cfg["device"])
    table = to_markdown(rows, cfg, name)
    command = shlex.join(["python", "-m", "sparsezoo.compare", *(sys.argv[1:] if argv is None else argv)])
    (out / "compare.md").write_text(f"Command: `{command}`\n\n{table}")
    (out / "compare.json").write_text(json.dumps({"device": name, "torch": torch.__version__, "config": cfg,
                                                  "results": rows}, indent=2))
    plot_summary(rows, out / "compare.png", f"{name}, T={cfg['seq_len']}, {cfg['dtype']}")
    print(table)
    print(f"wrote {out}/compare.md, compare.json, compare.png, patterns.png and pattern_<variant>.png")
    return rows


if __name__ == "__main__":
    main()
