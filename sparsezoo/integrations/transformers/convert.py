"""`convert`: swap the self-attention of a Llama-family transformers model for a sparsezoo variant, in place.

    model = convert(model, "msa", layers=[2, 3], block_size=64, topk=8)
    print(model.sparsezoo_conversion)          # what was reused, what is new

The variant's config takes the model's dims (hidden size, heads, KV heads, head dim, RoPE theta) from
the model; `variant` is a registered name (the variant's dataclass defaults), a dict, a YAML file or a
config dataclass, and `overrides` set its other fields. Each chosen layer keeps its q/k/v/o weights,
norms and the model's RoPE (`SparseSelfAttention`); the variant's new weights are initialised by the
variant and listed in the report, as the dense -> msa checkpoint load lists them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

import sparsezoo
from sparsezoo import AttentionConfig, ConfigError

from .attention import SparseSelfAttention, attention_core, model_rotary_function

SUPPORTED_MODELS = ("llama", "mistral", "qwen2", "qwen3")
MODEL_DIMS = ("d_model", "n_heads", "n_kv_heads", "head_dim", "rope_theta")

log = logging.getLogger("sparsezoo.transformers")


@dataclass
class ConversionReport:
    variant: str
    layers: list[int]
    reused: list[str] = field(default_factory=list)  # the model's tensors the converted layers keep
    new: list[str] = field(default_factory=list)  # the variant's own, initialised by the variant

    def __str__(self) -> str:
        lines = [f"{self.variant} on layers {self.layers}: reused {len(self.reused)} tensors of the model",
                 f"new (initialised by the variant): {len(self.new)}"]
        return "\n".join(lines + [f"  + {n}" for n in self.new])


def convert(model: nn.Module, variant: Any, *, layers: list[int] | None = None, **overrides) -> nn.Module:
    """Replace the self-attention of `layers` (default: all) by `variant`; returns the same model.

    The report (`ConversionReport`) is logged and kept as `model.sparsezoo_conversion`.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODELS:
        raise ValueError(f"convert supports the model types {list(SUPPORTED_MODELS)}, got {model_type!r}")
    stack = decoder_stack(model)
    config = stack.config
    chosen = layer_indices(len(stack.layers), layers)
    originals = [stack.layers[i].self_attn for i in chosen]
    for i, original in zip(chosen, originals):
        if isinstance(original, SparseSelfAttention):
            raise ValueError(f"layer {i} is converted already (to {original.variant.variant_name})")
        if uses_sliding_window(config, i):
            raise ValueError(f"layer {i} uses sliding-window attention, which the variant would replace by causal "
                             f"attention over the whole context; if that is what you want, load the model with "
                             f"sliding windows off (Mistral: sliding_window=None, Qwen: use_sliding_window=False)")
        model_rotary_function(original)  # fail before changing anything
    attn_config = variant_config(originals[0], config, variant, overrides)
    warn_on_scaled_rope(config)
    names = {module: name for name, module in model.named_modules()}
    report = ConversionReport(attn_config.variant, chosen)
    for i, original in zip(chosen, originals):
        converted = SparseSelfAttention(original, attention_core(attn_config, like=original.q_proj.weight))
        stack.layers[i].self_attn = converted
        prefix = names[original]
        for name, _ in converted.named_parameters():
            (report.new if name.startswith("variant.") else report.reused).append(f"{prefix}.{name}")
    model.sparsezoo_conversion = report
    log.info("sparsezoo conversion: %s", report)
    return model


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module holding `layers` (LlamaModel inside LlamaForCausalLM, or the model itself)."""
    stack = getattr(model, "base_model", model)
    if not hasattr(stack, "layers") or not hasattr(stack, "config"):
        raise TypeError(f"{type(model).__name__} has no decoder `layers`: not a Llama-family transformers model")
    return stack


def layer_indices(n_layers: int, layers: list[int] | None) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    chosen = sorted(set(layers))
    bad = [i for i in chosen if not isinstance(i, int) or not 0 <= i < n_layers]
    if bad or not chosen:
        raise ValueError(f"layers must be indices in [0, {n_layers}), got {layers}")
    return chosen


def uses_sliding_window(config, layer: int) -> bool:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return layer_types[layer] != "full_attention"
    return getattr(config, "sliding_window", None) is not None


def variant_config(original: nn.Module, config, variant: Any, overrides: dict[str, Any]) -> AttentionConfig:
    """The variant's typed config with the model's dims (read off the attention module's projections)."""
    clash = sorted(set(overrides) & set(MODEL_DIMS))
    if clash:
        raise ConfigError(f"{clash} come from the model and cannot be overridden")
    head_dim = original.head_dim
    dims = {"d_model": original.q_proj.in_features, "n_heads": original.q_proj.out_features // head_dim,
            "n_kv_heads": original.k_proj.out_features // head_dim, "head_dim": head_dim,
            "rope_theta": float(rope_parameters(config).get("rope_theta", 10000.0))}
    named = isinstance(variant, str) and not Path(variant).is_file()  # a variant name, not a YAML path
    base = {"variant": variant} if named else variant
    return sparsezoo.make_config(base, **overrides, **dims)


def rope_parameters(config) -> dict[str, Any]:
    """rope_theta and rope_type: in `rope_parameters` (transformers 5) or `rope_theta` / `rope_scaling` (4.x)."""
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.update(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def warn_on_scaled_rope(config) -> None:
    params = rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        log.warning("the model uses %r RoPE; the main q/k keep it, but a variant's new branches that apply RoPE "
                    "(index keys with index_rope, CSA compressor keys, NSA separate_kv branches) use plain RoPE "
                    "with theta %s", rope_type, params.get("rope_theta"))
