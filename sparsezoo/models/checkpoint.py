"""Checkpoints: safetensors weights + a YAML config beside them (never pickle).

A checkpoint folder holds
    model.safetensors    the model weights
    config.yaml          the run config (its `model:` section rebuilds the GPT)
    train_state.*        optional: optimizer tensors (safetensors) + step/history (JSON), for resuming

`load_weights` loads what matches and reports the rest, so a dense checkpoint can seed an MSA model:
the index-branch weights come back as `missing` (new), never silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from .gpt import GPT, GPTConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
OPTIM_TENSORS = "train_state.safetensors"
TRAIN_STATE = "train_state.json"


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint (kept as initialised)
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model (not loaded)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (name, checkpoint, model shape)

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        if self.missing:
            lines.append(f"missing from the checkpoint (new, left as initialised): {len(self.missing)}")
            lines += [f"  + {n}" for n in self.missing]
        if self.unexpected:
            lines.append(f"unexpected in the checkpoint (not used by this model): {len(self.unexpected)}")
            lines += [f"  - {n}" for n in self.unexpected]
        if self.mismatched:
            lines.append(f"shape mismatch (not loaded): {len(self.mismatched)}")
            lines += [f"  ! {n}: checkpoint {list(a)} vs model {list(b)}" for n, a, b in self.mismatched]
        return "\n".join(lines)


def save_weights(model: nn.Module, path: str | Path) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})


def load_weights(model: nn.Module, path: str | Path, strict: bool = False) -> LoadReport:
    """Copy every checkpoint tensor whose name and shape match into `model`; report the rest.

    strict=True raises on anything missing, unexpected or mismatched.
    """
    model = unwrap(model)
    saved = load_file(str(path))
    own = model.state_dict()
    report = LoadReport()
    matched = {}
    for name, tensor in saved.items():
        if name not in own:
            report.unexpected.append(name)
        elif tuple(tensor.shape) != tuple(own[name].shape):
            report.mismatched.append((name, tuple(tensor.shape), tuple(own[name].shape)))
        else:
            matched[name] = tensor
            report.loaded.append(name)
    report.missing = [n for n in own if n not in saved]
    if strict and not report.exact:
        raise ValueError(f"checkpoint {path} does not match the model exactly:\n{report}")
    model.load_state_dict(matched, strict=False)
    return report


def save_checkpoint(folder: str | Path, model: nn.Module, run_config: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None, train_state: dict[str, Any] | None = None) -> Path:
    """Write weights, config and (optionally) the resumable training state; files are replaced atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic(folder / WEIGHTS, lambda p: save_weights(model, p))
    _atomic(folder / CONFIG, lambda p: p.write_text(yaml.safe_dump(run_config, sort_keys=False)))
    if optimizer is not None:
        tensors, rest = _split_optimizer_state(optimizer.state_dict())
        _atomic(folder / OPTIM_TENSORS, lambda p: save_file(tensors, str(p)))
        state = {**(train_state or {}), "optimizer": rest}
        _atomic(folder / TRAIN_STATE, lambda p: p.write_text(json.dumps(state)))
    return folder


def load_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG} in checkpoint folder {folder}")
    return yaml.safe_load(path.read_text())


def load_model(folder: str | Path, model_overrides: dict[str, Any] | None = None, strict: bool | None = None,
               device: str | torch.device = "cpu") -> tuple[GPT, LoadReport]:
    """Rebuild the GPT a checkpoint folder describes (with optional config changes, e.g. another
    attention variant) and load its weights. strict defaults to True when nothing is overridden."""
    model_cfg = {**load_config(folder)["model"], **(model_overrides or {})}
    model = GPT(GPTConfig.from_dict(model_cfg)).to(device)
    strict = not model_overrides if strict is None else strict
    return model, load_weights(model, Path(folder) / WEIGHTS, strict=strict)


def load_train_state(folder: str | Path, optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    """The saved train state (step, history, ...), restoring the optimizer in place; None if absent."""
    folder = Path(folder)
    if not (folder / TRAIN_STATE).is_file():
        return None
    state = json.loads((folder / TRAIN_STATE).read_text())
    rest = state.pop("optimizer")
    if optimizer is not None:
        # load_state_dict moves each tensor where its parameter lives (and keeps `step` where it belongs)
        tensors = load_file(str(folder / OPTIM_TENSORS))
        optimizer.load_state_dict(_join_optimizer_state(tensors, rest))
    return state


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


# -- optimizer state <-> (tensors, JSON) ---------------------------------------------------------
def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars,
                     "ids": [str(pid) for pid in state["state"]]}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(rest["scalars"].get(pid, {})) for pid in rest["ids"]}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state[int(pid)][name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)
