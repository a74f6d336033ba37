"""Which implementation `auto` would run on a CUDA device for every op of the GPU main job
(configs/compare_gpu.yaml), decided on the CPU from the same supports() rules the GPU run uses.

The GPU main job must report no reference implementation."""

from pathlib import Path

import pytest
import torch

from sparsezoo import create_attention, list_variants, ops
from sparsezoo.compare import load_job_config, variant_config
from sparsezoo.ops.dispatch import Request

pytest.importorskip("triton")

JOB = load_job_config(str(Path(__file__).resolve().parents[1] / "configs" / "compare_gpu.yaml"), device="cpu")
TRAINING_ONLY = {"msa_index_kl", "index_kl"}  # the main job runs forward passes


def planned(name: str) -> dict[str, str]:
    config = create_attention(variant_config(name, JOB)).config
    plan = {}
    for op_names in config.BACKEND_OPS.values():
        for op_name in op_names:
            if op_name not in TRAINING_ONLY:
                req = Request("cuda", torch.bfloat16, False, config.op_params(op_name))
                plan[op_name] = ops.op(op_name).choose(config.backend_for(op_name), req)
    return plan


@pytest.mark.parametrize("name", list_variants())
def test_gpu_main_job_runs_no_reference_op(name):
    plan = planned(name)
    slow = {op for op, impl in plan.items() if impl == "reference"}
    assert not slow, f"{name} would run the reference for {sorted(slow)} on a GPU: {plan}"
