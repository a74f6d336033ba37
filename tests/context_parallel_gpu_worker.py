"""Run under torchrun on 2 GPUs (NCCL) by tests/test_context_parallel_gpu.py: MSA and dense layers in
bf16 with their fast paths (`auto`), a sequence split over the ranks against the whole sequence on one
GPU; writes the relative errors of outputs, input gradients, parameter gradients and aux losses."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import sparsezoo
from sparsezoo.context_parallel import ContextParallel
from sparsezoo.ops.dispatch import track_implementations

out_dir = Path(sys.argv[1])
local = int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local)
dist.init_process_group("nccl", device_id=torch.device("cuda", local))
rank = dist.get_rank()
prefetch = dist.new_group(list(range(dist.get_world_size())))
SHAPE = dict(d_model=512, n_heads=16, n_kv_heads=2, head_dim=64)
CASES = {"msa": dict(variant="msa", block_size=64, topk=4, index_dim=64), "dense": dict(variant="dense")}


def rel(a, b) -> float:
    if a is None and b is None:
        return 0.0
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def summed(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


results = {}
for name, config in CASES.items():
    for T in (8192, 6000):  # 6000: uneven chunks that cut through the 64-token blocks
        torch.manual_seed(0)
        layer = sparsezoo.create_attention({**config, **SHAPE}).cuda().to(torch.bfloat16).train()
        g = torch.Generator(device="cuda").manual_seed(1)
        x = torch.randn(1, T, SHAPE["d_model"], device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(x.shape, device="cuda", dtype=torch.bfloat16, generator=g)
        cp = ContextParallel(T, prefetch_group=prefetch)
        params = list(layer.parameters())

        def run(xx, ww, **kw):
            xx = xx.clone().requires_grad_(True)
            y = layer(xx, **kw)
            aux = layer.aux_loss
            loss = (y.float() * ww.float()).sum() + (aux.float() if aux is not None else 0.0)
            gx, *gp = torch.autograd.grad(loss, [xx, *params], materialize_grads=True)
            return y, aux, gx, gp

        y, aux, gx, gp = run(x, w)
        with track_implementations() as used:
            y_cp, aux_cp, gx_cp, gp_cp = run(cp.shard(x), cp.shard(w), context_parallel=cp)
        results[f"{name}/T{T}"] = {
            "out": rel(y_cp, cp.shard(y)), "grad_x": rel(gx_cp, cp.shard(gx)),
            "grad_params": max(rel(summed(a.float()), b.float()) for a, b in zip(gp_cp, gp)),
            "aux": 0.0 if aux is None else rel(summed(aux_cp.float()), aux.float()),
            "implementations": used,
        }
(out_dir / f"rank{rank}.json").write_text(json.dumps(results))
dist.barrier()
dist.destroy_process_group()
