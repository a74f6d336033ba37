"""examples/quality_study.py: equal free-key budgets, the record schema, the aggregation over seeds, resume,
and the --smoke pipeline end to end (a few seconds per job on a CPU); also the passkey-in-text data."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import sparsezoo
from sparsezoo.config import ConfigError
from sparsezoo.models import GPTConfig
from sparsezoo.models.data import NEEDLE, QUERY, Data, DataConfig, batch_generator
from tests.test_quality_tools import load_example

study = load_example("quality_study")
RECORD_KEYS = {
    "variant",
    "config",
    "task",
    "train_len",
    "eval_len",
    "seeds",
    "mean",
    "std",
    "paired_diff_vs_dense",
    "kv_read",
    "free_keys_per_query",
}


def free_keys_from_config(variant: str, cfg: dict) -> int:
    """Freely chosen keys per query, recomputed from a config (independently of equal_budget's branches)."""
    return {
        "msa": lambda: (cfg["topk"] - 1) * cfg["block_size"],
        "moba": lambda: (cfg["topk"] - 1) * cfg["block_size"],
        "dsa": lambda: cfg["topk"],
        "csa": lambda: cfg["topk"] * cfg["compress_ratio"],
        "nsa": lambda: (cfg["sel_topk"] - 3) * cfg["sel_block"],
    }[variant]()


@pytest.mark.parametrize("target, block", [(1024, 64), (512, 32), (32, 16)])
def test_every_sparse_variant_gets_the_target_free_keys_and_reports_forced_keys(target, block):
    for v in ("msa", "moba", "dsa", "csa", "nsa"):
        b = study.equal_budget(v, target, block=block, csa_ratio=4, window=128)
        assert b["free_keys"] == target == free_keys_from_config(v, b["config"]), v
        assert set(b["config"]) <= set(sparsezoo.variant_class(v).config_class.field_names())
    assert study.equal_budget("msa", target, block)["forced"] == {"own block": block}
    assert study.equal_budget("moba", target, block)["forced"] == {"own block": block}
    assert study.equal_budget("dsa", target, block)["forced"] == {}
    assert study.equal_budget("csa", target, block, window=128)["forced"] == {"window": 128}
    nsa = study.equal_budget("nsa", target, block, window=128, cmp_stride=16)["forced"]
    assert nsa == {"block 0": block, "local blocks": 2 * block, "window": 128, "compressed": "T/16"}
    for v in ("dense", "lightning", "gdn"):
        assert study.equal_budget(v, target, block)["free_keys"] is None


def test_budget_refuses_a_target_off_the_variants_grid():
    with pytest.raises(ValueError, match="multiple of 64 for msa"):
        study.equal_budget("msa", 1000, block=64)
    with pytest.raises(ValueError, match="known: dense"):
        study.equal_budget("nope", 1024)


def test_gpu_card_budget_is_an_eighth_of_the_kv_and_configs_are_valid():
    card = study.CARDS["h200"]
    assert card["free_keys"] * 8 == card["train_len"] == 8192
    assert card["model"]["short_conv"] == 4 and len(card["seeds"]) >= 5
    assert study.curriculum_steps(card) < card["steps"]  # some steps train at the full length
    for v in card["variants"]:
        cfg = study.attention_config(card, v)
        if v not in ("dense", *study.LINEAR):
            assert free_keys_from_config(v, cfg) == card["free_keys"]
        run = study.run_config(card, v, "mqar", 0, Path("unused"), None)
        GPTConfig.from_dict(run["model"])  # every layer's attention config builds (its own checks pass)
        for task in card["tasks"]:
            DataConfig.from_dict(study.run_config(card, v, task, 0, Path("unused"), None)["data"])


def test_fewer_steps_than_the_curriculum_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="no step would train at 128"):
        study.main(["--smoke", "--out", str(tmp_path), "--results", str(tmp_path), "--steps", "2"])


def synthetic_results(per_seed: dict[str, dict[int, float]], task: str = "mqar", lengths=(128, 256)) -> dict:
    return {
        f"{v}/{task}/seed{s}": {"accuracy": {str(L): acc for L in lengths}, "kv_read": 0.5 if v != "dense" else 1.0}
        for v, by_seed in per_seed.items()
        for s, acc in by_seed.items()
    }


