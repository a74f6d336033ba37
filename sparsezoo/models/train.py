"""Train the example GPT from a YAML config (one implementation; examples/train.py calls it).

    python examples/train.py --config configs/gpt_tiny.yaml --set model.attention=msa
    torchrun --nproc_per_node 2 examples/train.py --config configs/gpt_small.yaml   # DDP (gloo on CPU)
    torchrun --nproc_per_node 2 examples/train.py --config configs/gpt_small.yaml --set train.parallel=fsdp

A run config has three sections: `model` (GPTConfig), `data` (DataConfig) and `train` (TrainConfig).
MSA/DSA layers (anything with `set_routing`) run dense routing for their `warmup_steps` while the
index branch learns from its KL, then switch to sparse routing. The LM loss and the index loss
(`sparsezoo.aux_loss`) are logged separately. Output folder: checkpoint/ (safetensors + config.yaml,
resumable with --resume), metrics.jsonl, loss.png. Under torchrun, `train.parallel` picks DDP (every rank
holds the whole model) or FSDP2 (`fully_shard` per block, see sparsezoo/models/fsdp.py); both write
the same checkpoint format, so either resumes the other's run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import yaml

import sparsezoo
from sparsezoo.config import CheckedConfig, ConfigError, from_known_fields, read_yaml

from . import checkpoint as ckpt
from . import fsdp
from .data import Data, DataConfig, score
from .gpt import GPT, GPTConfig
from .short_conv import CONTEXT_PARALLEL_REFUSAL

log = logging.getLogger("sparsezoo.train")


@dataclass
class TrainConfig(CheckedConfig):
    steps: int = 200
    batch_size: int = 8  # per process
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio
    lr_warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 50  # 0 = only at the end
    eval_batches: int = 4
    eval_lengths: list[int] | None = None  # synthetic-task eval lengths; default [data.seq_len]
    log_every: int = 10
    out_dir: str = "runs/gpt"
    init_from: str | None = None  # checkpoint folder to start from (may be another variant)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    progress: bool = True
    parallel: str = "ddp"  # with several processes: ddp (replicated model) | fsdp (FSDP2, sharded per block)
    context_parallel: int = 1  # ranks that split each sequence (sparsezoo.context_parallel); world = data x this
    fsdp_param_dtype: str = "auto"  # FSDP compute params: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    find_unused_parameters: bool = False  # for DDP with variants that leave parameters unused
    time_limit_s: float | None = None  # stop early (and say so in the summary) after this many seconds

    LABEL: ClassVar[str] = "train"
    CHOICES: ClassVar[dict[str, tuple]] = {"device": ("auto", "cpu", "cuda"), "dtype": ("auto", "bf16", "fp32"),
                                           "parallel": ("ddp", "fsdp"), "fsdp_param_dtype": ("auto", "bf16", "fp32")}
    POSITIVE: ClassVar[tuple[str, ...]] = ("batch_size", "eval_batches", "log_every", "time_limit_s",
                                           "context_parallel")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("steps", "lr", "min_lr_ratio", "lr_warmup", "weight_decay",
                                               "grad_clip", "eval_every")

    def __post_init__(self) -> None:
        self.check_fields()
        if self.eval_lengths is not None and not all(n > 0 for n in self.eval_lengths):
            raise ConfigError(f"train.eval_lengths must hold lengths > 0, got {self.eval_lengths}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return from_known_fields(cls, data, "train")


SECTIONS = ("model", "data", "train")
LOCK = "train.lock"  # in out_dir, held by the run writing there


def load_run_config(path: str | Path | None = None, sets: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A run config dict from YAML (safe_load) plus `section.field=value` overrides (values parsed as YAML)."""
    run = read_yaml(path) if path else {}
    unknown = sorted(set(run) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown run config section(s) {unknown}; valid sections: {list(SECTIONS)}")
    for item in sets:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 2 or parts[0] not in SECTIONS:
            raise ConfigError(f"--set expects section.field=value with section in {list(SECTIONS)}, got {item!r}")
        node = run.setdefault(parts[0], {})
        for p in parts[1:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return {s: dict(run.get(s) or {}) for s in SECTIONS}


def build(run: dict[str, Any]) -> tuple[GPTConfig, DataConfig, TrainConfig]:
    return GPTConfig.from_dict(run["model"]), DataConfig.from_dict(run["data"]), TrainConfig.from_dict(run["train"])


# -- distributed ---------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_pref: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on CUDA, gloo on CPU. Single process otherwise."""
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    local = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), world, torch.device(f"cuda:{local}" if use_cuda else "cpu"))


