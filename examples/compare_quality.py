"""Apples-to-apples quality comparison of every registered attention variant in the example GPT.

Each variant in `sparsezoo.list_variants()` trains the same GPT (size, data, steps, seed, optimizer)
with only its attention layers swapped, then reports:
- passkey (needle) and multi-query recall accuracy at each eval length (exact answers: with teacher
  forcing a sample counts only if every answer token is the argmax, i.e. greedy decoding gets it);
- the byte-level LM loss on held-out text at the training length;
- the fraction of visible KV each query reads (from the layers' `kv_pattern`, last queries of a long
  sample), tokens/s in training (the training backend) and in cached decode (the eval backend).

Phases: (1) training workers, `--jobs` at a time (each its own process); (2) speed workers, one at a
time, so timings are never shared with another job; (3) a markdown table, JSON and PNG in --out.

    python examples/compare_quality.py --out runs/quality                        # all variants
    python examples/compare_quality.py --out /tmp/q --device cpu --preset tiny   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

import sparsezoo

REPO = Path(__file__).resolve().parents[1]

# KV budget per query, per variant: ~256 tokens at `small` (1/8 of a 2k context), ~32 at `tiny`.
# A variant registered later without an entry here runs with its defaults (+ COMMON fields it has).
BUDGETS = {
    "small": {
        "msa": {"block_size": 64, "topk": 4, "index_dim": 32},
        "moba": {"block_size": 64, "topk": 4},
        "dsa": {"topk": 256, "n_index_heads": 4, "index_dim": 32},
        "nsa": {"cmp_block": 32, "cmp_stride": 16, "sel_block": 64, "sel_topk": 4, "window": 64},
        "csa": {"compress_ratio": 4, "topk": 32, "window": 128, "n_index_heads": 4, "index_dim": 32,
                "index_kl": True},
    },
    "tiny": {
        "msa": {"block_size": 16, "topk": 2, "index_dim": 16},
        "moba": {"block_size": 16, "topk": 2},
        "dsa": {"topk": 32, "n_index_heads": 2, "index_dim": 16},
        "nsa": {"cmp_block": 16, "cmp_stride": 8, "sel_block": 16, "sel_topk": 3, "window": 16,
                "compressor_hidden": 32},
        "csa": {"compress_ratio": 4, "topk": 8, "window": 16, "n_index_heads": 2, "index_dim": 16,
                "index_kl": True},
    },
}
MODELS = {
    "small": {"d_model": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2},
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
}


def parse_sets(items: list[str] | None) -> dict[str, dict]:
    """['msa.topk=16', ...] -> {'msa': {'topk': 16}}; values are YAML scalars; fields are checked."""
    out: dict[str, dict] = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        variant, dot, field = name.partition(".")
        if not (eq and dot and variant and field):
            raise SystemExit(f"--set {item!r}: expected VARIANT.FIELD=VALUE, for example msa.topk=16")
        fields = sparsezoo.variant_class(variant).config_class.field_names()
        if field not in fields:
            raise SystemExit(f"--set {item!r}: {variant} has no field {field!r}; valid fields: {sorted(fields)}")
        out.setdefault(variant, {})[field] = yaml.safe_load(value)
    return out


def variant_overrides(variant: str, preset: str, warmup_steps: int, backend: str, sets: dict | None = None) -> dict:
    """The attention config fields this variant gets (only fields its config class has)."""
    fields = sparsezoo.variant_class(variant).config_class.field_names()
    common = {"warmup_steps": warmup_steps, "backend": backend}
    out = {k: v for k, v in common.items() if k in fields}
    out.update(BUDGETS[preset].get(variant, {}))
    out.update((sets or {}).get(variant, {}))
    return out


def parse_curriculum(text: str | None) -> tuple[int | None, int]:
    """'LEN:STEPS' -> (LEN, STEPS); None -> no curriculum."""
    if not text:
        return None, 0
    try:
        length, steps = (int(x) for x in text.split(":"))
    except ValueError:
        raise SystemExit(f"--curriculum {text!r}: expected LEN:STEPS, for example 512:900") from None
    return length, steps


def check_data_config(data: dict) -> None:
    """Fail before any worker starts on a data config the trainer would refuse (e.g. a bad curriculum)."""
    from sparsezoo.config import ConfigError
    from sparsezoo.models.data import DataConfig

    try:
        DataConfig.from_dict(data)
    except ConfigError as e:
        raise SystemExit(f"bad data settings: {e}") from None


def run_config(args, variant: str, backend: str) -> dict:
    steps = args.steps
    warmup = int(args.warmup_frac * steps)
    model = {"vocab_size": 512, **MODELS[args.preset], "attention": variant, "dense_layers": args.dense_layers,
             "attention_overrides": {variant: variant_overrides(variant, args.preset, warmup, backend,
                                                                       parse_sets(args.set))}}
    short_len, short_steps = parse_curriculum(args.curriculum)
    data = {"task": "mix", "seq_len": args.train_len, "curriculum_len": short_len, "curriculum_steps": short_steps,
            "passkey_len": args.passkey_len, "n_pairs": args.n_pairs,
            "n_queries": args.n_pairs, "text_path": args.text, "text_glob": args.text_glob,
            "mix": {k: float(w) for k, w in (item.split("=") for item in args.mix.split(","))}}
    train = {"steps": steps, "batch_size": args.batch, "lr": args.lr, "lr_warmup": max(1, steps // 20),
             "seed": args.seed, "eval_every": 0, "eval_batches": 2, "log_every": 10, "device": args.device,
             "out_dir": str(Path(args.out) / variant), "progress": False, "time_limit_s": args.time_limit}
    return {"model": model, "data": data, "train": train}


# -- workers ---------------------------------------------------------------------------------------
def train_worker(spec: dict) -> dict:
    from sparsezoo.models import load_model
    from sparsezoo.models.data import Data, DataConfig
    from sparsezoo.models.train import evaluate, train

    run, args = spec["run"], spec["args"]
    t0 = time.perf_counter()
    with sparsezoo.ops.track_implementations() as train_impls:
        summary = train(run)
    train_s = time.perf_counter() - t0
    device = "cuda" if args["device"] == "cuda" or (args["device"] == "auto" and torch.cuda.is_available()) else "cpu"
    variant = run["model"]["attention"]
    eval_over = {**run["model"]["attention_overrides"][variant], "backend": args["eval_backend"]}
    if "backend" not in sparsezoo.variant_class(variant).config_class.field_names():
        eval_over.pop("backend")
    dense_over = {"backend": args["eval_backend"]}
    model, _ = load_model(summary["checkpoint"], {"attention_overrides": {variant: eval_over, "dense": dense_over}},
                          strict=True, device=device)
    model.apply_routing_schedule(run["train"]["steps"])  # sparse routing, as after training
    data = Data(DataConfig.from_dict(run["data"]), model.config.vocab_size, seed=run["train"]["seed"])
    results = {"variant": variant, "train_seconds": train_s, "steps_done": summary["steps_done"],
               "final_train_lm": _tail_mean(summary["history"]), "implementations_train": dict(train_impls),
               "attention_config": run["model"]["attention_overrides"][variant], "accuracy": {}, "errors": {}}
    n_batches = max(1, args["eval_samples"] // args["eval_batch"])
    with sparsezoo.ops.track_implementations() as eval_impls:
        text = evaluate(model, _only(data, "text"), n_batches, args["eval_batch"], device=device) if "text" in data.tasks else {}
        for key, value in text.items():
            results["text_loss"] = value["loss"]
        for length in args["eval_lens"]:
            try:
                res = evaluate(model, _only(data, "needle", "recall"), n_batches, args["eval_batch"], [length],
                               device=device)
                results["accuracy"][str(length)] = {k.split("@")[0]: v for k, v in res.items()}
            except torch.OutOfMemoryError as e:  # reported in the table, never hidden
                results["errors"][f"eval@{length}"] = f"out of memory: {str(e)[:200]}"
                torch.cuda.empty_cache()
    results["implementations_eval"] = dict(eval_impls)
    try:
        results["kv_read"] = kv_read_fraction(model, data, args["kv_len"], device)
    except Exception as e:  # noqa: BLE001 - recorded in the output
        results["errors"]["kv_read"] = f"{type(e).__name__}: {str(e)[:200]}"
    return results


def _tail_mean(history: list[dict], n: int = 30) -> dict:
    out = {}
    for task in sorted({h["task"] for h in history}):
        vals = [h["lm_loss"] for h in history if h["task"] == task][-n:]
        out[task] = sum(vals) / len(vals)
    return out


def _only(data, *tasks):
    """A view of `data` restricted to some tasks (for evaluate)."""
    view = object.__new__(type(data))
    view.__dict__.update(data.__dict__)
    view.tasks = {k: v for k, v in data.tasks.items() if k in tasks}
    return view


@torch.no_grad()
def kv_read_fraction(model, data, length: int, device) -> dict:
    """Mean fraction of visible keys read by the last 1/8 of the queries of one needle sample,
    per layer (from each attention layer's kv_pattern on its real input)."""
    from sparsezoo.models.data import batch_generator

    x, _ = data.batch("needle", 1, length, batch_generator(0, 0, stream=77), "val", device)
    inputs = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a, kw: inputs.append(a[0]), with_kwargs=True)
             for b in model.blocks]
    model.eval()
    model(x)
    for h in hooks:
        h.remove()
    tail = length // 8
    fractions = []
    for block, h in zip(model.blocks, inputs):
        pattern = block.attn.kv_pattern(h)[:, :, -tail:]  # [B, H, tail, S]
        visible = torch.arange(length - tail, length, device=pattern.device) + 1
        fractions.append(float((pattern.sum(-1).float() / visible).mean()))
        del pattern
    return {"length": length, "per_layer": fractions, "mean": sum(fractions) / len(fractions)}


