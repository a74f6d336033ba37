"""sparsezoo.integrations.transformers on tiny random-weight Llama, Qwen2, Qwen3 and Mistral models built from
configs (2 layers, hidden 64, 4 heads, 2 KV heads; fp32 on the CPU, reference backends): conversion against the
original logits, caches (generate with the cache equals without, chunked prefill, crop, beam search), the
AttentionInterface registration, and the example GPT saved and loaded as a PreTrainedModel.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import (AutoModelForCausalLM, DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM, StaticCache)

import sparsezoo  # noqa: E402
from sparsezoo.config import ConfigError  # noqa: E402
from sparsezoo.integrations.transformers import (REGISTERED_ATTENTION, SparseCacheLayer,  # noqa: E402
                                                 SparseSelfAttention, SparsezooGPTForCausalLM, convert)
from sparsezoo.models import GPT, GPTConfig  # noqa: E402

MODELS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
          "qwen3": (Qwen3Config, Qwen3ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
DIMS = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
# transformers 5 renamed the forward argument past_key_values to cache
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
T = 48  # tokens per test sequence: 6 blocks of 8
REF = {"backend": "reference"}
REF_SELECT = {"backend": "reference", "select_backend": "reference"}
# Budgets that leave each variant sparse at T tokens. Index RoPE on: without it a repeated token gives the same
# index key twice, and the tie between them is broken by rounding noise, which differs between a cached decode
# step and a full forward.
TINY = {
    "dense": REF,
    "msa": {"block_size": 8, "topk": 2, "index_dim": 16, "index_rope": True, **REF_SELECT},
    "dsa": {"topk": 8, "n_index_heads": 2, "index_dim": 16, "index_rope": True, **REF_SELECT},
    "moba": {"block_size": 8, "topk": 2, **REF_SELECT},
    "nsa": {"cmp_block": 8, "cmp_stride": 4, "sel_block": 8, "sel_topk": 3, "window": 8, "compressor_hidden": 16,
            **REF_SELECT},
    "csa": {"compress_ratio": 4, "topk": 2, "window": 8, "n_index_heads": 2, "index_dim": 16, **REF_SELECT},
}
# What each variant keeps per token in its cache layer, next to K/V.
CACHED = {"dense": set(), "moba": set(), "msa": {"k_idx"}, "dsa": {"k_idx"},
          "nsa": {"k_cmp", "v_cmp", "k_win", "v_win"}, "csa": {"cmp_kv", "cmp_score", "idx_kv", "idx_score"}}


def tiny_model(kind: str = "llama", **config):
    config_class, model_class = MODELS[kind]
    if kind == "mistral":
        config.setdefault("sliding_window", None)
    torch.manual_seed(0)
    return model_class(config_class(**DIMS, **config)).eval()


def tokens(batch: int = 2, length: int = T) -> torch.Tensor:
    return torch.randint(0, DIMS["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))


def converted(model, variant: str, **overrides):
    return convert(copy.deepcopy(model), variant, **{**TINY[variant], **overrides})


@torch.no_grad()
def logits(model, ids, **kwargs) -> torch.Tensor:
    return model(ids, **kwargs).logits


@torch.no_grad()
def assert_cached_generation_matches(model, prompt, **kwargs):
    run = lambda cache: model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=cache, output_logits=True,
                                       return_dict_in_generate=True, pad_token_id=0, **kwargs)
    cached, uncached = run(True), run(False)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# -- converting -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("variant, overrides, reproduces", [
    ("dense", {}, True),
    ("msa", {"topk": T // 8}, True),  # every block
    ("dsa", {"topk": T}, True),  # every token
    ("msa", {}, False),
    ("dsa", {}, False),
])
def test_conversion_against_the_original_logits(kind, variant, overrides, reproduces):
    model = tiny_model(kind)
    ids = tokens()
    diff = (logits(converted(model, variant, **overrides), ids) - logits(model, ids)).abs().max().item()
    if reproduces:
        assert diff <= 1e-5
    else:
        assert diff > 1e-3


@pytest.mark.parametrize("kind, own", [("qwen3", ["q_norm.weight", "k_norm.weight"]), ("qwen2", ["q_proj.bias"])])
def test_conversion_reuses_the_model_weights_and_reports_the_new_ones(kind, own):
    model = tiny_model(kind)
    original = model.model.layers[1].self_attn
    kept = {name: p for name, p in original.named_parameters()}
    convert(model, "msa", layers=[1], **TINY["msa"])
    layer = model.model.layers[1].self_attn
    assert isinstance(layer, SparseSelfAttention) and not isinstance(model.model.layers[0].self_attn,
                                                                     SparseSelfAttention)
    assert all(layer.get_parameter(name) is p for name, p in kept.items())  # the same tensors, not copies
    report = model.sparsezoo_conversion
    assert report.layers == [1] and report.variant == "msa"
    assert sorted(report.reused) == sorted(f"model.layers.1.self_attn.{n}" for n in kept)
    assert all(f"model.layers.1.self_attn.{n}" in report.reused for n in ["q_proj.weight", "o_proj.weight", *own])
    assert report.new == ["model.layers.1.self_attn.variant.index_q.weight",
                          "model.layers.1.self_attn.variant.index_k.weight"]
    assert "+ model.layers.1.self_attn.variant.index_q.weight" in str(report)
    assert set(model.state_dict()) >= set(report.reused) | set(report.new)


def test_index_branch_trains_through_the_converted_model():
    model = convert(tiny_model("llama"), sparsezoo.make_config({"variant": "msa", **TINY["msa"]}, d_model=64)).train()
    ids = tokens()
    model(ids, labels=ids).loss.backward()
    kl = sparsezoo.aux_loss(model)
    assert kl is not None and kl.requires_grad
    kl.backward()
    assert model.model.layers[0].self_attn.variant.index_q.weight.grad.abs().sum() > 0


# -- running: caches ------------------------------------------------------------------------------
@pytest.mark.parametrize("variant, kind", [("dense", "llama"), ("msa", "qwen3"), ("dsa", "mistral"),
                                           ("nsa", "llama"), ("csa", "qwen2"), ("moba", "llama")])
def test_cached_generation_equals_uncached(variant, kind):
    assert_cached_generation_matches(converted(tiny_model(kind), variant), tokens(length=20))


@pytest.mark.parametrize("variant", ["msa", "nsa", "csa"])
def test_cache_holds_the_variant_state_through_chunked_prefill_and_crop(variant):
    model = converted(tiny_model("llama"), variant)
    ids = tokens()
    full = logits(model, ids)
    cache = DynamicCache()
    chunks = [logits(model, ids[:, a:b], **{CACHE_ARG: cache}, use_cache=True) for a, b in [(0, 20), (20, T)]]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=0)
    for layer in cache.layers:
        assert isinstance(layer, SparseCacheLayer) and set(layer.extras) == CACHED[variant]
        assert all(t.shape[dim] == T for t, dim in layer.extras.values())
    cache.crop(-8)  # drop the last 8 tokens (K/V and the variant's buffers), then feed them again
    assert all(t.shape[dim] == T - 8 for layer in cache.layers for t, dim in layer.extras.values())
    again = logits(model, ids[:, T - 8:], **{CACHE_ARG: cache}, use_cache=True)
    torch.testing.assert_close(again, full[:, T - 8:], atol=1e-5, rtol=0)


def test_beam_search_reorders_the_variant_state_with_the_cache():
    assert_cached_generation_matches(converted(tiny_model("llama"), "dsa", topk=4), tokens(length=20), num_beams=3)


def test_caches_other_than_dynamic_are_refused():
    model = converted(tiny_model("llama"), "msa")
    cache = StaticCache(config=model.config, max_cache_len=64)
    with pytest.raises(TypeError, match="DynamicLayer"):
        model(tokens(), **{CACHE_ARG: cache}, use_cache=True)


# -- running: attention masks ---------------------------------------------------------------------------
def test_all_ones_masks_run_batched_and_inner_padding_is_refused():
    """Padded batches themselves: tests/test_padding.py."""
    model = converted(tiny_model("llama"), "msa")
    ids = tokens()
    ones = torch.ones_like(ids)
    with sparsezoo.ops.track_implementations() as used:
        torch.testing.assert_close(logits(model, ids, attention_mask=ones), logits(model, ids), atol=0, rtol=0)
    assert "varlen" not in used  # no padding: one batched attend
    inner = ones.clone()
    inner[0, 5] = 0
    with pytest.raises(ValueError, match="cannot honour"):
        model(ids, attention_mask=inner)
    with pytest.raises(ValueError, match="cannot honour"):
        model.generate(ids, attention_mask=inner, max_new_tokens=2, pad_token_id=0)


def test_eager_models_pass_their_causal_mask():
    model = tiny_model("llama", attn_implementation="eager")
    ids = tokens()
    sparse = converted(model, "dense")
    torch.testing.assert_close(logits(sparse, ids), logits(model, ids), atol=1e-5, rtol=0)
    assert_cached_generation_matches(sparse, tokens(length=20))


# -- registering ------------------------------------------------------------------------------------
def test_weightless_variants_are_registered_as_attention_implementations():
    assert REGISTERED_ATTENTION == ["sparsezoo_dense", "sparsezoo_moba"]
    model = tiny_model("qwen3")
    ids = tokens()
    ref = logits(model, ids)
    registered = lambda impl, **settings: tiny_model("qwen3", attn_implementation=impl, sparsezoo_attention=settings)
    torch.testing.assert_close(logits(registered("sparsezoo_dense"), ids), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(registered("sparsezoo_moba", block_size=8, topk=T // 8), ids), ref,
                               atol=1e-5, rtol=0)
    moba = registered("sparsezoo_moba", block_size=8, topk=2)
    assert moba.config._attn_implementation == "sparsezoo_moba"
    assert (logits(moba, ids) - ref).abs().max() > 1e-3
    assert_cached_generation_matches(moba, tokens(length=20))
    padded = torch.ones_like(ids)  # row 1 left-padded: its real tokens give what they give alone
    padded[1, :3] = 0
    torch.testing.assert_close(logits(moba, ids, attention_mask=padded)[1, 3:], logits(moba, ids[1:, 3:])[0],
                               atol=1e-5, rtol=0)
    inner = torch.ones_like(ids)
    inner[1, 3] = 0
    with pytest.raises(ValueError, match="cannot honour"):
        moba(ids, attention_mask=inner)


# -- exporting the example GPT ----------------------------------------------------------------------------
def test_example_gpt_round_trips_as_a_pretrained_model(tmp_path):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, layers=["dense", "msa"],
                        attention_overrides={"msa": {"block_size": 8, "topk": 2, "index_dim": 16}})).eval()
    SparsezooGPTForCausalLM.from_gpt(gpt).save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, SparsezooGPTForCausalLM)
    assert loaded.config.gpt_config() == gpt.config
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(2))
    out = loaded(ids, labels=ids)
    torch.testing.assert_close(out.logits, gpt(ids)[0], atol=0, rtol=0)
    torch.testing.assert_close(out.loss, gpt(ids[:, :-1], ids[:, 1:])[1], atol=1e-6, rtol=0)


# -- errors ---------------------------------------------------------------------------------------------
def test_unsupported_inputs_fail_with_a_reason():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model types"):
        convert(gpt2, "dense")
    with pytest.raises(ValueError, match="sliding"):
        convert(tiny_model("mistral", sliding_window=16), "dense")
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="unknown variant"):
        convert(model, "no_such_variant")
    with pytest.raises(ConfigError, match="come from the model"):
        convert(model, "msa", head_dim=32)
    with pytest.raises(ValueError, match="indices"):
        convert(model, "dense", layers=[2])
    convert(model, "dense", layers=[0])
    with pytest.raises(ValueError, match="converted already"):
        convert(model, "msa", layers=[0, 1])
    assert not isinstance(model.model.layers[1].self_attn, SparseSelfAttention)  # nothing changed on failure
