"""The example GPT (`sparsezoo.models.GPT`) as a transformers `PreTrainedModel`.

    hf = SparsezooGPTForCausalLM.from_gpt(gpt)          # shares gpt's weights
    hf.save_pretrained("out/gpt")                       # config.json + model.safetensors
    hf = AutoModelForCausalLM.from_pretrained("out/gpt")
    hf.gpt.generate(prompt, max_new_tokens=32)          # sparsezoo's own per-layer caches

The config holds the `GPTConfig` fields as they are (per-layer variants, attention overrides), under
model_type "sparsezoo_gpt", registered with AutoConfig / AutoModelForCausalLM when this package is
imported. `forward` follows transformers' convention: `labels` are the input ids, shifted inside.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from sparsezoo.models import GPT, GPTConfig

GPT_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig))


class SparsezooGPTConfig(PretrainedConfig):
    model_type = "sparsezoo_gpt"

    def __init__(self, **kwargs):
        gpt = GPTConfig.from_dict({k: kwargs.pop(k) for k in GPT_FIELDS if k in kwargs})  # validates
        kwargs.setdefault("tie_word_embeddings", False)  # the GPT ties its own output to tok_emb
        super().__init__(**kwargs)
        for name, value in gpt.to_dict().items():
            setattr(self, name, value)

    @classmethod
    def from_gpt_config(cls, config: GPTConfig, **kwargs) -> "SparsezooGPTConfig":
        return cls(**config.to_dict(), **kwargs)

    def gpt_config(self) -> GPTConfig:
        return GPTConfig.from_dict({name: getattr(self, name) for name in GPT_FIELDS})


class SparsezooGPTForCausalLM(PreTrainedModel):
    config_class = SparsezooGPTConfig
    base_model_prefix = "gpt"
    _no_split_modules = ["Block"]

    def __init__(self, config: SparsezooGPTConfig, gpt: GPT | None = None):
        super().__init__(config)
        self.gpt = gpt if gpt is not None else GPT(config.gpt_config())
        self.post_init()

    @classmethod
    def from_gpt(cls, gpt: GPT) -> "SparsezooGPTForCausalLM":
        return cls(SparsezooGPTConfig.from_gpt_config(gpt.config), gpt)

    def _init_weights(self, module) -> None:
        """The GPT initialises its own weights (and each attention variant its own); nothing to add."""

    def get_input_embeddings(self):
        return self.gpt.tok_emb

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        logits, _ = self.gpt(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)
