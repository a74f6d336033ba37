"""MSA decode benchmark (issue 5): paged cache + Triton indexer + split-K sparse attention vs dense.

For each shape (m3, m2), context length, batch and q_len (1, and 4 for MTP):
- dense = the fastest of SDPA's flash / cuDNN / efficient backends (GQA folded into the query axis)
  and, where enabled, compiled FlexAttention decode, over a contiguous copy of the same cache;
- MSA = MSADecoder.run (indexer + attention), bf16 and fp8 (per-page scale) index keys, and fp8 keys with
  e4m3-rounded index queries (index_dtype "fp8_q8": the scores are an fp8 x fp8 dot);
- sanity: our attention kernel with a selection that covers every block (dense-equivalent).
Every timed configuration is checked against the references first. Decode steps are captured in
CUDA graphs and, where the working set is small, rotate over several caches (layers) so L2 does not
flatter them. The physical limit is (index-key bytes + selected K/V bytes) at the device-to-device
copy bandwidth measured in the same run.

    python benchmarks/decode.py --out out/decode            # full run (GPU)
    python benchmarks/decode.py --out out/decode --quick    # small smoke run
    python benchmarks/decode.py --out out/decode --flush read   # each timed call after a read, not a zeroing, flush
Writes decode_<card>.json (one record per configuration), decode_<card>.md and decode_<card>.png into --out,
named after the card that ran them (decode_h200.json on an H200); --tune adds decode_tune_<card>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from cards import card_tag

SHAPES = {  # the m3 and m2 layer shapes (configs/shapes/)
    "m3": dict(hq=64, hkv=4, d=128, di=128, block=128, topk=16),
    "m2": dict(hq=48, hkv=8, d=128, di=128, block=128, topk=16),
}
# index keys: bf16; fp8 (per-page scale); fp8_q8: fp8 keys and e4m3-rounded index queries (MSADecoder's
# fp8_index_queries: an fp8 x fp8 dot for the scores)
INDEX_MODES = ("bf16", "fp8", "fp8_q8")
PDL_MODES = {"auto": None, "on": True, "off": False}  # --pdl -> MSADecoder(pdl=...)
L2_ROTATE_BYTES = 256 << 20
MAX_ROTATE = 8


# ---- timing ---------------------------------------------------------------------------------
# What runs before each timed call (--flush): "zero", triton's do_bench, zeroes a 256 MB buffer, which leaves
# the L2 full of dirty lines that the timed call then writes back as it streams; "read" sums the same buffer
# instead, leaving the L2 cold and clean, as after a layer's other kernels (which mostly read).
FLUSHES = ("zero", "read")
FLUSH = {"mode": "zero"}
FLUSH_TEXT = {"zero": "a 256 MB buffer zeroed (do_bench's flush)", "read": "a 256 MB buffer read (a cold, clean L2)"}


@functools.cache
def flushes() -> dict:
    """The cache flushes over one 256 MB buffer on the current GPU: "zero" (a write, as do_bench's), "read" (a sum,
    which leaves the L2 clean) and "none"."""
    buf = torch.empty(L2_ROTATE_BYTES, dtype=torch.int8, device="cuda")
    total = torch.empty((), dtype=torch.int64, device="cuda")
    return {"zero": buf.zero_, "read": lambda: torch.sum(buf, dim=0, dtype=torch.int64, out=total),
            "none": lambda: None}


def median_after(fn, flush, reps: int) -> float:
    """Median ms of `reps` calls of fn, `flush` queued before each (outside the events), after 5 warm-up calls."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for _ in range(5):
        flush()
        fn()
    for s, e in zip(starts, ends):
        flush()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[reps // 2]


def _median_after_read_flush(fn, rep: int) -> float:
    """Median ms of fn over about `rep` ms of calls, each after a read of a 256 MB buffer (outside the events)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    n = max(10, min(1000, int(rep / max(start.elapsed_time(end) / 5, 1e-3))))
    return median_after(fn, flushes()["read"], n)


def _median(fn, rep: int) -> float:
    import triton

    if FLUSH["mode"] == "read":
        return _median_after_read_flush(fn, rep)
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def bench(fn, graph: bool = True, rep: int = 60) -> tuple[float, bool]:
    """Median ms of fn (captured in a CUDA graph when possible, timed for about `rep` ms, each call after the
    --flush); returns (ms, graphed)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            g.replay()
            torch.cuda.synchronize()
            return _median(g.replay, rep), True
        except Exception as exc:  # recorded, not hidden: the record says graphed=False
            print(f"  (graph capture failed: {type(exc).__name__}: {str(exc)[:120]}; timing eagerly)")
            torch.cuda.synchronize()
    return _median(fn, rep), False


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s, counting read + write bytes."""
    import triton

    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=5, rep=100, return_mode="median")
    del x, y
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


# ---- setup ----------------------------------------------------------------------------------
def make_caches(shape, S, B, n_rot, device, fp8: bool, seed: int):
    """n_rot caches (layers) with B requests of S tokens each, on shuffled physical pages."""
    from sparsezoo.paged_cache import FP8, PagedKVCache

    blk = shape["block"]
    width = math.ceil(S / blk)
    g = torch.Generator(device=device).manual_seed(seed)
    caches = []
    for _ in range(n_rot):
        c = PagedKVCache(B * width, shape["hkv"], shape["d"], shape["di"], page_size=blk, dtype=torch.bfloat16,
                         device=device)
        for t in (c.k, c.v, c.k_idx):
            t.normal_(generator=g)
        caches.append(c)
    table = torch.randperm(B * width, generator=g, device=device).to(torch.int32).view(B, width)
    fp8_caches = [c.with_index_dtype(FP8, "page") for c in caches] if fp8 else None
    return caches, fp8_caches, table


def contiguous(cache, table, S):
    """[B, Hkv, S, D] copies of K and V for the dense baselines and the references."""
    B, width = table.shape
    k = cache.k[table.long()].permute(0, 2, 1, 3, 4).reshape(B, cache.num_kv_heads, width * cache.page_size, -1)
    v = cache.v[table.long()].permute(0, 2, 1, 3, 4).reshape(B, cache.num_kv_heads, width * cache.page_size, -1)
    return k[:, :, :S].contiguous(), v[:, :, :S].contiguous()


# ---- dense baselines ------------------------------------------------------------------------
def sdpa_decode_candidates(q, k, v, Q: int) -> dict:
    """name -> fn: SDPA's flash, cuDNN and efficient backends two ways each, since either can be the fastest
    at a given batch: with the group folded into the query axis (q [B, Hkv, G*Q, D]: one KV head's queries in
    one call) and with enable_gqa on the unfolded q (sdpa_*_gqa; on an H200 cuDNN this way took 3.83 ms at 1M
    b8 where folded flash took 4.10). Both see every key (no mask): with Q > 1 a lower bound on exact dense
    cost. Outputs reshape to [B, Hq, Q, D] either way (fold_out)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    qf = q.reshape(B, Hkv, (Hq // Hkv) * Q, D)
    out = {}
    for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def folded(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(qf, k, v)

        def grouped(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        out[name], out[name + "_gqa"] = folded, grouped
    return out


def dense_candidates(q, k, v, Q, use_flex: bool):
    """name -> fn: sdpa_decode_candidates, and compiled flex (exact causal mask) if use_flex."""
    out = sdpa_decode_candidates(q, k, v, Q)
    if use_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        S = k.shape[2]
        mask = create_block_mask(lambda b, h, qi, kv: kv <= S - Q + qi, None, None, Q, S, device=q.device)
        flex = torch.compile(flex_attention, dynamic=False)
        out["flex"] = lambda: flex(q, k, v, block_mask=mask, enable_gqa=True)
    return out


def fold_out(o, B, Hq, Q, D):
    return o.reshape(B, Hq, Q, D)


# ---- checks ---------------------------------------------------------------------------------
def check_msa(dec, caches, table, S, q, q_idx, out, shape, fp8_cache=None):
    """Selection (ranking up to eps) and attention (vs the gather reference) for 2 requests."""
    from sparsezoo.ops import references as R

    blk, topk, Q = shape["block"], shape["topk"], q.shape[2]
    c = caches[0] if fp8_cache is None else fp8_cache
    for b in sorted({0, q.shape[0] - 1}):
        pages = table[b].long()
        ki = c.index_keys(pages).reshape(-1, shape["di"])[:S].float()
        pos = R.query_positions(Q, S, 0, Q, q.device)
        sc = R.block_scores(q_idx[b:b + 1].float(), ki[None], pos, blk, 1 / math.sqrt(shape["di"]))[0]
        local = pos // blk
        sc = sc.masked_fill(torch.arange(sc.shape[-1], device=sc.device)[None, None] >= local[None, :, None],
                            float("-inf"))
        sel = dec.selection[b].long()
        n_valid = torch.clamp(local, max=topk - 1)
        assert bool((sel[:, torch.arange(Q), n_valid] == local).all()), "local block missing"
        ranked = sel[..., :topk - 1].clamp_min(0)
        got = torch.gather(sc, -1, ranked).min(-1).values
        kth = torch.sort(sc, -1, descending=True).values[..., topk - 2]
        assert bool((got >= kth - 2e-2 * kth.abs().clamp_min(1)).all()), "selection ranks worse than the top-k"
        k, v = (x[None] for x in caches[0].gather(pages, S)[:2])
        ref = R.block_sparse_attention_reference(q[b:b + 1].float(), k.float(), v.float(), dec.selection[b:b + 1],
                                                 blk, 1 / math.sqrt(shape["d"]))
        err = (out[b:b + 1].float() - ref).abs().max().item()
        assert err < 3e-2, f"attention error {err}"


def check_dense(o, q, k, v, Q):
    """Exact check for Q = 1 (the SDPA runs see every key, which is exact then)."""
    if Q != 1:
        return
    from sparsezoo.ops import references as R

    ref = R.dense_attention_reference(q[:1].float(), k[:1].float(), v[:1].float(), 1 / math.sqrt(q.shape[-1]))
    err = (o[:1].float() - ref).abs().max().item()
    assert err < 3e-2, f"dense baseline error {err}"


# ---- one configuration ----------------------------------------------------------------------
def run_config(name, shape, S, B, Q, args, env, bw):
    from sparsezoo.kernels import decode_attention as att
    from sparsezoo.kernels.decode_indexer import fp8_query_round_trip
    from sparsezoo.paged_cache import MSADecoder
    from sparsezoo.ops import references as R

    dev = torch.device("cuda")
    hq, hkv, d, di, blk, topk = (shape[x] for x in ("hq", "hkv", "d", "di", "block", "topk"))
    width = math.ceil(S / blk)
    kv_bytes = B * S * hkv * d * 2 * 2
    idx_bytes = B * S * di * 2
    n_rot = max(1, min(MAX_ROTATE, math.ceil(L2_ROTATE_BYTES / idx_bytes)))
    need = n_rot * (kv_bytes + idx_bytes * 1.5) + kv_bytes + (2 << 30)
    free = torch.cuda.mem_get_info()[0]
    if need > free * 0.92:
        return [dict(shape=name, seq_len=S, batch=B, q_len=Q, skipped=f"needs {need / 2**30:.1f} GiB, "
                     f"{free / 2**30:.1f} GiB free")]
    torch.cuda.reset_peak_memory_stats()
    caches, caches8, table = make_caches(shape, S, B, n_rot, dev, args.fp8, seed=S + B + Q)
    g = torch.Generator(device=dev).manual_seed(1)
    qs = [torch.randn(B, hq, Q, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(n_rot)]
    qis = [torch.randn(B, hkv, Q, di, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(n_rot)]
    lens = torch.full((B,), S, dtype=torch.int32, device=dev)

    # dense baselines over a contiguous copy of layer 0 (its K/V alone exceed L2 from 16k up)
    k, v = contiguous(caches[0], table, S)
    dense = {}
    for dname, fn in dense_candidates(qs[0], k, v, Q, args.flex and (name, S, B, Q) in args.flex_set).items():
        try:
            o = fold_out(fn(), B, hq, Q, d)
            check_dense(o, qs[0], k, v, Q)
            dense[dname] = bench(fn)[0]
        except Exception as exc:
            print(f"  dense {dname}: unavailable ({type(exc).__name__}: {str(exc)[:100]})")
    dense_impl = min(dense, key=dense.get)
    dense_ms = dense[dense_impl]

    decs = {}
    for idt in INDEX_MODES:  # fp8_q8: fp8 keys and e4m3-rounded queries (one fp8 x fp8 dot)
        decs[idt] = MSADecoder(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, index_dim=di, block_size=blk,
                               topk=topk, index_config=args.index_configs.get(idt),
                               fp8_index_queries=idt == "fp8_q8",
                               pdl=PDL_MODES[args.pdl])
        decs[idt].plan(lens, table, Q, num_pages=caches[0].num_pages)
    dec = decs["bf16"]
    outs = [torch.empty_like(x) for x in qs]

    # sanity line: our attention kernel over every block (dense-equivalent), Q = 1 only
    sanity_ms = None
    if Q == 1 and args.sanity:
        full = R.full_selection(Q, S, blk, B, hkv, dev).contiguous()
        per, ns = att.plan_splits(B * hkv * Q, full.shape[-1], torch.cuda.get_device_properties(0).multi_processor_count)
        per = max(per, 32)
        ns = math.ceil(full.shape[-1] / per)
        ws = att.attention_workspace(B, hkv, Q, hq // hkv, d, ns, dev)
        o_full = torch.empty_like(qs[0])

        def full_fn():
            att.decode_attention(qs[0], caches[0].k, caches[0].v, dec.page_table, dec.seq_lens, full,
                                 scale=1 / math.sqrt(d), blocks_per_split=per, n_splits=ns, out=o_full, workspace=ws)
        full_fn()
        ref_o = fold_out(dense_candidates(qs[0], k, v, Q, False)["sdpa_flash"](), B, hq, Q, d)
        err = (o_full.float() - ref_o.float()).abs().max().item()
        assert err < 3e-2, f"full-selection attention vs SDPA error {err}"
        sanity_ms = bench(full_fn)[0]
        del ws, full
    del k, v

    records = []
    for idx_name in INDEX_MODES:
        cs = caches if idx_name == "bf16" else caches8
        if cs is None:
            continue
        dec = decs[idx_name]
        dec.run(qs[0], qis[0], cs[0], out=outs[0])
        q_ranked = fp8_query_round_trip(qis[0]) if idx_name == "fp8_q8" else qis[0]  # what the indexer ranked by
        check_msa(dec, caches, table, S, qs[0], q_ranked, outs[0], shape,
                  fp8_cache=None if idx_name == "bf16" else cs[0])
        sel_unique = torch.tensor([torch.unique(dec.selection[b, h][dec.selection[b, h] >= 0]).numel()
                                   for b in range(B) for h in range(hkv)]).sum().item()

        def step(cs=cs, dec=dec):
            for i in range(n_rot):
                dec.run(qs[i], qis[i], cs[i], out=outs[i])

        def index_only(cs=cs, dec=dec):
            for i in range(n_rot):
                dec.select(qis[i], cs[i])

        def attn_only(cs=cs, dec=dec):
            for i in range(n_rot):
                dec.attend(qs[i], cs[i], out=outs[i])

        msa_ms, graphed = bench(step)
        msa_ms /= n_rot
        index_ms = bench(index_only)[0] / n_rot
        attn_ms = bench(attn_only)[0] / n_rot
        idx_tok_bytes = di * (2 if idx_name == "bf16" else 1)
        n_cand_tokens = B * ((S - 1) // blk) * blk
        scale_bytes = 0 if idx_name == "bf16" else B * ((S - 1) // blk) * 4
        sel_bytes = sel_unique * blk * d * 2 * 2
        min_bytes = n_cand_tokens * idx_tok_bytes + scale_bytes + sel_bytes
        limit_ms = min_bytes / (bw * 1e9) * 1e3  # bytes moved at the copy's (read + write) rate
        rec = dict(card=env["card"], torch=env["torch"], triton=env["triton"], shape=name, seq_len=S, batch=B,
                   q_len=Q, index_dtype=idx_name, dense_ms=round(dense_ms, 4), dense_impl=dense_impl,
                   dense_all_ms={k_: round(v_, 4) for k_, v_ in dense.items()},
                   dense_exact=Q == 1 or dense_impl == "flex",
                   msa_ms=round(msa_ms, 4), index_ms=round(index_ms, 4), attn_ms=round(attn_ms, 4),
                   speedup=round(dense_ms / msa_ms, 3), limit_ms=round(limit_ms, 4),
                   limit_fraction=round(limit_ms / msa_ms, 3),
                   bound_speedup=round(kv_bytes / min_bytes, 2),
                   msa_gbps=round(min_bytes / (msa_ms * 1e-3) / 1e9, 1),
                   index_gbps=round((n_cand_tokens * idx_tok_bytes + scale_bytes) / (index_ms * 1e-3) / 1e9, 1),
                   dense_gbps=round(kv_bytes / (dense_ms * 1e-3) / 1e9, 1),
                   sanity_full_ms=None if sanity_ms is None else round(sanity_ms, 4),
                   graphed=graphed, pdl=dec.pdl, rotated_layers=n_rot, index_splits=list(dec.index_split),
                   attn_splits=list(dec.attn_split), index_config=dict(dec.index_config), flush=FLUSH["mode"],
                   peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), copy_gbps=round(bw, 1))
        records.append(rec)
        print(f"  {name} S={S} B={B} Q={Q} idx={idx_name}: dense {dense_ms:.4f} ms ({dense_impl}), MSA "
              f"{msa_ms:.4f} ms (index {index_ms:.4f} + attn {attn_ms:.4f}), {rec['speedup']}x, "
              f"limit fraction {rec['limit_fraction']}, sanity {sanity_ms}", flush=True)
    del caches, caches8, qs, qis, outs, dec, decs
    torch.cuda.empty_cache()
    return records


# ---- indexer tuning sweep ----
def tune_indexer(args, configs=((1 << 20, 1), (1 << 20, 8))):
    """Indexer-only time over launch configs; returns the best index_config per index dtype (by
    the summed time over `configs`) and every measurement."""
    import itertools

    from sparsezoo.paged_cache import MSADecoder

    dev = torch.device("cuda")
    shape = SHAPES["m3"]
    grid = [dict(programs_per_sm=pps, pages_per_step=nb, num_stages=3, min_rows=mr, merge_warps=mw)
            for pps, nb, mr, mw in itertools.product((1, 2), (2, 4), (16, 64), (0, 16))]
    results, total = [], {}
    for S, B in configs:
        caches, caches8, table = make_caches(shape, S, B, 1, dev, True, seed=0)
        qi = torch.randn(B, shape["hkv"], 1, shape["di"], device=dev, dtype=torch.bfloat16)
        lens = torch.full((B,), S, dtype=torch.int32, device=dev)
        for idt, c in (("bf16", caches[0]), ("fp8", caches8[0]), ("fp8_q8", caches8[0])):
            idx_bytes = B * S * shape["di"] * (2 if idt == "bf16" else 1)
            for i, cfg in enumerate(grid):
                dec = MSADecoder(num_q_heads=shape["hq"], num_kv_heads=shape["hkv"], head_dim=shape["d"],
                                 index_dim=shape["di"], index_config=cfg, fp8_index_queries=idt == "fp8_q8")
                dec.plan(lens, table, 1)
                try:
                    ms = bench(lambda: dec.select(qi, c))[0]
                except Exception as exc:
                    print(f"  tune S={S} B={B} {idt} {cfg}: failed {exc!s:.80}")
                    ms = float("inf")
                total[(idt, i)] = total.get((idt, i), 0.0) + ms / B  # per request: b=1 counts as much as b=8
                results.append(dict(S=S, B=B, idx=idt, **cfg, ms=round(ms, 4), splits=dec.index_split,
                                    gbps=round(idx_bytes / ms / 1e6, 1)))
                print("  tune", results[-1], flush=True)
        del caches, caches8
        torch.cuda.empty_cache()
    best = {idt: dict(grid[min((i for (t, i) in total if t == idt), key=lambda i: total[(idt, i)])])
            for idt in INDEX_MODES}
    print("  tuned index configs:", best, flush=True)
    return best, results


# ---- reports --------------------------------------------------------------------------------
def write_reports(records, out_dir, env, cmd):
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"decode_{card_tag(env['card'])}")
    with open(stem + ".json", "w") as f:
        json.dump(records, f, indent=1)
    done = [r for r in records if "skipped" not in r]
    lines = [f"# MSA decode benchmark on {env['card']} (torch {env['torch']}, triton {env['triton']})", "",
             f"Command: `{cmd}`", "",
             f"Copy bandwidth measured in the same run: {done[0]['copy_gbps'] if done else '?'} GB/s (read + write). "
             "dense = fastest of SDPA flash/cuDNN/efficient (and FlexAttention where run); for q_len > 1 "
             "the SDPA baseline attends to every key (a lower bound on exact dense cost). "
             "limit = (index-key bytes + unique selected K/V bytes) moved at the copy bandwidth. "
             f"All steps captured in CUDA graphs; before each timed call: {FLUSH_TEXT[FLUSH['mode']]}.", "",
             "| shape | seq_len | batch | q_len | index keys | dense ms (impl) | MSA ms | index ms | attn ms | "
             "speedup | bound | limit fraction | MSA GB/s | full-selection ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in done:
        lines.append(f"| {r['shape']} | {r['seq_len']} | {r['batch']} | {r['q_len']} | {r['index_dtype']} | "
                     f"{r['dense_ms']:.4f} ({r['dense_impl']}) | {r['msa_ms']:.4f} | {r['index_ms']:.4f} | "
                     f"{r['attn_ms']:.4f} | {r['speedup']:.2f}x | {r['bound_speedup']:.1f}x | "
                     f"{r['limit_fraction']:.2f} | {r['msa_gbps']:.0f} | {r['sanity_full_ms'] or '-'} |")
    skipped = [r for r in records if "skipped" in r]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{r['shape']} S={r['seq_len']} B={r['batch']} Q={r['q_len']} "
                                              f"({r['skipped']})" for r in skipped)]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(done, stem + ".png", env)


def plot(records, path, env):
    """Speedup against context: one panel per shape; colour = batch, line = index dtype,
    marker = q_len."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in records}, key=list(SHAPES).index)
    fig, axes = plt.subplots(1, max(1, len(shapes)), figsize=(6.5 * max(1, len(shapes)), 5), squeeze=False)
    colours = {1: "tab:blue", 8: "tab:orange", 32: "tab:green"}
    for ax, shape in zip(axes[0], shapes):
        series = {}
        for r in records:
            if r["shape"] == shape:
                series.setdefault((r["batch"], r["q_len"], r["index_dtype"]), []).append((r["seq_len"], r["speedup"]))
        for (B, Q, idt), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colours.get(B, "gray"),
                    ls="-" if idt == "bf16" else "--", marker="o" if Q == 1 else "s",
                    label=f"b={B} q_len={Q} {idt} index keys")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("speedup over best dense decode")
        ax.set_title(f"{shape}", fontsize=10)
        ax.axhline(1, color="gray", lw=0.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"MSA decode step (indexer + attention, CUDA graphs) vs dense: {env['card']}, "
                 f"torch {env['torch']}, triton {env['triton']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- main -----------------------------------------------------------------------------------
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory for decode_<card>.json/.md/.png")
    p.add_argument("--quick", action="store_true", help="small smoke run (m3, 32k/128k, b=1/8)")
    p.add_argument("--shapes", default="m3,m2")
    p.add_argument("--lens", default="32768,131072,524288,1048576")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--qlens", default="1,4")
    p.add_argument("--no-fp8", dest="fp8", action="store_false", help="skip fp8 index keys")
    p.add_argument("--no-sanity", dest="sanity", action="store_false", help="skip the full-selection line")
    p.add_argument("--flex", default="m3:131072:8:1,m3:1048576:1:1",
                   help="shape:len:batch:q_len configs that also time compiled FlexAttention ('' = none)")
    p.add_argument("--tune", action="store_true",
                   help="first sweep the indexer's launch config at m3 1M b=1/b=8 and use the best per index dtype")
    p.add_argument("--replot", metavar="JSON", help="only redraw decode_<card>.png from an earlier decode_<card>.json")
    p.add_argument("--time-budget", type=float, default=420.0, help="stop starting new configs after this many s")
    p.add_argument("--index-config", default="", metavar="JSON",
                   help="MSADecoder index_config overrides for every index dtype (--tune replaces them)")
    p.add_argument("--flush", choices=FLUSHES, default="zero",
                   help="before each timed call: zero a 256 MB buffer (do_bench's flush) or read it (a clean L2)")
    p.add_argument("--pdl", choices=tuple(PDL_MODES), default="auto",
                   help="MSADecoder's programmatic dependent launches (auto: the decoder's default, on at batch 1)")
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.lens, args.batches, args.qlens = "m3", "32768,131072", "1,8", "1,4"
        args.flex = "m3:32768:1:1"
    args.flex_set = {(a, int(b), int(c), int(d)) for a, b, c, d in
                     (x.split(":") for x in args.flex.split(",") if x)}
    args.flex = bool(args.flex_set)
    return args


def main(argv=None):
    args = parse(argv)
    if args.replot:
        recs = [r for r in json.load(open(args.replot)) if "skipped" not in r]
        os.makedirs(args.out, exist_ok=True)
        return plot(recs, os.path.join(args.out, f"decode_{card_tag(recs[0]['card'])}.png"), recs[0])
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/decode.py times CUDA kernels: it needs a CUDA GPU "
                         "(the CPU suite in tests/test_decode.py covers correctness)")
    import triton

    env = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    FLUSH["mode"] = args.flush
    bw = copy_bandwidth()
    print(f"{env}; copy bandwidth {bw:.0f} GB/s", flush=True)
    args.index_configs = {idt: json.loads(args.index_config) for idt in INDEX_MODES} if args.index_config else {}
    tune_results = []
    if args.tune:
        args.index_configs, tune_results = tune_indexer(args)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"decode_tune_{card_tag(env['card'])}.json"), "w") as f:
            json.dump(dict(best=args.index_configs, results=tune_results), f, indent=1)
    cmd = "python benchmarks/decode.py " + " ".join(sys.argv[1:] if argv is None else argv)
    records, t0 = [], time.time()
    for name in args.shapes.split(","):
        for S in (int(x) for x in args.lens.split(",")):
            for B in (int(x) for x in args.batches.split(",")):
                for Q in (int(x) for x in args.qlens.split(",")):
                    if time.time() - t0 > args.time_budget:
                        records.append(dict(shape=name, seq_len=S, batch=B, q_len=Q, skipped="time budget"))
                        continue
                    records += run_config(name, SHAPES[name], S, B, Q, args, env, bw)
                    write_reports(records, args.out, env, cmd)
    write_reports(records, args.out, env, cmd)
    print(open(os.path.join(args.out, f"decode_{card_tag(env['card'])}.md")).read())


if __name__ == "__main__":
    main()
