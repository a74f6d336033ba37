"""Checkpoints: safetensors weights + a YAML config beside them (never pickle).

A checkpoint folder holds
    model.safetensors    the model weights
    config.yaml          the run config (its `model:` section rebuilds the GPT)
    train_state.*        optional: optimizer tensors (safetensors) + step/history (JSON), for resuming

`load_weights` loads what matches and reports the rest, so a dense checkpoint can seed an MSA model:
the index-branch weights come back as `missing` (new), never silently ignored.

A save is one unit: the files go into a fresh temporary folder beside the checkpoint, are fsynced, and
the folder is swapped in by renames (old -> backup, new -> checkpoint, backup removed). A reader sees
the old checkpoint or the new one, never a mix; an interrupted save leaves the old one loadable. Each
part records the save's id and step, and resuming checks that they agree. A sharded (FSDP) run gathers
its full state on rank 0 and writes this same format (`save_checkpoint_state`, sparsezoo/models/fsdp.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sparsezoo.config import ConfigError

from .gpt import GPT, GPTConfig

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
OPTIM_TENSORS = "train_state.safetensors"
TRAIN_STATE = "train_state.json"
PARTS = (WEIGHTS, CONFIG, OPTIM_TENSORS, TRAIN_STATE)
STAMP = "_checkpoint"  # train_state.json key holding the save's id and step

log = logging.getLogger("sparsezoo.checkpoint")


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint (kept as initialised)
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model (not loaded)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (name, checkpoint, model shape)
    cast: list[tuple[str, torch.dtype, torch.dtype]] = field(default_factory=list)  # loaded with another float dtype

    @property
    def exact(self) -> bool:
        """Every tensor matched by name and shape (a float dtype cast, listed in `cast`, still counts)."""
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
        if self.cast:
            lines.append(f"cast to the model's dtype: {len(self.cast)}")
            lines += [f"  ~ {n}: {a} -> {b}" for n, a, b in self.cast]
        return "\n".join(lines)


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    _save_tensors(unwrap(model).state_dict(), path, metadata)


def _save_tensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(path), metadata={"format": "pt", **(metadata or {})})


def load_weights(model: nn.Module, path: str | Path, strict: bool = False) -> LoadReport:
    """Copy every checkpoint tensor whose name and shape match into `model`; report the rest.

    strict=True raises on anything missing, unexpected or mismatched. A non-floating tensor for a floating
    one (or the reverse) always raises; another float dtype (bf16 into fp32) is cast and listed in `cast`.
    """
    return _load_state(model, load_file(str(path)), path, strict)


def _load_state(model: nn.Module, saved: dict[str, torch.Tensor], path: str | Path, strict: bool) -> LoadReport:
    model = unwrap(model)
    matched, report = match_state(model.state_dict(), saved, path, strict)
    model.load_state_dict(matched, strict=False)
    return report


def match_state(own: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], path: str | Path,
                strict: bool) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The saved tensors that fit `own` (a model's state dict) by name and shape, and the report on the
    rest; raises as `load_weights` does. Loads nothing (a sharded model loads its own way)."""
    report = LoadReport()
    matched, wrong_kind = {}, []
    for name, tensor in saved.items():
        if name not in own:
            report.unexpected.append(name)
        elif tuple(tensor.shape) != tuple(own[name].shape):
            report.mismatched.append((name, tuple(tensor.shape), tuple(own[name].shape)))
        elif tensor.is_floating_point() != own[name].is_floating_point():
            wrong_kind.append(f"{name} ({tensor.dtype} in the checkpoint, {own[name].dtype} in the model)")
        else:
            matched[name] = tensor
            report.loaded.append(name)
            if tensor.dtype != own[name].dtype:
                report.cast.append((name, tensor.dtype, own[name].dtype))
    if wrong_kind:
        raise ValueError(f"checkpoint {path}: floating and non-floating tensors do not convert: {wrong_kind}")
    report.missing = [n for n in own if n not in saved]
    if strict and not report.exact:
        raise ValueError(f"checkpoint {path} does not match the model exactly:\n{report}")
    return matched, report


