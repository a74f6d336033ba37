"""Train one variant on one task of the quality study and watch it learn: exact accuracy and answer loss every
N steps, printed and written to a JSON file.

The run is one job of examples/quality_study.py (the same run config: model, data, curriculum, budgets,
optimizer, trainer), built from a card (default `h200`) with the options below changed. Use it to check that a
card learns before spending a whole study on it, or to compare settings (e.g. --short-conv 0 against 4).

    python scripts/quality_probe.py --variant dense --task mqar                        # the gpu card's job
    python scripts/quality_probe.py --task passkey --short-conv 0 --steps 300 --device cuda
    python scripts/quality_probe.py --task mqar --layers 2 --d-model 128 --train-len 512 --curriculum none \\
        --steps 200 --batch 8 --lr 3e-3 --device cpu                                   # a CPU-sized probe

Each line: step, task@length, answer loss (mean cross-entropy over the scored answer tokens; ln(vocab) at
chance), token accuracy and exact accuracy (rows with every answer token right). The JSON holds the run
config, every evaluation and the wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_study():
    """examples/quality_study.py as a module (its cards, run_config and budgets)."""
    path = REPO / "examples" / "quality_study.py"
    spec = importlib.util.spec_from_file_location("quality_study", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--card", default="h200", help="the study card to start from (examples/quality_study.py)")
    p.add_argument("--variant", default="dense")
    p.add_argument("--task", default="mqar", help="a task of the card: mqar (recall) or passkey (needle)")
    p.add_argument("--short-conv", type=int, default=None, help="model.short_conv taps (0 = off)")
    p.add_argument("--layers", type=int, default=None, help="model.n_layers")
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--heads", type=int, default=None, help="query heads (KV heads: a quarter, at least 1)")
    p.add_argument("--train-len", type=int, default=None)
    p.add_argument(
        "--curriculum", default=None, help="LEN:STEPS[,LEN:STEPS...]: stages before the training length, or 'none'"
    )
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch", type=int, default=None, help="rows per step at the training length")
    p.add_argument("--free-keys", type=int, default=None, help="free keys per query of the sparse variants")
    p.add_argument("--pairs", type=int, default=None, help="mqar: key-value pairs per row")
    p.add_argument("--queries", type=int, default=None, help="mqar: queried keys per row")
    p.add_argument("--keys", type=int, default=None, help="mqar: distinct keys (n_keys)")
    p.add_argument("--values", type=int, default=None, help="distinct values (n_values; passkey tokens too)")
    p.add_argument("--passkey-len", type=int, default=None, help="passkey: tokens of the passkey")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument(
        "--eval-lens",
        default=None,
        help="comma list of eval lengths (default: the curriculum's lengths and the training length)",
    )
    p.add_argument("--eval-samples", type=int, default=32, help="held-out rows per evaluation")
    p.add_argument("--time-limit", type=float, default=None, help="seconds: training stops (and reports) by then")
    p.add_argument("--out", type=Path, default=None, help="the JSON file (default runs/quality_probe/<name>.json)")
    p.add_argument("--work-dir", type=Path, default=None, help="the trainer's folder (default: a temporary one)")
    return p.parse_args(argv)


def probe_card(study, args: argparse.Namespace) -> dict:
    """The card with the options applied."""
    card = json.loads(json.dumps(study.CARDS[args.card]))  # a deep copy
    if args.task not in card["tasks"]:
        raise SystemExit(f"--task {args.task!r}: the card has {sorted(card['tasks'])}")
    model = card["model"]
    set_given(model, short_conv=args.short_conv, n_layers=args.layers, d_model=args.d_model)
    if args.heads is not None:
        model["n_heads"], model["n_kv_heads"] = args.heads, max(1, args.heads // 4)
    set_given(card, train_len=args.train_len, steps=args.steps, lr=args.lr, batch=args.batch, free_keys=args.free_keys)
    if args.curriculum is not None:
        stages = [] if args.curriculum == "none" else args.curriculum.split(",")
        card["curriculum"] = [[int(n) for n in stage.split(":")] for stage in stages]
    set_given(
        card["tasks"][args.task],
        n_pairs=args.pairs,
        n_queries=args.queries,
        passkey_len=args.passkey_len,
        n_keys=args.keys,
        n_values=args.values,
    )
    return card


def set_given(target: dict, **options) -> None:
    """Copy the options that were given (not None) into target."""
    target.update({k: v for k, v in options.items() if v is not None})


def eval_lengths(args: argparse.Namespace, card: dict) -> list[int]:
    if args.eval_lens:
        return [int(n) for n in args.eval_lens.split(",")]
    return sorted({length for length, _ in card["curriculum"]} | {card["train_len"]})


def main(argv=None) -> dict:
    args = parse(argv)
    study = load_study()
    card = probe_card(study, args)
    from sparsezoo.models.train import train

    name = (
        f"{args.variant}_{args.task}_conv{card['model'].get('short_conv', 0)}_L{card['model']['n_layers']}"
        f"_d{card['model']['d_model']}_T{card['train_len']}_s{card['steps']}_seed{args.seed}"
    )
    out = args.out or REPO / "runs" / "quality_probe" / f"{name}.json"
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.work_dir or Path(tmp)
        run = study.run_config(card, args.variant, args.task, args.seed, folder, None)
        run["train"].update(
            eval_every=args.eval_every,
            eval_batches=max(1, math.ceil(args.eval_samples / card["batch"])),
            device=args.device,
            log_every=max(1, min(10, args.eval_every)),
            eval_lengths=eval_lengths(args, card),
            time_limit_s=args.time_limit,
        )
        print(f"probe {name}: model {run['model']}, data {run['data']}", flush=True)
        t0 = time.perf_counter()
        summary = train(run)
        seconds = time.perf_counter() - t0
    evals = [
        {"step": e["step"], "phase": e["phase"], **{k: v for k, v in e.items() if isinstance(v, dict)}}
        for e in summary["evals"]
    ]
    print(f"\n{'step':>6} {'eval':>16} {'answer loss':>11} {'token acc':>9} {'exact':>6}")
    for e in evals:
        for key, v in e.items():
            if isinstance(v, dict):
                print(f"{e['step']:>6} {key:>16} {v['loss']:>11.3f} {v['token_acc']:>9.3f} {v['exact']:>6.2f}")
    record = {
        "name": name,
        "variant": args.variant,
        "task": args.task,
        "seed": args.seed,
        "card": args.card,
        "run": run,
        "evals": evals,
        "seconds": seconds,
        "steps_done": summary["steps_done"],
        "final": evals[-1] if evals else None,
        "implementations": summary["implementations"],
        "history": [  # every 10th step: losses and throughput, per phase of the curriculum
            {k: h[k] for k in ("step", "phase", "lm_loss", "index_loss", "tokens_per_s")}
            for h in summary["history"][9::10]
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"{seconds:.0f} s; wrote {out}")
    return record


if __name__ == "__main__":
    main()
