"""Aggregate `compare_quality.py` runs that differ only in --seed: per-seed accuracy, mean and spread,
and each variant's paired difference to a baseline (dense by default), as a markdown table, JSON and PNG.

One seed of a small model at the edge of learning retrieval says little (the same seed can land on
either side of it, GPU kernels being non-deterministic), so compare variants over several seeds:

    python examples/quality_seeds.py runs/seed0/quality.json runs/seed1/quality.json ... --out runs/seeds
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# run settings that must agree across the aggregated runs (everything that shapes training and eval)
SAME = ("preset", "steps", "batch", "train_len", "curriculum", "eval_lens", "eval_samples", "lr", "mix",
        "passkey_len", "n_pairs", "set", "warmup_frac", "dense_layers", "kv_len")


def load_runs(paths: list[Path]) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in paths]
    for key in SAME:
        values = {json.dumps(r["args"].get(key)) for r in runs}
        if len(values) > 1:
            raise SystemExit(f"the runs differ in {key}: {sorted(values)}; aggregate only runs that differ by seed")
    seeds = [r["args"]["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"repeated seeds {seeds}: each run must have its own seed")
    return runs


def trained_by_all(runs: list[dict]) -> tuple[list[str], list[str]]:
    """(variants every run trained, variants some run lacks or failed): only the first are aggregated."""
    trained = [{v for v, q in r["quality"].items() if "failed" not in q} for r in runs]
    common = set.intersection(*trained)
    return sorted(common), sorted({v for r in runs for v in r["quality"]} - common)


def accuracy_table(runs: list[dict], task: str, variants: list[str]) -> dict[str, dict[str, dict[int, float]]]:
    """{variant: {length: {seed: exact accuracy}}} for the given variants."""
    out: dict = {}
    for v in variants:
        for r in runs:
            for length, res in r["quality"][v].get("accuracy", {}).items():
                if task in res:
                    out.setdefault(v, {}).setdefault(length, {})[r["args"]["seed"]] = res[task]["exact"]
    return out


def summarize(table: dict, baseline: str) -> dict:
    """Mean, standard deviation and the paired mean difference to `baseline` per variant and length."""
    out: dict = {}
    for v, by_len in table.items():
        for length, by_seed in by_len.items():
            vals = list(by_seed.values())
            row = {"per_seed": by_seed, "mean": statistics.fmean(vals),
                   "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
            base = table.get(baseline, {}).get(length)
            if base is not None and v != baseline:
                diffs = [by_seed[s] - base[s] for s in by_seed if s in base]
                row["paired_diff_vs_" + baseline] = statistics.fmean(diffs) if diffs else None
            out.setdefault(v, {})[length] = row
    return out


def write_markdown(path: Path, runs: list[dict], summary: dict, task: str, baseline: str,
                   left_out: list[str]) -> None:
    args = runs[0]["args"]
    seeds = sorted(r["args"]["seed"] for r in runs)
    lengths = sorted({int(L) for v in summary.values() for L in v})
    lines = [f"# {task} accuracy over seeds {seeds} on {runs[0]['device']}", "",
             f"{len(runs)} runs of `examples/compare_quality.py` that differ only in --seed: {args['steps']} steps, "
             f"train length {args['train_len']} (curriculum {args.get('curriculum')}), {args['eval_samples']} eval "
             f"samples per length, attention overrides {args.get('set')}. Cells: per-seed exact accuracy; mean ± "
             f"sample std; Δ = mean paired difference to {baseline} (same seed)."
             + (f" Left out, as not every run trained them: {', '.join(left_out)}." if left_out else ""), "",
             "| variant | length | " + " | ".join(f"seed {s}" for s in seeds) + f" | mean ± std | Δ vs {baseline} |",
             "|---|---|" + "---|" * len(seeds) + "---|---|"]
    for v, by_len in summary.items():
        for L in lengths:
            row = by_len.get(str(L))
            if row is None:
                continue
            cells = [f"{row['per_seed'][s]:.2f}" if s in row["per_seed"] else "n/a" for s in seeds]
            diff = row.get(f"paired_diff_vs_{baseline}")
            lines.append(f"| {v} | {L} | " + " | ".join(cells) + f" | {row['mean']:.2f} ± {row['std']:.2f} | "
                         + ("—" if diff is None else f"{diff:+.2f}") + " |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, summary: dict, task: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({int(L) for v in summary.values() for L in v})
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.2 * len(lengths), 3.6), squeeze=False)
    for ax, L in zip(axes[0], lengths):
        for i, (v, by_len) in enumerate(summary.items()):
            row = by_len.get(str(L))
            if row is None:
                continue
            ys = list(row["per_seed"].values())
            ax.scatter([i] * len(ys), ys, alpha=0.6)
            ax.errorbar(i + 0.15, row["mean"], yerr=row["std"], fmt="k_", capsize=4)
        ax.set_xticks(range(len(summary)), list(summary), fontsize=8)
        ax.set(title=f"{task} @ {L}", ylim=(-0.05, 1.05), ylabel="exact accuracy (dots: seeds; bar: mean ± std)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="quality.json files of runs that differ only in --seed")
    p.add_argument("--out", type=Path, required=True, help="output prefix: writes PREFIX.md, .json and .png")
    p.add_argument("--task", default="needle", choices=["needle", "recall"])
    p.add_argument("--baseline", default="dense")
    args = p.parse_args(argv)
    runs = load_runs(args.runs)
    variants, left_out = trained_by_all(runs)
    if not variants:
        raise SystemExit(f"no variant was trained by every run (seen: {left_out})")
    if left_out:
        print(f"left out, as not every run trained them: {', '.join(left_out)}")
    summary = summarize(accuracy_table(runs, args.task, variants), args.baseline)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out.with_suffix(".md"), runs, summary, args.task, args.baseline, left_out)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"device": runs[0]["device"], "runs": [str(r) for r in args.runs], "task": args.task, "summary": summary,
         "left_out": left_out}, indent=1))
    plot(args.out.with_suffix(".png"), summary, args.task,
         f"{args.task} over {len(runs)} seeds, {runs[0]['device']}")
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
