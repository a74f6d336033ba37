"""MSA prefill / training benchmark vs dense attention (issue 6), one GPU, m3 shape, bf16, batch 1.

    python benchmarks/prefill.py --out examples/results            # full run (about 5 minutes)
    python benchmarks/prefill.py --sweep --out /tmp/sweep           # tiling sweep at 32k / 128k

Dense = the fastest of SDPA cuDNN, SDPA flash and compiled FlexAttention causal, timed in the same
run (flash and flex only up to 128k, where cuDNN is already the fastest; 1M dense cuDNN is timed
with one repeat, ~37 s). MSA prefill = fused indexer (scores -> block max -> top-k) + per-tile
unions + Triton block-sparse attention. Index queries are spatially correlated (a smooth random
walk over tokens plus noise), as a trained indexer's are; the union width that correlation gives is
recorded (`union_blocks`), and an uncorrelated-selection run is recorded beside it.
Every timed configuration is checked against the reference on its last 128 queries first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from cards import card_tag

SHAPES = {"m3": dict(Hq=64, Hkv=4, D=128, Di=128, block=128, topk=16)}
KB = 1024


def bench(fn, reps: int | None = None, warmup: int = 1) -> float:
    """Median ms. reps=None -> triton do_bench (warm-up + repeats for short ops)."""
    import triton

    if reps is None:
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return float(sorted(times)[len(times) // 2])


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


def correlated_index_queries(H, T, Di, gen, stride=512, noise=0.5):
    """Smooth random walk over tokens (anchors every `stride` tokens, linear blend) plus noise."""
    n_anchor = T // stride + 2
    anchors = torch.randn(H, n_anchor, Di, device="cuda", generator=gen)
    pos = torch.arange(T, device="cuda", dtype=torch.float32) / stride
    i0 = pos.floor().long()
    w = (pos - i0).view(1, T, 1)
    base = anchors[:, i0] * (1 - w) + anchors[:, i0 + 1] * w
    out = base + noise * torch.randn(H, T, Di, device="cuda", generator=gen)
    return out.to(torch.bfloat16)[None]


def make_inputs(T, sh, correlated=True, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v = mk(1, sh["Hq"], T, sh["D"]), mk(1, sh["Hkv"], T, sh["D"]), mk(1, sh["Hkv"], T, sh["D"])
    q_idx = correlated_index_queries(sh["Hkv"], T, sh["Di"], gen) if correlated else mk(1, sh["Hkv"], T, sh["Di"])
    k_idx = mk(1, T, sh["Di"])
    return q, k, v, q_idx, k_idx


def dense_flops(N, sh):
    return 2 * N * N * sh["Hq"] * sh["D"]


def index_flops(N, sh):
    return N * N * sh["Hkv"] * sh["Di"]


def sparse_flops(N, sh):
    return 4 * N * sh["topk"] * sh["block"] * sh["Hq"] * sh["D"]


def flop_limit(N, sh):
    return dense_flops(N, sh) / (index_flops(N, sh) + sparse_flops(N, sh))


# ----------------------------------------------------------------------------- correctness gates

def check_prefill(q, k, v, q_idx, k_idx, sel, out, sh, n_check=128):
    from sparsezoo.ops import references as ref

    S = k.shape[2]
    qi = q_idx[:, :, -n_check:].float()
    pos = ref.query_positions(n_check, S, 0, n_check, q.device)
    b = ref.block_scores(qi, k_idx.float(), pos, sh["block"], 1 / math.sqrt(sh["Di"]))
    want = ref.select_from_block_scores(b, pos, sh["block"], sh["topk"])
    got = sel[:, :, -n_check:]
    local = (pos // sh["block"]).view(1, 1, -1, 1)

    def ranked(s):
        keep = (s >= 0) & (s.long() != local)
        v_ = torch.gather(b, -1, s.long().clamp_min(0))
        return torch.sort(torch.where(keep, v_, float("-inf")), -1, descending=True).values

    g, w = ranked(got), ranked(want)
    fin = torch.isfinite(w)
    sel_err = (g[fin] - w[fin]).abs().max().item()
    assert sel_err < 3e-2, f"selection differs from the reference (score error {sel_err})"
    rout = ref.block_sparse_attention_reference(q[:, :, -n_check:], k, v, got, sh["block"], 1 / math.sqrt(sh["D"]))
    att_err = (out[:, :, -n_check:].float() - rout.float()).abs().max().item()
    assert att_err < 3e-2, f"attention differs from the reference (max error {att_err})"
    return sel_err, att_err


# ----------------------------------------------------------------------------- dense baselines

def dense_fns(q, k, v, scale, with_flex):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return run

    fns = {"cudnn": sdpa(SDPBackend.CUDNN_ATTENTION), "flash": sdpa(SDPBackend.FLASH_ATTENTION)}
    if with_flex:
        from sparsezoo.ops import dense_attention

        fns["flex"] = lambda: dense_attention(q, k, v, scale=scale, backend="flex")
    return fns


def time_dense(q, k, v, scale, names, reps, train=False, warmup=1):
    res = {}
    fns = dense_fns(q, k, v, scale, "flex" in names)
    for name in names:
        fn = fns[name]
        if train:
            f0 = fn
            go = torch.randn_like(q)

            def fn(f0=f0):
                for x in (q, k, v):
                    x.grad = None
                out = f0()
                torch.autograd.backward(out, go)
        try:
            res[name] = bench(fn, reps, warmup)
        except Exception as e:  # a backend the build lacks is reported, not silently replaced
            print(f"  dense {name}: unavailable ({type(e).__name__}: {str(e)[:120]})", flush=True)
        finally:
            for x in (q, k, v):
                x.grad = None
    return res


# ----------------------------------------------------------------------------- MSA

def msa_prefill_parts(q, k, v, q_idx, k_idx, sh):
    """(selection, scores-only probe, attention, both): the attention goes through
    `ops.block_sparse_attention`'s Triton dispatch, so it runs the schedule inference runs (key-major)."""
    from sparsezoo import ops
    from sparsezoo.kernels import select_triton as st

    scale, iscale = 1 / math.sqrt(sh["D"]), 1 / math.sqrt(sh["Di"])
    sel_fn = lambda: st.msa_select_triton(q_idx, k_idx, sh["block"], sh["topk"], iscale)
    probe_fn = lambda: st.msa_select_triton(q_idx, k_idx, sh["block"], sh["topk"], iscale, do_topk=False)
    attn_fn = lambda sel: ops.block_sparse_attention(q, k, v, sel, block_size=sh["block"], scale=scale,
                                                     backend="triton")
    total_fn = lambda: attn_fn(sel_fn())
    return sel_fn, probe_fn, attn_fn, total_fn


