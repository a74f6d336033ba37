"""The example GPT (sparsezoo.models) with every registered variant: training, cached generation,
checkpoints, dense -> sparse conversion, the trainer (resume) and DDP on 2 gloo processes.

Everything runs on the CPU with tiny models. Variants come from sparsezoo.list_variants() at
collection time, so a newly registered variant is covered without editing this file.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import sparsezoo
from sparsezoo.config import ConfigError
from sparsezoo.models import GPT, GPTConfig, load_model, load_weights, save_checkpoint
from sparsezoo.models.checkpoint import WEIGHTS, load_train_state
from sparsezoo.models.data import BOS, NEEDLE, QUERY, Data, DataConfig, batch_generator
from sparsezoo.models.train import load_run_config, make_optimizer, train, TrainConfig
from tests.helpers import run_torchrun

REPO = Path(__file__).resolve().parents[1]
VARIANTS = sparsezoo.list_variants()

# Small budgets so every variant is actually sparse at 64-128 tokens; a variant without an entry
# runs with its defaults.
TINY = {
    "msa": {"block_size": 16, "topk": 2, "index_dim": 16, "warmup_steps": 3},
    "dsa": {"topk": 16, "n_index_heads": 2, "index_dim": 16, "warmup_steps": 3},
    "moba": {"block_size": 16, "topk": 2},
    "nsa": {"cmp_block": 16, "cmp_stride": 8, "sel_block": 16, "sel_topk": 3, "window": 16, "compressor_hidden": 32},
    "csa": {"compress_ratio": 4, "topk": 4, "window": 16, "n_index_heads": 2, "index_dim": 16, "index_kl": True},
}


def tiny_config(variant: str, **kw) -> GPTConfig:
    base = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, attention=variant,
                attention_overrides={k: v for k, v in TINY.items() if k in VARIANTS})
    return GPTConfig(**{**base, **kw})


def text_data(seq_len: int) -> Data:
    return Data(DataConfig(task="text", seq_len=seq_len, text_path=str(REPO / "sparsezoo"), text_glob="**/*.py"),
                vocab_size=512)


# -- config ----------------------------------------------------------------------------------------
def test_layer_variants_from_dense_layers_and_list():
    cfg = GPTConfig(n_layers=4, attention="msa", dense_layers=3)
    assert cfg.layer_variants() == ["dense", "dense", "dense", "msa"]
    assert GPTConfig(layers=["msa", "dense"]).n_layers == 2
    model = GPT(GPTConfig(layers=["dense", "msa"], d_model=32, n_heads=2, n_kv_heads=1,
                          attention_overrides={"msa": {"block_size": 16}, "backend": "reference"}))
    assert [b.attn.variant_name for b in model.blocks] == ["dense", "msa"]
    assert model.blocks[1].attn.config.block_size == 16
    assert all(b.attn.config.backend == "reference" for b in model.blocks)


@pytest.mark.parametrize("bad, match", [
    (dict(attention="nope"), "unknown attention variant"),
    (dict(layers=["dense"], n_layers=2), "layers names 1"),
    (dict(attention="dense", attention_overrides={"block_size": 16}), "field of none"),
    (dict(attention="msa", attention_overrides={"msa": {"blok_size": 16}}), "unknown field"),
    (dict(attention="msa", attention_overrides={"d_model": 8}), "from the model config"),
])
def test_bad_configs_raise(bad, match):
    with pytest.raises(ConfigError, match=match):
        GPTConfig(**bad)


# -- data ------------------------------------------------------------------------------------------
def test_synthetic_tasks_score_only_the_answers():
    data = Data(DataConfig(task="mix", seq_len=96, passkey_len=3, n_pairs=4, n_queries=3, mix={"needle": 1, "recall": 1}),
                vocab_size=512)
    x, y = data.batch("needle", 3, 96, batch_generator(0, 0))
    assert x.shape == y.shape == (3, 96) and (x[:, 0] == BOS).all()
    for row_x, row_y in zip(x, y):
        at = int((row_x == NEEDLE).nonzero()[0])
        assert row_y[-3:].tolist() == row_x[at + 1:at + 4].tolist()  # the answer is the passkey
        assert (row_y[:-3] == -100).all() and row_x[-3] == QUERY  # x = [..., QUERY, p1, p2]
    x, y = data.batch("recall", 2, 96, batch_generator(0, 1))
    for row_x, row_y in zip(x, y):
        scored = (row_y != -100).nonzero().flatten()
        assert len(scored) == 3
        for t in scored.tolist():  # each scored value is the one paired with the queried key earlier
            key = int(row_x[t])
            first = int((row_x == key).nonzero()[0])
            assert first < t and int(row_x[first + 1]) == int(row_y[t])


# -- training --------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_with_finite_decreasing_loss(variant):
    torch.manual_seed(0)
    model = GPT(tiny_config(variant))
    data = text_data(64)
    _, x, y = data.train_batch(0, 3)
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0), fused=False)
    losses, aux_seen = [], []
    for step in range(6):
        model.apply_routing_schedule(step)  # MSA/DSA: dense warm-up for 3 steps, then sparse
        _, lm = model(x, y)
        aux = sparsezoo.aux_loss(model)
        loss = lm if aux is None else lm + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(lm.item())
        aux_seen.append(None if aux is None else aux.item())
    assert all(math.isfinite(v) for v in losses), losses
    assert all(a is None or math.isfinite(a) for a in aux_seen), aux_seen
    assert losses[-1] < losses[0] - 0.1, losses
    if model.routed_layers():
        assert all(a.routing == "sparse" for a in model.routed_layers())


# -- generation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_generation_equals_uncached(variant):
    """Prefill in two chunks, then decode token by token: the logits equal one uncached forward,
    and greedy generation with the cache equals generation without it. fp64, and distinct tokens,
    so no exact score ties can flip a top-k selection between the two paths."""
    torch.manual_seed(1)
    model = GPT(tiny_config(variant, vocab_size=300)).double().eval()
    idx = torch.stack([torch.randperm(300)[:72] for _ in range(2)])
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_cache(2, 80)
        parts = [model(idx[:, :40], use_cache=True)[0], model(idx[:, 40:52], use_cache=True)[0]]
        parts += [model(idx[:, t:t + 1], use_cache=True)[0] for t in range(52, 72)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-9, rtol=1e-9)
    cached = model.generate(idx[:, :60], 12)
    uncached = model.generate(idx[:, :60], 12, use_cache=False)
    assert torch.equal(cached, uncached)
    assert model.caches is None  # generate frees its caches


# -- checkpoints -----------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config("msa", dense_layers=1))
    opt = make_optimizer(model, TrainConfig(), fused=False)
    _, x, y = text_data(64).train_batch(0, 2)
    model(x, y)[1].backward()
    opt.step()
    run = {"model": model.config.to_dict(), "data": {}, "train": {}}
    save_checkpoint(tmp_path, model, run, opt, {"step": 1, "history": [], "evals": []})
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    loaded, report = load_model(tmp_path)
    assert report.exact and len(report.loaded) == len(model.state_dict())
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x)[0], model(x)[0], atol=0, rtol=0)
    opt2 = make_optimizer(loaded, TrainConfig(), fused=False)
    assert load_train_state(tmp_path, opt2)["step"] == 1
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for pid in s1:
        for key in s1[pid]:
            assert torch.equal(s1[pid][key], s2[pid][key]), (pid, key)


def test_dense_to_msa_reports_index_weights_as_new(tmp_path):
    torch.manual_seed(0)
    dense = GPT(tiny_config("dense", n_layers=3))
    save_checkpoint(tmp_path, dense, {"model": dense.config.to_dict(), "data": {}, "train": {}})
    msa, report = load_model(tmp_path, {"attention": "msa", "dense_layers": 1})
    expected_new = sorted(n for n in msa.state_dict() if ".attn.index_" in n)
    assert expected_new and all(n.startswith(("blocks.1.", "blocks.2.")) for n in expected_new)
    assert sorted(report.missing) == expected_new
    assert report.unexpected == [] and report.mismatched == []
    for name in report.loaded:  # every shared weight came over unchanged
        assert torch.equal(msa.state_dict()[name], dense.state_dict()[name]), name
    assert "index" in str(report) and "missing" in str(report)
    with pytest.raises(ValueError, match="does not match"):
        load_weights(msa, tmp_path / WEIGHTS, strict=True)
    # and back: an MSA checkpoint into a dense model reports the index weights as unexpected
    save_checkpoint(tmp_path / "msa", msa, {"model": msa.config.to_dict(), "data": {}, "train": {}})
    _, back = load_model(tmp_path / "msa", {"attention": "dense", "dense_layers": 0})
    assert sorted(back.unexpected) == expected_new and back.missing == []


# -- the trainer -----------------------------------------------------------------------------------
def tiny_run(out_dir: Path, steps: int, **train) -> dict:
    return load_run_config(REPO / "configs" / "gpt_tiny.yaml", [
        f"train.out_dir={out_dir}", f"train.steps={steps}", "train.batch_size=2", "train.eval_every=0",
        "train.eval_batches=1", "train.progress=false", "train.log_every=2", "data.seq_len=64",
        "model.attention_overrides.msa.warmup_steps=2", f"data.text_path={REPO / 'sparsezoo'}", *[f"train.{k}={v}" for k, v in train.items()]])


def test_trainer_writes_outputs_and_resume_is_exact(tmp_path):
    const_lr = {"lr_warmup": 1, "min_lr_ratio": 1.0}  # so the schedule does not depend on train.steps
    full = train(tiny_run(tmp_path / "full", 5, **const_lr))
    assert full["steps_done"] == 5 and len(full["history"]) == 5
    phases = [h["phase"] for h in full["history"]]
    assert phases[:2] == ["warmup", "warmup"] and phases[2:] == ["sparse"] * 3
    assert any(h["index_loss"] > 0 for h in full["history"])  # logged beside the LM loss
    for name in ("loss.png", "metrics.jsonl", "checkpoint/model.safetensors", "checkpoint/config.yaml"):
        assert (tmp_path / "full" / name).is_file(), name
    train(tiny_run(tmp_path / "split", 3, **const_lr))  # "interrupted" after 3 steps
    resumed = train(tiny_run(tmp_path / "split", 5, **const_lr), resume=True)
    assert [h["step"] for h in resumed["history"]] == list(range(5))
    a, _ = load_model(tmp_path / "full" / "checkpoint")
    b, _ = load_model(tmp_path / "split" / "checkpoint")
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)


def test_ddp_two_gloo_processes(tmp_path):
    """examples/train.py under torchrun; run_torchrun fails with the output on a non-zero exit, an abort
    at exit ("terminate called") or a timeout."""
    out = tmp_path / "ddp"
    stdout = run_torchrun([
        str(REPO / "examples" / "train.py"), "--config", str(REPO / "configs" / "gpt_tiny.yaml"),
        "--set", f"train.out_dir={out}", "--set", "train.steps=3", "--set", "train.batch_size=2",
        "--set", "train.eval_every=0", "--set", "train.eval_batches=1", "--set", "train.progress=false",
        "--set", "data.seq_len=64", "--set", f"data.text_path={REPO / 'sparsezoo'}"], cwd=tmp_path, timeout=240)
    assert "world size 2" in stdout
    diff = float(stdout.split("max parameter difference between ranks")[1].split()[0])
    assert diff == 0.0  # gradients were all-reduced: both ranks hold the same weights
    assert (out / "checkpoint" / "model.safetensors").is_file()
