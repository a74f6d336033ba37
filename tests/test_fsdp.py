"""FSDP2 in the trainer (`train.parallel=fsdp`) on 2 gloo processes on the CPU: the same losses and weights
as one process over the same global batch, exact resume, checkpoints that resume in a single process,
bf16 mixed precision, no object (pickle) collectives, the process group torn down, and clear errors for bad options.

One torchrun runs all the FSDP trainings (a process cannot re-initialise the default group reliably),
so the script owns the process group: train() joins it, and the script destroys it in a finally.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sparsezoo.config import ConfigError
from sparsezoo.models import load_model
from sparsezoo.models.checkpoint import WEIGHTS, load_train_state
from sparsezoo.models.data import Data
from sparsezoo.models.train import TrainConfig, load_run_config, main, train
from tests.helpers import run_torchrun

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "gpt_tiny.yaml")
STEPS, SPLIT = 4, 2
SETS = [
    "train.batch_size=2",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.progress=false",
    "train.log_every=1",
    "train.lr_warmup=1",
    "train.min_lr_ratio=1.0",
    "data.seq_len=64",
    "model.attention_overrides.msa.warmup_steps=2",
    f"data.text_path={REPO / 'sparsezoo'}",
]

FSDP_SCRIPT = """
import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from sparsezoo.models.train import load_run_config, main, teardown_process_group, train

out, config, sets = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
steps, split = int(sys.argv[4]), int(sys.argv[5])
dist.init_process_group("gloo")


def pickled(*args, **kwargs):
    raise AssertionError("an object collective (pickle) was used")


for name in ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list"):
    setattr(dist, name, pickled)
    setattr(c10d, name, pickled)
rank, finished = dist.get_rank(), False
try:
    cli = [["--set", s] for s in sets + ["train.parallel=fsdp", f"train.out_dir={out / 'full'}", f"train.steps={steps}"]]
    full = main(["--config", config, *sum(cli, [])])  # what examples/train.py runs
    split_sets = sets + ["train.parallel=fsdp", f"train.out_dir={out / 'split'}"]
    train(load_run_config(config, split_sets + [f"train.steps={split}"]))  # "interrupted" after `split` steps
    if rank == 0:
        shutil.copytree(out / "split" / "checkpoint", out / "at_split")
    dist.barrier()
    train(load_run_config(config, split_sets + [f"train.steps={steps}"]), resume=True)
    train(load_run_config(config, sets + ["train.parallel=fsdp", "train.fsdp_param_dtype=bf16",
                                          f"train.out_dir={out / 'bf16'}", f"train.steps={split}"]))
    up = dist.is_initialized()
    finished = True
finally:
    teardown_process_group(finished)
result = {"parallel": full["parallel"], "local": full["local_param_elements"], "total": full["param_elements"],
          "group_up_during": up, "group_up_after": dist.is_initialized()}
(out / f"rank{rank}.json").write_text(json.dumps(result))
"""


def run(out: Path, steps: int, *extra: str) -> dict:
    return load_run_config(CONFIG, SETS + [f"train.out_dir={out}", f"train.steps={steps}", *extra])


@pytest.fixture
def global_batch(monkeypatch):
    """One process sees both ranks' rows each step: rank 0's then rank 1's (the FSDP global batch)."""
    per_rank = Data.train_batch

    def both_ranks(self, step, batch_size, rank=0, device="cpu"):
        (task, x0, y0), (_, x1, y1) = (per_rank(self, step, batch_size, r, device) for r in (0, 1))
        return task, torch.cat([x0, x1]), torch.cat([y0, y1])

    monkeypatch.setattr(Data, "train_batch", both_ranks)


def losses(folder: Path) -> list[tuple[float, float]]:
    return [(h["lm_loss"], h["index_loss"]) for h in load_train_state(folder, None)["history"]]


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    (ma, _), (mb, _) = load_model(a), load_model(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], atol=atol, rtol=1e-4, msg=name)


def test_fsdp_matches_one_process_and_resumes_exactly(tmp_path, global_batch):
    script = tmp_path / "fsdp_run.py"
    script.write_text(FSDP_SCRIPT)
    out = tmp_path / "fsdp"
    stdout = run_torchrun(
        [str(script), str(out), CONFIG, json.dumps(SETS), str(STEPS), str(SPLIT)], cwd=tmp_path, timeout=150
    )
    assert "world size 2 (parallel: fsdp)" in stdout
    for rank in (0, 1):
        result = json.loads((out / f"rank{rank}.json").read_text())
        assert result["parallel"] == "fsdp" and result["group_up_during"] and not result["group_up_after"]
        assert 0 < result["local"] < 0.6 * result["total"]  # each rank holds a shard (dim-0 chunks), not the model

    # (a) one process over the same global batch: same losses, same weights (fp32; reductions ordered differently)
    single = train(run(tmp_path / "single", STEPS))
    assert single["parallel"] == "none" and single["steps_done"] == STEPS
    fsdp_losses, single_losses = losses(out / "full" / "checkpoint"), losses(tmp_path / "single" / "checkpoint")
    assert len(fsdp_losses) == STEPS and any(ix > 0 for _, ix in fsdp_losses)  # MSA's index loss is trained too
    torch.testing.assert_close(torch.tensor(fsdp_losses), torch.tensor(single_losses), atol=1e-5, rtol=1e-5)
    assert_same_weights(out / "full" / "checkpoint", tmp_path / "single" / "checkpoint", atol=1e-5)

    # (b) saved at step SPLIT and resumed under FSDP: the uninterrupted run's losses and weights
    assert losses(out / "split" / "checkpoint") == fsdp_losses
    assert_same_weights(out / "split" / "checkpoint", out / "full" / "checkpoint", atol=1e-6)

    # bf16 mixed precision: bf16 compute (so not the fp32 losses), fp32 master weights in the checkpoint
    bf16 = losses(out / "bf16" / "checkpoint")
    assert bf16 != fsdp_losses[:SPLIT]
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fsdp_losses[:SPLIT]), atol=5e-2, rtol=5e-2)
    with safe_open(str(out / "bf16" / "checkpoint" / WEIGHTS), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}

    # the FSDP checkpoint is the single-process format: one process resumes it and gets there too
    cross = tmp_path / "cross"
    cross.mkdir()
    (out / "at_split").rename(cross / "checkpoint")
    train(run(cross, STEPS), resume=True)
    assert_same_weights(cross / "checkpoint", out / "full" / "checkpoint", atol=1e-5)


@pytest.mark.parametrize(
    "field, value, choices",
    [("parallel", "fsdp2", "['ddp', 'fsdp']"), ("fsdp_param_dtype", "fp16", "['auto', 'bf16', 'fp32']")],
)
def test_bad_parallel_option_names_the_choices(tmp_path, field, value, choices):
    with pytest.raises(ConfigError, match=f"train.{field} = '{value}'; choose one of {choices}".replace("[", r"\[")):
        main(["--config", CONFIG, "--set", f"train.out_dir={tmp_path}", "--set", f"train.{field}={value}"])
    assert not (tmp_path / "checkpoint").exists()
    with pytest.raises(ConfigError, match=f"train.{field}"):
        TrainConfig(**{field: value})


def test_fsdp_in_one_process_says_it_trains_unsharded(tmp_path, capsys):
    summary = train(run(tmp_path, 1, "train.parallel=fsdp"))
    assert summary["parallel"] == "none" and summary["steps_done"] == 1
    assert "nothing to shard, the model trains unsharded" in capsys.readouterr().out
