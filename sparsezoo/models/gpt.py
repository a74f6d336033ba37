"""A small, readable GPT whose attention layers come from the sparsezoo registry.

RMSNorm, SwiGLU, GQA and tied embeddings; RoPE lives inside the attention layers. The config names
the attention variant per layer:

    GPTConfig(layers=["dense", "dense", "msa", "msa"])              # explicit list
    GPTConfig(n_layers=4, attention="msa", dense_layers=2)          # same thing, M3 style
    GPTConfig(n_layers=8, layer_pattern=["gdn", "gdn", "gdn", "dense"])  # a repeated block: hybrid stacks
    GPTConfig(..., attention_overrides={"block_size": 64, "msa": {"topk": 8}})

`attention_overrides` holds variant config fields. A flat key applies to every layer whose variant
config has that field (and must be known to at least one of them); a key that names a variant holds
fields for that variant only. Generation uses one cache per layer (`make_cache`), so each variant
keeps its own extra decode state (index keys, compressed keys, a linear layer's recurrent state, ...).

`layer_pattern` builds the published hybrid stacks: linear-attention layers interleaved with full
attention, the pattern repeated n_layers / len(pattern) times (Qwen3-Next: 3 Gated DeltaNet layers, then
one softmax layer; MiniMax-01: 7 lightning layers, then one softmax layer). Variant configs with
`layer_index` and `n_layers` fields (lightning) get the layer's place in the model.

Padded and packed batches: `forward(idx, attention_mask=m)` (left padding) or `forward(idx,
cu_seqlens=c)` (documents packed in one row) run each sequence alone in every attention layer
(`sparsezoo.sequences`); `generate(prompts, n, attention_mask=m)` continues left-padded prompts.

Short convolution: `GPTConfig(short_conv=4)` puts a causal depthwise convolution of 4 taps, with a
residual, on every attention layer's input (after its norm; `sparsezoo.models.short_conv`), the same for
every variant. It lets one layer learn associative recall; caches keep its last inputs per layer.

Compiled generation: `generate(prompts, n, compile=True)` prefills eagerly, then runs `decode_step`
through `torch.compile(fullgraph=True)` (`mode="reduce-overhead"` on CUDA: CUDA-graph decode). The step
writes into the caches' preallocated buffers (and fixed-size entries and states) at a position tensor, so
one graph serves every position. Every built-in variant has a static decode step (`static_decode_variants()`);
a layer without one raises.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

import sparsezoo
from sparsezoo.cache import LayerCache
from sparsezoo.context_parallel import ContextParallel
from sparsezoo.config import AttentionConfig, CheckedConfig, ConfigError, from_known_fields, read_yaml
from sparsezoo.ops.dispatch import record

from .short_conv import CONTEXT_PARALLEL_REFUSAL, ShortConv, ShortConvCache

DENSE = "dense"  # the baseline variant `dense_layers` falls back to
STATIC_DECODE_OP = "decode_step"  # dispatch record: "static_compiled" after a compiled generate
MODEL_FIELDS = ("variant", "d_model", "n_heads", "n_kv_heads", "head_dim", "rope_theta", "layer_index", "n_layers")


@dataclass
class GPTConfig(CheckedConfig):
    vocab_size: int = 512
    d_model: int = 128
    n_layers: int | None = None  # defaults to len(layers), else 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # defaults to d_model // n_heads
    ffn_hidden: int | None = None  # defaults to ~8/3 d_model, a multiple of 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    attention: str = DENSE  # variant of every layer not listed as dense ...
    dense_layers: int = 0  # ... except the first `dense_layers`
    layers: list[str] | None = None  # or name every layer explicitly
    layer_pattern: list[str] | None = None  # or repeat a block of layers (hybrid stacks)
    attention_overrides: dict[str, Any] = field(default_factory=dict)
    short_conv: int = 0  # taps of a causal depthwise conv on every attention layer's input; 0 = none

    LABEL: ClassVar[str] = "model"
    POSITIVE: ClassVar[tuple[str, ...]] = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                           "ffn_hidden", "rope_theta", "norm_eps")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("init_std", "dense_layers", "short_conv")

    def __post_init__(self) -> None:
        self.check_fields()  # what was given ...
        if self.layer_pattern is not None:
            self.layer_pattern = list(self.layer_pattern)
            if self.layers is not None or self.dense_layers:
                raise ConfigError("layer_pattern names every layer: give it without layers or dense_layers")
            if not self.layer_pattern:
                raise ConfigError("layer_pattern must name at least one layer")
            if self.n_layers is None:
                self.n_layers = len(self.layer_pattern)
            if self.n_layers % len(self.layer_pattern):
                raise ConfigError(f"n_layers ({self.n_layers}) must be a multiple of the layer_pattern's "
                                  f"length ({len(self.layer_pattern)})")
        if self.layers is not None:
            self.layers = list(self.layers)
            if self.n_layers is None:
                self.n_layers = len(self.layers)
            if len(self.layers) != self.n_layers:
                raise ConfigError(f"layers names {len(self.layers)} layers but n_layers = {self.n_layers}")
        if self.n_layers is None:
            self.n_layers = 4
        if self.head_dim is None:
            self.head_dim = self.d_model // self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = 32 * -(-(8 * self.d_model // 3) // 32)
        self.check_fields()  # ... and the defaults derived from it
        if not 0 <= self.dense_layers <= self.n_layers:
            raise ConfigError(f"dense_layers must be in [0, n_layers={self.n_layers}], got {self.dense_layers}")
        self.attention_configs()  # validate every layer's attention config now

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GPTConfig":
        return from_known_fields(cls, data, "GPTConfig")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "GPTConfig":
        """A YAML file holding the model fields, or a run config with a `model:` section."""
        data = read_yaml(path)
        return cls.from_dict(data.get("model", data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def layer_variants(self) -> list[str]:
        if self.layer_pattern is not None:
            names = self.layer_pattern * (self.n_layers // len(self.layer_pattern))
        elif self.layers is not None:
            names = self.layers
        else:
            names = [DENSE] * self.dense_layers + [self.attention] * (self.n_layers - self.dense_layers)
        valid = sparsezoo.list_variants()
        for i, name in enumerate(names):
            if name not in valid:
                raise ConfigError(f"layer {i}: unknown attention variant {name!r}; choose one of {valid}")
        return names

    def attention_configs(self) -> list[AttentionConfig]:
        """One typed attention config per layer (shared model dims + the applicable overrides)."""
        variants = self.layer_variants()
        registered = set(sparsezoo.list_variants())
        flat = {k: v for k, v in self.attention_overrides.items() if k not in registered}
        per_variant = {k: v for k, v in self.attention_overrides.items() if k in registered}
        for name, section in per_variant.items():
            if not isinstance(section, dict):
                raise ConfigError(f"attention_overrides[{name!r}] must map config fields to values, got {section!r}")
        for key in flat:
            if key in MODEL_FIELDS:
                raise ConfigError(f"attention_overrides may not set {key!r}: it comes from the model config")
            fields_known = [v for v in set(variants) if key in sparsezoo.variant_class(v).config_class.field_names()]
            if not fields_known:
                raise ConfigError(f"attention_overrides key {key!r} is a field of none of this model's variants "
                                  f"{sorted(set(variants))}; to configure one variant only, nest it under its name")
        configs = []
        for index, name in enumerate(variants):
            known = sparsezoo.variant_class(name).config_class.field_names()
            data = {"variant": name, "d_model": self.d_model, "n_heads": self.n_heads,
                    "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim, "rope_theta": self.rope_theta}
            if "layer_index" in known and "n_layers" in known:  # depth-dependent layers (lightning's decay)
                data.update(layer_index=index, n_layers=self.n_layers)
            data.update({k: v for k, v in flat.items() if k in known})
            data.update(per_variant.get(name, {}))
            configs.append(sparsezoo.make_config(data))
        return configs


def static_decode_variants() -> list[str]:
    """The variants with a static decode step (`decode_static`), which compiled generation needs."""
    return [v for v in sparsezoo.list_variants() if sparsezoo.variant_class(v).static_decode]


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, attention: AttentionConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = sparsezoo.create_attention(attention)
        self.short_conv = ShortConv(config.d_model, config.short_conv) if config.short_conv else None
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = SwiGLU(config.d_model, config.ffn_hidden)

    def forward(self, x, positions=None, cache=None, attention_mask=None, cu_seqlens=None, context_parallel=None,
                conv_cache=None):
        h = self.attn_norm(x)
        if self.short_conv is not None:
            h = self.short_conv(h, conv_cache, cache.pos if cache is not None else 0, attention_mask, cu_seqlens)
        x = x + self.attn(h, positions=positions, cache=cache, attention_mask=attention_mask,
                          cu_seqlens=cu_seqlens, context_parallel=context_parallel)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, a) for a in config.attention_configs())
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.caches: list | None = None
        self.conv_caches: list[ShortConvCache] | None = None  # with short_conv: each layer's last conv inputs
        self._init_own_weights()

    def _init_own_weights(self) -> None:
        """nanoGPT-style init for the embedding and MLPs; attention layers keep their variant's init."""
        std = self.config.init_std
        nn.init.normal_(self.tok_emb.weight, std=std)
        for block in self.blocks:
            nn.init.normal_(block.mlp.gate.weight, std=std)
            nn.init.normal_(block.mlp.up.weight, std=std)
            nn.init.normal_(block.mlp.down.weight, std=std / (2 * self.config.n_layers) ** 0.5)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, use_cache: bool = False,
                positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, context_parallel: ContextParallel | None = None):
        """idx [B, T] -> (logits [B, T, V], mean cross-entropy over targets != -100, or None).

        use_cache=True continues the sequence held in the caches from `setup_cache`.
        attention_mask [B, past + T] (1 = real token, left padding) or cu_seqlens [n_docs + 1] (documents
        packed into one row): each sequence is computed alone. Logits at padding mean nothing, and
        their targets are ignored.
        context_parallel (a `sparsezoo.ContextParallel`): idx and targets hold this rank's tokens
        (`cp.shard`) of sequences split over a process group; the loss is this rank's share of the mean
        over the group's targets (its sum over the group is the whole sequences' loss), and so is
        `aux_loss()`.
        """
        if use_cache and self.caches is None:
            raise RuntimeError("use_cache=True needs setup_cache(batch, max_len) first")
        if context_parallel is not None and use_cache:
            raise ValueError("context_parallel runs whole sequences (training, prefill): use_cache must be False")
        if context_parallel is not None and self.config.short_conv:
            raise ValueError(CONTEXT_PARALLEL_REFUSAL)
        caches = self.caches if use_cache else [None] * len(self.blocks)
        conv_caches = self.conv_caches if use_cache and self.conv_caches else [None] * len(self.blocks)
        x = self.tok_emb(idx)
        for block, cache, conv_cache in zip(self.blocks, caches, conv_caches):
            x = block(x, positions=positions, cache=cache, attention_mask=attention_mask, cu_seqlens=cu_seqlens,
                      context_parallel=context_parallel, conv_cache=conv_cache)
        logits = F.linear(self.norm(x), self.tok_emb.weight)  # tied embeddings
        loss = None
        if targets is not None and attention_mask is not None:  # (checked by the attention layers above)
            targets = targets.masked_fill(attention_mask[:, -idx.shape[1]:] == 0, -100)
        if targets is not None and context_parallel is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets must match idx's shape {tuple(idx.shape)} (this rank's tokens), "
                                 f"got {tuple(targets.shape)}")
            flat = targets.flatten()
            total = F.cross_entropy(logits.float().flatten(0, 1), flat, ignore_index=-100, reduction="sum")
            counted = context_parallel.all_reduce_sum((flat != -100).sum())
            loss = total / counted.clamp_min(1)  # a share of the group's mean
        elif targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the attention layers' auxiliary losses (e.g. MSA's index KL) from the last forward."""
        return sparsezoo.aux_loss(self)

    # -- routing schedule (MSA/DSA warm-up) ---------------------------------------------------
    def routed_layers(self) -> list[nn.Module]:
        return [b.attn for b in self.blocks if hasattr(b.attn, "set_routing")]

    def apply_routing_schedule(self, step: int) -> str:
        """Dense routing for layers still in their `warmup_steps`, then their configured routing.

        Returns "warmup" while any layer is in warm-up, else "sparse" (or "n/a" with no routed layer).
        """
        layers = self.routed_layers()
        warm = False
        for attn in layers:
            in_warmup = step < getattr(attn.config, "warmup_steps", 0)
            attn.set_routing("dense" if in_warmup else getattr(attn.config, "routing", "sparse"))
            warm |= in_warmup
        return "n/a" if not layers else ("warmup" if warm else "sparse")

    def max_warmup_steps(self) -> int:
        return max([getattr(a.config, "warmup_steps", 0) for a in self.routed_layers()], default=0)

    # -- generation -----------------------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int, *, contiguous: bool = False) -> None:
        """One fresh cache per layer, chosen by the layer (`make_cache`): a LayerCache, or for MSA on a
        GPU a paged cache whose decode steps run the Triton kernels. contiguous=True: a LayerCache for
        every layer (what the static decode step reads). With short_conv, each layer also gets a
        ShortConvCache for its convolution's last inputs."""
        device = self.tok_emb.weight.device
        self.conv_caches = [ShortConvCache() for _ in self.blocks] if self.config.short_conv else None
        if contiguous:
            self.caches = [LayerCache(batch, max_len) for _ in self.blocks]
        else:
            self.caches = [block.attn.make_cache(batch, max_len, device) for block in self.blocks]

    def clear_cache(self) -> None:
        self.caches = None
        self.conv_caches = None

    def decode_step(self, idx: torch.Tensor, pos: torch.Tensor, kv: list[dict[str, torch.Tensor]],
                    conv: list[torch.Tensor] | None = None):
        """idx [B, 1], the tokens at position pos (long [1]) -> logits [B, 1, V], with static shapes.

        kv holds each layer's static state by name (`static_state`: the preallocated cache buffers "k", "v"
        [B, Hkv, max_len, D], index keys, compressed entries, recurrent states, ...); the step writes the
        token's entries at pos and reads the slots up to pos. Meant for torch.compile(fullgraph=True): one
        graph for every position (generate(..., compile=...) drives it).
        With short_conv, conv holds each layer's last conv inputs [B, short_conv - 1, d_model] (`_static_conv`),
        updated in place.
        """
        if self.config.short_conv and conv is None:
            raise ValueError("a short_conv model's decode_step needs each layer's conv state: pass conv "
                             "(GPT._static_conv() after the prefill)")
        x = self.tok_emb(idx)
        for i, (block, buffers) in enumerate(zip(self.blocks, kv)):
            h = block.attn_norm(x)
            if block.short_conv is not None:
                h, tail = block.short_conv.step(h, conv[i])
                conv[i].copy_(tail)
            x = x + block.attn.decode_static(h, pos, buffers)
            x = x + block.mlp(block.mlp_norm(x))
        return F.linear(self.norm(x), self.tok_emb.weight)

    def _compiled_decode_step(self, compile: bool | dict, use_cache: bool, idx, attention_mask):
        """torch.compile(decode_step) with the options of `compile`, after checking the model and batch."""
        missing = sorted({b.attn.variant_name for b in self.blocks if not b.attn.static_decode})
        if missing:
            raise ValueError(f"compiled generation needs a static decode step (decode_static) in every layer; "
                             f"{missing} have none (variants that have one: {static_decode_variants()}); use "
                             f"compile=False")
        paged = [b.attn.variant_name for b in self.blocks
                 if getattr(b.attn.config, "decode_backend", "auto") == "triton"
                 or getattr(b.attn.config, "decode_index_dtype", "model") != "model"]
        if paged:
            raise ValueError(f"compiled generation decodes over contiguous caches; layers {paged} ask for the paged "
                             f"Triton decode (decode_backend='triton' or decode_index_dtype='fp8'): set "
                             f"decode_backend='auto' and decode_index_dtype='model', or use compile=False")
        if not use_cache:
            raise ValueError("compiled generation decodes over the cache: use_cache=False takes compile=False")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("compiled generation takes unpadded prompts only (one position for the whole batch); "
                             "generate a padded batch with compile=False")
        if compile is True:
            options = {"fullgraph": True}
            if idx.device.type == "cuda":
                options["mode"] = "reduce-overhead"
        elif isinstance(compile, dict):
            options = {"fullgraph": True, **compile}
        else:
            raise TypeError(f"compile must be a bool or a dict of torch.compile options, got {compile!r}")
        return torch.compile(self.decode_step, **options)

    def _static_kv(self) -> list[dict[str, torch.Tensor]]:
        """Each layer's static decode state (`static_state`: its cache's whole buffers, written by the
        prefill, and its fixed-size summaries), marked as static addresses so CUDA graphs read and write
        them in place."""
        kv = []
        for block, cache in zip(self.blocks, self.caches):  # LayerCaches (setup_cache(contiguous=True))
            state = block.attn.static_state(cache)
            for buf in state.values():
                torch._dynamo.mark_static_address(buf)
            kv.append(state)
        return kv

    def _static_conv(self) -> list[torch.Tensor] | None:
        """Copies of each layer's last short_conv inputs after the prefill (decode_step updates them in
        place), marked as static addresses; None without short_conv."""
        if not self.config.short_conv:
            return None
        conv = [c.tail.clone() for c in self.conv_caches]
        for t in conv:
            torch._dynamo.mark_static_address(t)
        return conv

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, greedy: bool = True, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True, generator: torch.Generator | None = None,
                 attention_mask: torch.Tensor | None = None, compile: bool | dict = False) -> torch.Tensor:
        """Continue idx [B, T] by max_new_tokens. With the cache: one prefill, then one token per step.

        attention_mask [B, T] (1 = real token): left-padded prompts; each row continues as it would alone.
        compile=True (or a dict of torch.compile options, fullgraph=True by default) runs the decode
        steps through one compiled `decode_step` (`mode="reduce-overhead"` by default on CUDA); the
        prefill stays eager. Every layer needs a static decode step, and the prompts no padding.
        """
        if attention_mask is not None and attention_mask.shape == idx.shape and not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs left-padded prompts: the last column of attention_mask must be 1 in "
                             "every row (each prompt ends there)")
        step = None
        if compile is not False and compile is not None:
            step = self._compiled_decode_step(compile, use_cache, idx, attention_mask)
        was_training = self.training
        self.eval()
        try:
            if not use_cache:
                seq, mask = idx, attention_mask
                for _ in range(max_new_tokens):
                    logits, _ = self(seq, attention_mask=mask)
                    seq = torch.cat([seq, self._pick(logits[:, -1], greedy, temperature, top_k, generator)], 1)
                    if mask is not None:
                        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
                return seq
            self.setup_cache(idx.shape[0], idx.shape[1] + max_new_tokens, contiguous=step is not None)
            logits, _ = self(idx, use_cache=True, attention_mask=attention_mask)  # later steps: real in every row
            kv = self._static_kv() if step is not None and max_new_tokens > 1 else None
            conv = self._static_conv() if kv is not None else None
            out = [idx]
            for i in range(max_new_tokens):
                nxt = self._pick(logits[:, -1], greedy, temperature, top_k, generator)
                out.append(nxt)
                if i + 1 < max_new_tokens:
                    if step is None:
                        logits, _ = self(nxt, use_cache=True)
                    else:
                        pos = torch.full((1,), idx.shape[1] + i, dtype=torch.long, device=idx.device)
                        logits = step(nxt, pos, kv, conv)
            if step is not None and max_new_tokens > 1:
                record(STATIC_DECODE_OP, "static_compiled")
            return torch.cat(out, 1)
        finally:
            self.clear_cache()
            self.train(was_training)

    @staticmethod
    def _pick(logits, greedy, temperature, top_k, generator) -> torch.Tensor:
        if greedy:
            return logits.argmax(-1, keepdim=True)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling (use greedy=True instead), got {temperature}")
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)

    # -- reporting ------------------------------------------------------------------------------
    def describe(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        conv = f", short_conv {self.config.short_conv}" if self.config.short_conv else ""
        rows = [f"GPT: {n / 1e6:.2f}M parameters, d_model {self.config.d_model}, vocab {self.config.vocab_size}{conv}"]
        for i, block in enumerate(self.blocks):
            rows.append(f"  layer {i}: {block.attn.variant_name}")
        return "\n".join(rows)
