"""What one training step of the quality study's model costs, per variant, with the GPU to itself: wall time,
the CUDA kernels it launches and their summed device time, and the host syncs (device-to-host copies) that
stall it. Says whether many jobs sharing a GPU are bound by the device (too many kernels) or by the host.

    python scripts/profile_study_steps.py --card h200 --out out/profile_study_steps_h200.json   # and .md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import quality_study as qs  # noqa: E402

import sparsezoo  # noqa: E402
from sparsezoo.models.data import Data, DataConfig  # noqa: E402
from sparsezoo.models.gpt import GPT  # noqa: E402
from sparsezoo.models.train import autocast_for, build, make_optimizer  # noqa: E402


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def one_step(model, optimizer, x, y) -> None:
    with autocast_for(x.device, "auto"):
        _, loss = model(x, y)
    aux = sparsezoo.aux_loss(model)
    loss = loss if aux is None else loss + aux.float()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def profile(variant: str, card: dict, lengths: list[int], steps: int, task: str) -> list[dict]:
    run = qs.run_config(card, variant, task, 0, Path("/tmp/profile_study_steps"), None)
    model_cfg, data_cfg, train_cfg = build(run)
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: a dry run of this script
    model = GPT(model_cfg).to(dev)
    model.apply_routing_schedule(train_cfg.steps)  # past every warm-up: the sparse phase
    optimizer = make_optimizer(model, train_cfg, fused=dev.type == "cuda")
    tokens = card["batch"] * card["train_len"]
    out = []
    for length in lengths:
        data = Data(
            DataConfig.from_dict({**run["data"], "seq_len": length, "curriculum": None}), model_cfg.vocab_size, seed=0
        )
        rows = tokens // length
        t0 = time.perf_counter()
        batches = [data.train_batch(i, rows, 0, dev)[1:] for i in range(steps)]
        data_ms = (time.perf_counter() - t0) / steps * 1e3
        t0 = time.perf_counter()
        for x, y in batches[:3]:  # compile / autotune / caches
            one_step(model, optimizer, x, y)
        sync(dev)
        first_ms = (time.perf_counter() - t0) * 1e3
        times = []
        for x, y in batches[3:]:
            t0 = time.perf_counter()
            one_step(model, optimizer, x, y)
            sync(dev)
            times.append((time.perf_counter() - t0) * 1e3)
        n_prof = 3
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            for x, y in batches[:n_prof]:
                one_step(model, optimizer, x, y)
            sync(dev)
        kernels, kernel_us, syncs, d2h = 0, 0.0, 0, 0
        for e in prof.events():
            if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
                if "Memcpy DtoH" in e.name:
                    d2h += 1
                elif "Memcpy" not in e.name and "Memset" not in e.name:
                    kernels += 1
                    kernel_us += e.device_time
            elif e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"):
                syncs += 1
        rec = {
            "variant": variant,
            "task": task,
            "seq_len": length,
            "rows": rows,
            "step_ms_alone": statistics.median(times),
            "first_3_steps_ms": first_ms,
            "data_ms": data_ms,
            "kernels_per_step": kernels / n_prof,
            "kernel_ms_per_step": kernel_us / n_prof / 1e3,
            "d2h_copies_per_step": d2h / n_prof,
            "host_syncs_per_step": syncs / n_prof,
            "implementations": dict(sparsezoo.ops.implementations_used()),
        }
        print(
            f"{variant:9s} {length:5d}x{rows:<3d} step {rec['step_ms_alone']:7.1f} ms alone, "
            f"kernels {rec['kernels_per_step']:6.0f} ({rec['kernel_ms_per_step']:6.1f} ms on the device), "
            f"d2h {rec['d2h_copies_per_step']:4.0f}, syncs {rec['host_syncs_per_step']:4.0f}, "
            f"data {data_ms:5.1f} ms, first 3 steps {first_ms:7.0f} ms",
            flush=True,
        )
        out.append(rec)
    return out


def write_table(path: Path) -> None:
    """The markdown table beside a profile's JSON (same name, .md)."""
    d = json.loads(path.read_text())
    lines = [
        f"# One training step of the quality study's model (card `{d['card']}`), alone on {d['device']}",
        "",
        f"torch {d['torch']}; `python scripts/profile_study_steps.py --card {d['card']}`. Batch of "
        "8,192 tokens (rows x length), autocast bf16, past every routing warm-up; kernels and their device "
        "time summed from torch.profiler over 3 steps; d2h = device-to-host copies (each stalls the host).",
        "",
        "| variant | length x rows | step ms (alone) | kernels | kernel ms on the device | d2h copies | data ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in d["records"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['variant']} | {r['seq_len']} x {r['rows']} | {r['step_ms_alone']:.1f} | "
            f"{r['kernels_per_step']:.0f} | {r['kernel_ms_per_step']:.1f} | {r['d2h_copies_per_step']:.0f} | "
            f"{r['data_ms']:.1f} |"
        )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--card", default="h200", choices=sorted(qs.CARDS))
    p.add_argument("--variants", default=None, help="comma-separated; default: the card's")
    p.add_argument("--lengths", default="128,8192")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--task", default="mqar")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    card = qs.CARDS[a.card]
    variants = a.variants.split(",") if a.variants else card["variants"]
    lengths = [int(s) for s in a.lengths.split(",")]
    recs = []
    for v in variants:
        try:
            recs += profile(v, card, lengths, a.steps, a.task)
        except Exception as e:  # noqa: BLE001 - one variant's failure is recorded, the others still run
            print(f"{v}: failed: {type(e).__name__}: {e}", flush=True)
            recs.append({"variant": v, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    meta = {
        "card": a.card,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({**meta, "records": recs}, indent=1))
    write_table(Path(a.out))


if __name__ == "__main__":
    main()