def save_checkpoint(folder: str | Path, model: nn.Module, run_config: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None, train_state: dict[str, Any] | None = None) -> Path:
    """Write weights, config and (optionally) the resumable training state as one unit (module doc).

    `folder` is replaced as a whole, so it may hold only checkpoint files (anything else raises).
    """
    return save_checkpoint_state(folder, unwrap(model).state_dict(), run_config,
                                 None if optimizer is None else optimizer.state_dict(), train_state)


def save_checkpoint_state(folder: str | Path, weights: dict[str, torch.Tensor], run_config: dict[str, Any],
                          optimizer_state: dict[str, Any] | None = None,
                          train_state: dict[str, Any] | None = None) -> Path:
    """`save_checkpoint` from state dicts already in hand: `weights` as `model.state_dict()` gives them,
    `optimizer_state` as `optimizer.state_dict()` does (parameters numbered in the optimizer's order).
    A sharded (FSDP) run gathers both on one rank and saves through here, so its checkpoint is the
    same as a single process's."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _restore_backup(folder)
    _check_replaceable(folder)
    stamp = {"save_id": uuid.uuid4().hex}
    if train_state is not None and "step" in train_state:
        stamp["step"] = str(train_state["step"])
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        _save_tensors(weights, tmp / WEIGHTS, stamp)
        (tmp / CONFIG).write_text(yaml.safe_dump(run_config, sort_keys=False))
        if optimizer_state is not None:
            tensors, rest = _split_optimizer_state(optimizer_state)
            save_file(tensors, str(tmp / OPTIM_TENSORS), metadata=stamp)
            (tmp / TRAIN_STATE).write_text(json.dumps({**(train_state or {}), "optimizer": rest, STAMP: stamp}))
        for part in tmp.iterdir():
            _fsync(part)
        _fsync(tmp)
        _swap_in(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless the save failed
    return folder


def load_config(folder: str | Path) -> dict[str, Any]:
    """The run config a checkpoint was saved with (a mapping; anything else raises a ConfigError)."""
    path = _readable(folder) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG} in checkpoint folder {folder}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a YAML mapping (sections model, data, train), got {config!r}")
    return config


def load_model(folder: str | Path, model_overrides: dict[str, Any] | None = None, strict: bool | None = None,
               device: str | torch.device = "cpu") -> tuple[GPT, LoadReport]:
    """Rebuild the GPT a checkpoint folder describes (with optional config changes, e.g. another
    attention variant) and load its weights. strict defaults to True when nothing is overridden."""
    config, saved = _read_as_one(folder, lambda d: (load_config(d), load_file(str(d / WEIGHTS))))
    path = Path(folder) / CONFIG
    if not isinstance(config.get("model"), dict):
        raise ConfigError(f"{path} needs a `model:` mapping (the GPTConfig fields), got {config.get('model')!r}")
    try:
        model_cfg = GPTConfig.from_dict({**config["model"], **(model_overrides or {})})
    except ConfigError as e:
        raise ConfigError(f"{path}{f' with overrides {model_overrides}' if model_overrides else ''}: {e}") from None
    model = GPT(model_cfg).to(device)
    strict = not model_overrides if strict is None else strict
    return model, _load_state(model, saved, Path(folder) / WEIGHTS, strict)


def load_train_state(folder: str | Path, optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    """The saved train state (step, history, ...), restoring the optimizer in place; None if absent."""
    if not (_readable(folder) / TRAIN_STATE).is_file():
        return None
    state, (tensors, meta) = _read_as_one(folder, lambda d: (_read_train_state(d), _read_safetensors(d / OPTIM_TENSORS)))
    _check_one_save(folder, {"optimizer": meta, "train state": state.pop(STAMP, None)})
    _restore_optimizer(optimizer, tensors, state.pop("optimizer"))
    return state


def load_resume_state(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Resume: weights (strict), optimizer and train state, checked to come from one save."""
    weights, optimizer_state, state = read_resume_state(folder)
    _load_state(model, weights, Path(folder) / WEIGHTS, strict=True)
    if optimizer is not None:
        # load_state_dict moves each tensor where its parameter lives (and keeps `step` where it belongs)
        optimizer.load_state_dict(optimizer_state)
    return state


