"""sparsezoo: interchangeable sparse-attention variants behind one interface.

    import sparsezoo
    sparsezoo.list_variants()                      # ['dense', 'msa', ...]
    layer = sparsezoo.create_attention({"variant": "msa", "shape": "m3"})
    y = layer(x)                                   # x, y: [B, T, d_model]

The functional layer lives in `sparsezoo.ops` (layout documented there once).
"""

from . import ops
from .cache import LayerCache
from .config import AttentionConfig, ConfigError
from .context_parallel import ContextParallel
from .registry import (context_parallel_variants, create_attention, list_variants, make_config, register_variant,
                       variant_class)
from .variants.base import AttentionLayer, aux_loss

__all__ = [
    "AttentionConfig", "AttentionLayer", "ConfigError", "ContextParallel", "LayerCache", "aux_loss",
    "context_parallel_variants", "create_attention", "list_variants", "make_config", "ops", "register_variant", "variant_class",
]
__version__ = "0.1.0"
