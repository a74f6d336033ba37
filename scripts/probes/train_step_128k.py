"""One MSA training step at 128k (m3, bf16) against dense: `benchmarks/prefill.py`'s training record alone,
without its prefill points (which cost a GPU call minutes of dense prefill and a flex compile).

    python scripts/probes/train_step_128k.py [--length 128]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from prefill import KB, SHAPES, make_inputs, matmul_rate, run_train  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--length", type=int, default=128, help="k tokens")
T = p.parse_args().length * KB
run_train(T, SHAPES["m3"], *make_inputs(T, SHAPES["m3"]), matmul_rate())
