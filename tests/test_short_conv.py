"""GPTConfig.short_conv: a causal depthwise convolution (with a residual) on every attention layer's input.

fp64 on the CPU: the convolution equals torch's Conv1d; it is causal; cached decode, chunked prefill and the
static decode step equal one full forward (dense and MSA); padded batches and packed documents equal each
sequence alone; context parallelism is refused by name; the config checks its value and round-trips through
dicts, YAML and checkpoints.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import given
from hypothesis import strategies as st

from sparsezoo.config import ConfigError
from sparsezoo.models import GPT, GPTConfig, load_model, save_checkpoint
from sparsezoo.models.short_conv import ShortConv
from sparsezoo.models.train import TrainConfig, _context_parallel_groups, Dist

MSA = {"block_size": 8, "topk": 2, "index_dim": 8, "index_rope": True, "select_backend": "reference"}
TOL = dict(atol=1e-10, rtol=1e-10)


def tiny_gpt(variant: str = "dense", short_conv: int = 4, n_layers: int = 2) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=64,
        d_model=32,
        n_layers=n_layers,
        n_heads=4,
        n_kv_heads=2,
        attention=variant,
        attention_overrides={"msa": MSA} if variant == "msa" else {},
        short_conv=short_conv,
    )
    return GPT(config).double().eval()


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 64, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("width", [1, 2, 4])
def test_the_convolution_is_a_causal_depthwise_conv1d_plus_its_input(width):
    torch.manual_seed(0)
    conv = ShortConv(6, width).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    want = x + F.conv1d(F.pad(x.transpose(1, 2), (width - 1, 0)), conv.weight[:, None, :], groups=6).transpose(1, 2)
    got, tail = conv.step(x)
    torch.testing.assert_close(got, want, **TOL)
    assert tail.shape == (2, width - 1, 6) and torch.equal(tail, x[:, 9 - (width - 1) :])
    # in pieces, each continuing from the last one's tail
    first, tail = conv.step(x[:, :4])
    second, _ = conv.step(x[:, 4:], tail)
    torch.testing.assert_close(torch.cat([first, second], 1), want, **TOL)


@given(pos=st.integers(0, 19), width=st.integers(1, 5))
def test_a_future_token_changes_no_earlier_output(pos, width):
    model = tiny_gpt(short_conv=width)
    idx = tokens(2, 20)
    changed = idx.clone()
    changed[:, pos] = (changed[:, pos] % 63) + 1
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :pos], b[:, :pos], atol=0, rtol=0)
    assert not torch.allclose(a[:, pos], b[:, pos])


@pytest.mark.parametrize("variant", ["dense", "msa"])
def test_cached_decode_and_chunked_prefill_equal_one_forward(variant):
    model = tiny_gpt(variant)
    idx = tokens(2, 40)
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_cache(2, 48)
        parts = [model(idx[:, :17], use_cache=True)[0], model(idx[:, 17:19], use_cache=True)[0]]
        parts += [model(idx[:, t : t + 1], use_cache=True)[0] for t in range(19, 40)]
    torch.testing.assert_close(torch.cat(parts, 1), full, **TOL)
    assert torch.equal(model.generate(idx[:, :30], 8), model.generate(idx[:, :30], 8, use_cache=False))
    assert model.caches is None and model.conv_caches is None  # generate frees both


def test_without_short_conv_the_model_has_no_conv_and_the_cache_no_conv_state():
    model = tiny_gpt(short_conv=0)
    assert not [n for n in model.state_dict() if "short_conv" in n]
    model.setup_cache(1, 8)
    assert model.conv_caches is None
    assert sum("short_conv" in n for n in tiny_gpt(short_conv=3).state_dict()) == 2  # one [d_model, 3] per layer


@pytest.mark.parametrize("variant", ["dense", "msa"])
def test_static_decode_step_equals_the_cached_decode(variant):
    model = tiny_gpt(variant)
    idx = tokens(2, 36)
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_cache(2, 40, contiguous=True)
        model(idx[:, :20], use_cache=True)
        kv, conv = model._static_kv(), model._static_conv()
        for t in range(20, 36):
            logits = model.decode_step(idx[:, t : t + 1], torch.full((1,), t), kv, conv)
            torch.testing.assert_close(logits[:, 0], full[:, t], **TOL)
        with pytest.raises(ValueError, match="conv state"):
            model.decode_step(idx[:, :1], torch.full((1,), 36), kv)
    model.clear_cache()


def test_compiled_generate_equals_eager():
    model = tiny_gpt().float()
    idx = tokens(2, 12)
    assert torch.equal(model.generate(idx, 10, compile={"backend": "aot_eager"}), model.generate(idx, 10))


@pytest.mark.parametrize("variant", ["dense", "msa"])
def test_left_padded_prompts_generate_as_each_alone(variant):
    model = tiny_gpt(variant)
    lengths = [14, 5, 9]
    T = max(lengths)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 64, (n,), generator=g) for n in lengths]
    ids = torch.stack([torch.cat([torch.zeros(T - len(p), dtype=torch.long), p]) for p in prompts])
    mask = ids != 0
    with torch.no_grad():
        logits, _ = model(ids, attention_mask=mask)
        for b, p in enumerate(prompts):
            torch.testing.assert_close(logits[b, T - len(p) :], model(p[None])[0][0], **TOL)
    cached = model.generate(ids, 6, attention_mask=mask)
    assert torch.equal(cached, model.generate(ids, 6, attention_mask=mask, use_cache=False))
    for b, p in enumerate(prompts):
        assert torch.equal(cached[b, T - len(p) :], model.generate(p[None], 6)[0])


def test_packed_documents_equal_each_alone():
    model = tiny_gpt("msa")
    ids = tokens(1, 30)
    bounds = [0, 3, 3, 17, 30]  # an empty document too
    with torch.no_grad():
        logits, _ = model(ids, cu_seqlens=torch.tensor(bounds))
        for a, b in zip(bounds, bounds[1:]):
            if b > a:
                torch.testing.assert_close(logits[:, a:b], model(ids[:, a:b])[0], **TOL)


def test_refusals_and_cache_mismatches_name_the_option():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="short_conv does not run context-parallel"):
        model(tokens(1, 8), context_parallel=object())
    with pytest.raises(ConfigError, match="model.short_conv does not run context-parallel"):
        _context_parallel_groups(TrainConfig(context_parallel=2), Dist(), model)
    with torch.no_grad():
        model.setup_cache(2, 16)
        model(tokens(2, 5), use_cache=True)
        model.conv_caches[1].pos = 3  # out of step with the attention cache
        with pytest.raises(ValueError, match="short_conv state has seen 3 tokens"):
            model(tokens(2, 1), use_cache=True)
        for cache in model.caches:  # resetting the attention caches starts a new sequence for the conv too
            cache.reset()
        model.conv_caches[1].pos = 5
        fresh = model(tokens(1, 6), use_cache=True)[0]
        torch.testing.assert_close(fresh, model(tokens(1, 6))[0], **TOL)


@pytest.mark.parametrize(
    "bad, match", [(-1, "short_conv must be >= 0"), (True, "short_conv must be int"), (2.0, "short_conv must be int")]
)
def test_config_checks_the_value(bad, match):
    with pytest.raises(ConfigError, match=match):
        GPTConfig(short_conv=bad)


def test_config_round_trip_through_dict_yaml_and_checkpoint(tmp_path):
    config = GPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, short_conv=3)
    assert GPTConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": config.to_dict()}))
    assert GPTConfig.from_yaml(path) == config and "short_conv: 3" in path.read_text()
    assert GPTConfig.from_dict({"vocab_size": 64}).short_conv == 0  # older configs: off
    torch.manual_seed(0)
    model = GPT(config).eval()
    save_checkpoint(tmp_path / "ckpt", model, {"model": config.to_dict(), "data": {}, "train": {}})
    loaded, report = load_model(tmp_path / "ckpt")
    assert report.exact and loaded.config.short_conv == 3
    idx = tokens(1, 10)
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], atol=0, rtol=0)


def test_the_transformers_export_keeps_short_conv(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from sparsezoo.integrations.transformers import SparsezooGPTForCausalLM

    gpt = tiny_gpt(short_conv=3).float()
    SparsezooGPTForCausalLM.from_gpt(gpt).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.gpt_config() == gpt.config
    idx = tokens(1, 12)
    torch.testing.assert_close(loaded(idx).logits, gpt(idx)[0], atol=0, rtol=0)
