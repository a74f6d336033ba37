"""Registry-wide tests: every registered variant gets them automatically (timm style)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

import sparsezoo
from sparsezoo import ConfigError, create_attention, list_variants, make_config
from sparsezoo.cache import LayerCache

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VARIANTS = list_variants()


def build(name: str, **overrides):
    torch.manual_seed(0)
    return create_attention(CONFIGS / f"{name}.yaml", **overrides).double()


def test_core_variants_registered():
    assert {"dense", "msa"} <= set(VARIANTS)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_has_a_yaml_config(name):
    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert data["variant"] == name


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_shape_and_backward(name):
    layer = build(name).train()
    x = torch.randn(2, 150, layer.config.d_model, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    loss = y.square().mean()
    if layer.aux_loss is not None:
        assert torch.isfinite(layer.aux_loss)
        loss = loss + layer.aux_loss
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if pname == "v_proj" and layer.v_proj is None:  # CSA's shared K = V: k_proj makes both
            continue
        assert getattr(layer, pname).weight.grad is not None, pname


@pytest.mark.parametrize("name", VARIANTS)
def test_state_dict_round_trip(name):
    a, b = build(name).eval(), create_attention(CONFIGS / f"{name}.yaml").double().eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 70, a.config.d_model, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_causality(name):
    layer = build(name).eval()
    x = torch.randn(1, 130, layer.config.d_model, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 90:] = torch.randn_like(x2[:, 90:])
    torch.testing.assert_close(layer(x)[:, :90], layer(x2)[:, :90], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", VARIANTS)
def test_cached_decode_and_chunked_prefill_equal_prefill(name):
    layer = build(name).eval()
    B, T = 2, 140
    x = torch.randn(B, T, layer.config.d_model, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        cache = LayerCache(B, T)
        pieces, start = [], 0
        for step in [60, 33, 1, 1, 1, 20, 1]:  # chunked prefill, then decode steps
            pieces.append(layer(x[:, start:start + step], cache=cache))
            start += step
        while start < T:
            pieces.append(layer(x[:, start:start + 1], cache=cache))
            start += 1
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_pattern_is_causal_boolean_map(name):
    layer = build(name).eval()
    x = torch.randn(1, 96, layer.config.d_model, dtype=torch.float64)
    pat = layer.kv_pattern(x)
    assert pat.dtype == torch.bool and tuple(pat.shape) == (1, layer.n_heads, 96, 96)
    assert not pat.triu(1).any()  # causal
    assert pat.any(-1).all()  # every query reads at least one key


@pytest.mark.parametrize("name", VARIANTS)
def test_bad_input_shape_is_rejected(name):
    layer = build(name)
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(1, 10, layer.config.d_model + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(10, layer.config.d_model, dtype=torch.float64))


@pytest.mark.parametrize("name", VARIANTS)
def test_config_errors_name_the_choices(name):
    with pytest.raises(ConfigError, match="valid fields"):
        make_config(CONFIGS / f"{name}.yaml", no_such_field=1)
    with pytest.raises(ConfigError, match="choose one of"):
        make_config(CONFIGS / f"{name}.yaml", backend="warp-speed")
    with pytest.raises(ConfigError, match="multiple of n_kv_heads"):
        make_config(CONFIGS / f"{name}.yaml", n_heads=6, n_kv_heads=4)
    with pytest.raises(ConfigError, match="must be int"):
        make_config(CONFIGS / f"{name}.yaml", n_heads="8")
    config_class = type(make_config(CONFIGS / f"{name}.yaml"))
    for field in config_class.all_non_negative():
        make_config(CONFIGS / f"{name}.yaml", **{field: 0})  # zero is allowed
        with pytest.raises(ConfigError, match=f"{field} must be >= 0"):
            make_config(CONFIGS / f"{name}.yaml", **{field: -1})


def test_unknown_variant_names_the_choices():
    with pytest.raises(ConfigError, match="choose one of"):
        create_attention({"variant": "nope"})
    with pytest.raises(ConfigError, match="must name its 'variant'"):
        create_attention({"d_model": 8})


def test_config_sources_agree():
    from_yaml = make_config(CONFIGS / "msa.yaml")
    from_dict = make_config(yaml.safe_load((CONFIGS / "msa.yaml").read_text()))
    from_dataclass = make_config(from_dict)
    assert from_yaml == from_dict == from_dataclass


def test_layer_shapes_from_performance_doc():
    m3 = make_config({"variant": "msa", "shape": "m3"})
    assert (m3.n_heads, m3.n_kv_heads, m3.head_dim, m3.block_size, m3.topk, m3.index_dim) == (64, 4, 128, 128, 16, 128)
    m2 = make_config({"variant": "dense", "shape": "m2"})
    assert (m2.n_heads, m2.n_kv_heads, m2.head_dim) == (48, 8, 128)
    with pytest.raises(ConfigError, match="choose one of"):
        make_config({"variant": "dense", "shape": "m9"})


def test_registration_is_one_decorator_and_duplicates_fail():
    @dataclass
    class ToyConfig(sparsezoo.AttentionConfig):
        variant: str = "toy_for_test"

    @sparsezoo.register_variant("toy_for_test")
    class Toy(sparsezoo.variants.dense.DenseAttention):
        config_class = ToyConfig

    assert "toy_for_test" in sparsezoo.list_variants()
    assert isinstance(create_attention({"variant": "toy_for_test"}), Toy)
    with pytest.raises(ValueError, match="registered twice"):
        sparsezoo.register_variant("toy_for_test")(type("Other", (Toy,), {}))
    sparsezoo.registry._VARIANTS.pop("toy_for_test")


def test_cache_rejects_overflow_and_mismatch():
    cache = LayerCache(1, 8)
    cache.append("k", torch.zeros(1, 2, 5, 4), seq_dim=2)
    cache.advance(5)
    with pytest.raises(ValueError, match="overflow"):
        cache.append("k", torch.zeros(1, 2, 4, 4), seq_dim=2)
    with pytest.raises(ValueError, match="holds"):
        cache.append("k", torch.zeros(1, 2, 1, 4, dtype=torch.float64), seq_dim=2)
    with pytest.raises(ValueError, match="max_batch_size"):
        cache.append("k", torch.zeros(2, 2, 1, 4), seq_dim=2)


def test_a_bare_variant_name_uses_the_packaged_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the name must resolve inside the package
    layer = create_attention("msa")
    assert type(layer).__name__ == "MSAAttention" and layer.config.block_size == 64
    with pytest.raises(ConfigError, match=r"no packaged config named 'msaa'; packaged: \['csa', 'dense'.*'msa'"):
        create_attention("msaa")
    with pytest.raises(ConfigError, match="not found: nope.yaml"):
        create_attention("nope.yaml")
