"""benchmarks/scale.py runs end to end: a CPU smoke test on 1 and 2 gloo processes (small heads) writes
its JSON records and markdown table, with the efficiency of the 2-process point against the 1-process one.
No timing is checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_scale_benchmark_smoke(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--device", "cpu", "--gpus", "1,2", "--lengths",
           "48", "--layers", "1", "--d-model", "32", "--reps", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads((tmp_path / "scale_cpu.json").read_text())
    assert [(r["gpus"], r["seq_len"]) for r in records] == [(1, 48), (2, 48)]
    for r in records:
        assert r["mode"] == "train_cp" and r["variant"] == "msa" and r["tokens_per_s"] > 0, r
    assert records[1]["implementations"]["context_parallel"] == "all_gather"
    assert "context_parallel" not in records[0]["implementations"]  # one process runs the plain layers
    assert records[1]["efficiency"] > 0 and records[1]["efficiency_vs_seq_len"] == 48
    table = (tmp_path / "scale_cpu.md").read_text()
    assert "| 2 | 48 |" in table and "smoke-test attention" in table
