"""FSDP2 for the example GPT: `fully_shard` on each block, then on the root, and checkpoints that stay
the trainer's one safetensors format.

Sharding. `torch.distributed.fsdp.fully_shard` (FSDP2, DTensor parameters sharded on dim 0 over a 1-D
mesh of all ranks) wraps every transformer block, so one block's parameters are gathered at a time,
and then the root, which holds the tied embedding and the final norm. Parameter names do not change.
A mixed precision policy (`param_dtype="bf16"`: bf16 parameters in forward/backward, gradients
reduced in fp32, fp32 master weights in the optimizer) is optional; fp32 is the default on the CPU.

Checkpoints. torch.distributed.checkpoint (DCP) is used for its state-dict API only:
`get_state_dict(..., full_state_dict=True, cpu_offload=True)` gathers the full model and optimizer state
onto rank 0's CPU, which writes it with `checkpoint.save_checkpoint_state`, the same atomic writer as a
single process (temp folder, fsync, one swap, save stamps): an FSDP checkpoint resumes under FSDP, DDP
or a single process, at any world size, and `load_model` / `examples/sample.py` read it. Resuming, every
rank reads that checkpoint and `set_state_dict(..., full_state_dict=True)` keeps its own shard (tensors
are broadcast from rank 0).

Not used, on purpose:
- DCP's default storage (`dcp.save` / `FileSystemWriter`) writes its `.metadata` file with `pickle` and
  `FileSystemReader.read_metadata` reads it back with a plain `pickle.load` (torch 2.11 to 2.13); non-tensor
  entries go through `torch.save`. This project never unpickles a file.
- `StateDictOptions(broadcast_from_rank0=True)` sends the state dict's structure with
  `broadcast_object_list`, which pickles.
- DCP's safetensors storage (`HuggingFaceStorageWriter`/`Reader`, no pickle) holds tensors only: the
  optimizer's parameter groups would need a second format beside it, and its files have no room for
  the save stamps that let a resume check that all parts come from one save.
The cost of the full-state route: rank 0 holds one full copy of model + optimizer state in CPU memory
while saving, and each rank while resuming. That is nothing for the example GPT; a model too large for
that would need a sharded safetensors format.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

PARAM_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # None: keep the parameters' own dtype


def shard_model(model: nn.Module, device_type: str, world: int, param_dtype: str = "fp32") -> nn.Module:
    """fully_shard each block of `model.blocks`, then the root (in place; returns `model`)."""
    if param_dtype not in PARAM_DTYPES:
        raise ValueError(f"FSDP param_dtype = {param_dtype!r}; choose one of {list(PARAM_DTYPES)}")
    mesh = init_device_mesh(device_type, (world,))
    dtype = PARAM_DTYPES[param_dtype]
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def gather_full_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, optimizer state dict) in full on rank 0's CPU, as a single process's `model.state_dict()`
    and `optimizer.state_dict()` give them; empty dicts on the other ranks. Every rank must call it."""
    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not weights:
        return {}, {}
    return weights, _numbered(optim, _param_names(model, optimizer))


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Load a full (unsharded) state, as `gather_full_state` returns it, into the sharded model and
    optimizer: each rank keeps its shard. Every rank must call it with the full state."""
    set_state_dict(
        model,
        optimizer,
        model_state_dict=weights,
        optim_state_dict=_named(optimizer_state, _param_names(model, optimizer)),
        options=StateDictOptions(full_state_dict=True),
    )


def local_and_total_elements(model: nn.Module) -> tuple[int, int]:
    """(parameter elements this rank holds, elements of the whole model)."""
    params = list(model.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    return local, sum(p.numel() for p in params)


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, in the order `optimizer.state_dict()` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _numbered(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter name (DCP's form) -> keyed by number (torch.optim's)."""
    number = {n: i for i, n in enumerate(names)}
    return {
        "state": {number[n]: entry for n, entry in state["state"].items()},
        "param_groups": [{**g, "params": [number[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def _named(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of `_numbered`."""
    return {
        "state": {names[int(i)]: entry for i, entry in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
