"""Compiled generation with a static decode step (docs/models.md, "torch.compile").

CPU: `GPT.decode_step` traced with fullgraph=True through Dynamo + AOTAutograd ("aot_eager") compiles
once for every position of a generation, and gives eager generate's tokens (greedy) and logits (fp32
tolerance). The step reads no cache slot past its position. GPU (`gpu`): mode="reduce-overhead" records
a CUDA graph and replays it.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from sparsezoo.models import GPT, GPTConfig, static_decode_variants
from sparsezoo.ops import implementations_used
from tests.test_compile import cold_start  # noqa: F401  (autouse: a fresh Dynamo state per test)

TOL = dict(rtol=1e-4, atol=1e-5)
MSA = {"block_size": 16, "topk": 2, "index_dim": 16}  # 1 ranked block + the local one: selection matters past 32
NSA = {"cmp_block": 16, "cmp_stride": 8, "sel_block": 16, "sel_topk": 3, "window": 16, "compressor_hidden": 32}
MODELS = {
    "dense": (["dense", "dense"], {}),
    "msa": (["dense", "msa"], {"msa": MSA}),
    "msa_warmup": (["msa", "msa"], {"msa": {**MSA, "routing": "dense"}}),
}


def tiny_gpt(layers=("dense", "dense"), device="cpu", **overrides) -> GPT:
    torch.manual_seed(0)
    return (
        GPT(
            GPTConfig(
                vocab_size=64, d_model=64, n_heads=4, n_kv_heads=2, layers=list(layers), attention_overrides=overrides
            )
        )
        .to(device)
        .eval()
    )


def prompts(B=2, T=5, device="cpu", seed=1):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("name", MODELS)
def test_compiled_generate_compiles_once_and_matches_eager(name):
    layers, overrides = MODELS[name]
    model, idx = tiny_gpt(layers, **overrides), prompts(T=20)
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


@pytest.mark.parametrize("name", MODELS)
def test_step_logits_match_eager_forward(name):
    layers, overrides = MODELS[name]
    model, idx = tiny_gpt(layers, **overrides), prompts(T=20)
    B, T, n = idx.shape[0], idx.shape[1], 30
    seq = torch.cat([idx, prompts(T=n, seed=3)], 1)
    with torch.no_grad():
        eager, _ = model(seq)  # full causal forward: the oracle
        model.setup_cache(B, T + n)
        model(idx, use_cache=True)
        kv = model._static_kv()
        step = torch.compile(model.decode_step, backend="aot_eager", fullgraph=True)
        for i in range(n):
            pos = torch.full((1,), T + i, dtype=torch.long)
            logits = step(seq[:, T + i : T + i + 1], pos, kv)
            torch.testing.assert_close(logits[:, 0], eager[:, T + i], **TOL)
    model.clear_cache()


@pytest.mark.parametrize("name", ["dense", "msa"])
@pytest.mark.parametrize("junk", [float("nan"), 1e4])
def test_no_slot_past_the_position_is_read(junk, name):
    layers, overrides = MODELS[name]
    model, idx = tiny_gpt(layers, **overrides), prompts(T=40)
    B, T = idx.shape
    nxt = prompts(T=1, seed=4)
    pos = torch.full((1,), T, dtype=torch.long)
    with torch.no_grad():
        model.setup_cache(B, T + 24)
        model(idx, use_cache=True)
        kv = model._static_kv()
        clean = [{n: b.clone() for n, b in buffers.items()} for buffers in kv]
        expected = model.decode_step(nxt, pos, clean)
        for buffers in kv:  # everything after the position holds junk
            for buf in buffers.values():
                buf.narrow(buf.dim() - 2, T + 1, buf.shape[-2] - T - 1).fill_(junk)
        got = model.decode_step(nxt, pos, kv)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for buffers, buffers0 in zip(kv, clean):  # the step wrote slot T, the same entries either way
        for n, buf in buffers.items():
            written = buffers0[n].narrow(buf.dim() - 2, T, 1)
            torch.testing.assert_close(buf.narrow(buf.dim() - 2, 0, T + 1), buffers0[n].narrow(buf.dim() - 2, 0, T + 1))
            assert written.abs().sum() > 0, n
    model.clear_cache()


def test_refusals_name_the_static_variants():
    assert static_decode_variants() == ["dense", "msa"]
    model = tiny_gpt(["dense", "moba", "nsa"], moba={"block_size": 16, "topk": 2}, nsa=NSA)
    with pytest.raises(ValueError, match=r"\['moba', 'nsa'\] have none.*\['dense', 'msa'\]"):
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


@pytest.mark.gpu
@pytest.mark.parametrize("name", MODELS)
def test_cuda_graph_decode_matches_eager(name):
    from torch._inductor import cudagraph_trees

    layers, overrides = MODELS[name]
    if "msa" in overrides:  # fp32 references on both sides: greedy tokens must agree exactly
        refs = {"backend": "reference", "select_backend": "reference", "decode_backend": "reference"}
        overrides = {"msa": {**overrides["msa"], **refs}}
    model, idx = tiny_gpt(layers, device="cuda", **overrides), prompts(T=20, device="cuda")
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
