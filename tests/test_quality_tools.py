"""The quality-comparison tooling: the length curriculum of the data, `compare_quality.py`'s --set and
speed reuse, and `quality_seeds.py`'s aggregation over seeds. All CPU, no training."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sparsezoo.config import ConfigError
from sparsezoo.models.data import Data, DataConfig

REPO = Path(__file__).resolve().parents[1]


def load_example(name: str, folder: str = "examples"):
    """Import <folder>/<name>.py of the repository (examples and scripts are not packages)."""
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", REPO / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_curriculum_keeps_tokens_per_step_then_switches_to_seq_len():
    cfg = DataConfig(task="needle", seq_len=256, passkey_len=1, curriculum_len=64, curriculum_steps=5)
    data = Data(cfg, vocab_size=512)
    for step in range(8):
        _, x, y = data.train_batch(step, batch_size=2)
        want = (8, 64) if step < 5 else (2, 256)
        assert tuple(x.shape) == want and tuple(y.shape) == want
        assert x.numel() == 2 * 256


def test_curriculum_ladder_runs_its_stages_in_order_then_seq_len():
    cfg = DataConfig(task="recall", seq_len=256, n_pairs=4, n_queries=2, curriculum=[[32, 2], [128, 3]])
    data = Data(cfg, vocab_size=512)
    shapes = [tuple(data.train_batch(step, batch_size=2)[1].shape) for step in range(7)]
    assert shapes == [(16, 32)] * 2 + [(4, 128)] * 3 + [(2, 256)] * 2


@pytest.mark.parametrize("kw, match", [
    ({"curriculum": [[64, 5], [32, 5]]}, "grow from stage to stage"),
    ({"curriculum": [[100, 5]]}, "must divide seq_len"),
    ({"curriculum": [[64, 0]]}, "steps must be > 0"),
    ({"curriculum": [[64]]}, r"\[length, steps\] pairs"),
    ({"curriculum": [[64, 5]], "curriculum_len": 64}, "replaces data.curriculum_len"),
    ({"curriculum_len": 100}, "must divide seq_len"),
    ({"curriculum_len": 512}, "must divide seq_len"),
    ({"curriculum_steps": 10}, "needs data.curriculum_len"),
    ({"curriculum_len": 64, "curriculum_steps": -1}, ">= 0"),
])
def test_bad_curriculum_raises(kw, match):
    with pytest.raises(ConfigError, match=match):
        DataConfig(seq_len=256, **kw)


def test_set_overrides_a_variant_field_and_rejects_unknown_ones():
    cq = load_example("compare_quality")
    assert cq.parse_sets(["msa.topk=16", "msa.block_size=32", "dsa.topk=1024"]) == {
        "msa": {"topk": 16, "block_size": 32}, "dsa": {"topk": 1024}}
    over = cq.variant_overrides("msa", "small", 10, "auto", cq.parse_sets(["msa.topk=16"]))
    assert over["topk"] == 16 and over["block_size"] == cq.BUDGETS["small"]["msa"]["block_size"]
    with pytest.raises(SystemExit, match="valid fields"):
        cq.parse_sets(["msa.topq=16"])
    with pytest.raises(SystemExit, match="VARIANT.FIELD=VALUE"):
        cq.parse_sets(["msatopk16"])


def test_speed_results_are_reused_only_with_the_same_speed_settings(tmp_path):
    cq = load_example("compare_quality")
    args = vars(cq.parse([]))
    measured = {"variant": "msa", "train_tokens_per_s": 1.0,
                "speed_args": {k: args[k] for k in cq.SPEED_ARGS}}
    (tmp_path / "speed.json").write_text(json.dumps(measured))
    assert cq.reuse_speed(tmp_path, {"args": args}) == measured
    assert cq.reuse_speed(tmp_path, {"args": {**args, "decode_prompt": args["decode_prompt"] * 2}}) is None
    assert cq.reuse_speed(tmp_path / "missing", {"args": args}) is None


def fake_run(path: Path, seed: int, acc: dict[str, list[float]], **args) -> Path:
    """A quality.json as compare_quality writes it; acc[variant] = needle accuracy at 2048, 8192."""
    quality = {v: {"accuracy": {str(L): {"needle": {"exact": a}} for L, a in zip((2048, 8192), accs)}}
               for v, accs in acc.items()}
    run = {"device": "TEST", "args": {"seed": seed, "steps": 10, "train_len": 2048, "eval_samples": 4, **args},
           "quality": quality}
    path.mkdir(parents=True, exist_ok=True)
    (path / "quality.json").write_text(json.dumps(run))
    return path / "quality.json"


def test_seed_aggregation_means_and_paired_differences(tmp_path):
    qs = load_example("quality_seeds")
    runs = [fake_run(tmp_path / "s0", 0, {"dense": [1.0, 0.5], "msa": [0.5, 0.75], "nsa": [0.0, 0.0]}),
            fake_run(tmp_path / "s1", 1, {"dense": [0.5, 0.25], "msa": [0.25, 0.25]})]  # nsa: one seed only
    qs.main([str(p) for p in runs] + ["--out", str(tmp_path / "agg")])
    summary = json.loads((tmp_path / "agg.json").read_text())["summary"]
    assert set(summary) == {"dense", "msa"}  # only variants every run trained
    assert summary["dense"]["2048"]["mean"] == pytest.approx(0.75)
    assert summary["msa"]["2048"]["paired_diff_vs_dense"] == pytest.approx(-0.375)
    assert summary["msa"]["8192"]["paired_diff_vs_dense"] == pytest.approx(0.125)
    md = (tmp_path / "agg.md").read_text()
    assert "| msa | 8192 | 0.75 | 0.25 | 0.50 ± 0.35 | +0.12 |" in md
    assert "Left out, as not every run trained them: nsa." in md
    assert (tmp_path / "agg.png").stat().st_size > 0


def test_seed_aggregation_refuses_runs_that_differ_in_more_than_the_seed(tmp_path):
    qs = load_example("quality_seeds")
    a = fake_run(tmp_path / "a", 0, {"dense": [1.0, 1.0]})
    b = fake_run(tmp_path / "b", 1, {"dense": [1.0, 1.0]}, train_len=8192)
    with pytest.raises(SystemExit, match="differ in train_len"):
        qs.main([str(a), str(b), "--out", str(tmp_path / "agg")])
    c = fake_run(tmp_path / "c", 0, {"dense": [1.0, 1.0]})
    with pytest.raises(SystemExit, match="repeated seeds"):
        qs.main([str(a), str(c), "--out", str(tmp_path / "agg")])


def test_bad_curriculum_stops_compare_quality_before_any_worker(tmp_path):
    cq = load_example("compare_quality")
    with pytest.raises(SystemExit, match="must divide seq_len"):
        cq.main(["--out", str(tmp_path), "--device", "cpu", "--variants", "dense", "--curriculum", "300:10"])
    assert not list(tmp_path.glob("*/spec.json"))
