"""Bad input, misuse and interruptions: each test pins down one defect found by review.

Checkpoints (atomic saves, the out_dir lock, resume consistency, dtype checks), cache misuse, paged-cache
page ids, empty batches, config validation and the command-line tools. CPU only, tiny models.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import sparsezoo
from sparsezoo.models import GPT, GPTConfig, load_model, save_checkpoint
from sparsezoo.models import checkpoint as ckpt
from sparsezoo.models.train import load_run_config, make_optimizer, train, TrainConfig
from tests.helpers import run_torchrun

REPO = Path(__file__).resolve().parents[1]


def tiny_gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**dict(vocab_size=300, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1), **kw}))


def trained_step(model: GPT, opt: torch.optim.Optimizer) -> None:
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    model(x, x)[1].backward()
    opt.step()
    opt.zero_grad()


def save_at(folder: Path, model: GPT, opt, step: int) -> None:
    save_checkpoint(folder, model, {"model": model.config.to_dict(), "data": {}, "train": {}}, opt,
                    {"step": step, "history": [], "evals": []})


def same_weights(a: GPT, b: GPT) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def tiny_run(out_dir: Path, steps: int, **train_fields) -> dict:
    return load_run_config(REPO / "configs" / "gpt_tiny.yaml", [
        f"train.out_dir={out_dir}", f"train.steps={steps}", "train.batch_size=2", "train.eval_every=0",
        "train.eval_batches=1", "train.progress=false", "train.log_every=1", "data.seq_len=64",
        f"data.text_path={REPO / 'sparsezoo'}", *[f"train.{k}={v}" for k, v in train_fields.items()]])


# -- 1. checkpoints are saved as a whole; one writer per out_dir; resume checks its parts --------------
def _renames_interrupted_at(monkeypatch, n: int) -> None:
    """Make the n-th rename (os.replace / os.rename) of the process raise KeyboardInterrupt (a SIGINT)."""
    calls = {"n": 0}
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def flaky(src, dst, *a, _real=real, **kw):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt
            return _real(src, dst, *a, **kw)

        monkeypatch.setattr(os, name, flaky)


@pytest.mark.parametrize("interrupt_at", [1, 2, 3, 4])
def test_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch, interrupt_at):
    folder = tmp_path / "checkpoint"
    model = tiny_gpt()
    opt = make_optimizer(model, TrainConfig(), fused=False)
    trained_step(model, opt)
    save_at(folder, model, opt, step=1)
    old = tiny_gpt()
    old.load_state_dict(model.state_dict())
    trained_step(model, opt)
    with monkeypatch.context() as m:
        _renames_interrupted_at(m, interrupt_at)
        try:
            save_at(folder, model, opt, step=2)
        except KeyboardInterrupt:
            pass
    # whatever the interruption left, the folder holds one save as a whole: the old one or the new one
    loaded, _ = load_model(folder)
    state = ckpt.load_train_state(folder, make_optimizer(loaded, TrainConfig(), fused=False))
    assert same_weights(loaded, old if state["step"] == 1 else model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temp or backup folder left


def test_checkpoint_is_replaced_by_one_swap(tmp_path, monkeypatch):
    """A reader never sees a mix: a save that lands between the reads of config and weights makes
    load_model read again, from the new save only."""
    folder = tmp_path / "checkpoint"
    small, big = tiny_gpt(), tiny_gpt(d_model=64)
    save_checkpoint(folder, small, {"model": small.config.to_dict()})
    real_load = ckpt.load_file
    calls = {"n": 0}

    def load_during_a_save(path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 1:  # another process saves while this reader is between its two files
            save_checkpoint(folder, big, {"model": big.config.to_dict()})
        return real_load(path, *a, **kw)

    monkeypatch.setattr(ckpt, "load_file", load_during_a_save)
    loaded, report = load_model(folder)
    assert report.exact and loaded.config.d_model == 64 and same_weights(loaded, big)


def test_save_refuses_to_replace_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="notes.txt"):
        save_checkpoint(tmp_path, tiny_gpt(), {"model": {}})
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_second_run_on_one_out_dir_is_refused(tmp_path):
    from sparsezoo.models.train import lock_out_dir

    out = tmp_path / "run"
    with lock_out_dir(out):
        with pytest.raises(RuntimeError, match=f"pid {os.getpid()}"):
            train(tiny_run(out, 1))
    assert not (out / "metrics.jsonl").exists()


def test_out_dir_lock_is_released_after_an_error(tmp_path):
    from sparsezoo.models.train import lock_out_dir

    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError):
        train(tiny_run(out, 1) | {"data": {"task": "text", "text_path": str(tmp_path / "absent.txt")}})
    with lock_out_dir(out):  # free again
        pass


def test_resume_refuses_parts_from_different_steps(tmp_path):
    run = tiny_run(tmp_path / "run", 4)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_dict(run["model"]))
    opt = make_optimizer(model, TrainConfig(), fused=False)
    ckpt_dir = tmp_path / "run" / "checkpoint"
    save_at(tmp_path / "older", model, opt, step=2)
    save_at(ckpt_dir, model, opt, step=3)
    for name in (ckpt.TRAIN_STATE, ckpt.OPTIM_TENSORS):  # new weights beside an older train state
        shutil.copy(tmp_path / "older" / name, ckpt_dir / name)
    with pytest.raises(ValueError, match="step 3.*step 2|step 2.*step 3"):
        train(run, resume=True)


# -- 2. CSA trains on sequences shorter than one compressed entry ------------------------------------
@pytest.mark.parametrize("T", [1, 3])
def test_csa_trains_when_T_is_below_the_compress_ratio(T):
    torch.manual_seed(0)
    layer = sparsezoo.create_attention({"variant": "csa"})  # compress_ratio 4; modules start in training mode
    x = torch.randn(1, T, 256)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert layer.aux_loss is not None and float(layer.aux_loss) == 0.0  # nothing to select: the KL is empty
    (y.square().sum() + layer.aux_loss).backward()
    layer.eval()
    torch.testing.assert_close(layer(x), y)


# -- 3. caches refuse a batch size other than the one they were filled with --------------------------
@pytest.mark.parametrize("variant", sparsezoo.list_variants())
@pytest.mark.parametrize("prefill_batch, decode_batch", [(1, 2), (2, 1)])
def test_cache_refuses_another_batch_size_after_prefill(variant, prefill_batch, decode_batch):
    torch.manual_seed(0)
    layer = sparsezoo.create_attention({"variant": variant, "d_model": 64, "n_heads": 2, "n_kv_heads": 1}).eval()
    cache = layer.make_cache(2, 32)
    with torch.no_grad():
        layer(torch.randn(prefill_batch, 8, 64), cache=cache)
        with pytest.raises(ValueError, match=f"batch of {prefill_batch}.*got {decode_batch}"):
            layer(torch.randn(decode_batch, 1, 64), cache=cache)
        cache.reset()  # a new sequence may use another batch size
        assert layer(torch.randn(decode_batch, 4, 64), cache=cache).shape == (decode_batch, 4, 64)


def test_layer_cache_get_checks_the_batch():
    cache = sparsezoo.LayerCache(4, 16)
    cache.append("k", torch.zeros(2, 1, 3, 8), seq_dim=2)
    cache.advance(3)
    assert cache.get("k", 2).shape == (2, 1, 3, 8)
    with pytest.raises(ValueError, match="batch of 2"):
        cache.get("k", 3)


def test_paged_msa_cache_refuses_another_batch_size():
    from sparsezoo.paged_cache import MSAPagedLayerCache

    cfg = sparsezoo.make_config({"variant": "msa", "d_model": 64, "n_heads": 2, "n_kv_heads": 1, "block_size": 16,
                                 "index_dim": 16})
    cache = MSAPagedLayerCache(cfg, max_batch_size=2, max_seq_len=64)
    kv = lambda B, T: (torch.randn(B, 1, T, 32), torch.randn(B, 1, T, 32), torch.randn(B, T, 16))
    cache.write(*kv(1, 8))
    cache.advance(8)
    with pytest.raises(ValueError, match="batch of 1, got 2"):
        cache.write(*kv(2, 1))
    cache.reset()
    cache.write(*kv(2, 8))  # a new sequence may use another batch size
    assert cache.page_table.shape[0] == 2


# -- 4. the loader checks dtypes: no integers into float weights; float casts are reported -------------
class WithCounter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("count", torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("bad_dtype", [torch.int64, torch.bool])
def test_loader_rejects_non_float_tensors_for_float_weights(tmp_path, bad_dtype):
    from safetensors.torch import save_file

    model = tiny_gpt()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["tok_emb.weight"] = state["tok_emb.weight"].to(bad_dtype)
    save_file(state, str(tmp_path / "w.safetensors"))
    before = model.tok_emb.weight.detach().clone()
    with pytest.raises(ValueError, match="tok_emb.weight"):
        ckpt.load_weights(model, tmp_path / "w.safetensors")
    assert torch.equal(model.tok_emb.weight, before)  # nothing was loaded


def test_loader_rejects_float_tensors_for_integer_buffers(tmp_path):
    from safetensors.torch import save_file

    model = WithCounter()
    save_file({**model.state_dict(), "count": torch.ones(3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="count"):
        ckpt.load_weights(model, tmp_path / "w.safetensors")


def test_loader_reports_float_casts(tmp_path):
    source = tiny_gpt().to(torch.bfloat16)
    save_checkpoint(tmp_path, source, {"model": source.config.to_dict()})
    model, report = load_model(tmp_path)  # an fp32 model
    assert model.tok_emb.weight.dtype == torch.float32 and same_weights(model, source.float())
    assert ("tok_emb.weight", torch.bfloat16, torch.float32) in report.cast
    assert len(report.cast) == len(report.loaded) and "cast" in str(report)


# -- 5. paged cache: no write lands in a page it does not own; the allocator checks its sizes ----------
def _paged_cache(index_dtype=None, index_scale=None):
    from sparsezoo.paged_cache import PagedKVCache

    torch.manual_seed(0)
    cache = PagedKVCache(4, 1, 16, 16, page_size=8, dtype=torch.float32, index_dtype=index_dtype,
                         index_scale=index_scale)
    for t in (cache.k, cache.v):
        t[:cache.num_pages].normal_()
    cache.k_idx[:cache.num_pages] = torch.randn(cache.num_pages, 8, 16).to(cache.k_idx.dtype)
    return cache


def _pages_before(cache):
    n = cache.num_pages
    return [t[:n].clone() for t in (cache.k, cache.v, cache.k_idx)]


def _new_tokens(B, Q):
    return torch.randn(B, 1, Q, 16), torch.randn(B, 1, Q, 16), torch.randn(B, Q, 16)


FP8_MODES = [(None, None), (torch.float8_e4m3fn, "token"), (torch.float8_e4m3fn, "page")]


@pytest.mark.parametrize("index_dtype, index_scale", FP8_MODES)
def test_paged_append_never_writes_through_padding(index_dtype, index_scale):
    from sparsezoo.paged_cache import PageAllocator

    cache = _paged_cache(index_dtype, index_scale)
    alloc = PageAllocator(4, 8)
    alloc.reserve("a", 8)  # one page ...
    table = alloc.page_table(["a"], width=3)  # ... padded with -1
    assert table.tolist() == [[0, -1, -1]]
    before = _pages_before(cache)
    # token 9 sits in logical block 1, a padding column (-1): nothing of pages 0..3 may change
    cache.append(table, torch.tensor([10], dtype=torch.int32), *_new_tokens(1, 2))
    for a, b in zip(_pages_before(cache), before):
        assert torch.equal(a.float(), b.float()), "a real page changed"
    with pytest.raises(ValueError, match="must lie in"):
        cache.append(table, torch.tensor([10], dtype=torch.int32), *_new_tokens(1, 2), check=True)


@pytest.mark.parametrize("index_dtype, index_scale", FP8_MODES)
def test_paged_append_never_clamps_a_length_past_the_table(index_dtype, index_scale):
    cache = _paged_cache(index_dtype, index_scale)
    table = torch.tensor([[0, 1]], dtype=torch.int32)  # 2 pages = 16 tokens
    before = _pages_before(cache)
    cache.append(table, torch.tensor([20], dtype=torch.int32), *_new_tokens(1, 1))  # token 19: block 2
    for a, b in zip(_pages_before(cache), before):
        assert torch.equal(a.float(), b.float()), "a real page changed"
    with pytest.raises(ValueError, match="needs more than the page table"):
        cache.append(table, torch.tensor([20], dtype=torch.int32), *_new_tokens(1, 1), check=True)


def test_paged_append_still_writes_valid_tokens_beside_invalid_ones():
    cache = _paged_cache()
    table = torch.tensor([[0, -1], [2, 3]], dtype=torch.int32)
    k, v, ki = _new_tokens(2, 1)
    cache.append(table, torch.tensor([9, 9], dtype=torch.int32), k, v, ki)  # row 0: padding; row 1: page 3
    assert torch.equal(cache.k[3, :, 0], k[1, :, 0]) and torch.equal(cache.k_idx[3, 0], ki[1, 0])


def test_page_allocator_checks_sizes_and_keeps_no_entry_after_a_failed_reserve():
    from sparsezoo.paged_cache import PageAllocator

    for bad in (dict(num_pages=-1), dict(num_pages=0), dict(num_pages=4, page_size=0)):
        with pytest.raises(ValueError, match="num_pages|page_size"):
            PageAllocator(**bad)
    alloc = PageAllocator(2, 8)
    alloc.reserve("a", 4)
    with pytest.raises(ValueError, match="n_tokens"):
        alloc.reserve("a", -3)
    assert alloc.lengths["a"] == 4
    with pytest.raises(ValueError, match="out of pages"):
        alloc.reserve("b", 100)
    assert "b" not in alloc.pages and "b" not in alloc.lengths
    assert alloc.page_table(["a"]).tolist() == [[0]]
    alloc.free("a")
    assert sorted(alloc.reserve("c", 16)) == [0, 1]  # every page came back


# -- 6. validation: empty batches, config types and ranges, non-finite values, bad files and flags -----
from sparsezoo.config import ConfigError  # noqa: E402
from sparsezoo.models.data import Data, DataConfig  # noqa: E402


@pytest.mark.parametrize("variant", sparsezoo.list_variants())
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_gives_an_empty_output_in_every_variant(variant, training):
    layer = sparsezoo.create_attention({"variant": variant, "d_model": 64, "n_heads": 2, "n_kv_heads": 1})
    layer.train(training)
    y = layer(torch.randn(0, 5, 64))
    assert y.shape == (0, 5, 64) and layer.aux_loss is None
    with pytest.raises(ValueError, match="T >= 1"):
        layer(torch.randn(2, 0, 64))


@pytest.mark.parametrize("make, match", [
    (lambda: TrainConfig(log_every=0), "log_every must be > 0"),
    (lambda: TrainConfig(steps=-5), "steps must be >= 0"),
    (lambda: TrainConfig(batch_size=0), "batch_size must be > 0"),
    (lambda: TrainConfig(batch_size="8"), "batch_size must be int"),
    (lambda: TrainConfig(eval_every=-1), "eval_every must be >= 0"),
    (lambda: TrainConfig(eval_lengths=[64, 0]), "eval_lengths"),
    (lambda: TrainConfig(eval_lengths=["64"]), "eval_lengths"),
    (lambda: TrainConfig(device="gpu"), "device.*choose one of"),
    (lambda: TrainConfig(dtype="fp16"), "dtype.*choose one of"),
    (lambda: TrainConfig(progress="yes"), "progress must be bool"),
    (lambda: TrainConfig(time_limit_s=0), "time_limit_s must be > 0"),
    (lambda: DataConfig(seq_len=0), "seq_len must be > 0"),
    (lambda: DataConfig(passkey_len=-1), "passkey_len must be > 0"),
    (lambda: DataConfig(val_fraction=1.0), "val_fraction"),
    (lambda: DataConfig(mix={"needle": -1.0}), "mix"),
    (lambda: DataConfig(mix={"needle": "lots"}), "mix"),
    (lambda: DataConfig(text_path=3), "text_path must be str"),
    (lambda: GPTConfig(vocab_size=0), "vocab_size must be > 0"),
    (lambda: GPTConfig(d_model="128"), "d_model must be int"),
    (lambda: GPTConfig(n_heads=0), "n_heads must be > 0"),
    (lambda: GPTConfig(d_model=2, n_heads=4), "head_dim must be > 0"),
    (lambda: GPTConfig(norm_eps=0.0), "norm_eps must be > 0"),
    (lambda: GPTConfig(layers="dense"), "layers must be"),
    (lambda: GPTConfig(layers=["dense", 3]), "layers"),
    (lambda: GPTConfig(dense_layers=-1), "dense_layers"),
])
def test_run_configs_check_types_and_ranges(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_trainer_rejects_a_bad_train_config_before_running(tmp_path):
    with pytest.raises(ConfigError, match="steps must be >= 0"):
        train(tiny_run(tmp_path / "run", -5))
    assert not (tmp_path / "run" / "checkpoint").exists()


def _float_fields(cls):
    import typing

    hints = typing.get_type_hints(cls)
    return [name for name, hint in hints.items() if hint is float or (typing.get_origin(hint) in (typing.Union,
            getattr(__import__("types"), "UnionType", None)) and float in typing.get_args(hint))]


@pytest.mark.parametrize("variant", sparsezoo.list_variants())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_attention_configs_reject_non_finite_numbers(variant, bad):
    cls = sparsezoo.variant_class(variant).config_class
    for field in _float_fields(cls):
        with pytest.raises(ConfigError, match=f"{field} must be finite"):
            sparsezoo.make_config({"variant": variant, field: bad})


@pytest.mark.parametrize("cls", [TrainConfig, DataConfig, GPTConfig])
def test_run_configs_reject_non_finite_numbers(cls):
    fields = _float_fields(cls)
    assert fields
    for field in fields:
        with pytest.raises(ConfigError, match=f"{field} must be finite"):
            cls(**{field: float("nan")})
    with pytest.raises(ConfigError, match="finite"):
        DataConfig(mix={"needle": float("inf")})


def test_odd_head_dim_is_rejected_by_the_config():
    with pytest.raises(ConfigError, match="head_dim must be even"):
        sparsezoo.make_config({"variant": "dense", "head_dim": 31})
    with pytest.raises(ConfigError, match="head_dim must be even"):
        GPTConfig(d_model=96, n_heads=4, head_dim=25)


def test_create_attention_validates_a_changed_config():
    cfg = sparsezoo.make_config({"variant": "msa"})
    cfg.topk = 0
    with pytest.raises(ConfigError, match="topk must be > 0"):
        sparsezoo.create_attention(cfg)
    cfg.topk, cfg.backend = 4, "warp"
    with pytest.raises(ConfigError, match="choose one of"):
        sparsezoo.create_attention(cfg)


def test_empty_text_file_gives_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt.*no text|no text.*empty.txt"):
        Data(DataConfig(task="text", text_path=str(tmp_path / "empty.txt")), vocab_size=512)
    with pytest.raises(ValueError, match="no text"):
        Data(DataConfig(task="text", text_path=str(tmp_path)), vocab_size=512)


def _sample_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample_example", REPO / "examples" / "sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("args, message", [
    (["--set", "attention"], "FIELD=VALUE"),
    (["--set", "=msa"], "FIELD=VALUE"),
    (["--top-k", "0"], "must be >= 1"),
    (["--top-k", "-3"], "must be >= 1"),
    (["--max-new-tokens", "-1"], "must be >= 0"),
])
def test_sample_cli_rejects_bad_flags(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        _sample_main()(["--checkpoint", str(tmp_path), *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_sample_cli_still_generates(tmp_path, capsys):
    model = tiny_gpt(vocab_size=512)
    save_checkpoint(tmp_path, model, {"model": model.config.to_dict(), "data": {"task": "needle"}})
    _sample_main()(["--checkpoint", str(tmp_path), "--max-new-tokens", "3", "--top-k", "5", "--temperature", "1",
                    "--set", "norm_eps=0.00001", "--device", "cpu"])
    assert "GPT:" in capsys.readouterr().out


@pytest.mark.parametrize("text", ["model: [1, 2", "- a\n- b\n", "data: {}\n", "model: 3\n",
                                  "model: {d_model: abc}\n", "model: {no_such_field: 1}\n", ""])
def test_malformed_checkpoint_config_names_the_file(tmp_path, text):
    model = tiny_gpt()
    save_checkpoint(tmp_path, model, {"model": model.config.to_dict()})
    (tmp_path / ckpt.CONFIG).write_text(text)
    with pytest.raises(ConfigError, match=str(tmp_path / ckpt.CONFIG)):
        load_model(tmp_path)


# -- 7. DDP: the trainer tears its process group down on every exit path ----------------------------
DDP_SCRIPT = """
import os
import sys
from pathlib import Path
import torch.distributed as dist
from sparsezoo.models.train import load_run_config, train