def run_length(T, sh, args, mm_rate, records, with_train):
    from sparsezoo import ops
    from sparsezoo.kernels import sparse_attention_triton as sat

    reps = None if T <= 128 * KB else (3 if T <= 512 * KB else 2)
    q, k, v, q_idx, k_idx = make_inputs(T, sh)
    qkv_bytes = sum(x.numel() * x.element_size() for x in (q, k, v))
    sel_fn, probe_fn, attn_fn, total_fn = msa_prefill_parts(q, k, v, q_idx, k_idx, sh)
    torch.cuda.synchronize()
    base_mem = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sel = sel_fn()
    with ops.track_implementations() as used:
        out = attn_fn(sel)
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - base_mem - out.numel() * out.element_size()
    sel_err, att_err = check_prefill(q, k, v, q_idx, k_idx, sel, out, sh)
    TM = sat._tiling(sh["Hq"] // sh["Hkv"], sh["block"], q.device, sat.ATTN_CONFIG)[0]
    n_blocks = math.ceil(k.shape[2] / sh["block"])
    union = sat.tile_plan(sel, TM, sat.ATTN_CONFIG["WINDOW"], n_blocks)[1].float().mean().item()
    del out
    t_sel = bench(sel_fn, reps)
    t_probe = bench(probe_fn, reps)
    t_attn = bench(lambda: attn_fn(sel), reps)
    t_total = bench(total_fn, reps)
    names = ["cudnn", "flash", "flex"] if T <= 128 * KB else ["cudnn"]
    dense_reps = None if T <= 128 * KB else 1
    dense = time_dense(q, k, v, 1 / math.sqrt(sh["D"]), names, dense_reps, warmup=0 if T > 512 * KB else 1)
    if not dense:
        dense = time_dense(q, k, v, 1 / math.sqrt(sh["D"]), ["flash"], dense_reps)
    best = min(dense, key=dense.get)
    rec = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=_triton_version(),
               shape="m3", seq_len=T, batch=1, q_len=T, mode="prefill",
               dense_ms=dense[best], dense_backend=best, dense_all_ms=dense,
               msa_ms=t_total, index_ms=t_sel, index_scores_blockmax_ms=t_probe, topk_ms=t_sel - t_probe,
               attention_ms=t_attn, speedup=dense[best] / t_total,
               index_tflops=index_flops(T, sh) / t_sel / 1e9, matmul_tflops=mm_rate,
               index_matmul_fraction=index_flops(T, sh) / t_sel / 1e9 / mm_rate,
               attention_tflops=sparse_flops(T, sh) / 2 / t_attn / 1e9,
               flop_limit=flop_limit(T, sh), limit_fraction=dense[best] / t_total / flop_limit(T, sh),
               union_blocks_per_tile=union, peak_extra_bytes=peak_extra, qkv_bytes=qkv_bytes,
               peak_extra_over_qkv=peak_extra / qkv_bytes, sel_score_err=sel_err, attn_err=att_err,
               tokens_per_tile=TM, attn_config=dict(sat.ATTN_CONFIG), implementations=dict(used))
    if T <= 128 * KB:  # uncorrelated index queries: wider unions
        from sparsezoo.kernels import select_triton as st

        gen = torch.Generator(device="cuda").manual_seed(1)
        qi_iid = torch.randn(q_idx.shape, device="cuda", dtype=torch.bfloat16, generator=gen)

        sel_iid = st.msa_select_triton(qi_iid, k_idx, sh["block"], sh["topk"], 1 / math.sqrt(sh["Di"]))
        rec["attention_iid_ms"] = bench(lambda: attn_fn(sel_iid), reps)
        plan_iid = sat.tile_plan(sel_iid, TM, sat.ATTN_CONFIG["WINDOW"], n_blocks)
        rec["union_blocks_per_tile_iid"] = plan_iid[1].float().mean().item()
        del sel_iid, qi_iid
    if T <= 128 * KB:
        from sparsezoo.ops import block_sparse_attention

        try:
            fl = lambda: block_sparse_attention(q, k, v, sel, block_size=sh["block"], backend="flex")
            rec["flex_attention_ms"] = bench(fl)
        except Exception as e:
            print(f"  flex sparse: unavailable ({type(e).__name__}: {str(e)[:120]})", flush=True)
    print(json.dumps({k_: (round(v_, 3) if isinstance(v_, float) else v_) for k_, v_ in rec.items()}), flush=True)
    records.append(rec)
    if with_train:
        records.append(run_train(T, sh, q, k, v, q_idx, k_idx, mm_rate))
    del q, k, v, q_idx, k_idx, sel
    torch.cuda.empty_cache()


