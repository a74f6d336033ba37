"""Where a zoo step waits for the host: one variant's prefill step (as benchmarks/zoo.py times it) run once under
torch.cuda.set_sync_debug_mode("warn"), printing each distinct host synchronisation with the line that asked for
it, then the step's host time (launching only) against its device time (event-timed).

    python scripts/probes/step_syncs.py [--variant nsa] [--len 131072]
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import zoo  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="nsa")
    p.add_argument("--config", default="equal_budget")
    p.add_argument("--len", type=int, default=131072)
    args = p.parse_args()
    cfg = zoo.CONFIGS[args.variant]
    var = zoo.Variant(args.variant, cfg.get(args.config, cfg["published"]), 1, args.len, args.len, False)
    with torch.no_grad():
        var.step()  # compiles and warms up
        torch.cuda.synchronize()
        seen = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            start = time.perf_counter()
            var.step()
            host_ms = (time.perf_counter() - start) * 1e3
            torch.cuda.set_sync_debug_mode("default")
            caught = [w for w in caught if "synchronizing" in str(w.message)]  # not the mode's prototype notice
            for w in caught:
                seen.setdefault(f"{w.filename}:{w.lineno}", w)
        torch.cuda.synchronize()
        device_ms = zoo.bench(var.step)
    print(f"{args.variant} {args.len}: {len(caught)} host synchronisations, host time {host_ms:.2f} ms (launching "
          f"only), device time {device_ms:.2f} ms")
    for where, w in seen.items():
        print(f"  {where}: {str(w.message)[:100]}")
    if not seen:
        print("  none")


if __name__ == "__main__":
    main()