def test_records_mean_std_and_paired_difference_to_dense():
    card = {**study.CARDS["smoke"], "tasks": {"mqar": study.CARDS["smoke"]["tasks"]["mqar"]}}
    results = synthetic_results({"dense": {0: 1.0, 1: 0.8, 2: 0.9}, "msa": {0: 0.9, 1: 0.8, 2: 0.6}})
    recs = study.records("smoke", card, results)
    assert len(recs) == 4 and all(RECORD_KEYS <= set(r) for r in recs)
    msa = [r for r in recs if r["variant"] == "msa" and r["eval_len"] == 128][0]
    assert msa["seeds"] == [0, 1, 2]
    assert msa["mean"] == pytest.approx(2.3 / 3)
    assert msa["std"] == pytest.approx(torch.tensor([0.9, 0.8, 0.6], dtype=torch.float64).std().item())
    assert msa["paired_diff_vs_dense"] == pytest.approx((-0.1 + 0.0 - 0.3) / 3)
    assert msa["kv_read"] == 0.5 and msa["free_keys_per_query"] == card["free_keys"]
    assert msa["metric"] == "token_acc"  # every answer token counts; whole rows beside it (row_metric)
    assert msa["row_metric"]["mean"] is None  # these synthetic results hold no per-row scores
    dense = [r for r in recs if r["variant"] == "dense"][0]
    assert dense["paired_diff_vs_dense"] is None and dense["free_keys_per_query"] is None


def test_paired_difference_uses_only_seeds_both_finished():
    card = {**study.CARDS["smoke"], "tasks": {"mqar": study.CARDS["smoke"]["tasks"]["mqar"]}}
    results = synthetic_results({"dense": {0: 1.0, 1: 0.0}, "msa": {0: 0.5}})
    msa = [r for r in study.records("smoke", card, results) if r["variant"] == "msa"][0]
    assert msa["paired_diff_vs_dense"] == pytest.approx(-0.5)


def test_pending_jobs_skips_finished_ones(tmp_path):
    names = [study.job_name(v, "mqar", s) for v in ("dense", "msa") for s in (0, 1)]
    (tmp_path / names[1]).mkdir(parents=True)
    (tmp_path / names[1] / "train.json").write_text("{}")
    (tmp_path / names[2]).mkdir(parents=True)  # started, not finished (a checkpoint only): still pending
    assert study.pending_jobs(tmp_path, names) == [names[0], names[2], names[3]]


