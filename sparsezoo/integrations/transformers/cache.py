"""Where a converted layer keeps its decode state inside a transformers `Cache`.

A `DynamicCache` holds one `DynamicLayer` (keys, values) per decoder layer. A sparsezoo variant also
keeps per-token state of its own: MSA/DSA index keys, CSA's compressor inputs and index keys, NSA's
branch keys and values. CSA and NSA also keep their compressed entries, pooled from these, as derived
summaries (as in `sparsezoo.LayerCache`), dropped whenever the cache changes shape.
`SparseCacheLayer` is a `DynamicLayer` that holds those named buffers next to K/V and speaks the
`append(name, x, seq_dim)` protocol the variants call, so the variant code runs unchanged. Every
operation that reshapes the cache (reset, crop, beam reorder, batch repeat/select) applies to the
buffers too, so they always hold exactly the tokens K/V hold.

A converted layer swaps its empty `DynamicLayer` for a `SparseCacheLayer` on first use
(`sparse_cache_layer`); any other cache layer (static, sliding, quantized, offloaded) is refused.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class SparseCacheLayer(DynamicLayer):
    """K/V (as `DynamicLayer`) plus the variant's named per-token buffers (batch dim 0)."""

    def __init__(self):
        super().__init__()
        self.extras: dict[str, tuple[torch.Tensor, int]] = {}  # name -> (tensor, its sequence dim)
        self._derived: dict[str, torch.Tensor] = {}  # summaries a variant can rebuild from the buffers

    # -- the LayerCache protocol of sparsezoo variants ----------------------------------------------
    def append(self, name: str, x: torch.Tensor, seq_dim: int) -> torch.Tensor:
        """Add x's new tokens to buffer `name`; return the whole buffer. K/V already hold these tokens."""
        total = self.get_seq_length()
        if name in self.extras:
            x = torch.cat([self.extras[name][0], x], dim=seq_dim)
        if x.shape[seq_dim] != total:
            raise RuntimeError(f"sparsezoo cache buffer {name!r} would hold {x.shape[seq_dim]} tokens but the layer's "
                               f"keys hold {total}: the cache was changed outside the converted layer")
        self.extras[name] = (x, seq_dim)
        return x

    def derived(self, name: str) -> torch.Tensor | None:
        """A summary the variant stored with set_derived (None after any change to the cache's batch or length)."""
        return self._derived.get(name)

    def set_derived(self, name: str, x: torch.Tensor) -> None:
        self._derived[name] = x

    # -- keep the buffers in step with K/V ----------------------------------------------------------
    def _map_extras(self, fn) -> None:
        self.extras = {name: (fn(t, dim), dim) for name, (t, dim) in self.extras.items()}
        self._derived = {}

    def reset(self) -> None:
        super().reset()
        self.keys = self.values = None  # dropped, not zeroed: they grow by concatenation
        self.is_initialized = False
        self.extras = {}
        self._derived = {}

    def crop(self, *args, **kwargs) -> None:
        super().crop(*args, **kwargs)
        length = self.get_seq_length()
        self._map_extras(lambda t, dim: t.narrow(dim, 0, length))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_extras(lambda t, dim: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_extras(lambda t, dim: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_extras(lambda t, dim: t[indices])


def sparse_cache_layer(cache, layer_idx: int) -> SparseCacheLayer:
    """The `SparseCacheLayer` of `layer_idx` in a transformers cache, swapped in for an empty `DynamicLayer`."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"sparsezoo layers need a transformers DynamicCache, got {type(cache).__name__}")
    if getattr(cache, "offloading", False):
        raise ValueError("sparsezoo layers do not support an offloading cache (their index buffers stay on the device)")
    replicate = getattr(cache, "layer_class_to_replicate", None)
    while replicate is not None and len(layers) <= layer_idx:  # a lazy DynamicCache grows as Cache.update does
        layers.append(replicate())
    layer = layers[layer_idx]
    if isinstance(layer, SparseCacheLayer):
        return layer
    if type(layer) is DynamicLayer and layer.get_seq_length() == 0:
        layers[layer_idx] = SparseCacheLayer()
        return layers[layer_idx]
    raise TypeError(f"sparsezoo layer {layer_idx} needs an empty DynamicLayer in the cache (a DynamicCache over "
                    f"full-attention layers), got {type(layer).__name__} holding {layer.get_seq_length()} tokens")
