"""What the linear-attention variants (lightning, gdn) share: a recurrent state instead of a KV cache.

- No RoPE: `positions` are accepted for the contract and not used; token order reaches these layers
  through the recurrence (its decay) and, in gdn, a short causal convolution.
- The decode cache is a `LayerCache` (`make_cache`) holding the recurrent state [B, H, K, V] (fp32, fp64
  for fp64 models) and gdn's convolution state: O(1) memory in the sequence length. Prefill, chunked
  prefill and decode continue one state, so they agree with one full forward. `max_seq_len` is still
  enforced, for the contract's sake.
- `kv_pattern` is the full causal map: every query reads the state that summarises every earlier token.
- No auxiliary loss.
- Static decode (`decode_static`, compiled generation): the cached decode of one token with the states in
  fixed-size tensors (`static_state`), updated in place; the recurrence runs its plain-PyTorch reference.
- fla-core runs the recurrences on GPUs; building a layer without it raises, naming the `linear` extra,
  unless the config asks for `backend: reference` (the plain-PyTorch path, any device).
"""

from __future__ import annotations

import torch

from ..cache import LayerCache
from ..ops import fla_kernels
from .base import AttentionLayer, StaticCache


class LinearAttentionLayer(AttentionLayer):
    # q/k/v/o are not softmax attention's (SiLU, gates, gdn's head layout): sparsezoo.compare does not load
    # the dense layer's weights into these layers, and the transformers integration (which reuses a model's
    # projections and its K/V cache) refuses them
    reuses_dense_projections = False
    # a recurrence passes its state from chunk to chunk: gathering keys cannot split it over ranks
    supports_context_parallel = False
    static_decode = True
    static_buffers = ()  # no per-token buffer: the step reads and updates the recurrent states
    recurrent_states: tuple[str, ...] = ("linear_state",)  # what the cache keeps (`state`, `keep`)

    def __init__(self, config):
        if config.backend != "reference" and not fla_kernels.FLA_INSTALLED:
            raise ImportError(
                f"the {config.variant!r} variant runs fla-core's kernels: {fla_kernels.INSTALL_HINT} "
                f"(or set backend: reference for the plain-PyTorch path only)"
            )
        super().__init__(config)
        if config.backend != "reference" and torch.cuda.is_available():
            fla_kernels.load()  # now, so that no call imports it (torch.compile cannot trace an import)

    def forward_batch(self, x: torch.Tensor, positions: torch.Tensor | None, cache: LayerCache | None) -> torch.Tensor:
        """The base contract's checks, padding and packing ran first; positions are unused (no RoPE)."""
        B, T, _ = x.shape
        self.aux_loss = None
        if cache is not None:
            self.check_cache(cache, B, T)
        q, k, v = self.project(x, cache)
        out = self.attend(x, q, k, v, positions, cache)
        if cache is not None:
            cache.advance(T)
        return self.o_proj(self.output(x, out))

    # -- what each variant defines ------------------------------------------------------------------
    def project(self, x: torch.Tensor, cache: LayerCache | None):
        """x [B, T, d_model] -> q, k, v [B, heads, T, D] of the T new tokens."""
        raise NotImplementedError

    def attend(self, x, q, k, v, positions, cache) -> torch.Tensor:
        """The recurrence over the T new tokens, from and into the cache's state -> [B, H, T, D]."""
        raise NotImplementedError

    def output(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """[B, H, T, D] -> the normalised, gated [B, T, H * D] that o_proj reads."""
        raise NotImplementedError

    # -- static decode: the states in fixed-size tensors ----------------------------------------------
    def static_state(self, cache: LayerCache) -> dict[str, torch.Tensor]:
        """Copies of the states the prefill left in the cache, which decode_static updates in place."""
        missing = [name for name in self.recurrent_states if self.state(cache, name) is None]
        if missing:
            raise ValueError(
                f"static_state reads the states a cached forward keeps ({missing}): prefill the cache first"
            )
        return {name: self.state(cache, name).clone() for name in self.recurrent_states}

    def static_slots(self, name, n_tokens):
        return None  # fixed-size states, no slot per token

    def decode_static(self, x: torch.Tensor, pos: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The cached decode of one token (project, attend, output) from the states in `state`, which it
        updates in place (through a StaticCache); pos plays no part. Static shapes, no host reads."""
        cache = StaticCache(state, pos)
        q, k, v = self.project(x, cache)
        return self.o_proj(self.output(x, self.attend(x, q, k, v, pos, cache)))

    def backend(self, op: str, cache) -> str:
        """The op's backend: the config's, or in decode_static the plain-PyTorch reference (one token: a few
        small products, which torch.compile traces whole; fla's kernels are not traced)."""
        return "reference" if isinstance(cache, StaticCache) else self.config.backend_for(op)

    # -- the state in the cache ---------------------------------------------------------------------
    def check_cache(self, cache: LayerCache, B: int, T: int) -> None:
        """The LayerCache checks (batch size, length), made before anything changes."""
        if not isinstance(cache, LayerCache):
            raise TypeError(
                f"{self.variant_name} keeps a recurrent state in a sparsezoo.LayerCache (layer.make_cache); "
                f"got {type(cache).__name__}"
            )
        if B > cache.max_batch_size:
            raise ValueError(f"batch {B} exceeds the cache's max_batch_size {cache.max_batch_size}")
        if cache.batch is not None and cache.batch != B:
            raise ValueError(
                f"this cache holds a batch of {cache.batch}, got {B}; reset() it to start a new "
                f"sequence with another batch size"
            )
        if cache.pos + T > cache.max_seq_len:
            raise ValueError(f"cache overflow: {cache.pos} + {T} tokens > max_seq_len {cache.max_seq_len}")
        cache.batch = B

    @staticmethod
    def state(cache: LayerCache | StaticCache | None, name: str) -> torch.Tensor | None:
        """A state this layer kept in the cache (None: no cache, or the start of a sequence)."""
        if isinstance(cache, StaticCache):
            return cache.state[name]
        return None if cache is None else cache.derived(name)

    @staticmethod
    def keep(cache: LayerCache | StaticCache | None, name: str, value: torch.Tensor | None) -> None:
        """Keep a state in the cache (in decode_static: copy it into the fixed-size tensor, in place)."""
        if isinstance(cache, StaticCache):
            cache.state[name].copy_(value)
        elif cache is not None:
            cache.set_derived(name, value.detach())
