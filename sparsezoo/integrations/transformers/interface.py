"""`attn_implementation="sparsezoo_<name>"` for the variants that have no weights of their own (dense, moba).

Such a variant needs nothing but q, k and v, so it fits transformers' `AttentionInterface`: the model
keeps its own attention modules, projections, RoPE and cache, and calls the variant's `attend` where
it would call SDPA. Its settings come from the model config's `sparsezoo_attention` dict (e.g.
`{"block_size": 64, "topk": 4}` for moba; default: the variant's dataclass defaults), which
save_pretrained keeps in config.json. The mask function registered beside it is SDPA's, so a padded
or packed batch gives a mask, read back into sequences that are attended one by one (`sequences`).
Variants with weights (msa, dsa, nsa, csa) go through `convert`.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import sparsezoo

from .attention import attention_core
from .sequences import attend_segments, segments

PREFIX = "sparsezoo_"
CONFIG_FIELD = "sparsezoo_attention"  # model config attribute holding the variant's settings
PROBE_DIMS = {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16}


def weightless_variants() -> list[str]:
    """Registered variants whose module has no parameters besides the q/k/v/o projections."""
    return [name for name in sparsezoo.list_variants()
            if getattr(sparsezoo.variant_class(name), "reuses_dense_projections", True)
            and not list(attention_core(sparsezoo.make_config({"variant": name, **PROBE_DIMS})).parameters())]


def register_attention_functions() -> list[str]:
    """Register `sparsezoo_<name>` for every weightless variant; returns the names registered."""
    names = [PREFIX + variant for variant in weightless_variants()]
    for name in names:
        AttentionInterface.register(name, attention_function(name[len(PREFIX):]))
        AttentionMaskInterface.register(name, sdpa_mask)
    return names


def attention_function(variant: str):
    def sparsezoo_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            sliding_window=None, **kwargs):
        """query [B, Hq, T, D], key/value [B, Hkv, S, D] (RoPE and cache applied) -> ([B, T, Hq, D], None)."""
        if dropout:
            raise ValueError(f"sparsezoo_{variant} applies no attention dropout; set config.attention_dropout = 0")
        if sliding_window is not None:
            raise ValueError(f"sparsezoo_{variant} attends over the whole causal context, not a sliding window")
        T, S = query.shape[2], key.shape[2]
        segs = segments(attention_mask, T, S, query.shape[0], kwargs)  # None: plain causal
        settings = json.dumps(getattr(module.config, CONFIG_FIELD, None) or {}, sort_keys=True)
        core = weightless_core(variant, settings, query.shape[1], key.shape[1], query.shape[3], scaling)
        positions = torch.arange(S - T, S, device=query.device)
        if segs is None:
            out = core.attend(None, query, key, value, positions, None)
        else:
            out = attend_segments(core, None, query, key, value, positions, None, segs)
        return out.transpose(1, 2).contiguous(), None

    sparsezoo_attention.__name__ = f"sparsezoo_{variant}_attention"
    return sparsezoo_attention


@lru_cache(maxsize=64)
def weightless_core(variant: str, settings: str, n_heads: int, n_kv_heads: int, head_dim: int,
                    scaling: float | None):
    config = sparsezoo.make_config({"variant": variant, **json.loads(settings), "d_model": n_heads * head_dim,
                                    "n_heads": n_heads, "n_kv_heads": n_kv_heads, "head_dim": head_dim})
    core = attention_core(config)
    if scaling is not None:
        core.scale = scaling
    return core
