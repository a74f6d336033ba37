"""Typed attention configs: from a dataclass, a dict, or a YAML file (safe_load only).

Every variant has a dataclass subclass of `AttentionConfig`. Unknown fields, unknown variants and bad
values raise `ConfigError` naming the valid choices. `shape: m3` (or m2) pulls a layer shape from
configs/shapes/ and explicit keys override it.

`CheckedConfig` is the validation every config dataclass shares (the attention configs and the example
GPT's model, data and train configs): field types from the annotations, finite numbers, and the
CHOICES / POSITIVE / NON_NEGATIVE each class declares.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import yaml


class ConfigError(ValueError):
    pass


class CheckedConfig:
    """Shared validation of config dataclasses; subclasses declare their rules as class attributes."""

    LABEL: ClassVar[str | None] = None  # how messages name the config (default: the class name)
    # field name -> allowed values; fields that must be > 0 / >= 0 (None passes: "use the default")
    CHOICES: ClassVar[dict[str, tuple]] = {}
    POSITIVE: ClassVar[tuple[str, ...]] = ()
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ()

    def check_fields(self) -> None:
        owner = type(self).LABEL or type(self).__name__
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            _check_type(owner, f.name, getattr(self, f.name), hints[f.name])
        for name, allowed in self.all_choices().items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{owner}.{name} = {getattr(self, name)!r}; choose one of {list(allowed)}")
        for name in self.all_positive():
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{owner}.{name} must be > 0, got {value!r}")
        for name in self.all_non_negative():
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{owner}.{name} must be >= 0, got {value!r}")

    @classmethod
    def all_choices(cls) -> dict[str, tuple]:
        merged: dict[str, tuple] = {}
        for klass in reversed(cls.__mro__):
            merged.update(getattr(klass, "CHOICES", {}) if "CHOICES" in vars(klass) else {})
        return merged

    @classmethod
    def all_positive(cls) -> tuple[str, ...]:
        return cls._declared_names("POSITIVE")

    @classmethod
    def all_non_negative(cls) -> tuple[str, ...]:
        return cls._declared_names("NON_NEGATIVE")

    @classmethod
    def _declared_names(cls, attr: str) -> tuple[str, ...]:
        """The field names each class of the MRO declares in its own `attr` tuple."""
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            if attr in vars(klass):
                names.extend(vars(klass)[attr])
        return tuple(names)


@dataclass
class AttentionConfig(CheckedConfig):
    variant: str = "dense"
    d_model: int = 256
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 32
    rope_theta: float = 10000.0
    backend: str = "auto"

    POSITIVE: ClassVar[tuple[str, ...]] = ("d_model", "n_heads", "n_kv_heads", "head_dim", "rope_theta")
    # backend field -> the ops it drives. A backend names the implementation of every op of its field
    # that offers it; the field's other ops choose by `auto` (ops.implementations_used() shows what
    # ran). Its choices are "auto" plus the union of those ops' implementations.
    BACKEND_OPS: ClassVar[dict[str, tuple[str, ...]]] = {"backend": ("dense_attention",)}

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        self.check_fields()
        if self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"{type(self).__name__}.head_dim must be even (RoPE rotates pairs of dims), "
                              f"got {self.head_dim}")
        self.check_backends()

    @classmethod
    def all_choices(cls) -> dict[str, tuple]:
        from . import ops

        merged = {name: ("auto", *dict.fromkeys(impl for op in op_names for impl in ops.op(op).implementations))
                  for name, op_names in cls.BACKEND_OPS.items()}
        return {**merged, **super().all_choices()}

    def op_params(self, op: str) -> dict[str, Any]:
        """The static arguments this config passes to `op`, for the implementations' `supports` rules."""
        return {}

    def backend_for(self, op: str) -> str:
        """The backend to request from `op`: its field's value where the op offers it, else "auto"."""
        from . import ops

        for name, op_names in self.BACKEND_OPS.items():
            if op in op_names:
                backend = getattr(self, name)
                return backend if backend in ops.op(op).implementations else "auto"
        return "auto"

    def check_backends(self) -> None:
        """Every explicitly named backend must be able to run this config's static shapes, by the same
        `supports` rules `auto` uses at run time."""
        from . import ops
        from .ops.dispatch import Request

        for name, op_names in self.BACKEND_OPS.items():
            backend = getattr(self, name)
            if backend == "auto":
                continue
            for op_name in op_names:
                op = ops.op(op_name)
                if backend in op.implementations:
                    why = op.reason(backend, Request(params=self.op_params(op_name)))
                    if why is not None:
                        raise ConfigError(f"{type(self).__name__}.{name} = {backend!r} cannot run {op_name}: {why}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "AttentionConfig":
        return dataclasses.replace(self, **changes)


def from_known_fields(cls: type, data: dict[str, Any], section: str):
    """cls(**data) for a config dataclass; unknown keys raise a ConfigError naming them and the valid fields."""
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown {section} field(s) {unknown}; valid fields: {names}")
    return cls(**data)


def _check_type(owner: str, name: str, value: Any, hint: Any) -> None:
    if not _matches(value, hint):
        raise ConfigError(f"{owner}.{name} must be {_type_name(hint)}, got {value!r}")
    if not _finite(value):
        raise ConfigError(f"{owner}.{name} must be finite, got {value!r}")


def _union_args(hint: Any) -> tuple | None:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else None


def _matches(value: Any, hint: Any) -> bool:
    """Whether value fits the annotation (ints pass for floats, bools for neither; container items too)."""
    if hint is Any:
        return True
    if _union_args(hint) is not None:
        return any(_matches(value, t) for t in _union_args(hint))
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value if args)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1])
                                               for k, v in value.items() if args)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if _union_args(hint) is not None:
        return " or ".join(_type_name(t) for t in _union_args(hint))
    if hint is type(None):
        return "None"
    if typing.get_origin(hint) is not None:  # list[int], dict[str, Any], ...
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere in a number, list or mapping."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a YAML mapping, got {type(data).__name__}")
    return data