def test_passkey_in_text_hides_the_needle_in_text_bytes(tmp_path):
    (tmp_path / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    cfg = DataConfig(task="needle", seq_len=256, passkey_len=3, needle_filler="text", text_path=str(tmp_path))
    data = Data(cfg, vocab_size=512)
    x, y = data.batch("needle", 4, 256, batch_generator(0, 0), "val")
    for row, target in zip(x, y):
        special = row >= 256
        assert int(special.sum()) == 1 + 1 + 3 + 1 + 2  # BOS, NEEDLE + 3, QUERY + 2 (the last is the target)
        assert (row == NEEDLE).sum() == 1 and (row == QUERY).sum() == 1
        assert (target != -100).sum() == 3
    with pytest.raises(ConfigError, match="needs data.text_path"):
        Data(DataConfig(task="needle", needle_filler="text"), vocab_size=512)


def test_smoke_pipeline_end_to_end_then_resume_skips_everything(tmp_path):
    args = ["--smoke", "--out", str(tmp_path / "jobs"), "--results", str(tmp_path)]
    first = study.main(args)
    card = study.CARDS["smoke"]
    n_jobs = len(card["variants"]) * len(card["tasks"]) * len(card["seeds"])
    assert len(first["ran"]) == n_jobs and first["missing"] == []
    report = json.loads((tmp_path / "quality_study_smoke.json").read_text())
    assert (tmp_path / "quality_study_smoke.md").is_file() and (tmp_path / "quality_study_smoke.png").is_file()
    recs = report["records"]
    assert len(recs) == len(card["variants"]) * len(card["tasks"]) * 2  # train length and 2x
    assert all(RECORD_KEYS <= set(r) for r in recs)
    assert {r["eval_len"] for r in recs} == {card["train_len"], 2 * card["train_len"]}
    assert all(r["seeds"] == card["seeds"] and 0 <= r["mean"] <= 1 for r in recs)
    msa = [r for r in recs if r["variant"] == "msa"]
    assert all(r["free_keys_per_query"] == card["free_keys"] and 0 < r["kv_read"] < 1 for r in msa)
    again = study.main(args)
    assert again["ran"] == [] and again["records"] == first["records"]
    with pytest.raises(SystemExit, match="trained with other settings"):  # never mixes two settings
        study.main([*args, "--steps", "5"])
    assert (tmp_path / "quality_study_smoke_training.png").is_file()
    assert {(s["variant"], s["task"]) for s in report["stage_losses"]} == {
        (v, t) for v in card["variants"] for t in card["tasks"]
    }
    (tmp_path / "jobs" / "msa" / "mqar" / "seed1" / "train.json").unlink()  # one job not finished
    only = study.main(["--card", "smoke", "--report-only", "--out", str(tmp_path / "jobs"), "--results", str(tmp_path)])
    assert only["ran"] == [] and only["missing"] == ["msa/mqar/seed1"]
    assert json.loads((tmp_path / "quality_study_smoke.json").read_text())["device"] == "CPU"  # recorded by the jobs


def test_report_only_asks_for_the_device_of_jobs_that_do_not_record_it(tmp_path):
    job = tmp_path / "dense" / "mqar" / "seed0"
    job.mkdir(parents=True)
    (job / "train.json").write_text(json.dumps({"accuracy": {"128": 1.0}, "history": []}))
    with pytest.raises(SystemExit, match="--device-name"):
        study.main(["--card", "smoke", "--report-only", "--out", str(tmp_path), "--results", str(tmp_path)])


def test_reads_every_key_marks_lengths_the_budget_covers():
    card = study.CARDS["h200"]  # 1024 free keys: 16 blocks of 64 (+ own / + 3 forced), 1024 tokens, 256 entries of 4
    covered = {
        v: [L for L in (128, 512, 1024, 2048, 8192) if study.reads_every_key(card, v, L)] for v in card["variants"]
    }
    assert covered["dense"] == [128, 512, 1024, 2048, 8192]
    assert covered["msa"] == covered["moba"] == covered["dsa"] == covered["csa"] == covered["nsa"] == [128, 512, 1024]
    assert study.reads_every_key(card, "gdn", 128) is None


def test_stage_losses_average_the_tail_of_each_stage_over_seeds():
    card = {**study.CARDS["smoke"], "curriculum": [[64, 4]], "steps": 8}  # stages end at steps 4 and 8
    history = lambda offset: [{"step": s, "lm_loss": float(s + offset)} for s in range(8)]
    results = {"dense/mqar/seed0": {"history": history(0)}, "dense/mqar/seed1": {"history": history(2)}}
    (row,) = study.stage_losses(card, results, tail=2)
    assert row["seeds"] == 2
    assert [st["length"] for st in row["stages"]] == [64, card["train_len"]]
    assert [st["loss"] for st in row["stages"]] == [pytest.approx(3.5), pytest.approx(7.5)]  # (2.5, 4.5), (6.5, 8.5)


def test_linear_prewarm_covers_every_training_and_evaluation_shape():
    card = study.CARDS["h200"]
    train, evals = study.linear_shapes(card)
    assert {n for _, n in train} == {n for n, _ in card["curriculum"]} | {card["train_len"]}
    assert all(rows * n == card["batch"] * card["train_len"] for rows, n in train)  # the same tokens per step
    assert (card["eval_batch"], 2 * card["train_len"]) in evals  # extrapolation
    study.prewarm_linear(card, {"dense", "msa"})  # no linear variant: nothing runs (any device)


@pytest.mark.gpu
def test_linear_prewarm_runs_on_gpu():
    card = {**study.CARDS["smoke"], "variants": ["dense", *study.LINEAR]}
    study.prewarm_linear(card, set(card["variants"]))


def fake_launcher(behaviour: dict[str, tuple[float, int]]):
    """A launcher whose worker for job NAME sleeps behaviour[NAME][0] s, then exits with behaviour[NAME][1]
    (0 writes train.json), and records the order of launches and each spec's training time limit."""
    import subprocess
    import sys

    launched = []

    def launch(kind, spec_path, log_path):
        name = "/".join(spec_path.parent.parts[-3:])
        launched.append((name, json.loads(spec_path.read_text())["run"]["train"]["time_limit_s"]))
        sleep, code = behaviour[name]
        done = spec_path.parent / "train.json"
        script = f"import time, pathlib; time.sleep({sleep}); " + (
            f"pathlib.Path({str(done)!r}).write_text('{{}}')" if code == 0 else f"raise SystemExit({code})"
        )
        return subprocess.Popen([sys.executable, "-c", script], stdout=open(log_path, "w"), stderr=subprocess.STDOUT)

    return launch, launched


def test_study_runner_schedules_by_time_left_and_reports_every_job(tmp_path):
    names = ["a/mqar/seed0", "a/mqar/seed1", "b/mqar/seed0", "c/mqar/seed0", "d/mqar/seed0", "e/mqar/seed0"]
    behaviour = {
        "a/mqar/seed0": (0.1, 0),
        "a/mqar/seed1": (0.1, 0),
        "b/mqar/seed0": (0.1, 1),
        "c/mqar/seed0": (0.1, 3),
        "d/mqar/seed0": (30, 0),
        "e/mqar/seed0": (0.1, 0),
    }
    specs = {}
    for n in names:
        (tmp_path / n).mkdir(parents=True)
        specs[n] = {"run": {"train": {"time_limit_s": None}}}
    launch, launched = fake_launcher(behaviour)
    # a: estimated at 100 s, more than is left; d: runs past the end; e: estimated beyond the call
    estimates = {"a": 100.0, "b": 1.0, "c": 1.0, "d": 2.0, "e": 1e6}
    t_end = time.perf_counter() + 4.0
    status = study.run_study_jobs(specs, tmp_path, 2, t_end, estimates, launcher=launch, poll_s=0.05)
    assert status["b/mqar/seed0"].startswith("failed")
    assert status["c/mqar/seed0"].startswith("stopped by the time limit")
    assert status["d/mqar/seed0"] == "killed at the call's end"
    assert status["a/mqar/seed0"].startswith("not started") and status["e/mqar/seed0"].startswith("not started")
    assert [n for n, _ in launched][0] == "d/mqar/seed0"  # the longest estimate that fits starts first
    assert all(limit <= 4.0 for _, limit in launched)  # each worker's limit is the time left at its start
    assert set(status) == set(names)


def test_study_runner_starts_the_first_variants_then_goes_seed_by_seed(tmp_path):
    names = ["a/mqar/seed0", "a/mqar/seed1", "b/mqar/seed0", "b/mqar/seed1", "c/mqar/seed1"]
    for n in names:
        (tmp_path / n).mkdir(parents=True)
    specs = {n: {"run": {"train": {"time_limit_s": None}}} for n in names}
    launch, launched = fake_launcher({n: (0.05, 0) for n in names})
    estimates = {"a": 1.0, "b": 2.0, "c": 0.5}
    t_end = time.perf_counter() + 10.0
    status = study.run_study_jobs(specs, tmp_path, 1, t_end, estimates, launcher=launch, poll_s=0.02, first=("c",))
    assert [n for n, _ in launched] == ["c/mqar/seed1", "b/mqar/seed0", "a/mqar/seed0", "b/mqar/seed1", "a/mqar/seed1"]
    assert set(status.values()) == {"done"}


def test_study_runner_holds_jobs_until_their_variant_is_ready(tmp_path):
    names = ["a/mqar/seed0", "lin/mqar/seed0", "never/mqar/seed0"]
    for n in names:
        (tmp_path / n).mkdir(parents=True)
    specs = {n: {"run": {"train": {"time_limit_s": None}}} for n in names}
    launch, launched = fake_launcher({n: (0.05, 0) for n in names})
    opens_at = time.perf_counter() + 0.6  # "lin" waits (like the linear variants for their pre-warm)
    ready = lambda v: v == "a" or (v == "lin" and time.perf_counter() >= opens_at)
    t_end = time.perf_counter() + 1.5
    status = study.run_study_jobs(
        specs, tmp_path, 4, t_end, {"a": 0.1, "lin": 0.1, "never": 0.1}, launcher=launch, poll_s=0.02, ready=ready
    )
    assert [n for n, _ in launched] == ["a/mqar/seed0", "lin/mqar/seed0"]  # "lin" started once ready, after "a"
    assert status["a/mqar/seed0"] == status["lin/mqar/seed0"] == "done"
    assert status["never/mqar/seed0"].startswith("not started")  # waited until it no longer fit, then reported


def test_prewarm_starts_in_its_own_process_for_the_linear_variants_only(tmp_path, monkeypatch):
    calls = []
    launcher = lambda kind, path, log: calls.append((kind, json.loads(path.read_text())["variants"])) or "proc"
    card = study.CARDS["h200"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert study.start_prewarm(card, {"dense", "msa"}, tmp_path, launcher) is None  # nothing linear: nothing runs
    assert study.start_prewarm(card, {"dense", "gdn", "lightning"}, tmp_path, launcher) == "proc"
    assert calls == [("prewarm", ["gdn", "lightning"])]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert study.main(["--prewarm", str(tmp_path / "prewarm.json")]) == {}  # the worker's side: no GPU, nothing to warm


def test_a_spec_naming_a_triton_cache_gets_it_in_its_workers_environment(tmp_path, monkeypatch):
    import subprocess

    seen = []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, stdout, stderr, env: seen.append(env.get("TRITON_CACHE_DIR")))
    monkeypatch.setenv("TRITON_CACHE_DIR", "/elsewhere")
    for cache in ["/kept/cache", None]:
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"job": "gdn/mqar/seed0", "triton_cache_dir": cache}))
        study.launch("train", spec, tmp_path / "log")
    assert seen == ["/kept/cache", "/elsewhere"]  # the other jobs keep the cache they had


