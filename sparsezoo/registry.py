"""Variant registry: one decorator in the variant's own file; no central list to edit."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from .config import AttentionConfig, ConfigError, build_config, normalize

_VARIANTS: dict[str, type] = {}
_loaded = False


def register_variant(name: str):
    """Class decorator: `@register_variant("msa")` on an AttentionLayer subclass with a config_class."""

    def wrap(cls):
        if name in _VARIANTS and _VARIANTS[name] is not cls:
            raise ValueError(f"variant {name!r} is registered twice ({_VARIANTS[name].__qualname__} and {cls.__qualname__})")
        config_class = getattr(cls, "config_class", None)
        if config_class is None or not issubclass(config_class, AttentionConfig):
            raise TypeError(f"{cls.__qualname__} needs a config_class subclassing AttentionConfig")
        cls.variant_name = name
        _VARIANTS[name] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    """Import every module of sparsezoo.variants once, so their decorators run."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    package = importlib.import_module("sparsezoo.variants")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"sparsezoo.variants.{info.name}")


def list_variants() -> list[str]:
    _load_builtin()
    return sorted(_VARIANTS)


def context_parallel_variants() -> list[str]:
    """The variants whose layers run a context-parallel forward (`sparsezoo.context_parallel`)."""
    _load_builtin()
    return sorted(n for n, cls in _VARIANTS.items() if cls.supports_context_parallel)


def variant_class(name: str) -> type:
    _load_builtin()
    if name not in _VARIANTS:
        raise ConfigError(f"unknown variant {name!r}; choose one of {sorted(_VARIANTS)}")
    return _VARIANTS[name]


def make_config(config: Any, **overrides) -> AttentionConfig:
    """A YAML path, dict or dataclass (plus keyword overrides) -> the variant's typed config."""
    data = normalize(config)
    if isinstance(data, AttentionConfig):
        cls = variant_class(data.variant)
        if not isinstance(data, cls.config_class):
            raise ConfigError(f"variant {data.variant!r} needs a {cls.config_class.__name__}, got {type(data).__name__}")
        if overrides:
            return data.replace(**overrides)
        data.validate()  # a dataclass may have been changed since it was built
        return data
    data = {**data, **overrides}
    if "variant" not in data:
        raise ConfigError(f"a config must name its 'variant'; choose one of {list_variants()}")
    return build_config(variant_class(data["variant"]).config_class, data)


def create_attention(config: Any, **overrides):
    """Build the attention module a config names. See `list_variants()` for the choices."""
    cfg = make_config(config, **overrides)
    return variant_class(cfg.variant)(cfg)