out, config, text = sys.argv[1:4]
sets = [f"train.out_dir={out}", "train.steps=1", "train.batch_size=1", "train.eval_every=0", "train.eval_batches=1",
        "train.progress=false", "data.seq_len=32", "data.passkey_len=2", "data.n_pairs=2", "data.n_queries=2"]
if text:  # a missing text file: train() raises after setting up the process group
    try:
        train(load_run_config(config, sets + ["data.task=text", f"data.text_path={text}"]))
    except FileNotFoundError:
        result = f"raised; process group up: {dist.is_initialized()}"
else:
    summary = train(load_run_config(config, sets + ["data.task=needle"]))
    result = f"finished; process group up: {dist.is_initialized()}; world {summary['world']}"
Path(out).mkdir(parents=True, exist_ok=True)
Path(out, f"rank{os.environ['RANK']}.txt").write_text(result)
"""


def test_ddp_trainer_tears_down_its_process_group_on_every_exit(tmp_path):
    """One torchrun per exit path: a process cannot re-initialise the default group reliably."""
    script = tmp_path / "ddp_exits.py"
    script.write_text(DDP_SCRIPT)
    config = str(REPO / "configs" / "gpt_tiny.yaml")
    run_torchrun([str(script), str(tmp_path / "a"), config, str(tmp_path / "absent.txt")], cwd=tmp_path)
    for rank in (0, 1):
        assert (tmp_path / "a" / f"rank{rank}.txt").read_text() == "raised; process group up: False"
    run_torchrun([str(script), str(tmp_path / "b"), config, ""], cwd=tmp_path)
    for rank in (0, 1):
        assert (tmp_path / "b" / f"rank{rank}.txt").read_text() == "finished; process group up: False; world 2"

# -- 8. the README's "Errors and bad input" snippet runs as written and prints what it says ------------
def test_readme_errors_snippet_runs(capsys):
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Errors and bad input"):text.index("## Layout")]
    code = section.split("```python\n")[1].split("```")[0]
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    expected = [line.split("# ")[1].rstrip(" .") for line in code.splitlines() if "print(" in line]
    assert len(printed) == len(expected) == 3
    for got, want in zip(printed, expected):
        assert got.startswith(want), (got, want)