def test_study_runner_learns_durations_from_finished_jobs(tmp_path):
    names = ["a/mqar/seed0", "a/mqar/seed1"]
    for n in names:
        (tmp_path / n).mkdir(parents=True)
    specs = {n: {"run": {"train": {"time_limit_s": None}}} for n in names}
    launch, launched = fake_launcher({n: (0.1, 0) for n in names})
    # one worker at a time: the second job starts only once the first has shown that "a" takes 0.1 s, not 3 s
    t_end = time.perf_counter() + 5.0
    time.sleep(1.0)  # 4 s left: the first job fits its 3.5 s estimate, the second fits only what the first took
    status = study.run_study_jobs(specs, tmp_path, 1, t_end, {"a": 3.5}, launcher=launch, poll_s=0.05)
    assert status == {n: "done" for n in names}


def test_records_carry_the_whole_row_score_beside_the_per_token_one():
    card = {**study.CARDS["smoke"], "tasks": {"passkey": study.CARDS["smoke"]["tasks"]["passkey"]}}
    results = {
        f"{v}/passkey/seed{s}": {
            "accuracy": {"128": tok},
            "eval": {"128": {"token_acc": tok, "exact": row}},
            "kv_read": 1.0,
        }
        for v, by_seed in {"dense": {0: (0.9, 0.5), 1: (1.0, 1.0)}, "msa": {0: (0.8, 0.25), 1: (1.0, 0.75)}}.items()
        for s, (tok, row) in by_seed.items()
    }
    msa = next(r for r in study.records("smoke", card, results) if r["variant"] == "msa")
    assert msa["mean"] == pytest.approx(0.9) and msa["paired_diff_vs_dense"] == pytest.approx(-0.05)
    assert msa["row_metric"]["mean"] == pytest.approx(0.5)
    assert msa["row_metric"]["paired_diff_vs_dense"] == pytest.approx(-0.25)
    assert msa["row_metric"]["per_seed"] == {0: 0.25, 1: 0.75}
