"""Compiled generation with a static decode step (docs/models.md, "torch.compile").

Every variant has a static step (`decode_static`) over `static_state(cache)`: whole preallocated buffers and
fixed-size entries or states, a position tensor, no host reads. CPU, eager: `GPT.decode_step` gives the cached
decode's logits at every position (fp64: to rounding; fp32: fp32 tolerance), for every variant and the options
that change its step, and reads no slot past its position (NaN or huge values there change nothing). CPU,
compiled: `decode_step` traced with fullgraph=True through Dynamo + AOTAutograd ("aot_eager") compiles once for
every position of a generation and gives eager generate's tokens (greedy), for dense and MSA models and one
model with a layer of every variant. GPU (`gpu`): mode="reduce-overhead" records a CUDA graph and replays it.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import sparsezoo
from sparsezoo.models import GPT, GPTConfig, static_decode_variants
from sparsezoo.ops import implementations_used
from tests.test_compile import cold_start  # noqa: F401  (autouse: a fresh Dynamo state per test)

TOL = dict(rtol=1e-4, atol=1e-5)
FP64_TOL = dict(rtol=1e-9, atol=1e-11)
# small configs whose selections matter within 50 tokens; the entries of NSA, CSA and the block means of MoBA
# complete at positions 3 mod 4 (MoBA: 7 mod 8), so position 47 completes one and position 40 none
MSA = {"block_size": 16, "topk": 2, "index_dim": 16}  # 1 ranked block + the local one: selection matters past 32
DSA = {"topk": 8, "n_index_heads": 2, "index_dim": 16}
MOBA = {"block_size": 8, "topk": 3}
NSA = {"cmp_block": 8, "cmp_stride": 4, "sel_block": 8, "sel_topk": 4, "window": 8, "compressor_hidden": 16}
CSA = {"compress_ratio": 4, "topk": 4, "window": 8, "n_index_heads": 2, "index_dim": 16}
CSA_SIMPLE = {  # the earlier design: separate K and V, scalar gate, mean index keys, no sink, no overlap
    **CSA,
    "shared_kv": False,
    "compressor": "scalar_gate",
    "index_compressor": "mean",
    "attn_sink": False,
    "q_norm": False,
    "index_rope": False,
    "overlap": False,
}
LINEAR = {"backend": "reference"}  # fla-core's kernels otherwise (eager on the CPU: the Triton interpreter)
MODELS = {
    "dense": (["dense", "dense"], {}),
    "msa": (["dense", "msa"], {"msa": MSA}),
    "msa_warmup": (["msa", "msa"], {"msa": {**MSA, "routing": "dense"}}),
    "dsa": (["dense", "dsa"], {"dsa": DSA}),
    "dsa_group_fp8": (["dsa", "dsa"], {"dsa": {**DSA, "select_per": "group", "index_quant": "fp8"}}),
    "dsa_warmup": (["dsa", "dsa"], {"dsa": {**DSA, "routing": "dense"}}),
    "moba": (["dense", "moba"], {"moba": MOBA}),
    "nsa": (["dense", "nsa"], {"nsa": NSA}),
    "nsa_shared_kv": (["nsa", "nsa"], {"nsa": {**NSA, "separate_kv": False, "gate_mlp_hidden": 16}}),
    "csa": (["dense", "csa"], {"csa": CSA}),
    "csa_mqa_fp4": (["csa", "csa"], {"csa": {**CSA, "index_quant": "fp4", "n_kv_heads": 1}}),  # V4: MQA
    "csa_simple": (["csa", "csa"], {"csa": CSA_SIMPLE}),
    "csa_simple_overlap": (["csa", "csa"], {"csa": {**CSA_SIMPLE, "overlap": True, "shared_kv": True}}),
    "lightning": (["lightning", "dense"], {"lightning": LINEAR}),
    "gdn": (["gdn", "dense"], {"gdn": LINEAR}),
}
EVERY = ["dense", "nsa", "csa", "dsa", "moba", "gdn", "lightning", "msa"]
MIXED = {
    "mixed": (
        EVERY,
        {"msa": MSA, "dsa": DSA, "moba": MOBA, "nsa": NSA, "csa": CSA, "lightning": LINEAR, "gdn": LINEAR},
    )
}
COMPILED = {name: MODELS[name] for name in ("dense", "msa", "msa_warmup")} | MIXED


def tiny_gpt(layers=("dense", "dense"), device="cpu", dtype=torch.float32, **overrides) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=64, d_model=64, n_heads=4, n_kv_heads=2, layers=list(layers), attention_overrides=overrides
    )
    return GPT(config).to(device=device, dtype=dtype).eval()


def model_of(name, models=MODELS, **kwargs) -> GPT:
    layers, overrides = (models | MIXED)[name]
    return tiny_gpt(layers, **overrides, **kwargs)


def prompts(B=2, T=5, device="cpu", seed=1):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed)).to(device)


def test_every_variant_has_a_static_step():
    assert static_decode_variants() == sparsezoo.list_variants()
    assert set(EVERY) == set(sparsezoo.list_variants())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", MODELS)
def test_step_logits_match_cached_decode(name, dtype):
    """Eager decode_step over the static state == the cached forward, one token at a time, at every position."""
    model, idx = model_of(name, dtype=dtype), prompts(T=20)
    B, T, n = idx.shape[0], idx.shape[1], 30
    seq = torch.cat([idx, prompts(T=n, seed=3)], 1)
    with torch.no_grad():
        model.setup_cache(B, T + n)
        model(idx, use_cache=True)
        expected = [model(seq[:, T + i : T + i + 1], use_cache=True)[0] for i in range(n)]
        model.setup_cache(B, T + n, contiguous=True)
        model(idx, use_cache=True)
        state = model._static_kv()
        for i in range(n):
            pos = torch.full((1,), T + i, dtype=torch.long)
            logits = model.decode_step(seq[:, T + i : T + i + 1], pos, state)
            torch.testing.assert_close(logits, expected[i], **(FP64_TOL if dtype == torch.float64 else TOL))
    model.clear_cache()


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_generate_compiles_once_and_matches_eager(name):
    model, idx = model_of(name), prompts(T=20)
    n = 30  # 29 decode steps after the prefill, over 4 MSA blocks
    expected = model.generate(idx, n)
    counter = CompileCounterWithBackend("aot_eager")
    got = model.generate(idx, n, compile={"backend": counter})
    assert counter.frame_count == 1, "one graph for every position"
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(got, expected)
    assert implementations_used()["decode_step"] == "static_compiled"


def test_compiled_graph_is_reused_per_shape():
    model, idx = tiny_gpt(), prompts()
    n = 10
    counter = CompileCounterWithBackend("aot_eager")
    assert torch.equal(model.generate(idx, n, compile={"backend": counter}), model.generate(idx, n))
    assert counter.frame_count == 1
    # a second generation of the same shapes (fresh cache buffers) reuses the graph ...
    idx2 = prompts(seed=2)
    assert torch.equal(model.generate(idx2, n, compile={"backend": counter}), model.generate(idx2, n))
    assert counter.frame_count == 1
    # ... another cache length (prompt + new tokens) is another buffer shape: one more graph
    idx3 = prompts(T=3, seed=3)
    assert torch.equal(model.generate(idx3, n, compile={"backend": counter}), model.generate(idx3, n))
    assert counter.frame_count == 2


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_step_logits_match_eager_forward(name):
    model, idx = model_of(name), prompts(T=20)
    B, T, n = idx.shape[0], idx.shape[1], 30
    seq = torch.cat([idx, prompts(T=n, seed=3)], 1)
    with torch.no_grad():
        eager, _ = model(seq)  # full causal forward: the oracle
        model.setup_cache(B, T + n, contiguous=True)
        model(idx, use_cache=True)
        kv = model._static_kv()
        step = torch.compile(model.decode_step, backend="aot_eager", fullgraph=True)
        for i in range(n):
            pos = torch.full((1,), T + i, dtype=torch.long)
            logits = step(seq[:, T + i : T + i + 1], pos, kv)
            torch.testing.assert_close(logits[:, 0], eager[:, T + i], **TOL)
    model.clear_cache()


@pytest.mark.parametrize("T", [40, 47], ids=["mid_entry", "entry_completes"])
@pytest.mark.parametrize("junk", [float("nan"), 1e4])
@pytest.mark.parametrize("name", MODELS)
def test_no_slot_past_the_position_is_read(name, junk, T):
    model, idx = model_of(name), prompts(T=T)
    B = idx.shape[0]
    nxt = prompts(T=1, seed=4)
    pos = torch.full((1,), T, dtype=torch.long)
    with torch.no_grad():
        model.setup_cache(B, T + 24, contiguous=True)
        model(idx, use_cache=True)
        state = model._static_kv()
        clean = [{n: b.clone() for n, b in layer.items()} for layer in state]
        expected = model.decode_step(nxt, pos, clean)
        for block, layer in zip(model.blocks, state):  # everything after the position holds junk
            for n, buf in layer.items():
                slots = block.attn.static_slots(n, T)
                if slots is not None:
                    dim, filled = slots
                    buf.narrow(dim, filled, buf.shape[dim] - filled).fill_(junk)
        got = model.decode_step(nxt, pos, state)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for block, layer, layer0 in zip(model.blocks, state, clean):  # the same writes either way
        for n, buf in layer.items():
            slots = block.attn.static_slots(n, T + 1)
            if slots is None:  # a fixed-size state: updated whole
                torch.testing.assert_close(buf, layer0[n], rtol=0, atol=0)
                continue
            dim, filled = slots
            torch.testing.assert_close(buf.narrow(dim, 0, filled), layer0[n].narrow(dim, 0, filled), rtol=0, atol=0)
            if filled > block.attn.static_slots(n, T)[1]:  # the step wrote a slot (a token, an entry completed)
                assert buf.narrow(dim, filled - 1, 1).abs().sum() > 0, n
    model.clear_cache()


def test_refusals_name_the_static_variants(monkeypatch):
    for name in ("moba", "nsa"):  # a variant without a static step (none of the built-in ones)
        monkeypatch.setattr(sparsezoo.variant_class(name), "static_decode", False)
    have = [v for v in sparsezoo.list_variants() if v not in ("moba", "nsa")]
    assert static_decode_variants() == have
    model = tiny_gpt(["dense", "moba", "nsa"], moba=MOBA, nsa=NSA)
    with pytest.raises(ValueError, match=re.escape("['moba', 'nsa'] have none") + ".*" + re.escape(repr(have))):
        model.generate(prompts(), 4, compile=True)
    model = tiny_gpt()
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="unpadded prompts"):
        model.generate(prompts(), 4, compile=True, attention_mask=mask)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(prompts(), 4, compile=True, use_cache=False)
    with pytest.raises(ValueError, match="paged"):
        tiny_gpt(["msa"], msa={**MSA, "decode_backend": "triton"}).generate(prompts(), 4, compile=True)
    with pytest.raises(TypeError, match="compile must be"):
        model.generate(prompts(), 4, compile="yes")
    # an all-ones mask is no padding: allowed
    counter = CompileCounterWithBackend("aot_eager")
    got = model.generate(prompts(), 4, compile={"backend": counter}, attention_mask=torch.ones(2, 5, dtype=torch.long))
    assert torch.equal(got, model.generate(prompts(), 4))


def reference_backends(overrides: dict, layers) -> dict:
    """Every backend field of every layer's config set to "reference" (fp32 references on both sides of a
    GPU comparison, so greedy tokens must agree exactly)."""
    out = {}
    for variant in set(layers) - {"dense"}:
        fields = {f.name for f in dataclasses.fields(sparsezoo.variant_class(variant).config_class)}
        backends = {f: "reference" for f in ("backend", "select_backend", "decode_backend") if f in fields}
        out[variant] = {**overrides.get(variant, {}), **backends}
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS | MIXED)
def test_cuda_graph_decode_matches_eager(name):
    from torch._inductor import cudagraph_trees

    layers, overrides = (MODELS | MIXED)[name]
    model = tiny_gpt(layers, device="cuda", **reference_backends(overrides, layers))
    idx = prompts(T=20, device="cuda")
    n = 30
    expected = model.generate(idx, n)
    got = model.generate(idx, n, compile=True)  # CUDA: mode="reduce-overhead", Inductor
    assert counters["stats"]["unique_graphs"] == 1, "one graph for every position"
    assert counters["inductor"]["cudagraph_skips"] == 0, "CUDA graphs were skipped"
    manager = cudagraph_trees.get_manager(idx.device.index or 0, create_if_none_exists=False)
    assert manager is not None and sum(len(nodes) for nodes in manager.roots.values()) >= 1, "no CUDA graph recorded"
    assert torch.equal(got, expected)
    again = model.generate(idx, n, compile={"mode": "reduce-overhead"})  # fresh buffers: the graph re-records
    assert torch.equal(again, expected) and counters["stats"]["unique_graphs"] == 1