_teardowns = 0  # numbers each teardown's store keys (one process can set up and tear down several groups)


def teardown_process_group(finished: bool = True) -> None:
    """Destroy the default process group without cutting a peer's last message short.

    A gloo rank can leave its last collective before its peer has read that collective's final message;
    destroying the group then closes the connection under the peer, which aborts ("terminate called
    without an active exception"). So when the run finished, every rank passes a barrier and then waits
    on the rendezvous store (not a gloo connection) until all ranks are past it. After a failure (a rank
    may be dead) the group is destroyed at once."""
    global _teardowns
    try:
        if finished:
            dist.barrier()
            store, rank, world = dist.distributed_c10d._get_default_store(), dist.get_rank(), dist.get_world_size()
            _teardowns += 1
            key = f"sparsezoo/teardown/{_teardowns}"
            store.set(f"{key}/{rank}", "1")
            store.wait([f"{key}/{r}" for r in range(world)])
    finally:  # even when the barrier fails (a rank died)
        dist.destroy_process_group()


def _all_mean(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t)
        t /= d.world
    return t


# -- evaluation ----------------------------------------------------------------------------------
def autocast_for(device: torch.device, dtype: str):
    if dtype not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.dtype = {dtype!r}; choose one of ['auto', 'bf16', 'fp32']")
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: GPT, data: Data, n_batches: int, batch_size: int, lengths: list[int] | None = None,
             device=None, dtype: str = "auto") -> dict[str, dict[str, float]]:
    """Per task (and per length for synthetic tasks): mean loss, token accuracy, exact-answer accuracy."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    results = {}
    try:
        for task in sorted(data.tasks):
            for length in ([data.config.seq_len] if task == "text" else (lengths or [data.config.seq_len])):
                loss_sum, hit, n, exact, rows = 0.0, 0, 0, 0, 0
                for x, y in data.eval_batches(task, n_batches, batch_size, length, device):
                    with autocast_for(device, dtype):
                        logits, loss = model(x, y)
                    h, m, e, r = score(logits, y)
                    loss_sum += float(loss) * m
                    hit, n, exact, rows = hit + h, n + m, exact + e, rows + r
                results[f"{task}@{length}"] = {"loss": loss_sum / max(n, 1), "token_acc": hit / max(n, 1),
                                               "exact": exact / max(rows, 1), "tokens_scored": n}
    finally:
        model.train(was_training)
    return results


# -- the loop ------------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.lr_warmup:
        return cfg.lr * (step + 1) / cfg.lr_warmup
    progress = (step - cfg.lr_warmup) / max(1, cfg.steps - cfg.lr_warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: GPT, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


@contextlib.contextmanager
def lock_out_dir(out: str | Path):
    """Hold OUT_DIR/train.lock for a run: a second run on the same out_dir is refused, naming this
    one's pid. An flock, so it goes away with the process however it ends (POSIX only)."""
    import fcntl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RuntimeError(f"{out} is in use by another training run (pid {holder}); wait for it to end "
                               f"or choose another train.out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _exclusive_out_dir(out: Path, d: Dist):
    """Rank 0 holds the out_dir lock for the whole run; every rank stops when it cannot get it."""
    with contextlib.ExitStack() as stack:
        error = None
        if d.main:
            try:
                stack.enter_context(lock_out_dir(out))
            except RuntimeError as e:
                error = e
        if d.world > 1:
            failed = torch.tensor([float(error is not None)], device=d.device)
            dist.all_reduce(failed)
            if error is None and failed.item() > 0:
                error = RuntimeError(f"rank 0 could not lock {out} (another run uses it); see rank 0's error")
        if error is not None:
            raise error
        yield


def train(run: dict[str, Any], resume: bool = False) -> dict[str, Any]:
    """Train from a run config dict (see load_run_config). Returns a summary (history, evals, paths).

    One run per out_dir (`lock_out_dir`). Under torchrun, the process group this call sets up is torn
    down on every exit path (after a barrier when the run finished, so no rank leaves early)."""
    model_cfg, data_cfg, cfg = build(run)
    joined = dist.is_available() and dist.is_initialized()  # a caller's process group stays up
    d = setup_distributed(cfg.device)
    finished = False
    try:
        if d.world % cfg.context_parallel:  # before anything is written
            raise ConfigError(f"train.context_parallel = {cfg.context_parallel} must divide the number of "
                              f"processes ({d.world}): world = data-parallel replicas x context-parallel ranks")
        with _exclusive_out_dir(Path(cfg.out_dir), d):
            summary = _train(run, resume, model_cfg, data_cfg, cfg, d)
        finished = True
        return summary
    finally:
        if d.world > 1 and not joined and dist.is_initialized():
            teardown_process_group(finished)


def _train(run: dict[str, Any], resume: bool, model_cfg: GPTConfig, data_cfg: DataConfig, cfg: TrainConfig,
           d: Dist) -> dict[str, Any]:
    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoint"
    if d.main:
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(cfg.seed)  # identical init on every rank
    model = GPT(model_cfg).to(d.device)
    data = Data(data_cfg, model_cfg.vocab_size, seed=cfg.seed)
    start, history, evals = 0, [], []
    if cfg.init_from and not resume:
        report = ckpt.load_weights(model, Path(cfg.init_from) / ckpt.WEIGHTS)
        _say(d, f"init_from {cfg.init_from}:\n{report}")
    parallel = _parallel_mode(cfg, d)
    cp = _context_parallel_groups(cfg, d, model)
    if parallel == "fsdp":
        fsdp.shard_model(model, d.device.type, d.world, _fsdp_param_dtype(cfg, d.device))
    optimizer = make_optimizer(model, cfg, fused=d.device.type == "cuda")  # after sharding (DTensor parameters)
    if resume:
        state = _load_resume_state(ckpt_dir, model, optimizer, parallel)
        start, history, evals = state["step"], state["history"], state["evals"]
        _say(d, f"resumed from {ckpt_dir} at step {start}")
    _say(d, model.describe() + f"\ntasks: {sorted(data.weights)}; world size {d.world} (parallel: {parallel}"
                               f"{f', context parallel {cp.size}' if cp else ''}); "
                               f"device {d.device}")

    wrapped = model  # FSDP2 shards `model` in place: calling it gathers each block's parameters in turn
    if parallel == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters)

    def save(step: int) -> None:
        train_state = {"step": step, "history": history, "evals": evals}
        if parallel == "fsdp":  # every rank sends its shards; rank 0 gets the full state and writes it
            weights, optimizer_state = fsdp.gather_full_state(model, optimizer)

        def write() -> None:
            if parallel == "fsdp":
                ckpt.save_checkpoint_state(ckpt_dir, weights, run, optimizer_state, train_state)
            else:
                ckpt.save_checkpoint(ckpt_dir, model, run, optimizer, train_state)
            plot_history(history, evals, out / "loss.png", model.max_warmup_steps())

        _on_rank0(d, write, f"save {ckpt_dir}")

    def run_eval(step: int) -> None:
        if d.main or parallel == "fsdp":  # a sharded forward needs every rank
            phase = model.apply_routing_schedule(step)  # evaluate with the routing the next step uses
            res = evaluate(model, data, cfg.eval_batches, cfg.batch_size, cfg.eval_lengths, d.device, cfg.dtype)
        if d.main:
            evals.append({"step": step, "phase": phase, **res})
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(evals[-1]) + "\n")
            _say(d, f"eval @ {step}: " + ", ".join(f"{k} loss {v['loss']:.3f} acc {v['exact']:.2f}"
                                                     for k, v in res.items()))
        if d.world > 1:
            dist.barrier()

    bar = None
    if d.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", dynamic_ncols=True)
    pending: list[tuple[int, str, str, torch.Tensor]] = []
    cp_size = cp.size if cp else 1
    tokens_per_step = cfg.batch_size * data_cfg.seq_len * d.world // cp_size
    t_last, steps_since = time.perf_counter(), 0
    model.train()
    t_start, stopped_at = time.perf_counter(), None
    for step in range(start, cfg.steps):
        check_time = cfg.time_limit_s is not None and (d.world == 1 or step % cfg.log_every == 0)
        if check_time and _out_of_time(t_start, cfg.time_limit_s, d):
            stopped_at = step
            _say(d, f"time limit {cfg.time_limit_s}s reached: stopping at step {step} of {cfg.steps}")
            run_eval(step)
            save(step)
            break
        phase = model.apply_routing_schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        task, x, y = data.train_batch(step, cfg.batch_size, d.rank // cp_size, d.device)
        with autocast_for(d.device, cfg.dtype):
            if cp:  # this rank's tokens; the losses are its shares of the sequence means
                seq = cp.split(x.shape[1])
                _, lm_loss = wrapped(seq.shard(x), seq.shard(y), context_parallel=seq)
            else:
                _, lm_loss = wrapped(x, y)
        aux = sparsezoo.aux_loss(model)
        loss = lm_loss if aux is None else lm_loss + aux.float()
        optimizer.zero_grad(set_to_none=True)
        # DDP and FSDP average gradients over every rank: a group of cp ranks holds one sequence's shares
        (loss * cp_size if cp else loss).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        pending.append((step, task, phase, torch.stack([lm_loss.detach().float(),
                                                         (aux if aux is not None else lm_loss.new_zeros(())).detach().float()])))
        steps_since += 1
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.log_every == 0 or last:
            values = (_all_mean(torch.stack([p[3] for p in pending]), d) * cp_size).tolist()  # sum of shares
            now = time.perf_counter()
            tok_s = tokens_per_step * steps_since / (now - t_last)
            for (s, tk, ph, _), (lm, ix) in zip(pending, values):
                if not (math.isfinite(lm) and math.isfinite(ix)):
                    raise FloatingPointError(f"step {s}: non-finite loss (lm {lm}, index {ix})")
                history.append({"step": s, "task": tk, "phase": ph, "lm_loss": lm, "index_loss": ix,
                                "lr": lr_at(s, cfg), "tokens_per_s": tok_s})
            if bar is not None:
                bar.set_postfix(task=task, lm=f"{values[-1][0]:.3f}", idx=f"{values[-1][1]:.3f}", phase=phase,
                                tok_s=f"{tok_s:.0f}")
            pending, t_last, steps_since = [], now, 0
        if bar is not None:
            bar.update(1)
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
            run_eval(step + 1)
            save(step + 1)
            t_last = time.perf_counter()
    if bar is not None:
        bar.close()
    if start >= cfg.steps and not evals:
        run_eval(start)
        save(start)
    summary = {"history": history, "evals": evals, "out_dir": str(out), "checkpoint": str(ckpt_dir),
               "steps_done": stopped_at if stopped_at is not None else max(start, cfg.steps),
               "implementations": sparsezoo.ops.implementations_used(), "world": d.world, "parallel": parallel,
               "context_parallel": cp_size}
    if parallel == "ddp":
        summary["rank_max_param_diff"] = _rank_param_diff(model, d)
        _say(d, f"DDP: max parameter difference between ranks {summary['rank_max_param_diff']:.2e}")
    if parallel == "fsdp":
        summary["local_param_elements"], summary["param_elements"] = fsdp.local_and_total_elements(model)
        _say(d, f"FSDP: rank 0 holds {summary['local_param_elements']:,} of {summary['param_elements']:,} "
                f"parameter elements")
    return summary


def _parallel_mode(cfg: TrainConfig, d: Dist) -> str:
    """'none' in a single process, else train.parallel ('ddp' or 'fsdp')."""
    if d.world == 1:
        if cfg.parallel == "fsdp":
            _say(d, "train.parallel = 'fsdp' in a single process: nothing to shard, the model trains unsharded")
        return "none"
    return cfg.parallel


@dataclass
class ContextParallelGroups:
    """This rank's context-parallel groups: `size` consecutive ranks split each sequence, over a 2-D
    (data x context) device mesh; a second group over the same ranks carries the prefetched gathers."""

    size: int
    mesh: Any
    group: dist.ProcessGroup
    prefetch_group: dist.ProcessGroup

    def split(self, seq_len: int) -> sparsezoo.ContextParallel:
        return sparsezoo.ContextParallel(seq_len, self.group, self.prefetch_group)


def _context_parallel_groups(cfg: TrainConfig, d: Dist, model: GPT) -> ContextParallelGroups | None:
    """None for train.context_parallel = 1; else the groups, after checking the world and the layers."""
    n = cfg.context_parallel  # divides the world (checked in train())
    if n == 1:
        return None
    if model.config.short_conv:
        raise ConfigError(f"train.context_parallel: {CONTEXT_PARALLEL_REFUSAL}")
    unsupported = sorted({b.attn.variant_name for b in model.blocks if not b.attn.supports_context_parallel})
    if unsupported:
        raise ConfigError(f"train.context_parallel: the {unsupported} layers cannot split a sequence over ranks; "
                          f"variants that can: {sparsezoo.context_parallel_variants()}")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(d.device.type, (d.world // n, n), mesh_dim_names=("data", "context"))
    prefetch = None
    for replica in range(d.world // n):  # every rank takes part in making every group
        group = dist.new_group(list(range(replica * n, (replica + 1) * n)))
        if d.rank // n == replica:
            prefetch = group
    return ContextParallelGroups(n, mesh, mesh.get_group("context"), prefetch)


def _fsdp_param_dtype(cfg: TrainConfig, device: torch.device) -> str:
    """train.fsdp_param_dtype; 'auto' follows the autocast choice (bf16 on CUDA, fp32 on the CPU)."""
    if cfg.fsdp_param_dtype != "auto":
        return cfg.fsdp_param_dtype
    return "bf16" if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda") else "fp32"


def _load_resume_state(folder: Path, model: GPT, optimizer: torch.optim.Optimizer, parallel: str) -> dict[str, Any]:
    if parallel != "fsdp":
        return ckpt.load_resume_state(folder, model, optimizer)
    # every rank reads the (single-file, full) checkpoint and keeps its own shard
    weights, optimizer_state, state = ckpt.read_resume_state(folder)
    ckpt.match_state(model.state_dict(), weights, folder / ckpt.WEIGHTS, strict=True)
    fsdp.load_full_state(model, optimizer, weights, optimizer_state)
    return state


def _on_rank0(d: Dist, work, what: str) -> None:
    """Run `work` on rank 0; when it fails, every rank raises (no rank waits in a collective for rank 0)."""
    error = None
    if d.main:
        try:
            work()
        except Exception as e:  # re-raised below, after the other ranks know
            error = e
    if d.world > 1:
        failed = torch.tensor([float(error is not None)], device=d.device)
        dist.all_reduce(failed)
        if error is None and failed.item() > 0:
            error = RuntimeError(f"rank 0 could not {what}; see rank 0's error")
    if error is not None:
        raise error


def _rank_param_diff(model: GPT, d: Dist) -> float:
    """Largest difference between any rank's parameters and rank 0's (0 when DDP kept them in sync)."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def _out_of_time(t_start: float, limit: float, d: Dist) -> bool:
    late = time.perf_counter() - t_start > limit
    if d.world == 1:
        return late
    flag = torch.tensor([float(late)], device=d.device)
    return bool(_all_mean(flag, d).item() > 0)  # every rank stops at the same step


def plot_history(history: list[dict], evals: list[dict], path: Path, warmup: int = 0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lm, ax_idx) = plt.subplots(1, 2, figsize=(11, 4))
    for task in sorted({h["task"] for h in history}):
        pts = [(h["step"], h["lm_loss"]) for h in history if h["task"] == task]
        ax_lm.plot(*zip(*pts), lw=0.8, alpha=0.7, label=f"train {task}")
    for key in sorted({k for e in evals for k in e if "@" in k}):
        pts = [(e["step"], e[key]["loss"]) for e in evals if key in e]
        ax_lm.plot(*zip(*pts), "o--", ms=3, label=f"eval {key}")
    ax_lm.set(xlabel="step", ylabel="LM loss (nats/token)", title="LM loss")
    ax_lm.legend(fontsize=7)
    idx = [(h["step"], h["index_loss"]) for h in history if h["index_loss"] > 0]
    if idx:
        ax_idx.semilogy(*zip(*idx), lw=0.8)
    if warmup:
        ax_idx.axvspan(0, warmup, color="orange", alpha=0.15, label="dense warm-up")
        ax_idx.legend(fontsize=7)
    ax_idx.set(xlabel="step", ylabel="index KL", title="index loss (sparsezoo.aux_loss)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _say(d: Dist, text: str) -> None:
    """A line for the user from the main rank, written above the progress bar rather than through it."""
    if d.main:
        from tqdm import tqdm

        tqdm.write(text)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config YAML (sections model, data, train)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. --set model.attention=msa (value parsed as YAML)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT_DIR/checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return train(load_run_config(args.config, args.set), resume=args.resume)


if __name__ == "__main__":
    main()