def shape_names() -> list[str]:
    folder = resources.files("sparsezoo.configs.shapes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_shape(name: str) -> dict[str, Any]:
    if name not in shape_names():
        raise ConfigError(f"unknown layer shape {name!r}; choose one of {shape_names()}")
    text = resources.files("sparsezoo.configs.shapes").joinpath(f"{name}.yaml").read_text()
    data = yaml.safe_load(text)
    data.pop("description", None)
    return data


def packaged_config(name: str | Path) -> Path | None:
    """A bare name that is no file names a packaged config, if there is one: "msa" is configs/msa.yaml
    (CPU-scaled), "published/csa_v4_flash" configs/published/csa_v4_flash.yaml (the published size)."""
    parts = Path(name).parts
    if Path(name).is_file() or Path(name).suffix or len(parts) > 2 or (len(parts) == 2 and parts[0] != "published"):
        return None
    folder = resources.files("sparsezoo.configs.published" if len(parts) == 2 else "sparsezoo.configs")
    path = folder.joinpath(f"{parts[-1]}.yaml")
    return Path(str(path)) if path.is_file() else None


def packaged_config_names() -> list[str]:
    """Every packaged config name create_attention takes: "msa", ..., "published/<name>"."""
    folder = resources.files("sparsezoo.configs")
    names = sorted(p.name[:-5] for p in folder.iterdir()
                   if p.name.endswith(".yaml") and "variant" in (yaml.safe_load(p.read_text()) or {}))
    return names + published_config_names()


def published_config_names() -> list[str]:
    """The packaged configs at published sizes, as names create_attention takes ("published/<name>")."""
    folder = resources.files("sparsezoo.configs.published")
    return sorted(f"published/{p.name[:-5]}" for p in folder.iterdir() if p.name.endswith(".yaml"))


def normalize(config: Any) -> dict[str, Any] | AttentionConfig:
    """A YAML path, a dict or a dataclass -> a dict with shapes resolved, or the dataclass itself."""
    if isinstance(config, AttentionConfig):
        return config
    if isinstance(config, (str, Path)):
        path = packaged_config(config)
        if path is None and not Path(config).is_file() and not Path(config).suffix:
            raise ConfigError(f"no config file and no packaged config named {str(config)!r}; packaged: "
                              f"{packaged_config_names()} (or a YAML path, a dict, an AttentionConfig)")
        config = read_yaml(path or config)
    if not isinstance(config, dict):
        raise ConfigError(f"a config is a YAML path, a dict or an AttentionConfig, got {type(config).__name__}")
    config = dict(config)
    shape = config.pop("shape", None)
    if shape is not None:
        config = {**load_shape(shape), **config}
    return config


def build_config(config_class: type[AttentionConfig], data: dict[str, Any]) -> AttentionConfig:
    unknown = sorted(set(data) - set(config_class.field_names()))
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown} for variant {data.get('variant')!r}; "
                          f"valid fields: {config_class.field_names()}")
    return config_class(**data)