def kernel_times(fn) -> dict:
    """CUDA ms per kernel name over one call of fn (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    times = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" and getattr(ev, "device_time_total", 0) > 0:
            times[ev.key[:60]] = round(ev.device_time_total / 1e3, 3)
    return dict(sorted(times.items(), key=lambda kv: -kv[1])[:12])


def run_train(T, sh, q, k, v, q_idx, k_idx, mm_rate):
    from sparsezoo import ops
    from sparsezoo.ops.block_sparse_attention import triton as bsa_triton
    from sparsezoo.ops.index_kl import msa_triton as kl_triton
    from sparsezoo.training_step import msa_sparse_step

    leaves = [x.detach().requires_grad_() for x in (q, k, v, q_idx, k_idx)]
    go = torch.randn_like(q)

    def step(with_kl=True):
        for x in leaves:
            x.grad = None
        qq, kk, vv, qi, ki = leaves
        if with_kl:
            out, kl, _ = msa_sparse_step(qq, kk, vv, qi, ki, block_size=sh["block"], topk=sh["topk"])
            torch.autograd.backward([out, kl], [go, torch.ones_like(kl)])
        else:
            sel = ops.msa_select(qi.detach(), ki.detach(), block_size=sh["block"], topk=sh["topk"], backend="triton")
            out = ops.block_sparse_attention(qq, kk, vv, sel, block_size=sh["block"], backend="triton")
            torch.autograd.backward(out, go)

    torch.cuda.synchronize()
    base_mem = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with ops.track_implementations() as used:
        step()
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - base_mem
    t_step = bench(step)
    kernels = kernel_times(step)
    t_attn_only = bench(lambda: step(False))
    # the schedules the step replaced, in the same run: the query-major forward, and the query-major KL
    # and the key-major dK/dV the other way round from the default
    saved = bsa_triton.KEY_MAJOR_TRAIN, kl_triton.KEY_MAJOR, bsa_triton.KEY_MAJOR_DKDV
    try:
        bsa_triton.KEY_MAJOR_TRAIN = False
        t_attn_only_qm = bench(lambda: step(False))
        bsa_triton.KEY_MAJOR_TRAIN, kl_triton.KEY_MAJOR = True, False
        t_step_qm_kl = bench(step)
        bsa_triton.KEY_MAJOR_TRAIN, kl_triton.KEY_MAJOR, bsa_triton.KEY_MAJOR_DKDV = saved[0], saved[1], not saved[2]
        t_attn_only_dkdv = bench(lambda: step(False))
        t_step_dkdv = bench(step)
        kernels_dkdv = kernel_times(step)
    finally:
        bsa_triton.KEY_MAJOR_TRAIN, kl_triton.KEY_MAJOR, bsa_triton.KEY_MAJOR_DKDV = saved
    dense = time_dense(*leaves[:3], 1 / math.sqrt(sh["D"]), ["cudnn", "flash"], None, train=True)
    best = min(dense, key=dense.get)
    lim = 3 * dense_flops(T, sh) / (index_flops(T, sh) + 3 * sparse_flops(T, sh))
    rec = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=_triton_version(),
               shape="m3", seq_len=T, batch=1, q_len=T, mode="fwd+bwd",
               dense_ms=dense[best], dense_backend=best, dense_all_ms=dense,
               msa_ms=t_step, msa_attention_only_ms=t_attn_only, speedup=dense[best] / t_step,
               speedup_attention_only=dense[best] / t_attn_only, implementations=dict(used), kernels_ms=kernels,
               msa_attention_only_query_major_forward_ms=t_attn_only_qm, msa_query_major_kl_ms=t_step_qm_kl,
               key_major_dkdv=saved[2], msa_other_dkdv_ms=t_step_dkdv,
               msa_attention_only_other_dkdv_ms=t_attn_only_dkdv, kernels_other_dkdv_ms=kernels_dkdv,
               flop_limit=lim,
               limit_fraction=dense[best] / t_attn_only / lim, matmul_tflops=mm_rate,
               peak_extra_bytes=peak_extra)
    print(json.dumps({k_: (round(v_, 3) if isinstance(v_, float) else v_) for k_, v_ in rec.items()}), flush=True)
    return rec


def _triton_version():
    import triton

    return triton.__version__


# ----------------------------------------------------------------------------- sweep

def sweep(sh, lengths):
    from sparsezoo.kernels import select_triton as st
    from sparsezoo.kernels import sparse_attention_triton as sat

    iscale, scale = 1 / math.sqrt(sh["Di"]), 1 / math.sqrt(sh["D"])
    for T in lengths:
        q, k, v, q_idx, k_idx = make_inputs(T, sh)
        ref_sel = st.msa_select_triton(q_idx, k_idx, sh["block"], sh["topk"], iscale)
        print(f"== select T={T}  (index TFLOP/s = N^2*H_i*D_i / t)", flush=True)
        for HG, TM in [(4, 32), (4, 64), (2, 64), (1, 128)]:
            for nw in (4, 8):
                for ns in (3,):
                    cfg = dict(HG=HG, TM=TM, num_warps=nw, num_stages=ns)
                    try:
                        f = lambda: st.msa_select_triton(q_idx, k_idx, sh["block"], sh["topk"], iscale, config=cfg)
                        same = torch.equal(f(), ref_sel)
                        ms = bench(f)
                        print(f"  HG={HG} TM={TM:3d} w={nw} s={ns}: {ms:8.2f} ms "
                              f"{index_flops(T, sh) / ms / 1e9:6.0f} TF/s same={same}", flush=True)
                    except Exception as e:
                        print(f"  HG={HG} TM={TM} w={nw} s={ns}: failed {type(e).__name__}: {str(e)[:100]}")
        sel = ref_sel
        out_ref = sat.block_sparse_attention_triton(q, k, v, sel, sh["block"], scale)
        print(f"== attention fwd T={T}", flush=True)
        for rows in (64, 128):
            for nw in (4, 8):
                for ns in (2, 3):
                    cfg = dict(ROWS=rows, num_warps=nw, num_stages=ns)
                    try:
                        f = lambda: sat.block_sparse_attention_triton(q, k, v, sel, sh["block"], scale, config=cfg)
                        err = (f().float() - out_ref.float()).abs().max().item()
                        ms = bench(f)
                        print(f"  rows={rows} w={nw} s={ns}: {ms:8.2f} ms err={err:.1e}", flush=True)
                    except Exception as e:
                        print(f"  rows={rows} w={nw} s={ns}: failed {type(e).__name__}: {str(e)[:100]}")
        print(f"== attention fwd+bwd T={T}", flush=True)
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        go = torch.randn_like(q)
        for rows in (64, 128):
            for nw in (4, 8):
                for ns in (1, 2):
                    for seg in (32,):
                        cfg = dict(ROWS=rows, bwd_warps=nw, bwd_stages=ns, SEG=seg)

                        def f():
                            out = sat.block_sparse_attention_triton(qq, kk, vv, sel, sh["block"], scale, config=cfg)
                            torch.autograd.backward(out, go)
                        try:
                            ms = bench(f)
                            print(f"  rows={rows} w={nw} s={ns} seg={seg}: {ms:8.2f} ms", flush=True)
                        except Exception as e:
                            print(f"  rows={rows} w={nw} s={ns} seg={seg}: failed {type(e).__name__}: {str(e)[:100]}")
        del q, k, v, q_idx, k_idx, qq, kk, vv
        torch.cuda.empty_cache()


def tune_attention(sh, T):
    """Time a few attention tilings (fwd, then fwd+bwd) at length T and keep the fastest."""
    from sparsezoo.kernels import select_triton as st
    from sparsezoo.kernels import sparse_attention_triton as sat

    q, k, v, q_idx, k_idx = make_inputs(T, sh)
    sel = st.msa_select_triton(q_idx, k_idx, sh["block"], sh["topk"], 1 / math.sqrt(sh["Di"]))
    scale = 1 / math.sqrt(sh["D"])
    want = sat.block_sparse_attention_triton(q, k, v, sel, sh["block"], scale)
    best = None
    for rows, nw, ns in [(32, 4, 3), (64, 4, 3), (64, 8, 3), (128, 8, 2)]:
        for window in (1, 256):
            cfg = dict(ROWS=rows, num_warps=nw, num_stages=ns, WINDOW=window)
            f = lambda: sat.block_sparse_attention_triton(q, k, v, sel, sh["block"], scale, config=cfg)
            try:
                err = (f().float() - want.float()).abs().max().item()
            except Exception as e:  # e.g. out of shared memory: reported and skipped
                print(f"  tune fwd rows={rows} w={nw} s={ns}: failed {type(e).__name__}", flush=True)
                continue
            assert err < 1e-2, f"tiling {cfg} disagrees ({err})"
            ms = bench(f)
            print(f"  tune fwd T={T} rows={rows} w={nw} s={ns} window={window}: {ms:7.2f} ms", flush=True)
            if best is None or ms < best[0]:
                best = (ms, cfg)
    sat.ATTN_CONFIG.update(best[1])
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    go = torch.randn_like(q)
    bbest = None
    for nw, ns in [(4, 2), (8, 1), (8, 2)]:
        cfg = dict(bwd_warps=nw, bwd_stages=ns)

        def f():
            for x in (qq, kk, vv):
                x.grad = None
            out = sat.block_sparse_attention_triton(qq, kk, vv, sel, sh["block"], scale, config=cfg)
            torch.autograd.backward(out, go)
        ms = bench(f)
        print(f"  tune fwd+bwd T={T} bwd_warps={nw} bwd_stages={ns}: {ms:7.2f} ms", flush=True)
        if bbest is None or ms < bbest[0]:
            bbest = (ms, cfg)
    sat.ATTN_CONFIG.update(bbest[1])
    print(f"  chosen attention config: {sat.ATTN_CONFIG}", flush=True)
    del q, k, v, q_idx, k_idx, qq, kk, vv
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- outputs

def write_outputs(records, out_dir, card):
    """prefill_<card>.{json,md,png} in out_dir, named after the card that ran them (e.g. prefill_h200.json)."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"prefill_{card_tag(card)}")
    with open(stem + ".json", "w") as f:
        json.dump(records, f, indent=1)
    lines = [f"MSA prefill vs dense, m3 shape (Hq=64, Hkv=4, d=128, H_i=4, D_i=128, block 128, top-16), "
             f"bf16, batch 1 -- {card}", "",
             "| mode | length | dense (best) | MSA total | index (TF/s, % bf16 mm) | top-k | sparse attn | "
             "speedup | FLOP limit | fraction | extra peak mem / qkv |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        L = f"{r['seq_len'] // KB}k"
        if r["mode"] == "prefill":
            lines.append(
                f"| prefill | {L} | {r['dense_ms']:.1f} ms ({r['dense_backend']}) | {r['msa_ms']:.1f} ms | "
                f"{r['index_ms']:.1f} ms ({r['index_tflops']:.0f}, {100 * r['index_matmul_fraction']:.0f}%) | "
                f"{r['topk_ms']:.1f} ms | {r['attention_ms']:.1f} ms | **{r['speedup']:.1f}x** | "
                f"{r['flop_limit']:.1f}x | {r['limit_fraction']:.2f} | {r['peak_extra_over_qkv']:.2f} |")
        else:
            lines.append(
                f"| fwd+bwd | {L} | {r['dense_ms']:.1f} ms ({r['dense_backend']}) | {r['msa_ms']:.1f} ms "
                f"(with KL); {r['msa_attention_only_ms']:.1f} ms (no KL) | | | | **{r['speedup']:.2f}x** "
                f"({r['speedup_attention_only']:.2f}x no KL) | {r['flop_limit']:.1f}x | "
                f"{r['limit_fraction']:.2f} | {r['peak_extra_bytes'] / 2**30:.1f} GiB |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, mk in (("prefill", "o-"), ("fwd+bwd", "s--")):
        rs = [r for r in records if r["mode"] == mode]
        if rs:
            ax.plot([r["seq_len"] // KB for r in rs], [r["speedup"] for r in rs], mk, label=f"MSA {mode}")
            ax.plot([r["seq_len"] // KB for r in rs], [r["flop_limit"] for r in rs], ":", label=f"FLOP limit ({mode})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (k tokens)")
    ax.set_ylabel("speedup over best dense")
    ax.set_title(f"MSA vs dense, m3, bf16 -- {card}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--lengths", default="32,128,512,1024", help="prefill lengths in k tokens")
    p.add_argument("--train-lengths", default="32,128", help="fwd+bwd lengths in k tokens")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--tune", action="store_true", help="pick the attention tiling at 128k first (printed)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/prefill.py needs a CUDA GPU")
    sh = SHAPES["m3"]
    card = torch.cuda.get_device_name()
    print(f"card={card} torch={torch.__version__} triton={_triton_version()}", flush=True)
    if args.sweep:
        sweep(sh, [int(x) * KB for x in args.lengths.split(",")])
        return
    mm = matmul_rate()
    print(f"bf16 matmul 8192^3: {mm:.0f} TFLOP/s", flush=True)
    if args.tune:
        tune_attention(sh, 128 * KB)
    train = {int(x) * KB for x in args.train_lengths.split(",") if x}
    records = []
    t0 = time.time()
    for L in [int(x) * KB for x in args.lengths.split(",")]:
        run_length(L, sh, args, mm, records, L in train)
        write_outputs(records, args.out, card)
        print(f"  [{time.time() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