SPEED_ARGS = ("device", "eval_backend", "decode_prompt", "decode_tokens", "speed_warmup", "speed_steps")


def speed_worker(spec: dict) -> dict:
    from sparsezoo.models import load_model
    from sparsezoo.models.data import Data, DataConfig
    from sparsezoo.models.train import autocast_for, make_optimizer, TrainConfig

    run, args = spec["run"], spec["args"]
    device = torch.device("cuda" if args["device"] == "cuda" or (args["device"] == "auto" and torch.cuda.is_available()) else "cpu")
    ckpt = Path(run["train"]["out_dir"]) / "checkpoint"
    variant = run["model"]["attention"]
    out = {"variant": variant}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # training throughput (sparse routing, training backend), same batch shape as training
    model, _ = load_model(ckpt, strict=True, device=device)
    model.apply_routing_schedule(10 ** 9)
    data = Data(DataConfig.from_dict({**run["data"], "task": "needle", "curriculum_len": None, "curriculum_steps": 0}),
                model.config.vocab_size)  # the final training shape
    opt = make_optimizer(model, TrainConfig.from_dict(run["train"]), fused=device.type == "cuda")
    _, x, y = data.train_batch(0, run["train"]["batch_size"], device=device)
    with sparsezoo.ops.track_implementations() as impls:
        for i in range(args["speed_warmup"] + args["speed_steps"]):
            if i == args["speed_warmup"]:
                sync()
                t0 = time.perf_counter()
            with autocast_for(device, "auto"):
                _, loss = model(x, y)
            aux = sparsezoo.aux_loss(model)
            (loss if aux is None else loss + aux.float()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
    out["train_tokens_per_s"] = x.numel() * args["speed_steps"] / (time.perf_counter() - t0)
    out["implementations_train"] = dict(impls)
    del model, opt
    # cached decode throughput (eval backend): prefill a prompt, then one token per step
    eval_over = {**run["model"]["attention_overrides"][variant], "backend": args["eval_backend"]}
    if "backend" not in sparsezoo.variant_class(variant).config_class.field_names():
        eval_over.pop("backend")
    model, _ = load_model(ckpt, {"attention_overrides": {variant: eval_over, "dense": {"backend": args["eval_backend"]}}},
                          strict=True, device=device)
    model.apply_routing_schedule(10 ** 9)
    prompt = torch.randint(0, model.config.vocab_size, (1, args["decode_prompt"]), device=device,
                           generator=torch.Generator(device).manual_seed(0))
    n_new = args["decode_tokens"]
    with sparsezoo.ops.track_implementations() as impls, torch.no_grad(), autocast_for(device, "auto"):
        model.eval()
        model.setup_cache(1, args["decode_prompt"] + n_new + 4)
        logits, _ = model(prompt, use_cache=True)
        tok = logits[:, -1:].argmax(-1)
        for _ in range(3):  # warm-up steps
            tok = model(tok, use_cache=True)[0][:, -1:].argmax(-1)
        sync()
        t0 = time.perf_counter()
        for _ in range(n_new):
            tok = model(tok, use_cache=True)[0][:, -1:].argmax(-1)
        sync()
    out["decode_tokens_per_s"] = n_new / (time.perf_counter() - t0)
    out["decode_at"] = args["decode_prompt"]
    out["implementations_decode"] = dict(impls)
    out["speed_args"] = {k: args[k] for k in SPEED_ARGS}
    return out


# -- orchestration -------------------------------------------------------------------------------
def launch(kind: str, spec_path: Path, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, __file__, "--worker", kind, "--spec", str(spec_path)]
    return subprocess.Popen(cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=env)


def run_jobs(kind: str, specs: dict[str, Path], out: Path, jobs: int, timeout: float,
             deadline: float = math.inf, launcher=launch) -> dict[str, dict]:
    """Run workers (`launcher(kind, spec_path, log_path)` -> Popen), `jobs` at a time; a worker past
    `timeout` is killed, and none starts after `deadline` (time.perf_counter()); both are reported as failures."""
    pending, running, results = list(specs), {}, {}
    while pending or running:
        if pending and time.perf_counter() > deadline:
            for v in pending:
                results[v] = {"variant": v, "failed": "skipped: the run's --deadline passed"}
            pending = []
        while pending and len(running) < jobs:
            v = pending.pop(0)
            running[v] = (launcher(kind, specs[v], out / v / f"{kind}.log"), time.perf_counter())
            print(f"[{kind}] started {v}", flush=True)
        time.sleep(0.5)
        for v, (proc, t0) in list(running.items()):
            late = time.perf_counter() - t0 > timeout
            if proc.poll() is None and not late:
                continue
            if late and proc.poll() is None:
                proc.kill()
                proc.wait()
            del running[v]
            res_path = out / v / f"{kind}.json"
            if proc.returncode == 0 and res_path.is_file():
                results[v] = json.loads(res_path.read_text())
                print(f"[{kind}] {v} done in {time.perf_counter() - t0:.0f}s", flush=True)
            else:
                tail = (out / v / f"{kind}.log").read_text()[-1500:]
                why = f"timed out after {timeout:.0f}s" if late else f"exit code {proc.returncode}"
                results[v] = {"variant": v, "failed": why, "log_tail": tail}
                print(f"[{kind}] {v} FAILED ({why}):\n{tail}", flush=True)
    return results


def fmt(x, pattern="{:.2f}"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else pattern.format(x)


def curriculum_note(args) -> str:
    short_len, short_steps = parse_curriculum(args.curriculum)
    if short_len is None:
        return ""
    return (f" (the first {short_steps} steps at {short_len} tokens x batch {args.batch * args.train_len // short_len},"
            f" the same tokens per step)")


def write_report(out: Path, args, quality: dict, speed: dict, device_name: str) -> None:
    lens = args.eval_lens
    rows = []
    head = (["variant", "steps"] + [f"needle@{L}" for L in lens] + [f"recall@{L}" for L in lens] +
            ["text loss", f"KV read@{args.kv_len}", "train tok/s", f"decode tok/s @{args.decode_prompt}"])
    for v in sorted(quality):
        q, s = quality[v], speed.get(v, {})
        if "failed" in q:
            rows.append([v, f"failed: {q['failed']}"] + [""] * (len(head) - 2))
            continue
        acc = q.get("accuracy", {})
        get = lambda L, task: acc.get(str(L), {}).get(task, {}).get("exact")
        steps = f"{q['steps_done']}" + ("" if q["steps_done"] == args.steps else f" of {args.steps} (time limit)")
        rows.append([v, steps] + [fmt(get(L, "needle")) for L in lens] + [fmt(get(L, "recall")) for L in lens] +
                    [fmt(q.get("text_loss"), "{:.3f}"), fmt((q.get("kv_read") or {}).get("mean"), "{:.3f}"),
                     fmt(s.get("train_tokens_per_s"), "{:,.0f}"), fmt(s.get("decode_tokens_per_s"), "{:,.1f}")])
    table = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
    table += "".join("| " + " | ".join(r) + " |\n" for r in rows)
    impl_lines = []
    for v in sorted(quality):
        q, s = quality[v], speed.get(v, {})
        impl_lines.append(f"- {v}: train {q.get('implementations_train', {})}; eval {q.get('implementations_eval', {})}; "
                          f"decode {s.get('implementations_decode', {})}; attention {q.get('attention_config', {})}")
        for k, e in {**q.get("errors", {}), **({"speed": s["failed"]} if "failed" in s else {})}.items():
            impl_lines.append(f"  - error in {k}: {e}")
    md = (f"# Quality comparison on {device_name}\n\n"
          f"Command: `{' '.join(sys.argv)}`\n\n"
          f"Same GPT for every variant: {MODELS[args.preset]}, vocab 512, dense_layers {args.dense_layers}; "
          f"{args.steps} steps x batch {args.batch} x {args.train_len} tokens{curriculum_note(args)}, lr {args.lr}, "
          f"seed {args.seed}; "
          f"task mix = passkey ({args.passkey_len} tokens) + multi-query recall ({args.n_pairs} pairs) + byte-level "
          f"text ({args.text}, {args.text_glob}), weights {args.mix}. MSA/DSA: dense warm-up with the index KL for "
          f"{int(args.warmup_frac * args.steps)} steps, then sparse.\n\n"
          f"Accuracy = fraction of {args.eval_samples} held-out samples answered exactly (greedy). Lengths above "
          f"{args.train_len} are extrapolation (trained at {args.train_len}). KV read = mean fraction of the visible "
          f"keys read by the last 1/8 of the queries of a {args.kv_len}-token sample (from kv_pattern, averaged over "
          f"layers). train tok/s: training backend; decode tok/s: batch 1 after a {args.decode_prompt}-token prefill, "
          f"eval backend `{args.eval_backend}`, eager (no CUDA graphs).\n\n{table}\n"
          f"Implementations that ran and attention configs:\n" + "\n".join(impl_lines) + "\n")
    (out / "quality.md").write_text(md)
    (out / "quality.json").write_text(json.dumps({"device": device_name, "command": sys.argv, "args": vars(args),
                                                  "quality": quality, "speed": speed}, indent=1))
    plot(out / "quality.png", args, quality, speed, device_name)
    print(md)


def plot(path: Path, args, quality: dict, speed: dict, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [v for v in sorted(quality) if "failed" not in quality[v]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, task in zip(axes[:2], ("needle", "recall")):
        for v in ok:
            acc = quality[v].get("accuracy", {})
            pts = [(int(L), acc[L][task]["exact"]) for L in acc if task in acc[L]]
            if pts:
                ax.plot(*zip(*sorted(pts)), "o-", label=v)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="context length", ylabel="exact accuracy", title=f"{task} (trained at {args.train_len})",
               ylim=(-0.05, 1.05))
        ax.legend(fontsize=8)
    ax = axes[2]
    for v in ok:
        kv = (quality[v].get("kv_read") or {}).get("mean")
        tl = quality[v].get("text_loss")
        if kv is not None and tl is not None:
            ax.scatter(kv, tl)
            ax.annotate(v, (kv, tl), fontsize=8)
    ax.set(xlabel=f"fraction of KV read @ {args.kv_len}", ylabel="held-out text loss (nats/byte)",
           title="LM loss vs KV read")
    fig.suptitle(f"sparsezoo GPT variants, {device_name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--variants", default="all", help="comma list, or 'all' = sparsezoo.list_variants()")
    p.add_argument("--preset", choices=sorted(MODELS), default="small")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--train-len", type=int, default=2048)
    p.add_argument("--eval-lens", default="2048,8192,16384")
    p.add_argument("--eval-samples", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--kv-len", type=int, default=8192)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-frac", type=float, default=0.2, help="MSA/DSA dense warm-up, fraction of steps")
    p.add_argument("--dense-layers", type=int, default=0)
    p.add_argument("--set", action="append", metavar="VARIANT.FIELD=VALUE",
                   help="change one attention config field of a variant's budget (repeatable), e.g. msa.topk=16")
    p.add_argument("--curriculum", default=None,
                   help="LEN:STEPS: the first STEPS steps train at LEN tokens (same tokens per step), then --train-len")
    p.add_argument("--passkey-len", type=int, default=4)
    p.add_argument("--n-pairs", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", default=str(REPO), help="local text file or folder for the LM task")
    p.add_argument("--text-glob", default="**/*.py")
    p.add_argument("--mix", default="needle=2,recall=2,text=1", help="task weights of the training mix")
    p.add_argument("--backend", default="auto", help="attention backend for training")
    p.add_argument("--eval-backend", default="reference",
                   help="backend for long evals and decode (fixed-shape compiles would recompile per length)")
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", type=int, default=1, help="training workers at once (speed runs are always alone)")
    p.add_argument("--time-limit", type=float, default=None, help="per-variant training time limit (s)")
    p.add_argument("--worker-timeout", type=float, default=900)
    p.add_argument("--reuse", action="store_true",
                   help="keep variants whose earlier run in --out has the same run config and finished "
                        "(and their speed results, where measured with the same speed settings)")
    p.add_argument("--decode-prompt", type=int, default=8192)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--speed-warmup", type=int, default=3)
    p.add_argument("--speed-steps", type=int, default=5)
    p.add_argument("--speed-timeout", type=float, default=300)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--deadline", type=float, default=math.inf, help="start no speed worker after this many seconds")
    p.add_argument("--worker", choices=["train", "speed"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.eval_lens = [int(x) for x in str(args.eval_lens).split(",") if x]
    return args


def reuse_result(folder: Path, spec: dict) -> dict | None:
    """The finished result of an earlier run in `folder` whose run config equals this one (--reuse)."""
    old_spec, result = folder / "spec.json", folder / "train.json"
    if not (old_spec.is_file() and result.is_file()):
        return None
    if json.loads(old_spec.read_text())["run"] != json.loads(json.dumps(spec["run"])):
        return None
    r = json.loads(result.read_text())
    return r if r.get("steps_done") == spec["run"]["train"]["steps"] else None


def reuse_speed(folder: Path, spec: dict) -> dict | None:
    """The speed result of an earlier run in `folder` measured with this run's speed settings (--reuse
    only calls it for variants whose training was reused)."""
    path = folder / "speed.json"
    if not path.is_file():
        return None
    r = json.loads(path.read_text())
    return r if r.get("speed_args") == {k: spec["args"][k] for k in SPEED_ARGS} else None


def main(argv=None):
    args = parse(argv)
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        fn = train_worker if args.worker == "train" else speed_worker
        result = fn(spec)
        (Path(spec["run"]["train"]["out_dir"]) / f"{args.worker}.json").write_text(json.dumps(result, indent=1))
        return
    registered = sparsezoo.list_variants()
    variants = registered if args.variants == "all" else args.variants.split(",")
    unknown = sorted(set(variants) - set(registered))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose among {registered}")
    out = Path(args.out)
    specs, reused = {}, {}
    for v in variants:
        (out / v).mkdir(parents=True, exist_ok=True)
        spec = {"run": run_config(args, v, args.backend), "args": vars(args)}
        check_data_config(spec["run"]["data"])
        specs[v] = out / v / "spec.json"
        if args.reuse and (r := reuse_result(out / v, spec)) is not None:
            reused[v] = r
            continue
        specs[v].write_text(json.dumps(spec, indent=1))
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    t0 = time.perf_counter()
    for v in reused:
        print(f"[train] {v}: reusing {out / v / 'train.json'} ({args.steps} steps)", flush=True)
    todo = {v: p for v, p in specs.items() if v not in reused}
    quality = {**reused, **run_jobs("train", todo, out, args.jobs, args.worker_timeout)}
    quality = {v: quality[v] for v in variants}
    print(f"training phase: {time.perf_counter() - t0:.0f}s", flush=True)
    speed = {}
    if not args.skip_speed:
        trained = {v: p for v, p in specs.items() if "failed" not in quality[v]}
        for v in reused:
            if (r := reuse_speed(out / v, {"args": vars(args)})) is not None:
                speed[v] = r
                print(f"[speed] {v}: reusing {out / v / 'speed.json'}", flush=True)
        todo = {v: p for v, p in trained.items() if v not in speed}
        speed.update(run_jobs("speed", todo, out, 1, args.speed_timeout, t0 + args.deadline))
    print(f"total: {time.perf_counter() - t0:.0f}s", flush=True)
    write_report(out, args, quality, speed, device_name)


if __name__ == "__main__":
    main()
