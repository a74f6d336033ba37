"""A quality study with signal: every variant at the same free-key budget, on retrieval tasks dense solves,
over several seeds, with the paired difference to dense and extrapolation to twice the training length.

- Equal budgets: `equal_budget` turns one target (free keys per query) into each variant's config; keys a
  variant reads whether or not it chose them (local/own blocks, NSA's first block, windows, compressed
  entries) are reported apart and not counted. Linear variants (lightning, gdn) read no keys: no budget.
- Tasks: `mqar` (multi-query associative recall, Zoology-style: many key-value pairs in filler, then queries)
  and `passkey` (a passkey hidden in real text: the repository's own docs, the only prose that ships with it;
  the GPU machine is offline). Both trained with a length curriculum.
- Jobs: one per (variant, task, seed), each its own process; a finished job writes result.json in its folder
  and a rerun skips it; a job stopped by the call's time limit leaves a checkpoint and resumes from it.
- Report: examples/results/quality_study_<card>.{json,md,png}, one record per variant x task x eval length.

    python examples/quality_study.py --card h200 --jobs 8 --time-limit 540   # ~10-minute calls; repeat until done
    python examples/quality_study.py --card smoke                    # the whole pipeline on a CPU, < 1 min
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import sparsezoo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_quality import check_data_config, kv_read_fraction  # noqa: E402
from quality_seeds import summarize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LINEAR = ("lightning", "gdn")  # recurrent state, no KV read: no key budget

# A card fixes everything a study's numbers depend on. `h200`: 8k training, 1/8 of the KV as free keys. The model
# is small (2 layers, d_model 256, short_conv 4: 1.7M parameters, where the issue asked for 20-50M at 6-8 layers):
# the device time allows a few thousand steps per job, and in that many steps this model learns both tasks while
# deeper ones did not start (docs/quality.md). Training climbs a ladder of lengths, 400 steps at 128 tokens (the
# circuit forms), 200 at 512 and 200 at 2,048, then 1,200 at 8k, the same tokens in every step: measured on an
# H200 (examples/results/quality_probe_h200/), a jump from 128 straight to 8k lost what was learned, and the
# ladder carried it. What a job costs: `job_seconds` below. `smoke`: the same pipeline at toy size, for the test
# on a CPU.
CARDS = {
    "h200": {
        "model": {"vocab_size": 1024, "d_model": 256, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "short_conv": 4},
        "variants": ["dense", "msa", "dsa", "csa", "nsa", "moba", "lightning", "gdn"],
        "tasks": {
            "mqar": {"task": "recall", "n_pairs": 16, "n_queries": 16, "n_keys": 64, "n_values": 64},
            "passkey": {"task": "needle", "passkey_len": 8, "n_values": 64, "n_keys": 64, "needle_filler": "text"},
        },
        "seeds": [0, 1, 2, 3, 4],
        "train_len": 8192,
        "curriculum": [[128, 400], [512, 200], [2048, 200]],
        "steps": 2000,
        "batch": 1,
        "lr": 3e-3,
        "warmup_frac": 0.2,
        "free_keys": 1024,
        "block": 64,
        "csa_ratio": 4,
        "window": 128,
        "extra": {
            "msa": {"index_dim": 32},
            "dsa": {"n_index_heads": 4, "index_dim": 32},
            "csa": {"n_index_heads": 4, "index_dim": 32, "index_kl": True},
            "nsa": {"cmp_block": 32, "cmp_stride": 16},
        },
        "eval_samples": 32,
        "eval_batch": 8,
        "backend": "auto",
        "eval_backend": "reference",
        # seconds per job, for scheduling until this call has timed its own: measured on an H200 under MPS
        # (docs/quality.md, "Cost"): dense 74-82 s (10 at once), DSA 475-500 s (beside 10 MSA jobs), MSA
        # 545 s beside DSA and about 200 s without it, CSA 315-330 s, MoBA about 215 s, lightning 95-155 s
        # (24 at once), NSA 160 s (4 at once; 24 at once 457 s), gdn 250-260 s (10 at once, training on the
        # chunked PyTorch reference: fla refuses its backward on Hopper with Triton < 3.7.1). A job whose
        # estimate exceeds a call never starts.
        "job_seconds": {
            "dense": 80,
            "msa": 200,
            "csa": 330,
            "moba": 220,
            "nsa": 160,
            "dsa": 480,
            "lightning": 160,
            "gdn": 260,
        },
    },
    "smoke": {
        "model": {"vocab_size": 512, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "short_conv": 4},
        "variants": ["dense", "msa"],
        "tasks": {
            "mqar": {"task": "recall", "n_pairs": 4, "n_queries": 4, "n_keys": 64, "n_values": 64},
            "passkey": {"task": "needle", "passkey_len": 2, "n_values": 64, "n_keys": 64, "needle_filler": "text"},
        },
        "seeds": [0, 1],
        "train_len": 128,
        "curriculum": [[64, 2]],
        "steps": 4,
        "batch": 2,
        "lr": 3e-3,
        "warmup_frac": 0.25,
        "free_keys": 32,
        "block": 16,
        "csa_ratio": 4,
        "window": 16,
        "extra": {
            "msa": {"index_dim": 16},
            "dsa": {"n_index_heads": 1, "index_dim": 16},
            "csa": {"n_index_heads": 1, "index_dim": 16, "index_kl": True},
            "nsa": {"cmp_block": 16, "cmp_stride": 8, "compressor_hidden": 16},
        },
        "eval_samples": 2,
        "eval_batch": 2,
        "backend": "reference",
        "eval_backend": "reference",
    },
}
# The score of a task, per answer token on both: each mqar query (Zoology's MQAR accuracy), each passkey token.
# Every record also carries the whole-row score ("exact": all 16 queries / all 8 passkey tokens right), which
# compounds the per-token errors and so sits lower (dense's passkey: 0.95 per token, 0.69-0.78 whole on probes).
METRIC = {"recall": "token_acc", "needle": "token_acc"}
ROW_METRIC = "exact"
# The passkey's haystack: a frozen copy of the repository's docs (docs/*.md as the study's first jobs read them),
# so that editing the docs does not change the study's data.
HAYSTACK = REPO / "examples" / "data" / "passkey_haystack"
TEXT = {"text_path": str(HAYSTACK), "text_glob": "*.md", "val_fraction": 0.25}


def equal_budget(
    variant: str, free_keys: int, block: int = 64, csa_ratio: int = 4, window: int = 128, cmp_stride: int = 16
) -> dict:
    """The attention config that gives `variant` `free_keys` freely chosen keys per query, and the keys it
    reads without choosing them (`forced`: counts, or a formula in T = the query's position).

    msa/moba: (topk - 1) chosen blocks of `block` keys + the query's own block (forced).
    dsa: topk chosen tokens. csa: topk chosen entries of `csa_ratio` tokens each (free keys = tokens the
    entries cover) + a raw window (forced). nsa: (sel_topk - 3) chosen blocks of `block`; block 0, the 2
    local blocks, the window and every compressed entry are forced. dense: every key, nothing chosen.
    lightning/gdn: no keys read (a recurrent state): free_keys None."""
    if variant == "dense":
        return {"config": {}, "free_keys": None, "forced": {"all keys": "T"}, "note": "reads every key"}
    if variant in LINEAR:
        return {"config": {}, "free_keys": None, "forced": {}, "note": "linear attention: no key budget"}
    unit = csa_ratio if variant == "csa" else (1 if variant == "dsa" else block)
    if free_keys <= 0 or free_keys % unit:
        raise ValueError(f"free_keys {free_keys} must be a positive multiple of {unit} for {variant}")
    n = free_keys // unit
    if variant in ("msa", "moba"):
        cfg, forced = {"block_size": block, "topk": n + 1}, {"own block": block}
    elif variant == "dsa":
        cfg, forced = {"topk": n}, {}
    elif variant == "csa":
        cfg, forced = {"compress_ratio": csa_ratio, "topk": n, "window": window}, {"window": window}
    elif variant == "nsa":
        cfg = {"sel_block": block, "sel_topk": n + 3, "window": window, "cmp_stride": cmp_stride}
        forced = {"block 0": block, "local blocks": 2 * block, "window": window, "compressed": f"T/{cmp_stride}"}
    else:
        raise ValueError(
            f"no key budget rule for {variant!r}; known: dense, msa, moba, dsa, csa, nsa, {', '.join(LINEAR)}"
        )
    return {
        "config": cfg,
        "free_keys": free_keys,
        "forced": forced,
        "note": f"{n} chosen {'entries' if variant == 'csa' else 'tokens' if variant == 'dsa' else 'blocks'}",
    }


def budget_table(card: dict) -> dict[str, dict]:
    return {
        v: equal_budget(
            v,
            card["free_keys"],
            card["block"],
            card["csa_ratio"],
            card["window"],
            card["extra"].get("nsa", {}).get("cmp_stride", 16),
        )
        for v in card["variants"]
    }


def attention_config(card: dict, variant: str) -> dict:
    """Budget config + the card's fixed extras + warm-up/backend, only fields the variant's config has."""
    fields = sparsezoo.variant_class(variant).config_class.field_names()
    out = {
        "warmup_steps": int(card["warmup_frac"] * card["steps"]),
        "backend": card["backend"],
        **card["extra"].get(variant, {}),
        **budget_table(card)[variant]["config"],
    }
    return {k: v for k, v in out.items() if k in fields}


def run_config(card: dict, variant: str, task: str, seed: int, folder: Path, time_limit: float | None) -> dict:
    data = {
        **TEXT,
        **card["tasks"][task],
        "seq_len": card["train_len"],
        "curriculum": [list(stage) for stage in card["curriculum"]],
    }
    model = {**card["model"], "attention": variant, "attention_overrides": {variant: attention_config(card, variant)}}
    train = {
        "steps": card["steps"],
        "batch_size": card["batch"],
        "lr": card["lr"],
        "lr_warmup": max(1, card["steps"] // 20),
        "seed": seed,
        "eval_every": 0,
        "eval_batches": 1,
        "log_every": 10,
        "device": "auto",
        "out_dir": str(folder),
        "progress": False,
        "time_limit_s": time_limit,
    }
    return {"model": model, "data": data, "train": train}


def curriculum_steps(card: dict) -> int:
    return sum(steps for _, steps in card["curriculum"])


def stages_text(card: dict) -> str:
    return ", then ".join(f"{steps} steps at {length} tokens" for length, steps in card["curriculum"])


def job_name(variant: str, task: str, seed: int) -> str:
    return f"{variant}/{task}/seed{seed}"


def pending_jobs(out: Path, names: list[str], runs: dict[str, dict] | None = None) -> list[str]:
    """The jobs without a finished result in `out` (a rerun skips the others). With `runs` (name -> run
    config), a finished result of another run config is refused rather than mixed in."""
    todo = []
    for n in names:
        path = out / n / "train.json"
        if not path.is_file():
            todo.append(n)
        elif runs is not None and json.loads(path.read_text()).get("run") != same_run(runs[n]):
            raise SystemExit(
                f"{path} was trained with other settings than this call's; use another --out (or delete that folder)"
            )
    return todo


def same_run(run: dict) -> dict:
    """The part of a run config that results depend on (not this call's time limit)."""
    return {**run, "train": {k: v for k, v in run["train"].items() if k != "time_limit_s"}}


@contextlib.contextmanager
def deterministic(on: bool = True):
    """Deterministic kernels where torch has them (warn, not fail, where it has none), restored after;
    data order is already a pure function of (seed, step)."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


# -- the worker: train one (variant, task, seed), evaluate, write train.json ------------------------
def device_name() -> str:
    """The device this process trains on, as the records name it."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def train_worker(spec: dict) -> dict:
    from sparsezoo.models import load_model
    from sparsezoo.models.data import Data, DataConfig
    from sparsezoo.models.train import evaluate, train

    run, card = spec["run"], spec["card"]
    folder = Path(run["train"]["out_dir"])
    resume = (folder / "checkpoint" / "config.yaml").is_file()
    t0 = time.perf_counter()
    with deterministic(spec["deterministic"]):
        summary = train(run, resume=resume)
    result = {
        "job": spec["job"],
        "steps_done": summary["steps_done"],
        "train_seconds": time.perf_counter() - t0,
        "resumed": resume,
        "deterministic": spec["deterministic"],
        "device": device_name(),
        "run": same_run(run),
        # every 10th step's losses and throughput: where a job learned (or did not), and what a step cost
        "history": [
            {k: h[k] for k in ("step", "phase", "lm_loss", "index_loss", "tokens_per_s")}
            for h in summary["history"][9::10]
        ],
    }
    if summary["steps_done"] < run["train"]["steps"]:
        return {**result, "unfinished": True}  # the caller saves nothing: the next call resumes
    device = "cuda" if torch.cuda.is_available() else "cpu"
    variant = run["model"]["attention"]
    fields = sparsezoo.variant_class(variant).config_class.field_names()
    over = {
        variant: {
            **run["model"]["attention_overrides"][variant],
            **({"backend": card["eval_backend"]} if "backend" in fields else {}),
        }
    }
    model, _ = load_model(summary["checkpoint"], {"attention_overrides": over}, strict=True, device=device)
    model.apply_routing_schedule(run["train"]["steps"])
    data = Data(DataConfig.from_dict(run["data"]), model.config.vocab_size, seed=run["train"]["seed"])
    lens = [card["train_len"], 2 * card["train_len"]]
    n_batches = max(1, card["eval_samples"] // card["eval_batch"])
    with sparsezoo.ops.track_implementations() as impls, deterministic(spec["deterministic"]):
        res = evaluate(model, data, n_batches, card["eval_batch"], lens, device=device)
    metric = METRIC[run["data"]["task"]]
    result["metric"] = metric
    result["accuracy"] = {k.split("@")[1]: v[metric] for k, v in res.items()}
    result["eval"] = {k.split("@")[1]: v for k, v in res.items()}
    result["implementations_eval"] = dict(impls)
    needle = Data(
        DataConfig.from_dict({"task": "needle", "seq_len": card["train_len"], "n_values": 64, "n_keys": 64}),
        model.config.vocab_size,
    )
    try:
        result["kv_read"] = kv_read_fraction(model, needle, card["train_len"], device)["mean"]
    except Exception as e:  # noqa: BLE001 - recorded, and the record says n/a
        result["kv_read"], result["kv_read_error"] = None, f"{type(e).__name__}: {str(e)[:200]}"
    return result


# -- aggregation and report -------------------------------------------------------------------------
def records(card_name: str, card: dict, results: dict[str, dict]) -> list[dict]:
    """One record per variant x task x eval length over the seeds that finished (paired to dense)."""
    budgets = budget_table(card)
    out = []
    for task in card["tasks"]:
        table: dict = {}
        rows: dict = {}
        for name, r in results.items():
            variant, t, seed = name.split("/")
            if t == task:
                for length, acc in r["accuracy"].items():
                    table.setdefault(variant, {}).setdefault(length, {})[int(seed[4:])] = acc
                for length, ev in r.get("eval", {}).items():
                    rows.setdefault(variant, {}).setdefault(length, {})[int(seed[4:])] = ev[ROW_METRIC]
        whole = summarize(rows, "dense")
        for variant, by_len in summarize(table, "dense").items():
            kv = [  # linear variants keep a state and read no keys: no fraction
                r["kv_read"]
                for n, r in results.items()
                if n.startswith(f"{variant}/{task}/") and r.get("kv_read") is not None and variant not in LINEAR
            ]
            for length, row in by_len.items():
                out.append(
                    {
                        "variant": variant,
                        "config": attention_config(card, variant),
                        "task": task,
                        "metric": METRIC[card["tasks"][task]["task"]],
                        "train_len": card["train_len"],
                        "eval_len": int(length),
                        "seeds": sorted(row["per_seed"]),
                        "per_seed": row["per_seed"],
                        "mean": row["mean"],
                        "std": row["std"],
                        "paired_diff_vs_dense": row.get("paired_diff_vs_dense"),
                        "row_metric": {
                            k: whole.get(variant, {}).get(length, {}).get(k)
                            for k in ("per_seed", "mean", "std", "paired_diff_vs_dense")
                        },
                        "kv_read": statistics.fmean(kv) if kv else None,
                        "free_keys_per_query": budgets[variant]["free_keys"],
                        "forced_keys": budgets[variant]["forced"],
                        "card": card_name,
                    }
                )
    return sorted(out, key=lambda r: (r["task"], r["variant"] != "dense", r["variant"], r["eval_len"]))


def stage_ends(card: dict) -> list[tuple[int, int]]:
    """(length, first step after it) for each stage of training, the last at the training length."""
    from sparsezoo.models.data import DataConfig

    data = DataConfig.from_dict({"seq_len": card["train_len"], "curriculum": card["curriculum"]})
    return [*data.stage_ends(), (card["train_len"], card["steps"])]


def reads_every_key(card: dict, variant: str, length: int) -> bool | None:
    """Whether `variant`'s budget covers every causal key at `length` (its choice then cannot miss);
    None for linear variants (no keys read)."""
    if variant in LINEAR:
        return None
    cfg = budget_table(card)[variant]["config"]
    if variant == "dense":
        return True
    if variant == "dsa":
        return cfg["topk"] >= length
    if variant == "csa":
        return cfg["topk"] * cfg["compress_ratio"] >= length
    if variant == "nsa":
        return cfg["sel_topk"] * cfg["sel_block"] >= length
    return cfg["topk"] * cfg["block_size"] >= length  # msa, moba


def stage_losses(card: dict, results: dict[str, dict], tail: int = 50) -> list[dict]:
    """Per variant x task: the mean training answer loss over the last `tail` steps of each stage, averaged
    over the finished seeds. Where a variant stops learning, this shows at which length it lost the skill."""
    out = []
    for task in card["tasks"]:
        for variant in card["variants"]:
            runs = [r for n, r in results.items() if n.startswith(f"{variant}/{task}/")]
            if not runs:
                continue
            per_stage = []
            for length, end in stage_ends(card):
                means = []
                for r in runs:
                    losses = [h["lm_loss"] for h in r["history"] if end - tail <= h["step"] < end]
                    if losses:
                        means.append(statistics.fmean(losses))
                per_stage.append(
                    {
                        "length": length,
                        "loss": statistics.fmean(means) if means else None,
                        "reads_every_key": reads_every_key(card, variant, length),
                    }
                )
            out.append({"variant": variant, "task": task, "seeds": len(runs), "stages": per_stage})
    return out


def fmt(x, pattern="{:.2f}") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else pattern.format(x)


def write_report(
    prefix: Path,
    card_name: str,
    card: dict,
    recs: list[dict],
    missing: list[str],
    device: str,
    results: dict[str, dict] | None = None,
) -> None:
    budgets = budget_table(card)
    stages = stage_losses(card, results or {})
    ends = stage_ends(card)
    lines = [
        f"# Quality study, card `{card_name}`, on {device}",
        "",
        f"Model {card['model']}; {card['steps']} steps x batch {card['batch']} x {card['train_len']} tokens "
        f"(first {stages_text(card)}, the same tokens per step); "
        f"seeds {card['seeds']}; {card['eval_samples']} eval samples per length. Accuracy per answer token: each "
        f"mqar query (Zoology's), each passkey token; 'whole rows': rows with every answer right. "
        f"Passkey haystack: a frozen copy of the repository's docs (real prose; no other corpus ships, the GPU is offline).",
        "",
        f"## Budgets: {card['free_keys']} free keys per query "
        f"({card['free_keys'] / card['train_len']:.3f} of the KV at {card['train_len']})",
        "",
        "| variant | config | free keys | forced keys (not counted) |",
        "|---|---|---|---|",
    ]
    for v, b in budgets.items():
        lines.append(
            f"| {v} | {b['config'] or '—'} | {fmt(b['free_keys'], '{}')} ({b['note']}) | {b['forced'] or '—'} |"
        )
    lines += [
        "",
        "## Results",
        "",
        "| task | variant | eval len | seeds | mean ± std | Δ vs dense (paired) | whole rows: mean ± std | "
        "whole rows: Δ vs dense | KV read |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recs:
        extra = " (2x)" if r["eval_len"] > r["train_len"] else ""
        whole = r.get("row_metric") or {}
        whole_mean = "—" if whole.get("mean") is None else f"{whole['mean']:.3f} ± {whole['std']:.3f}"
        lines.append(
            f"| {r['task']} | {r['variant']} | {r['eval_len']}{extra} | {len(r['seeds'])} | "
            f"{r['mean']:.3f} ± {r['std']:.3f} | {fmt(r['paired_diff_vs_dense'], '{:+.3f}')} | {whole_mean} | "
            f"{fmt(whole.get('paired_diff_vs_dense'), '{:+.3f}')} | {fmt(r['kv_read'], '{:.3f}')} |"
        )
    if stages:
        lines += [
            "",
            "## Where each variant learned: training answer loss at the end of each stage",
            "",
            f"Mean over the finished seeds of the last 50 steps of each stage (chance: ln 64 = {math.log(64):.2f} "
            "nats). `*`: the variant's budget covers every key at that length, so its choice cannot miss.",
            "",
            "| task | variant | seeds | " + " | ".join(f"{L} tokens" for L, _ in ends) + " |",
            "|---|---|---|" + "---|" * len(ends),
        ]
        for row in stages:
            cells = [
                fmt(st["loss"]) + (" *" if st["reads_every_key"] and row["variant"] != "dense" else "")
                for st in row["stages"]
            ]
            lines.append(f"| {row['task']} | {row['variant']} | {row['seeds']} | " + " | ".join(cells) + " |")
    if missing:
        lines += ["", f"Not finished yet ({len(missing)} jobs; rerun the command): {', '.join(missing)}"]
    prefix.with_suffix(".md").write_text("\n".join(lines) + "\n")
    prefix.with_suffix(".json").write_text(
        json.dumps(
            {
                "card": card_name,
                "settings": card,
                "device": device,
                "budgets": budgets,
                "records": recs,
                "stage_losses": stages,
                "missing": missing,
            },
            indent=1,
        )
    )
    plot(prefix.with_suffix(".png"), card, recs, f"quality study `{card_name}`, {device}")
    if results:
        plot_training(
            prefix.with_name(prefix.name + "_training.png"), card, results, f"training, `{card_name}`, {device}"
        )


def variant_color(card: dict, variant: str) -> str:
    """One colour per variant in every plot of a card."""
    return f"C{card['variants'].index(variant) % 10}"


def plot(path: Path, card: dict, recs: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, L) for t in card["tasks"] for L in (card["train_len"], 2 * card["train_len"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (task, length) in zip(axes[0], panels):
        rows = [r for r in recs if r["task"] == task and r["eval_len"] == length]
        for i, r in enumerate(rows):
            ax.scatter(
                [i] * len(r["per_seed"]),
                list(r["per_seed"].values()),
                alpha=0.6,
                color=variant_color(card, r["variant"]),
            )
            ax.errorbar(i + 0.15, r["mean"], yerr=r["std"], fmt="k_", capsize=4)
        ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], fontsize=8)
        ax.set(title=f"{task} @ {length}", ylim=(-0.05, 1.05), ylabel="accuracy")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(path: Path, card: dict, results: dict[str, dict], title: str, window: int = 5) -> None:
    """Answer loss against step per task, one line per variant (mean over its seeds, a running mean over
    `window` logged points), the stage boundaries dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(card["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for variant in card["variants"]:
            runs = [r["history"] for n, r in results.items() if n.startswith(f"{variant}/{task}/")]
            if not runs:
                continue
            steps = sorted(set.intersection(*({h["step"] for h in run} for run in runs)))
            by_step = [{h["step"]: h["lm_loss"] for h in run} for run in runs]
            mean = [statistics.fmean(b[st] for b in by_step) for st in steps]
            smooth = [statistics.fmean(mean[max(0, i - window + 1) : i + 1]) for i in range(len(mean))]
            ax.plot(steps, smooth, label=f"{variant} ({len(runs)})", lw=1.2, color=variant_color(card, variant))
        ends = stage_ends(card)
        for (_, end), (following, _) in zip(ends, ends[1:]):
            ax.axvline(end, color="grey", ls=":", lw=0.8)
            ax.text(end, 0.98, f" →{following}", transform=ax.get_xaxis_transform(), fontsize=7, va="top")
        ax.axhline(math.log(64), color="k", lw=0.6, ls="--")
        ax.set(title=f"{task} (dashed: chance)", xlabel="step", ylabel="answer loss (nats)")
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- orchestration ----------------------------------------------------------------------------------
def linear_shapes(card: dict) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(rows, length) of every training step and evaluation batch a job of the card runs."""
    train = [(card["batch"] * card["train_len"] // n, n) for n, _ in card["curriculum"]]
    train.append((card["batch"], card["train_len"]))
    evals = [(card["eval_batch"], n) for n in (card["train_len"], 2 * card["train_len"])] + [(1, card["train_len"])]
    return train, evals


def prewarm_linear(card: dict, variants: set[str]) -> None:
    """Run each linear variant's layer once at every shape its jobs will see, so fla's Triton autotuning
    happens here, once, instead of in every worker (on an H200 that made lightning stall in evaluation and
    gdn take 1.1 s per step at 8k): its results go to Triton's on-disk cache (fla turns `cache_results` on),
    where the workers find them. The study runs it in a process of its own (`start_prewarm`) beside the
    other variants' jobs, and holds the linear jobs until it is done."""
    todo = sorted(variants & set(LINEAR))
    if not todo or not torch.cuda.is_available():
        return
    m = card["model"]
    train, evals = linear_shapes(card)
    t0 = time.perf_counter()
    for variant in todo:
        layer = sparsezoo.create_attention(
            {
                "variant": variant,
                "d_model": m["d_model"],
                "n_heads": m["n_heads"],
                "n_kv_heads": m["n_kv_heads"],
                "head_dim": m.get("head_dim") or m["d_model"] // m["n_heads"],  # as the GPT builds it
            }
        ).cuda()
        for (rows, length), grad in [*((s, True) for s in train), *((s, False) for s in evals)]:
            x = torch.randn(rows, length, m["d_model"], device="cuda", requires_grad=grad)
            with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
                out = layer(x)
            if grad:
                out.float().sum().backward()
        del layer
    torch.cuda.synchronize()
    print(f"pre-warmed fla's autotuning for {todo} in {time.perf_counter() - t0:.0f} s", flush=True)


def launch(kind: str, spec_path: Path, log_path: Path):
    """A worker process for one spec; a spec naming a `triton_cache_dir` gets it as Triton's cache."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cache = json.loads(spec_path.read_text()).get("triton_cache_dir")
    if cache:
        env["TRITON_CACHE_DIR"] = cache
    flag = {"train": "--worker", "prewarm": "--prewarm"}[kind]
    return subprocess.Popen(
        [sys.executable, __file__, flag, str(spec_path)],
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        env=env,
    )


STOP_MARGIN_S = 30  # a worker stops training this long before the call's end, to save its checkpoint


def start_prewarm(card: dict, variants: set[str], out: Path, launcher=None, triton_cache_dir: str | None = None):
    """`prewarm_linear` in a process of its own for the linear variants among `variants` (None if there
    are none, or no GPU), with `triton_cache_dir` as Triton's cache if given."""
    todo = sorted(variants & set(LINEAR))
    if not todo or not torch.cuda.is_available():
        return None
    path = out / "prewarm.json"
    path.write_text(json.dumps({"card": card, "variants": todo, "triton_cache_dir": triton_cache_dir}, indent=1))
    print(f"[prewarm] started for {todo}; their jobs wait for it", flush=True)
    return (launcher or launch)("prewarm", path, out / "prewarm.log")


def run_study_jobs(
    specs: dict[str, dict],
    out: Path,
    jobs: int,
    t_end: float,
    estimates: dict[str, float],
    launcher=None,
    poll_s: float = 0.5,
    first: tuple[str, ...] = (),
    ready=None,
) -> dict[str, str]:
    """Train the jobs, `jobs` at a time, by the call's end `t_end` (time.perf_counter()); returns each job's
    status ("done", or why not). The variants in `first` start before the others; then seed by seed (every
    variant gets a row before any gets its last seed), the longest jobs first. A job starts only if it can
    finish in the time left (its variant's mean duration among this call's finished jobs, else
    `estimates[variant]`) and once `ready(variant)` says so (the linear variants wait for their pre-warm).
    Each worker gets the time left (less STOP_MARGIN_S) as its training limit, so it stops and saves a
    checkpoint before the end; one still running at the end is killed. The caller writes the report
    whatever happens."""
    launcher = launcher or launch
    variant = lambda name: name.split("/")[0]
    pending = sorted(
        specs, key=lambda n: (variant(n) not in first, int(n.split("seed")[-1]), -estimates.get(variant(n), 0.0))
    )
    running: dict[str, tuple] = {}
    took: dict[str, list[float]] = {}
    status: dict[str, str] = {}
    need = lambda v: statistics.fmean(took[v]) if took.get(v) else estimates.get(v, 0.0)
    ready = ready or (lambda v: True)
    while pending or running:
        left = t_end - time.perf_counter()
        fits = [n for n in pending if need(variant(n)) <= left]
        for name in [n for n in fits if ready(variant(n))][: max(0, jobs - len(running))]:
            pending.remove(name)
            spec = specs[name]
            spec["run"]["train"]["time_limit_s"] = max(1.0, left - STOP_MARGIN_S)
            path = out / name / "spec.json"
            path.write_text(json.dumps(spec, indent=1))
            running[name] = (launcher("train", path, out / name / "train.log"), time.perf_counter())
            print(f"[train] started {name} ({left:.0f} s left)", flush=True)
        if not running and all(ready(variant(n)) for n in fits):  # nothing runs, and nothing that fits waits
            for name in pending:
                status[name] = f"not started: needs about {need(variant(name)):.0f} s, {left:.0f} s were left"
            break
        time.sleep(poll_s)
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is None:
                if time.perf_counter() < t_end:
                    continue
                proc.kill()
                proc.wait()
                status[name] = "killed at the call's end"
            elif proc.returncode == 0 and (out / name / "train.json").is_file():
                took.setdefault(variant(name), []).append(time.perf_counter() - t0)
                status[name] = "done"
                print(f"[train] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
            elif proc.returncode == 3:
                status[name] = "stopped by the time limit; its checkpoint resumes it on this machine"
            else:
                log = out / name / "train.log"
                status[name] = f"failed (exit code {proc.returncode})"
                tail = log.read_text()[-1500:] if log.is_file() else ""
                print(f"[train] {name} FAILED (exit code {proc.returncode}):\n{tail}", flush=True)
            del running[name]
    return status


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--card", choices=sorted(CARDS), default="h200")
    p.add_argument("--smoke", action="store_true", help="the same as --card smoke --jobs 0")
    p.add_argument("--out", type=Path, default=None, help="job folders (default runs/quality_study_<card>)")
    p.add_argument("--results", type=Path, default=REPO / "examples" / "results", help="where the report goes")
    p.add_argument("--variants", default=None, help="comma list (default: the card's)")
    p.add_argument("--tasks", default=None, help="comma list of the card's tasks (default: all)")
    p.add_argument("--seeds", default=None, help="comma list (default: the card's)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the card's)")
    p.add_argument("--batch", type=int, default=None, help="rows per step at the training length (default: the card's)")
    p.add_argument("--free-keys", type=int, default=None, help="free keys per query (default: the card's)")
    p.add_argument("--first", default="", help="comma list of variants whose jobs start before the others")
    p.add_argument("--jobs", type=int, default=1, help="workers at once on the device; 0 = in this process")
    p.add_argument(
        "--time-limit",
        type=float,
        default=540,
        help="seconds for this call: workers stop and checkpoint by then, and no job starts after it",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the report from the jobs finished under --out",
    )
    p.add_argument("--device-name", default=None, help="the device of finished jobs that do not record one")
    p.add_argument("--no-deterministic", action="store_true", help="allow non-deterministic kernels")
    p.add_argument(
        "--linear-triton-cache",
        type=Path,
        default=None,
        help="Triton's cache for the pre-warm and the linear variants' jobs only (fla's compiled and autotuned "
        "kernels), apart from the other jobs' kernels, so that it stays small enough to carry to the next machine",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--prewarm", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.card, args.jobs = "smoke", 0
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.prewarm:
        spec = json.loads(Path(args.prewarm).read_text())
        prewarm_linear(spec["card"], set(spec["variants"]))
        return {}
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        result = train_worker(spec)
        if result.get("unfinished"):  # the runner lists it as not finished (exit code 3): the next call resumes
            print(
                f"{spec['job']}: stopped at step {result['steps_done']} by the call's time limit; a checkpoint "
                f"is saved and the next call resumes from it",
                flush=True,
            )
            raise SystemExit(3)
        (Path(spec["run"]["train"]["out_dir"]) / "train.json").write_text(json.dumps(result, indent=1))
        return result
    card = dict(CARDS[args.card])
    for key in ("variants", "tasks", "seeds"):
        if getattr(args, key):
            picked = [int(x) if key == "seeds" else x for x in getattr(args, key).split(",")]
            valid = list(card[key]) if key == "tasks" else (sparsezoo.list_variants() if key == "variants" else None)
            bad = sorted(set(map(str, picked)) - set(valid)) if valid else []
            if bad:
                raise SystemExit(f"--{key}: unknown {bad}; choose among {valid}")
            card[key] = {t: card["tasks"][t] for t in picked} if key == "tasks" else picked
    for key in ("steps", "batch", "free_keys"):
        if getattr(args, key) is not None:
            card[key] = getattr(args, key)
    if curriculum_steps(card) >= card["steps"]:
        raise SystemExit(
            f"--steps {card['steps']}: the card's curriculum runs its first {stages_text(card)}, so no step "
            f"would train at {card['train_len']}; give more steps"
        )
    if "dense" not in card["variants"]:
        raise SystemExit("--variants must include dense (the paired baseline)")
    first = tuple(v for v in args.first.split(",") if v)
    if set(first) - set(card["variants"]):
        raise SystemExit(f"--first: {sorted(set(first) - set(card['variants']))} not among {card['variants']}")
    out = args.out or REPO / "runs" / f"quality_study_{args.card}"
    t_end = time.perf_counter() + args.time_limit
    names = [job_name(v, t, s) for v in card["variants"] for t in card["tasks"] for s in card["seeds"]]
    runs = {}
    for name in names:
        variant, task, seed = name.split("/")
        runs[name] = run_config(card, variant, task, int(seed[4:]), out / name, None)
        check_data_config(runs[name]["data"])
    todo = [] if args.report_only else pending_jobs(out, names, runs)
    print(f"{len(names) - len(todo)} of {len(names)} jobs finished earlier; {len(todo)} to run", flush=True)
    specs = {}
    cache = str(args.linear_triton_cache.resolve()) if args.linear_triton_cache else None
    for name in todo:
        (out / name).mkdir(parents=True, exist_ok=True)
        specs[name] = {"job": name, "run": runs[name], "card": card, "deterministic": not args.no_deterministic}
        if cache and name.split("/")[0] in LINEAR:
            specs[name]["triton_cache_dir"] = cache
    if args.jobs == 0 and not args.report_only:  # in this process (the smoke test): one after another
        for name, spec in specs.items():
            spec["run"]["train"]["time_limit_s"] = max(1.0, t_end - time.perf_counter())
            result = train_worker(spec)
            if not result.get("unfinished"):
                (out / name / "train.json").write_text(json.dumps(result, indent=1))
    elif specs:
        warm = start_prewarm(card, {name.split("/")[0] for name in specs}, out, triton_cache_dir=cache)
        ready = lambda v: v not in LINEAR or warm is None or warm.poll() is not None
        try:
            status = run_study_jobs(specs, out, args.jobs, t_end, card.get("job_seconds", {}), first=first, ready=ready)
        finally:
            if warm is not None and warm.poll() is None:
                warm.kill()
                print("[prewarm] still running at the call's end: stopped", flush=True)
            elif warm is not None and warm.returncode:  # the linear jobs then autotuned for themselves
                print(f"[prewarm] failed (exit code {warm.returncode}); see {out / 'prewarm.log'}", flush=True)
        not_done = {n: why for n, why in status.items() if why != "done"}
        if not_done:
            print("not finished in this call:\n" + "\n".join(f"  {n}: {why}" for n, why in not_done.items()))
    results = {n: json.loads((out / n / "train.json").read_text()) for n in names if (out / n / "train.json").is_file()}
    missing = [n for n in names if n not in results]
    here = device_name()
    unrecorded = sorted(n for n, r in results.items() if not r.get("device"))
    if args.report_only and unrecorded and not args.device_name:
        raise SystemExit(
            f"{len(unrecorded)} finished jobs do not record their device (e.g. {unrecorded[0]}): "
            f"name it with --device-name"
        )
    fallback = args.device_name or here
    device = ", ".join(sorted({r.get("device") or fallback for r in results.values()})) or here
    recs = records(args.card, card, results)
    args.results.mkdir(parents=True, exist_ok=True)
    prefix = args.results / f"quality_study_{args.card}"
    write_report(prefix, args.card, card, recs, missing, device, results)
    print(prefix.with_suffix(".md").read_text())
    return {"records": recs, "missing": missing, "ran": list(specs)}


if __name__ == "__main__":
    main()
