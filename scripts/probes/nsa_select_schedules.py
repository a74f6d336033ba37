"""NSA selection at the zoo's prefill point (m3 heads, bf16, the paper's config, the compressed branch's LSE
given): kernel device times of each config and whether its selection equals the 'stream' schedule's with the
indexer's histogram select. Configs: the stream schedule with each buffer select ('indexer', 'rows'), the
'stream_topk' schedule (each row's running top-k kept during the walk), then the extra ones (over the default).

    python scripts/probes/nsa_select_schedules.py [--lengths 32768,131072] [--configs '{"ROW_GROUP": 16}' ...]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import zoo  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sweep  # noqa: E402

from sparsezoo.kernels import nsa_select_triton as nst  # noqa: E402


def kernel_times(fn, reps=5) -> dict:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {e.key.strip("_")[:32]: round(e.device_time_total / reps / 1e3, 2) for e in prof.key_averages()
            if e.device_time_total > 0}


def probe(T: int, extra: list[dict]) -> None:
    var = zoo.Variant("nsa", zoo.CONFIGS["nsa"]["published"], 1, T, T, False)
    c = var.cfg
    sel_args = (var.q, var.extra["kc"], T, c["l"], c["d"], c["lsel"], c["n"], var.scale)
    run = lambda cfg: nst.nsa_select_triton(*sel_args, config=cfg, lse=var.extra["cmp_lse"])
    want = run({"schedule": "stream", "select": "indexer"})
    base = [{"schedule": "stream", "select": "indexer"}, {"schedule": "stream", "select": "rows"},
            {"schedule": "stream_topk"}]
    for cfg in base + extra:
        try:
            same = torch.equal(run(cfg), want)
            ms = zoo.bench(lambda: run(cfg))
            print(f"T {T} {cfg}: {ms:.2f} ms, same selection: {same}, kernels (ms) "
                  f"{kernel_times(lambda: run(cfg))}", flush=True)
        except Exception as exc:  # a config that does not compile or fit: say so, go on
            print(f"T {T} {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)


if __name__ == "__main__":
    sweep.main(probe, "32768,131072", "extra JSON configs (over the default one)")
