"""Which tensors are live at the peak of one training step of benchmarks/scale.py's MSA stack.

    torchrun --standalone --nproc-per-node 1 benchmarks/memory_trace.py 65536    # one GPU, plain layers
    torchrun --standalone --nproc-per-node 2 benchmarks/memory_trace.py 131072   # two GPUs, context parallel

One warm-up step, then one step under torch.cuda.memory._record_memory_history. Rank 0 replays the trace's
allocations and frees, takes the set of live blocks at the largest total, and prints them grouped by the
sparsezoo/benchmark frames that allocated them, in KB per local token.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sparsezoo  # noqa: E402
from scale import MSA_M3, Stack  # noqa: E402

OWN = ("sparsezoo", "scale", "memory_trace")


def where(block: dict) -> str:
    frames = [f for f in block.get("frames", []) if any(s in f["filename"] for s in OWN)]
    return " <- ".join(f"{os.path.basename(f['filename'])}:{f['line']}:{f['name']}" for f in frames[:4])


def live_at_peak(trace: list[dict]) -> tuple[int, dict]:
    live, total, best, best_set = {}, 0, 0, {}
    for ev in trace:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            total += ev["size"]
            if total > best:
                best, best_set = total, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])["size"]
    return best, best_set


def main() -> None:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    world = dist.get_world_size()
    T = int(sys.argv[1])
    cp = sparsezoo.ContextParallel(T, prefetch_group=dist.new_group(list(range(world)))) if world > 1 else None
    torch.manual_seed(0)
    model = Stack(2, 1024, MSA_M3, True).cuda().to(torch.bfloat16).train()
    x = torch.randn(1, cp.local_len if cp else T, 1024, device="cuda", dtype=torch.bfloat16)

    def step():
        out = model(x, cp)
        (out.float().square().sum() / (T * 1024) + sparsezoo.aux_loss(model)).backward()
        model.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=200000)
    step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    if dist.get_rank() == 0:
        n = x.shape[1]
        peak = torch.cuda.max_memory_allocated()
        print(f"T={T} ranks={world} local tokens={n} before the step {base / 2**30:.2f} GiB, peak {peak / 2**30:.2f} "
              f"GiB ({(peak - base) / n / 1024:.1f} KB per local token above it)")
        best, blocks = live_at_peak(snapshot["device_traces"][local])
        print(f"largest total allocated during the traced step: {best / 2**30:.2f} GiB")
        size, count = collections.Counter(), collections.Counter()
        for b in blocks.values():
            size[where(b)] += b["size"]
            count[where(b)] += 1
        for w, s in size.most_common(25):
            print(f"{s / n / 1024:8.1f} KB/token  x{count[w]:3d}  {w}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
