"""Example GPT models built from the sparsezoo registry: any variant per layer, by config.

    from sparsezoo.models import GPT, GPTConfig
    model = GPT(GPTConfig(layers=["dense", "msa", "msa"], attention_overrides={"block_size": 64}))
    out = model.generate(prompt, max_new_tokens=32)          # KV cache: prefill, then decode

Training: `python examples/train.py --config configs/gpt_tiny.yaml --set model.attention=msa`
(see docs/models.md). Checkpoints are safetensors + config.yaml (`sparsezoo.models.checkpoint`).
"""

from .checkpoint import LoadReport, load_model, load_weights, save_checkpoint, save_weights
from .data import Data, DataConfig
from .gpt import GPT, GPTConfig, static_decode_variants

__all__ = ["Data", "DataConfig", "GPT", "GPTConfig", "LoadReport", "load_model", "load_weights",
           "save_checkpoint", "save_weights", "static_decode_variants"]
