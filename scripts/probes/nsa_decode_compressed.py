"""Where NSA's fused decode step spends its time at 128k, batch 8 (m3 heads, bf16): each of its four kernels
(torch.profiler), against two stripped versions of its compressed-branch kernel on the same entries and
splits: the loads alone (the copy rate this access pattern reaches) and a plain flash-decoding loop (no block
sums).

    python scripts/probes/nsa_decode_compressed.py [--batch 8] [--configs '{"block_sums": "dot"}' ...] [--stripped]
"""

import argparse
import json

import torch
import triton
import triton.language as tl

from sparsezoo.kernels import nsa_decode_triton as nd


@triton.jit
def _loads_only(KC, VC, OUT, n_tiles_per_split, Sc, sks, svs, BE: tl.constexpr, D: tl.constexpr):
    sp, bg = tl.program_id(0), tl.program_id(1).to(tl.int64)
    e, d = tl.arange(0, BE), tl.arange(0, D)
    acc = tl.zeros([BE, D], tl.float32)
    for tile in range(sp * n_tiles_per_split, (sp + 1) * n_tiles_per_split):
        i = tile * BE + e
        ok = (i < Sc)[:, None]
        kt = tl.load(KC + bg * Sc * sks + i[:, None].to(tl.int64) * sks + d[None, :], mask=ok, other=0.0)
        vt = tl.load(VC + bg * Sc * svs + i[:, None].to(tl.int64) * svs + d[None, :], mask=ok, other=0.0)
        acc += kt.to(tl.float32) + vt.to(tl.float32)
    tl.store(OUT + (bg * tl.num_programs(0) + sp) * D + d, tl.sum(acc, axis=0))


@triton.jit
def _flash_only(Q, KC, VC, OUT, n_tiles_per_split, Sc, qk2, sks, svs, BM: tl.constexpr, BE: tl.constexpr,
                D: tl.constexpr):
    sp, bg = tl.program_id(0), tl.program_id(1).to(tl.int64)
    e, d, r = tl.arange(0, BE), tl.arange(0, D), tl.arange(0, BM)
    q = tl.load(Q + (bg * BM + r[:, None]) * D + d[None, :])
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for tile in range(sp * n_tiles_per_split, (sp + 1) * n_tiles_per_split):
        i = tile * BE + e
        ok = (i < Sc)[:, None]
        kt = tl.load(KC + bg * Sc * sks + i[:, None].to(tl.int64) * sks + d[None, :], mask=ok, other=0.0)
        s = tl.dot(q, tl.trans(kt)) * qk2
        s = tl.where((i < Sc)[None, :], s, float("-inf"))
        vt = tl.load(VC + bg * Sc * svs + i[:, None].to(tl.int64) * svs + d[None, :], mask=ok, other=0.0)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    tl.store(OUT + ((bg * tl.num_programs(0) + sp) * BM + r[:, None]) * D + d[None, :], acc / l_i[:, None])


def timed(fn, reps=200):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3  # us


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--len", type=int, default=131072)
    p.add_argument("--configs", nargs="*", default=[], help="JSON config overrides to time beside the default")
    p.add_argument("--stripped", action="store_true", help="also time the stripped kernels (loads, flash only)")
    args = p.parse_args()
    B, Hkv, G, D, S = args.batch, 4, 16, 128, args.len
    l, d, lsel, n, w = 32, 16, 64, 16, 512
    Sc = (S - l) // d + 1
    dev, bf = "cuda", torch.bfloat16
    q = torch.randn(B, Hkv * G, 1, D, device=dev, dtype=bf)
    kc, vc = (torch.randn(B, Hkv, Sc, D, device=dev, dtype=bf) for _ in range(2))
    k, v = (torch.randn(B, Hkv, S, D, device=dev, dtype=bf) for _ in range(2))
    gates = torch.rand(3, B, Hkv * G, 1, device=dev)
    bytes_cmp = 2 * kc.numel() * kc.element_size()
    print(f"B {B}, S {S}, Sc {Sc}: compressed K+V {bytes_cmp / 1e6:.1f} MB = {bytes_cmp / 4.25e6:.1f} us at 4.25 TB/s")

    def step(cfg=None):  # a config's "pdl" entry goes to the launcher's pdl argument
        cfg = dict(cfg or {})
        pdl = cfg.pop("pdl", None)
        return nd.nsa_decode_triton(q, kc, vc, k, v, k, v, l, d, lsel, n, w, D ** -0.5, gates=gates, config=cfg,
                                    pdl=pdl)

    for cfg in [{}] + [json.loads(c) for c in args.configs]:
        line = f"step {cfg} (graph): {timed(lambda: step(cfg)):.1f} us;"
        step(cfg)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                step(cfg)
            torch.cuda.synchronize()
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
            if e.device_time_total > 0:
                line += f" {e.key.strip('_').replace('_kernel', '')} {e.device_time_total / e.count:.1f}"
        print(line, flush=True)
    if not args.stripped:
        return
    BM = 16
    qf = q.view(B * Hkv, G, D).contiguous()
    for be, warps, stages, splits in ((64, 4, 2, 8), (64, 4, 3, 8), (128, 4, 2, 8), (64, 4, 2, 16), (64, 8, 2, 8),
                                      (32, 4, 3, 16), (64, 4, 4, 4)):
        tiles = triton.cdiv(Sc, be)
        per = triton.cdiv(tiles, splits)
        out = torch.empty(B * Hkv, splits, BM, D, device=dev)
        launch = dict(BE=be, D=D, num_warps=warps, num_stages=stages)
        t_load = timed(lambda: _loads_only[(splits, B * Hkv)](kc, vc, out, per, Sc, D, D, **launch))
        t_flash = timed(lambda: _flash_only[(splits, B * Hkv)](qf, kc, vc, out, per, Sc, 0.127, D, D, BM=BM,
                                                                 **launch))
        print(f"BE {be} warps {warps} stages {stages} splits {splits}: loads only {t_load:.1f} us "
              f"({bytes_cmp / t_load / 1e6:.2f} TB/s), flash decoding {t_flash:.1f} us "
              f"({bytes_cmp / t_flash / 1e6:.2f} TB/s)")


if __name__ == "__main__":
    main()
