"""Context-parallel MSA training at 0.5M-2M tokens: one GPU against several (all-gather CP, zig-zag layout).

    python benchmarks/scale.py --out examples/results                        # 1 GPU, then 2, every length
    python benchmarks/scale.py --gpus 2 --lengths 2097152 --out /tmp/scale   # one point

The model is a stack of `--layers` pre-norm residual MSA layers with m3 attention (Hq 64, Hkv 4, d 128,
index dim 128, block 128, top-16) on a `--d-model` residual stream (1024 by default, so that the
per-token projections stay small next to the attention), bf16 weights, sparse routing with the index KL.
One training step: forward, loss = mean(out^2) (a stand-in for the LM loss) + index KL, backward of
both, with activation checkpointing per layer by default (a layer keeps only its input, so memory is one
layer's working set, as in long-context training). Input: random x [1, T, d_model].

Each (GPUs, length) point runs in its own torchrun (an out-of-memory there ends that point only, and is
recorded as `oom`): one warm-up step, then the median of `--reps` timed steps; tokens/s counts the whole
sequence; peak memory is the largest over ranks; comm_fraction is the NCCL kernel time of one more step
(torch.profiler, device time) over the median step time. The gathers of the late chunk overlap the
early chunk's work, so that fraction bounds the exposed communication from above.
efficiency = tokens/s per GPU over one GPU's tokens/s at the same length, or at the longest length one
GPU runs when this one does not fit there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from cards import card_tag

LENGTHS = (524288, 1048576, 2097152)
MSA_M3 = dict(variant="msa", n_heads=64, n_kv_heads=4, head_dim=128, block_size=128, topk=16, index_dim=128)
MSA_SMOKE = dict(variant="msa", n_heads=4, n_kv_heads=2, head_dim=16, block_size=16, topk=2, index_dim=16)  # CPU


# ----------------------------------------------------------------------------- one point (under torchrun)
class Stack(torch.nn.Module):
    def __init__(self, layers: int, d_model: int, attention: dict, checkpoint: bool):
        super().__init__()
        self.checkpoint = checkpoint
        import sparsezoo

        self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(d_model) for _ in range(layers))
        self.layers = torch.nn.ModuleList(sparsezoo.create_attention({**attention, "d_model": d_model})
                                          for _ in range(layers))

    def forward(self, x, cp):
        from torch.utils.checkpoint import checkpoint

        for norm, layer in zip(self.norms, self.layers):
            block = lambda x, norm=norm, layer=layer: x + layer(norm(x), context_parallel=cp)
            # activation checkpointing: a layer keeps only its input; its backward recomputes the rest
            # (the gathers too, in the same order on every rank)
            x = checkpoint(block, x, use_reentrant=False) if self.checkpoint else block(x)
        return x


def device_ms_of_nccl(prof) -> float:
    total = 0.0
    for e in prof.key_averages():
        if "nccl" in e.key.lower():
            total += getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
    return total / 1e3


def worker(args) -> None:
    import torch.distributed as dist

    import sparsezoo

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:  # the CPU smoke test (tests/test_scale_benchmark.py): small heads, gloo
        dist.init_process_group("gloo")
    device, dtype = (torch.device("cuda", local), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rank, world = dist.get_rank(), dist.get_world_size()
    prefetch = dist.new_group(list(range(world)))
    T = args.length
    # one GPU runs the plain layers (its best path); several split the sequence
    cp = sparsezoo.ContextParallel(T, prefetch_group=prefetch) if world > 1 else None
    torch.manual_seed(0)
    model = Stack(args.layers, args.d_model, MSA_M3 if cuda else MSA_SMOKE, args.checkpoint).to(device, dtype).train()
    x = torch.randn(1, cp.local_len if cp else T, args.d_model, device=device, dtype=dtype)

    def step():
        out = model(x, cp)
        loss = out.float().square().sum() / (T * args.d_model) + sparsezoo.aux_loss(model)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def timed() -> float:
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        dist.barrier()
        return (time.perf_counter() - t0) * 1e3

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timed()  # warm-up: compiles the kernels
    times = sorted(timed() for _ in range(args.reps))
    ms = times[len(times) // 2]
    nccl_ms = 0.0
    if world > 1 and cuda:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            timed()
        nccl_ms = device_ms_of_nccl(prof)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=device)
    nccl = torch.tensor([nccl_ms], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    dist.all_reduce(nccl, op=dist.ReduceOp.MAX)
    if rank == 0:
        record = dict(gpus=world, seq_len=T, step_ms=ms, step_ms_all=times, tokens_per_s=T / (ms / 1e3),
                      tokens_per_s_per_gpu=T / (ms / 1e3) / world, peak_mem_gib=float(peak),
                      comm_fraction=float(nccl) / ms if world > 1 else 0.0,
                      implementations=sparsezoo.ops.implementations_used())
        Path(args.json).write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the driver
def run_point(gpus: int, T: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "point.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
               __file__, "--worker", "--length", str(T), "--json", str(out), "--layers", str(args.layers),
               "--d-model", str(args.d_model), "--reps", str(args.reps), "--device", args.device,
               "--checkpoint" if args.checkpoint else "--no-checkpoint"]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.point_timeout)
        except subprocess.TimeoutExpired:
            return dict(gpus=gpus, seq_len=T, error=f"timed out after {args.point_timeout}s")
        if out.exists():
            return json.loads(out.read_text())
        errors = sorted(Path(tmp).glob("point.json.err*"))  # a worker's own traceback, where it wrote one
        text = errors[0].read_text() if errors else proc.stdout + proc.stderr
        oom = "OutOfMemoryError" in text or "out of memory" in text
        tail = [line for line in text.splitlines() if line.strip()][-6:]
        return dict(gpus=gpus, seq_len=T, oom=oom, error=None if oom else "\n".join(tail),
                    wall_s=time.perf_counter() - t0)


def add_efficiency(records: list[dict]) -> None:
    one = {r["seq_len"]: r["tokens_per_s"] for r in records if r["gpus"] == 1 and "tokens_per_s" in r}
    longest = max(one) if one else None
    for r in records:
        if r["gpus"] > 1 and "tokens_per_s" in r and one:
            base_len = r["seq_len"] if r["seq_len"] in one else longest
            r["efficiency"] = r["tokens_per_s_per_gpu"] / one[base_len]
            r["efficiency_vs_seq_len"] = base_len


def write(records: list[dict], out: Path, card: str, cmd: str, args) -> None:
    tag = card_tag(card)
    out.mkdir(parents=True, exist_ok=True)
    rows = [dict(card=card, variant="msa", mode="train_cp", torch=torch.__version__, layers=args.layers,
                 d_model=args.d_model, activation_checkpointing=args.checkpoint, **r) for r in records]
    (out / f"scale_{tag}.json").write_text(json.dumps(rows, indent=1) + "\n")
    heads = ("m3 attention (Hq 64, Hkv 4, d 128, block 128, top-16), bf16" if args.device == "cuda" else
             "smoke-test attention (Hq 4, Hkv 2, d 16, block 16, top-2), fp32 on gloo CPU processes")
    lines = [f"# Context-parallel MSA training on {card}", "",
             f"{args.layers} MSA layers, {heads}, d_model {args.d_model}, batch 1"
             f"{', activation checkpointing per layer' if args.checkpoint else ''}; one step = forward + index KL "
             f"+ backward.", "",
             f"Command: `{cmd}`", "",
             "| GPUs | tokens | step (s) | tokens/s | tokens/s per GPU | efficiency | peak GiB/GPU | comm |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['gpus']} | {r['seq_len']:,} | {'out of memory' if r.get('oom') else 'failed'} "
                         f"| | | | | |")
            continue
        eff = f"{r['efficiency']:.2f}" if "efficiency" in r else "-"
        if "efficiency" in r and r["efficiency_vs_seq_len"] != r["seq_len"]:
            eff += f" (vs 1 GPU at {r['efficiency_vs_seq_len']:,})"
        lines.append(f"| {r['gpus']} | {r['seq_len']:,} | {r['step_ms'] / 1e3:.2f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s_per_gpu']:,.0f} | {eff} | {r['peak_mem_gib']:.1f} | "
                     f"{r['comm_fraction']:.1%} |")
    (out / f"scale_{tag}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpus", default="1,2", help="comma-separated GPU counts (default 1,2)")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--checkpoint", action=argparse.BooleanOptionalAction, default=True,
                   help="activation checkpointing per layer (default on: memory is one layer's, not the stack's)")
    p.add_argument("--point-timeout", type=int, default=240, help="seconds per (GPUs, length) point")
    p.add_argument("--out", type=Path, default=Path("examples/results"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke test on gloo processes")
    p.add_argument("--card", help="the card's name in the results (default: the GPU's)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        try:
            return worker(args)
        except BaseException:
            Path(f"{args.json}.err{os.environ.get('RANK', '0')}").write_text(traceback.format_exc())
            raise
    gpus = [int(g) for g in args.gpus.split(",")]
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/scale.py needs CUDA GPUs (or --device cpu for a smoke test)")
        if max(gpus) > torch.cuda.device_count():
            raise SystemExit(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} GPUs")
    cmd = "python benchmarks/scale.py " + " ".join(sys.argv[1:] if argv is None else argv)
    card = args.card or (torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
    records = []
    for g in gpus:
        for T in sorted(int(n) for n in args.lengths.split(",")):
            if g == 1 and any(r["gpus"] == 1 and r.get("oom") for r in records):
                records.append(dict(gpus=1, seq_len=T, oom=True, skipped="a shorter length ran out of memory"))
                continue
            r = run_point(g, T, args)
            records.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "implementations"}), flush=True)
            add_efficiency(records)
            write(records, args.out, card, cmd, args)  # after every point: a later timeout loses nothing


if __name__ == "__main__":
    main()
