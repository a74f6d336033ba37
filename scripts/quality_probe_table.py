"""A markdown table of scripts/quality_probe.py records: one row per probe, with its last evaluation at each
length (accuracy per answer token / per row with every answer right) and the seconds per training step at
each curriculum length (median over the logged steps; on a shared GPU this includes the other probes' load).

    python scripts/quality_probe_table.py examples/results/quality_probe_h200/*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from sparsezoo.models.data import DataConfig


def step_lengths(record: dict) -> list[tuple[int, int]]:
    """(length, first step after it) for each curriculum stage, then the training length to the end."""
    data = DataConfig.from_dict(record["run"]["data"])
    return [*data.stage_ends(), (data.seq_len, record["run"]["train"]["steps"])]


def seconds_per_step(record: dict) -> dict[int, float]:
    stages, by_len = step_lengths(record), {}
    tokens = record["run"]["train"]["batch_size"] * record["run"]["data"]["seq_len"]  # every step's tokens
    for h in record.get("history", []):
        length = next((n for n, end in stages if h["step"] < end), stages[-1][0])
        by_len.setdefault(length, []).append(tokens / h["tokens_per_s"])
    return {n: statistics.median(v) for n, v in by_len.items()}


def row(path: Path, record: dict) -> str:
    stages, start, parts = step_lengths(record)[:-1], 0, []
    for n, end in stages:
        parts.append(f"{n}×{end - start}")
        start = end
    ladder = " → ".join(parts) or "none"
    last = record["evals"][-1] if record["evals"] else {}
    scores = ", ".join(
        f"{k.split('@')[1]}: {v['token_acc']:.2f} / {v['exact']:.2f}" for k, v in last.items() if isinstance(v, dict)
    )
    speed = ", ".join(f"{n}: {s:.3f}" for n, s in sorted(seconds_per_step(record).items()))
    return (
        f"| {path.stem} | {record['variant']} | {record['task']} | {record['seed']} | {ladder} | "
        f"{record['run']['train']['lr']:g} | {record['steps_done']}/{record['run']['train']['steps']} | "
        f"{scores or '—'} | {speed or '—'} |"
    )


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("records", nargs="+", type=Path)
    args = p.parse_args(argv)
    lines = [
        "| probe | variant | task | seed | curriculum (len × steps) | lr | steps done | last eval, len: per token "
        "/ per row | s per step, by length |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [row(path, json.loads(path.read_text())) for path in sorted(args.records)]
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
