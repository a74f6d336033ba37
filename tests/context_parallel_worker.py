"""Run under torchrun (2+ gloo processes) by tests/test_context_parallel.py.

Every rank builds the same layers and inputs, runs the whole sequence alone (the oracle), then its shard
under context parallelism, and writes the largest differences per case to OUT/rank{r}.json: the output
and the input gradient on its own tokens, the parameter gradients and the aux loss summed over the group.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import sparsezoo
from sparsezoo.context_parallel import ContextParallel
from sparsezoo.models import GPT, GPTConfig
from sparsezoo.models.train import load_run_config, teardown_process_group, train
from tests.test_padding import DIMS, TINY

out_dir, lengths = Path(sys.argv[1]), [int(n) for n in sys.argv[2].split(",") if n]
train_runs = json.loads(sys.argv[3]) if len(sys.argv) > 3 else []  # [[out folder, config, [--set ...]], ...]
dist.init_process_group("gloo")
rank = dist.get_rank()
prefetch = dist.new_group(list(range(dist.get_world_size())))
results: dict[str, dict[str, float]] = {}


def diff(a, b) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return float("inf")
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def summed(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def layer_case(name: str, T: int, mode: str) -> dict[str, float]:
    torch.manual_seed(0)
    layer = sparsezoo.create_attention({"variant": name, **TINY[name]}, **DIMS).double()
    if mode == "warmup":  # MSA's dense routing: dense attention, the index branch trains by a dense KL
        layer.set_routing("dense")
    layer.train(mode != "eval")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, T, DIMS["d_model"], generator=g, dtype=torch.float64)
    w = torch.randn(x.shape, generator=g, dtype=torch.float64)  # a random linear loss on the outputs
    cp = ContextParallel(T, prefetch_group=prefetch if mode != "no_prefetch" else None)
    params = list(layer.parameters())
    grad_on = mode != "eval"

    def run(xx, ww, **kw):
        xx = xx.clone().requires_grad_(grad_on)
        with torch.set_grad_enabled(grad_on):
            y = layer(xx, **kw)
            aux = layer.aux_loss
            loss = (y * ww).sum() + (aux if aux is not None else 0.0)
        if not grad_on:
            return y, aux, None, [None] * len(params)
        gx, *gp = torch.autograd.grad(loss, [xx, *params], allow_unused=True, materialize_grads=True)
        return y, aux, gx, gp

    y, aux, gx, gp = run(x, w)
    y_cp, aux_cp, gx_cp, gp_cp = run(cp.shard(x), cp.shard(w), context_parallel=cp)
    used = sparsezoo.ops.implementations_used().get("context_parallel")
    report = {"out": diff(y_cp, cp.shard(y)), "whole_out": diff(cp.gather_sequence(y_cp), y),
              "aux": diff(None if aux_cp is None else summed(aux_cp), aux), "recorded": float(used == "all_gather")}
    if grad_on:
        report["grad_x"] = diff(gx_cp, cp.shard(gx))
        report["grad_params"] = max(diff(summed(a), b) for a, b in zip(gp_cp, gp))
    return report


def gpt_case(T: int) -> dict[str, float]:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, layers=["dense", "msa"],
                       attention_overrides={"msa": {k: v for k, v in TINY["msa"].items()}, "backend": "reference"})
    model = GPT(config).double().train()
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 64, (2, T), generator=g)
    targets = torch.randint(0, 64, (2, T), generator=g)
    targets[0, 3] = -100  # an ignored target: the mean counts the group's real targets
    cp = ContextParallel(T, prefetch_group=prefetch)
    params = list(model.parameters())

    def run(**kw):
        logits, loss = model(**kw)
        total = loss + model.aux_loss()
        return logits, loss, model.aux_loss(), torch.autograd.grad(total, params, allow_unused=True,
                                                                   materialize_grads=True)

    logits, loss, aux, grads = run(idx=idx, targets=targets)
    logits_cp, loss_cp, aux_cp, grads_cp = run(idx=cp.shard(idx), targets=cp.shard(targets), context_parallel=cp)
    return {"out": diff(logits_cp, cp.shard(logits)), "loss": diff(summed(loss_cp), loss),
            "aux": diff(summed(aux_cp), aux),
            "grad_params": max(diff(summed(a), b) for a, b in zip(grads_cp, grads))}


finished = False
try:
    for T in lengths:
        for name in sorted(TINY):
            results[f"{name}/T{T}/train"] = layer_case(name, T, "train")
        results[f"msa/T{T}/warmup"] = layer_case("msa", T, "warmup")
        results[f"nsa/T{T}/eval"] = layer_case("nsa", T, "eval")
        results[f"msa/T{T}/no_prefetch"] = layer_case("msa", T, "no_prefetch")
        results[f"gpt/T{T}"] = gpt_case(T)
    for folder, config, sets in train_runs:  # the trainer under context parallelism (compared by the test)
        summary = train(load_run_config(config, sets + [f"train.out_dir={folder}"]))
        results[f"train/{Path(folder).name}"] = {"context_parallel": summary["context_parallel"],
                                                  "world": summary["world"]}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    finished = True
finally:
    teardown_process_group(finished)