def read_resume_state(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(weights, optimizer state dict, train state) of a resumable checkpoint, checked to come from one
    save; loads nothing. The optimizer state dict numbers parameters as `optimizer.state_dict()` does."""
    if not (_readable(folder) / TRAIN_STATE).is_file():
        raise FileNotFoundError(f"no resumable checkpoint in {folder} (no {TRAIN_STATE})")
    (weights, w_meta), state, (tensors, o_meta) = _read_as_one(folder, lambda d: (
        _read_safetensors(d / WEIGHTS), _read_train_state(d), _read_safetensors(d / OPTIM_TENSORS)))
    _check_one_save(folder, {"weights": w_meta, "optimizer": o_meta, "train state": state.pop(STAMP, None)})
    return weights, _join_optimizer_state(tensors, state.pop("optimizer")), state


def _read_train_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / TRAIN_STATE).read_text())


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def _restore_optimizer(optimizer, tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    if optimizer is not None:
        # load_state_dict moves each tensor where its parameter lives (and keeps `step` where it belongs)
        optimizer.load_state_dict(_join_optimizer_state(tensors, rest))


def _check_one_save(folder, stamps: dict[str, dict | None]) -> None:
    """Every part must carry the same save id (a checkpoint from before stamps carries none)."""
    ids = {part: (s or {}).get("save_id") for part, s in stamps.items()}
    if not any(ids.values()):
        log.warning("checkpoint %s predates save stamps: cannot check that its parts belong together", folder)
        return
    if len(set(ids.values())) > 1:
        parts = ", ".join(f"{part} from step {(s or {}).get('step', 'unknown')}" for part, s in stamps.items())
        raise ValueError(f"checkpoint {folder} mixes parts of different saves ({parts}); it cannot be resumed "
                         f"safely: restore a whole checkpoint or start afresh")


# -- the swap ------------------------------------------------------------------------------------
def _backups(folder: Path) -> list[Path]:
    """Backups a save left behind when interrupted between its two renames (newest last)."""
    return sorted(folder.parent.glob(f".{folder.name}.old-*"), key=lambda p: p.stat().st_mtime_ns)


def _restore_backup(folder: Path) -> None:
    """Writer side: put back the checkpoint an interrupted swap left as a backup; drop stale backups."""
    backups = _backups(folder)
    if backups and not folder.exists():
        os.replace(backups.pop(), folder)
    for stale in backups:
        shutil.rmtree(stale, ignore_errors=True)


def _readable(folder: str | Path) -> Path:
    """Reader side: `folder`, or the backup of an interrupted swap while `folder` is missing."""
    folder = Path(folder)
    backups = [] if folder.exists() else _backups(folder)
    return backups[-1] if backups else folder


def _read_as_one(folder: str | Path, read):
    """read(dir) with every file from one save: read again when a save swapped the folder meanwhile."""
    for _ in range(10):
        where = _readable(folder)
        before = _identity(where)
        result = read(where)
        if _identity(_readable(folder)) == before:
            return result
    raise RuntimeError(f"checkpoint {folder} kept changing while being read")


def _identity(path: Path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _check_replaceable(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"checkpoint path {folder} is a file, not a folder")
    others = sorted(p.name for p in folder.iterdir() if p.name not in PARTS and not _legacy_tmp(p.name)) \
        if folder.exists() else []
    if others:
        raise ValueError(f"refusing to replace checkpoint folder {folder}: it holds {others} besides checkpoint "
                         f"files {list(PARTS)}; save elsewhere or move them")


def _legacy_tmp(name: str) -> bool:
    return name.endswith(".tmp") and name[:-4] in PARTS  # left by saves that renamed file by file


def _swap_in(new: Path, folder: Path) -> None:
    """Rename `new` to `folder`, keeping the old folder as a backup until the new one is in place."""
    backup = None
    if folder.exists():
        backup = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex}")
        os.replace(folder, backup)
    try:
        os.replace(new, folder)
    except BaseException:
        if backup is not None and not folder.exists():
            os.replace(backup, folder)
        raise
    _fsync(folder.parent)
    if backup is not None:
        shutil.rmtree(backup)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
