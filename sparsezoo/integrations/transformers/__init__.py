"""sparsezoo inside Hugging Face transformers (needs `pip install "sparsezoo-attn[hf]"`); see docs/transformers.md.

- `convert(model, variant, layers=None, **overrides)`: a Llama / Mistral / Qwen2 / Qwen3 model's
  self-attention becomes a sparsezoo variant, in place, reusing q/k/v/o, norms and RoPE
  (`SparseSelfAttention`); `model.sparsezoo_conversion` reports what was reused and what is new.
- Caches: a converted layer keeps its variant's per-token state (index keys, compressor inputs) in its
  `DynamicCache` layer (`SparseCacheLayer`), so `generate()` with the cache equals without.
- `attn_implementation="sparsezoo_dense"` / `"sparsezoo_moba"`: the weightless variants, registered in
  `AttentionInterface` on import (`register_attention_functions()` again for variants registered later).
- `SparsezooGPTForCausalLM`: the example GPT as a `PreTrainedModel` (save_pretrained / from_pretrained).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .attention import SparseSelfAttention, attention_core
from .cache import SparseCacheLayer, sparse_cache_layer
from .convert import SUPPORTED_MODELS, ConversionReport, convert
from .gpt import SparsezooGPTConfig, SparsezooGPTForCausalLM
from .interface import register_attention_functions

REGISTERED_ATTENTION = register_attention_functions()
AutoConfig.register(SparsezooGPTConfig.model_type, SparsezooGPTConfig, exist_ok=True)
AutoModelForCausalLM.register(SparsezooGPTConfig, SparsezooGPTForCausalLM, exist_ok=True)

__all__ = ["ConversionReport", "REGISTERED_ATTENTION", "SUPPORTED_MODELS", "SparseCacheLayer", "SparseSelfAttention",
           "SparsezooGPTConfig", "SparsezooGPTForCausalLM", "attention_core", "convert",
           "register_attention_functions", "sparse_cache_layer"]
