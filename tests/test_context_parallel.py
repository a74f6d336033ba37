"""Context parallelism (`sparsezoo.context_parallel`): the zig-zag layout, and on 2 and 3 gloo processes
on the CPU, a sequence split over ranks gives the single-process outputs, losses and gradients (fp64, to
1e-12) for every variant that supports it, at lengths whose chunks are uneven and cut through the
variants' blocks; the trainer (`train.context_parallel`) under FSDP2 and DDP matches one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsezoo
from sparsezoo.context_parallel import ZigzagLayout
from sparsezoo.config import ConfigError
from sparsezoo.models.train import TrainConfig, load_run_config, train
from tests.helpers import run_torchrun
from tests.test_fsdp import SETS, assert_same_weights, global_batch, losses  # noqa: F401 (a fixture)
from tests.test_padding import DIMS, TINY

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "context_parallel_worker.py"
CONFIG = str(REPO / "configs" / "gpt_tiny.yaml")
STEPS = 3


# -- the layout -------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(world=st.integers(1, 5), extra=st.integers(0, 40))
def test_layout_covers_the_sequence_once_and_balances_causal_work(world, extra):
    T = 2 * world + extra
    layout = ZigzagLayout(T, world)
    sizes = [b - a for a, b in layout.chunk_bounds()]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == T
    positions = torch.cat([layout.local_positions(r) for r in range(world)])
    assert sorted(positions.tolist()) == list(range(T))
    x = torch.arange(T)[None].expand(2, T) * 10
    pieces = [layout.shard(x, r) for r in range(world)]
    assert all(torch.equal(p[0], layout.local_positions(r) * 10) for r, p in enumerate(pieces))
    assert torch.equal(layout.unshard(pieces), x)
    # causal work per rank (keys its queries see): equal chunks give equal work; a chunk one token longer
    # costs at most two tokens' keys (< 2T), where a contiguous split differs by about T^2 / world
    work = [int((layout.local_positions(r) + 1).sum()) for r in range(world)]
    assert max(work) - min(work) <= 2 * T


def test_layout_rejects_bad_sizes():
    with pytest.raises(ValueError, match="at least 4 tokens"):
        ZigzagLayout(3, 2)
    with pytest.raises(ValueError, match="world size >= 1"):
        ZigzagLayout(8, 0)
    with pytest.raises(ValueError, match="expects 8 tokens"):
        ZigzagLayout(8, 2).shard(torch.zeros(1, 7), 0)
    with pytest.raises(ValueError, match="rank must be in"):
        ZigzagLayout(8, 2).rank_chunks(2)


def test_a_layer_without_context_parallelism_says_which_have_it():
    assert "msa" in sparsezoo.context_parallel_variants()
    assert "lightning" not in sparsezoo.context_parallel_variants()
    layer = sparsezoo.create_attention({"variant": "lightning", "backend": "reference"}, **DIMS)
    with pytest.raises(ValueError, match=r"lightning has no context-parallel forward; variants that have one: \["):
        layer(torch.randn(1, 8, DIMS["d_model"]), context_parallel=object())


def test_context_parallel_outside_a_process_group_is_an_error():
    with pytest.raises(RuntimeError, match="inside an initialised process group"):
        sparsezoo.ContextParallel(8)


def test_trainer_checks_the_context_parallel_size(tmp_path):
    run = load_run_config(CONFIG, SETS + ["train.steps=1", "train.context_parallel=2", f"train.out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"context_parallel = 2 must divide the number of processes \(1\)"):
        train(run)
    assert not any(tmp_path.iterdir())  # refused before anything was written
    with pytest.raises(ConfigError, match="context_parallel"):
        TrainConfig.from_dict({"context_parallel": 0})


# -- against one process, on gloo processes -----------------------------------------------------------------
def cp_runs(tmp_path: Path) -> list:
    base = SETS + ["train.context_parallel=2", f"train.steps={STEPS}"]
    return [[str(tmp_path / "cp_fsdp"), CONFIG, base + ["train.parallel=fsdp"]],
            [str(tmp_path / "cp_ddp"), CONFIG, base + ["train.parallel=ddp"]]]


def check_ranks(out: Path, world: int, tol: float = 1e-12) -> dict:
    cases = {}
    for rank in range(world):
        for case, errors in json.loads((out / f"rank{rank}.json").read_text()).items():
            if case.startswith("train/"):
                continue
            assert errors.pop("recorded", 1.0) == 1.0, f"{case}: context_parallel was not recorded"
            # GPT's loss is a float32 cross-entropy of fp64 logits
            bad = {k: v for k, v in errors.items() if not v <= (1e-6 if k == "loss" else tol)}
            assert not bad, f"rank {rank}, {case}: {bad}"
            cases[case] = errors
    return cases


def test_two_ranks_match_one_process_and_the_trainer_matches(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # T = 13: chunks of 4, 3, 3, 3 tokens; T = 5: 2, 1, 1, 1 (one-token chunks, NSA's decode op in eval)
    run_torchrun([str(WORKER), str(out), "13,5", json.dumps(cp_runs(tmp_path))], cwd=tmp_path, timeout=300)
    cases = check_ranks(out, 2)
    assert {c.split("/")[0] for c in cases} == set(TINY) | {"gpt"}

    single = train(load_run_config(CONFIG, SETS + [f"train.steps={STEPS}", f"train.out_dir={tmp_path / 'one'}"]))
    assert single["context_parallel"] == 1
    want = torch.tensor(losses(tmp_path / "one" / "checkpoint"))
    assert (want[:, 1] > 0).any()  # MSA's index loss trains too
    for name in ("cp_fsdp", "cp_ddp"):
        got = torch.tensor(losses(tmp_path / name / "checkpoint"))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
        assert_same_weights(tmp_path / name / "checkpoint", tmp_path / "one" / "checkpoint", atol=1e-5)


def test_three_ranks_match_one_process(tmp_path):
    # T = 17 over 6 chunks: 3, 3, 3, 3, 3, 2; the late chunks come from the ranks in reverse order
    run_torchrun([str(WORKER), str(tmp_path), "17"], cwd=tmp_path, timeout=300, nproc=3)
    check_ranks(tmp_path, 3)


@pytest.mark.usefixtures("global_batch")
def test_two_replicas_of_two_context_ranks_match_one_process(tmp_path):
    """4 processes: a (data 2 x context 2) mesh under FSDP2; one process sees both replicas' rows."""
    runs = [[str(tmp_path / "cp_dp"), CONFIG, SETS + ["train.context_parallel=2", "train.parallel=fsdp",
                                                       f"train.steps={STEPS}"]]]
    run_torchrun([str(WORKER), str(tmp_path), "", json.dumps(runs)], cwd=tmp_path, timeout=300, nproc=4)
    result = json.loads((tmp_path / "rank3.json").read_text())["train/cp_dp"]
    assert result == {"context_parallel": 2, "world": 4}
    train(load_run_config(CONFIG, SETS + [f"train.steps={STEPS}", f"train.out_dir={tmp_path / 'one'}"]))
    got, want = (torch.tensor(losses(tmp_path / n / "checkpoint")) for n in ("cp_dp", "one"))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert_same_weights(tmp_path / "cp_dp" / "checkpoint", tmp_path / "one" / "checkpoint", atol=1e-5)
