"""Every variant at m3 heads (Hq 64, Hkv 4, d 128), bf16, on one GPU, against the fastest dense path.

    python benchmarks/zoo.py --out examples/results                          # the committed points
    python benchmarks/zoo.py --modes prefill --lengths 32768 --variants nsa  # one slice

Per variant, two configs: `published` (the paper's own) and `equal_budget` (about 2,048 keys read per
query); where they coincide one run serves both records. Modes: prefill (batch 1), fwd+bwd (batch 1,
d(out) random) and decode (one new token per request over a cache of --decode-len tokens). Each point
runs the variant's ops (selection, then attention) under `auto` on random bf16 inputs and records the
implementation of every op (`ops.implementations_used()`); before timing, the attention output of the
last 64 queries is checked against the fp32 reference on the same selection, and the selection's
overlap with the reference selection is recorded. Dense is the fastest of SDPA cuDNN / flash /
efficient (enable_gqa) and compiled flex in the same run. Limits: prefill = dense FLOPs over the
variant's selection + attention FLOPs over the keys it reads; decode = the bytes ratio, and the
fraction is the byte floor (at the copy bandwidth measured in the same run) over the measured time.
Peers (attn-gym's lightning_indexer and gather_attn, fla's parallel_nsa) run in the same process
where installed; a peer that fails is recorded with its error.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import decode as decode_bench  # benchmarks/decode.py: CUDA-graph timing and the copy bandwidth
from cards import card_tag

M3 = dict(Hq=64, Hkv=4, D=128)
CONFIGS = {
    "msa": {"published": dict(block=128, topk=16, Di=128)},
    "nsa": {"published": dict(l=32, d=16, lsel=64, n=16, w=512)},
    "dsa": {"published": dict(topk=2048, J=64, Di=128)},
    "csa": {"published": dict(m=4, topk=512, w=128, J=64, Di=128)},
    "moba": {"published": dict(block=4096, topk=12), "equal_budget": dict(block=128, topk=16)},
}
CHECK_ROWS = 64
DEVICE, DTYPE = "cuda", torch.bfloat16  # the CPU smoke test (tests/test_zoo_benchmark.py) switches these


# ----------------------------------------------------------------------------- timing

def bench(fn, reps: int = 5) -> float:
    """Median ms over `reps` event-timed runs after one warm-up (do_bench for short ops)."""
    import triton

    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    if a.elapsed_time(b) < 20:
        return float(triton.testing.do_bench(fn, warmup=20, rep=150, return_mode="median"))
    times = []
    for _ in range(reps):
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return float(sorted(times)[len(times) // 2])


def bench_graph(fn) -> tuple[float, bool]:
    """Median ms of fn replayed from a CUDA graph when it captures; else eager (recorded)."""
    return decode_bench.bench(fn, graph=True, rep=80)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    return decode_bench.copy_bandwidth() * 1e9


# ----------------------------------------------------------------------------- dense baseline

def dense_candidates(q, k, v, decode: bool, with_flex: bool):
    """name -> fn over the same inputs; decode: decode.py's SDPA candidates (no mask needed)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from sparsezoo import ops

    if decode:  # folded and enable_gqa forms of each SDPA backend (either can be the fastest)
        out = decode_bench.sdpa_decode_candidates(q, k, v, q.shape[2])
    else:
        out = {}
        for name, be in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                         ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
            def fn(be=be):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            out[name] = fn
    if with_flex:
        out["flex"] = lambda: ops.dense_attention(q, k, v, backend="flex")
    return out


_DENSE: dict[tuple, tuple] = {}


def time_dense(q, k, v, mode: str, with_flex: bool) -> tuple[float, str, dict]:
    """Fastest dense path for this (mode, shape), timed once per run and shared by every variant."""
    key = (mode, tuple(q.shape), tuple(k.shape))
    if key not in _DENSE:
        _DENSE[key] = _time_dense(q, k, v, mode, with_flex)
    return _DENSE[key]


def _time_dense(q, k, v, mode: str, with_flex: bool) -> tuple[float, str, dict]:
    times = {}
    for name, fn in dense_candidates(q, k, v, mode == "decode", with_flex).items():
        run = with_backward(fn, (q, k, v)) if mode == "fwd+bwd" else fn
        try:
            times[name] = bench_graph(run)[0] if mode == "decode" else bench(run)
        except Exception as exc:  # a backend this build lacks is reported, never replaced silently
            times[name] = None
            print(f"    dense {name}: unavailable ({type(exc).__name__}: {str(exc)[:100]})", flush=True)
        finally:
            for x in (q, k, v):
                x.grad = None
    ok = {n: t for n, t in times.items() if t is not None}
    best = min(ok, key=ok.get)
    return ok[best], best, times


def with_backward(fn, leaves):
    grad_out = {}

    def run():
        for x in leaves:
            x.grad = None
        out = fn()
        if "g" not in grad_out:
            grad_out["g"] = torch.randn_like(out)
        out.backward(grad_out["g"])
    return run


# ----------------------------------------------------------------------------- variants

def randn(*shape, grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE).requires_grad_(grad)


def smooth(*shape, grad=False, stride=512, noise=0.5):
    """[..., T, D] queries that drift smoothly over tokens (anchors every `stride` tokens, linearly
    blended) plus noise, as a trained model's queries do; iid queries would make neighbouring tokens
    select unrelated blocks, which no trained model does (benchmarks/prefill.py measures both)."""
    *lead, T, D = shape
    n_anchor = T // stride + 2
    anchors = torch.randn(*lead, n_anchor, D, device=DEVICE)
    pos = torch.arange(T, device=DEVICE, dtype=torch.float32) / stride
    i0 = pos.floor().long()
    w = (pos - i0).view(T, 1)
    base = anchors[..., i0, :] * (1 - w) + anchors[..., i0 + 1, :] * w
    out = base + noise * torch.randn(*shape, device=DEVICE)
    return out.to(DTYPE).requires_grad_(grad)


class Variant:
    """One variant's inputs, selection, attention and cost model at m3 heads."""

    def __init__(self, name: str, cfg: dict, B: int, T: int, S: int, grad: bool):
        self.name, self.cfg, self.B, self.T, self.S = name, cfg, B, T, S
        Hq, Hkv, D = M3["Hq"], M3["Hkv"], M3["D"]
        # NSA and MoBA select from q itself: give it a trained model's smoothness over tokens
        make_q = smooth if name in ("nsa", "moba") else randn
        self.q, self.k, self.v = make_q(B, Hq, T, D, grad=grad), randn(B, Hkv, S, D, grad=grad), \
            randn(B, Hkv, S, D, grad=grad)
        if name == "csa":  # V4: one shared K = V entry per token (and per compressed entry)
            self.v = self.k
        self.extra = getattr(self, f"_inputs_{name}")(grad)
        if name == "nsa":  # the LSE the step's compressed branch hands to the selection (timed in step())
            from sparsezoo import ops

            c = cfg
            self.extra["cmp_lse"] = ops.compressed_attention(
                self.q.detach(), self.extra["kc"].detach(), self.extra["vc"].detach(), S=S, block_len=c["l"],
                stride=c["d"], scale=self.scale, return_lse=True)[1]

    # inputs
    def _inputs_msa(self, grad):
        return dict(q_idx=smooth(self.B, M3["Hkv"], self.T, self.cfg["Di"]), k_idx=randn(self.B, self.S, self.cfg["Di"]))

    def _inputs_nsa(self, grad):
        from sparsezoo.ops.compressed_attention import n_compressed

        Sc = n_compressed(self.S, self.cfg["l"], self.cfg["d"])
        return dict(kc=randn(self.B, M3["Hkv"], Sc, M3["D"], grad=grad), vc=randn(self.B, M3["Hkv"], Sc, M3["D"], grad=grad))

    def _inputs_dsa(self, grad):
        c = self.cfg
        return dict(q_i=smooth(self.B, 1, c["J"], self.T, c["Di"]).transpose(2, 3).contiguous(), w=randn(self.B, 1, self.T, c["J"]),
                    k_i=randn(self.B, self.S, c["Di"]), key_end=torch.arange(self.S, device=DEVICE))

    def _inputs_csa(self, grad):
        c = self.cfg
        Sc = self.S // c["m"]
        return dict(q_i=smooth(self.B, 1, c["J"], self.T, c["Di"]).transpose(2, 3).contiguous(), w=randn(self.B, 1, self.T, c["J"]),
                    k_i=randn(self.B, Sc, c["Di"]), key_end=(torch.arange(Sc, device=DEVICE) + 1) * c["m"] - 1,
                    kc=randn(self.B, M3["Hkv"], Sc, M3["D"], grad=grad),  # the K = V entries
                    sink=torch.randn(M3["Hq"], device=DEVICE, requires_grad=grad))  # V4's attention sink

    def _inputs_moba(self, grad):
        if self.T > 1:
            return {}
        # decode: the served path keeps the complete blocks' mean keys in its cache (variants/moba.py)
        from sparsezoo.ops.moba_select.api import block_mean_keys

        return dict(means=block_mean_keys(self.k.float(), self.cfg["block"])[:, :, :(self.S - 1) // self.cfg["block"]])

    def as_float(self) -> "Variant":
        """A detached fp32 copy of the first batch item, for the reference (index tensors unchanged)."""
        import copy

        f = copy.copy(self)
        f.B = 1
        f.q, f.k, f.v = (x.detach()[:1].float() for x in (self.q, self.k, self.v))
        if self.v is self.k:
            f.v = f.k
        f.extra = {n: (x.detach()[:1].float() if x.is_floating_point() and x.dim() > 1 else
                       x.detach().float() if x.is_floating_point() else x) for n, x in self.extra.items()}
        return f

    def msa_paged_decoder(self):
        """MSA's served decode path: the paged cache (identity page table) and its plan/run decoder."""
        from sparsezoo.paged_cache import MSADecoder, PagedKVCache

        c, B, S = self.cfg, self.B, self.S
        Hq, Hkv, D, blk = M3["Hq"], M3["Hkv"], M3["D"], c["block"]
        width = math.ceil(S / blk)
        pages = lambda x: F.pad(x, (0, 0, 0, width * blk - S)).view(B, Hkv, width, blk, D).transpose(1, 2)
        cache = PagedKVCache(B * width, Hkv, D, c["Di"], page_size=blk, dtype=torch.bfloat16, device=DEVICE)
        n = B * width  # the cache keeps a scratch page after these (writes to missing pages land there)
        cache.k[:n].copy_(pages(self.k.detach()).reshape(n, Hkv, blk, D))
        cache.v[:n].copy_(pages(self.v.detach()).reshape(n, Hkv, blk, D))
        cache.k_idx[:n].copy_(F.pad(self.extra["k_idx"], (0, 0, 0, width * blk - S)).view(n, blk, c["Di"]))
        table = torch.arange(B * width, device=DEVICE, dtype=torch.int32).view(B, width)
        dec = MSADecoder(num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D, index_dim=c["Di"], block_size=blk,
                         topk=c["topk"])
        dec.plan(torch.full((B,), S, dtype=torch.int32, device=DEVICE), table, self.T, num_pages=B * width)
        return dec, cache

    def leaves(self):
        unique = {id(t): t for t in (self.q, self.k, self.v, *self.extra.values())}  # CSA: v is k
        return [t for t in unique.values() if t.requires_grad]

    # selection and attention, through the public ops under auto
    def select(self, rows: slice | None = None, backend: str = "auto"):
        from sparsezoo import ops

        c, e, S = self.cfg, self.extra, self.S
        r = rows or slice(None)  # a tail of the T queries: they stay the last rows of S positions
        if self.name == "msa":
            return ops.msa_select(e["q_idx"][:, :, r], e["k_idx"], block_size=c["block"], topk=c["topk"],
                                  backend=backend)
        if self.name == "nsa":  # with the compressed branch's LSE where the step computed it (see step())
            lse = e.get("cmp_lse") if rows is None else None
            return ops.nsa_select(self.q[:, :, r].detach(), e["kc"].detach(), S=S, block_len=c["l"], stride=c["d"],
                                  sel_block=c["lsel"], topk=c["n"], scale=self.scale, lse=lse, backend=backend)
        if self.name in ("dsa", "csa"):
            return ops.indexer_topk(e["q_i"][:, :, r], e["w"][:, :, r], e["k_i"], e["key_end"], S=S,
                                    topk=c["topk"], scale=1 / math.sqrt(c["Di"]), backend=backend)
        return ops.moba_select(self.q[:, :, r].detach(), self.k.detach(), block_size=c["block"], topk=c["topk"],
                               means=e.get("means"), backend=backend)

    @property
    def scale(self):
        return 1 / math.sqrt(M3["D"])

    def attend_part(self, part: str, sel):
        """One NSA branch alone (for the tuning printout)."""
        from sparsezoo import ops

        c, e = self.cfg, self.extra
        if part == "compressed":
            return ops.compressed_attention(self.q, e["kc"], e["vc"], S=self.S, block_len=c["l"], stride=c["d"],
                                            scale=self.scale)
        if part == "selected":
            return ops.block_sparse_attention(self.q, self.k, self.v, sel, block_size=c["lsel"])
        return ops.window_attention(self.q, self.k, self.v, window=c["w"])

    def step(self):
        """One layer's selection + attention as the variant module runs it: NSA's compressed branch
        comes first and hands its LSE to the selection (a decode step runs all of it in one op, fused on a
        GPU); the others select, then attend."""
        if self.name != "nsa":
            return self.attend(self.select())
        from sparsezoo import ops
        from sparsezoo.ops.nsa_decode import DECODE_T

        c, e = self.cfg, self.extra
        if self.T <= DECODE_T:  # unit gates, as below
            return ops.nsa_decode(self.q, e["kc"], e["vc"], self.k, self.v, self.k, self.v, block_len=c["l"],
                                  stride=c["d"], sel_block=c["lsel"], topk=c["n"], window=c["w"], scale=self.scale)[0]
        o_cmp, lse = ops.compressed_attention(self.q, e["kc"], e["vc"], S=self.S, block_len=c["l"], stride=c["d"],
                                              scale=self.scale, return_lse=True)
        sel = ops.nsa_select(self.q.detach(), e["kc"].detach(), S=self.S, block_len=c["l"], stride=c["d"],
                             sel_block=c["lsel"], topk=c["n"], scale=self.scale, lse=lse)
        return ops.branch_sum([o_cmp] + [self.attend(sel, branches=(b,)) for b in ("selected", "window")])

    def attend(self, sel, rows: slice | None = None, backend: str = "auto",
               branches=("compressed", "selected", "window")):
        from sparsezoo import ops

        c, e, S = self.cfg, self.extra, self.S
        q = self.q if rows is None else self.q[:, :, rows]  # rows: a tail of the T queries
        if self.name in ("msa", "moba"):
            return ops.block_sparse_attention(q, self.k, self.v, sel, block_size=c["block"], backend=backend)
        if self.name == "nsa":  # fixed unit gates: the gate MLP is not an attention cost
            parts = []
            if "compressed" in branches:
                parts.append(ops.compressed_attention(q, e["kc"], e["vc"], S=S, block_len=c["l"], stride=c["d"],
                                                      scale=self.scale, backend=backend))
            if "selected" in branches:
                parts.append(ops.block_sparse_attention(q, self.k, self.v, sel, block_size=c["lsel"], backend=backend))
            if "window" in branches:
                parts.append(ops.window_attention(q, self.k, self.v, window=c["w"], backend=backend))
            if len(parts) == 1:
                return parts[0]
            # the branches' sum in one pass (the NSA module's gated sum, with unit gates)
            return ops.branch_sum(parts, backend="reference" if backend == "reference" else "auto")
        if self.name == "dsa":
            return ops.gather_attention(q, self.k, self.v, sel, scale=self.scale, backend=backend)
        return ops.gather_attention(q, self.k, self.v, sel, scale=self.scale, window=c["w"], extra_ids=True,
                                    backend=backend, k_extra=e["kc"], v_extra=e["kc"], sink=e["sink"])

    # cost models (per batch element; T queries, the last T of S)
    def keys_read(self) -> dict:
        """Mean keys each query reads, split into freely chosen and fixed ones."""
        c, S = self.cfg, self.S
        mean_pos = S - self.T / 2
        if self.name == "msa":
            return dict(free=(c["topk"] - 1) * c["block"], fixed=c["block"])
        if self.name == "nsa":
            return dict(free=(c["n"] - 3) * c["lsel"], fixed=3 * c["lsel"] + c["w"] + mean_pos / c["d"])
        if self.name == "dsa":
            return dict(free=c["topk"], fixed=0)
        if self.name == "csa":
            return dict(free=c["topk"], fixed=c["w"])
        return dict(free=(c["topk"] - 1) * c["block"], fixed=c["block"])

    def flops(self) -> dict:
        """Selection and attention FLOPs (QK^T + PV = 4 Hq d per query-key pair)."""
        c, T, S = self.cfg, self.T, self.S
        Hq, Hkv, D = M3["Hq"], M3["Hkv"], M3["D"]
        pairs = T * (S - T / 2)  # visible (query, key) pairs
        read = min(sum(self.keys_read().values()), S - T / 2)
        attn = 4 * Hq * D * T * read
        if self.name == "msa":
            sel = pairs * Hkv * 2 * c["Di"]
        elif self.name == "nsa":
            sel = 0.0  # the importances reuse the compressed attention's probabilities
        elif self.name == "dsa":
            sel = pairs * 2 * c["J"] * c["Di"]
        elif self.name == "csa":
            sel = pairs / c["m"] * 2 * c["J"] * c["Di"]
        else:
            sel = pairs / c["block"] * 2 * Hq * D
        return dict(selection=sel, attention=attn, dense=4 * Hq * D * pairs)

    def decode_bytes(self, sel=None) -> dict:
        """Bytes one decode step must read per request (bf16), and dense's. MoBA's query heads choose
        blocks independently, so its K/V bytes are the union of the blocks the heads of a KV group
        chose (measured on `sel`), not one head's budget."""
        c, S = self.cfg, self.S
        Hkv, D = M3["Hkv"], M3["D"]
        kv_dense = 2 * Hkv * D * 2  # K and V per token
        kv = kv_dense // 2 if self.name == "csa" else kv_dense  # CSA reads one shared K = V row per key
        keys = min(sum(self.keys_read().values()), S)
        if self.name == "moba" and sel is not None:
            keys = min(S, group_union_blocks(sel, Hkv) * c["block"])
        if self.name == "msa":
            sel = S * c["Di"] * 2
        elif self.name == "nsa":
            sel = 0.0
        elif self.name in ("dsa", "csa"):
            sel = S / (c.get("m", 1)) * c["Di"] * 2
        else:
            sel = S / c["block"] * Hkv * D * 4  # the cached fp32 block means
        return dict(variant=sel + keys * kv, dense=S * kv_dense)


def group_union_blocks(sel: torch.Tensor, Hkv: int) -> float:
    """Mean over (request, KV group) of the distinct valid blocks the group's query heads selected."""
    B, Hq, T, K = sel.shape
    ids = sel.reshape(B, Hkv, -1).long().sort(-1).values
    first = torch.ones_like(ids, dtype=torch.bool)
    first[..., 1:] = ids[..., 1:] != ids[..., :-1]
    return float((first & (ids >= 0)).sum(-1).float().mean())


# ----------------------------------------------------------------------------- one point

def check(var: Variant, sel, fast_out=None) -> tuple[float, float]:
    """(relative error of the last rows' output vs the fp32 reference on the same selection,
    mean overlap of the fast selection with the fp32 reference selection on those rows), batch item 0."""
    rows = slice(var.T - min(CHECK_ROWS, var.T), var.T)
    with torch.no_grad():
        out = (var.attend(sel) if fast_out is None else fast_out)[:1, :, rows].float()
        ref_var = var.as_float()
        ref = ref_var.attend(sel[:1, :, rows], rows=rows, backend="reference").float()
        ref_sel = ref_var.select(rows=rows, backend="reference").long()
    mine = sel[:1, :, rows].long()
    overlap = []
    for a, b in zip(mine.reshape(-1, mine.shape[-1]), ref_sel.reshape(-1, ref_sel.shape[-1])):
        sa, sb = set(a[a >= 0].tolist()), set(b[b >= 0].tolist())
        overlap.append(len(sa & sb) / max(len(sb), 1))
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return err, sum(overlap) / len(overlap)


def run_point(name, config_names, cfg, mode, T, S, B, bw, args) -> list[dict]:
    from sparsezoo import ops

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    grad = mode == "fwd+bwd"
    var = Variant(name, cfg, B, T, S, grad)
    dense_ms, dense_impl, dense_all = time_dense(var.q, var.k, var.v, mode, mode in args.dense_flex.split(","))
    fast_out = None
    with ops.track_implementations() as used:
        if mode == "decode" and name == "msa":  # the served path: paged cache, plan once, run per layer
            dec, cache = var.msa_paged_decoder()
            q_idx, fast_out = var.extra["q_idx"], torch.empty_like(var.q)
            dec.run(var.q, q_idx, cache, out=fast_out)
            sel = dec.selection.clone()
        else:
            sel = var.select()
    # the check runs the references: outside the record of what the timed path used
    err, overlap = check(var, sel, fast_out) if args.check else (None, None)
    with ops.track_implementations() as used_timed:
        if mode == "decode" and name == "msa":
            out = fast_out
            selection_ms, _ = bench_graph(lambda: dec.select(q_idx, cache))
            attention_ms, _ = bench_graph(lambda: dec.attend(var.q, cache, out=out))
            variant_ms, graphed = bench_graph(lambda: dec.run(var.q, q_idx, cache, out=out))
        elif mode == "fwd+bwd":
            selection_ms = bench(lambda: var.select(), args.reps)
            attention_ms = bench(with_backward(lambda: var.attend(sel), var.leaves()), args.reps)
            variant_ms = bench(with_backward(var.step, var.leaves()), args.reps)
            graphed = False
        elif mode == "decode":
            selection_ms, _ = bench_graph(lambda: var.select())
            attention_ms, _ = bench_graph(lambda: var.attend(sel))
            variant_ms, graphed = bench_graph(var.step)
        else:
            selection_ms = bench(lambda: var.select(), args.reps)
            attention_ms = bench(lambda: var.attend(sel), args.reps)
            variant_ms = bench(var.step, args.reps)
            graphed = False
    peak = torch.cuda.max_memory_allocated() / 2**30
    fl = var.flops()
    if mode == "decode":
        by = var.decode_bytes(sel)
        limit = by["dense"] / by["variant"]
        floor_ms = B * by["variant"] / bw * 1e3
    else:
        limit = fl["dense"] / (fl["selection"] + fl["attention"])
        floor_ms = None
    speedup = dense_ms / variant_ms
    limit_fraction = (floor_ms / variant_ms) if mode == "decode" else speedup / limit
    keys = var.keys_read()
    base = dict(card=torch.cuda.get_device_name(), torch=torch.__version__, triton=_triton_version(), variant=name,
                mode=mode, shape="m3", seq_len=S, batch=B, dense_ms=dense_ms, dense_impl=dense_impl,
                dense_all_ms=dense_all, variant_ms=variant_ms, selection_ms=selection_ms, attention_ms=attention_ms,
                speedup=speedup, limit_speedup=limit, limit_fraction=limit_fraction, decode_floor_ms=floor_ms,
                cuda_graph=graphed, implementations={**used, **used_timed}, check_rel_err=err, selection_overlap=overlap,
                free_keys_per_query=keys["free"], fixed_keys_per_query=keys["fixed"], peak_mem_gib=peak,
                params=cfg)
    return [dict(base, config=c) for c in config_names]


def _triton_version():
    import triton

    return triton.__version__


# ----------------------------------------------------------------------------- peers

def run_peers(lengths, args) -> list[dict]:
    """attn-gym's fused lightning indexer and gather attention, fla's parallel_nsa, prefill batch 1."""
    recs = []
    for T in lengths:
        for peer, fn in (("attn_gym.lightning_indexer[dsa]", _peer_indexer(T, 1, 2048)),
                         ("attn_gym.lightning_indexer[csa]", _peer_indexer(T, 4, 512)),
                         ("attn_gym.gather_attn[csa,mqa]", _peer_gather(T)),
                         ("fla.parallel_nsa[no window, l=d=64]", _peer_nsa(T))):
            if args.peer and args.peer not in peer:
                continue
            rec = dict(card=torch.cuda.get_device_name(), peer=peer, mode="prefill", seq_len=T, batch=1)
            signal.signal(signal.SIGALRM, _peer_timeout)
            signal.alarm(args.peer_timeout)  # a peer's autotuning may not eat the whole GPU call
            try:
                rec["ms"] = bench(fn(), args.reps)
            except Exception as exc:
                rec["error"] = f"{type(exc).__name__}: {exc}"[:400]
                rec["traceback"] = traceback.format_exc()[-1500:]
            finally:
                signal.alarm(0)
            print(f"  peer {peer} @ {T}: {rec.get('ms', rec.get('error'))}", flush=True)
            recs.append(rec)
            torch.cuda.empty_cache()
    return recs


def _peer_timeout(signum, frame):
    raise TimeoutError("peer exceeded --peer-timeout")


def _peer_indexer(T, m, topk):
    def make():
        from attn_gym.sparse.indexer import lightning_indexer

        q, w, k = randn(1, T, 64, 128), randn(1, T, 64), randn(1, T // m, 128)
        return lambda: lightning_indexer(q, k, w, topk, causal=True, compress_ratio=m)
    return make


def _peer_gather(T):
    def make():
        from attn_gym.sparse.gather_attn import gather_attn

        q, local, sparse = randn(1, 64, T, 128), randn(1, 1, T, 128), randn(1, 1, T // 4, 128)
        idx = torch.randint(0, T // 4, (1, T, 512), device="cuda", dtype=torch.int32)
        return lambda: gather_attn(q, local, sparse, idx, sliding_window_size=128)
    return make


def _peer_nsa(T):
    def make():
        from fla.ops.nsa import parallel_nsa

        q, k, v = randn(1, T, 64, 128), randn(1, T, 4, 128), randn(1, T, 4, 128)
        g = [torch.rand(1, T, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        # window_size=0: fla's window branch calls flash_attn.flash_attn_func, which is None when the
        # flash-attn package is absent (the "'NoneType' object is not callable" seen before). fla also
        # compresses by mean pooling at l = d = 64, a quarter of the paper's (32, 16) entries.
        return lambda: parallel_nsa(q, k, v, g[0], g[1], None, block_counts=16, block_size=64, window_size=0)
    return make


# ----------------------------------------------------------------------------- reports

def write(records, peers, out: Path, card: str, cmd: str, notes=()) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tag = card_tag(card)
    (out / f"zoo_{tag}.json").write_text(json.dumps(dict(command=cmd, records=records, peers=peers,
                                                         notes=list(notes)), indent=1))
    lines = [f"# Zoo benchmark on one {card} (m3 heads, bf16)", "", f"Command: `{cmd}`", "",
             "| variant | config | mode | len | batch | dense ms (impl) | variant ms | select ms | attn ms | "
             "speedup | limit | fraction | free+fixed keys | implementations | check err / overlap |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        impls = ", ".join(f"{k}:{v}" for k, v in sorted(r["implementations"].items()))
        chk = "-" if r["check_rel_err"] is None else f"{r['check_rel_err']:.1e} / {r['selection_overlap']:.3f}"
        lines.append(f"| {r['variant']} | {r['config']} | {r['mode']} | {r['seq_len'] // 1024}k | {r['batch']} | "
                     f"{r['dense_ms']:.3f} ({r['dense_impl']}) | {r['variant_ms']:.3f} | {r['selection_ms']:.3f} | "
                     f"{r['attention_ms']:.3f} | {r['speedup']:.2f}x | {r['limit_speedup']:.1f}x | "
                     f"{r['limit_fraction']:.0%} | {r['free_keys_per_query']:.0f}+{r['fixed_keys_per_query']:.0f} | "
                     f"{impls} | {chk} |")
    if peers:
        lines += ["", "Peers, prefill batch 1 (same run):", "", "| peer | len | ms |", "|---|---|---|"]
        lines += [f"| {p['peer']} | {p['seq_len'] // 1024}k | {p.get('ms', p.get('error', ''))} |" for p in peers]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    (out / f"zoo_{tag}.md").write_text("\n".join(lines) + "\n")
    plot(records, out / f"zoo_{tag}.png", card)


def plot(records, path: Path, card: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["mode"], r["seq_len"], r["batch"]) for r in records})
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(4 * max(len(groups), 1), 3.6), squeeze=False)
    for ax, (mode, S, B) in zip(axes[0], groups):
        rs = [r for r in records if (r["mode"], r["seq_len"], r["batch"]) == (mode, S, B)]
        names = [f"{r['variant']}\n{r['config'][:5]}" for r in rs]
        ax.bar(names, [r["speedup"] for r in rs], color="tab:blue", label="measured")
        ax.scatter(names, [r["limit_speedup"] for r in rs], color="tab:red", marker="_", s=300, label="limit")
        ax.axhline(1, color="gray", lw=0.8)
        ax.set_title(f"{mode} {S // 1024}k b{B}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=90)
        ax.set_ylabel("speedup over fastest dense")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"sparsezoo variants vs dense, {card}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def ints_of(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def tune(T: int, parts: list[str]) -> None:
    """Tilings of the selection kernels at prefill length T (median ms, printed); parts: indexer, gather,
    moba, nsa."""
    from sparsezoo.kernels import indexer_triton, nsa_select_triton

    for name in ("dsa", "csa") if "indexer" in parts else ():
        var = Variant(name, CONFIGS[name]["published"], 1, T, T, False)
        e, c = var.extra, var.cfg
        for cfg in ({}, dict(TM=64, BN=128), dict(TM=128, BN=64), dict(topk_mode="torch"), dict(select_bins=32),
                    dict(select_bins=128), dict(select_warps=4), dict(select_warps=16), dict(select_block=2048),
                    dict(select_block=4096, select_warps=16), dict(select_cap=2048), dict(select_cap=8192)):
            try:
                ms = bench(lambda: indexer_triton.indexer_topk_triton(e["q_i"], e["w"], e["k_i"], e["key_end"], T,
                                                                      c["topk"], 1 / math.sqrt(c["Di"]), config=cfg))
            except Exception as exc:
                ms = f"{type(exc).__name__}: {str(exc)[:80]}"
            print(f"tune indexer {name} {T}: {cfg} -> {ms}", flush=True)
        del var
    if "gather" in parts:
        _tune_csa_attention(T)
    if "moba" in parts:
        _tune_moba_select(T)
    if "moba_attention" in parts:
        _tune_moba_attention(T)
    if "decode" in parts:
        _tune_indexer_decode(T)
    if "nsa_decode" in parts:
        _tune_nsa_decode(T)
    if "nsa" not in parts:
        return
    var = Variant("nsa", CONFIGS["nsa"]["published"], 1, T, T, False)
    c = var.cfg
    stream = dict(schedule="stream")
    sel_args = (var.q, var.extra["kc"], T, c["l"], c["d"], c["lsel"], c["n"], var.scale)
    for cfg in ({}, dict(ROWS=128), dict(BE=128), dict(ROWS=128, BE=128, num_warps=8), dict(num_stages=3),
                dict(CHUNKS=16), dict(CHUNKS=4), dict(num_warps=8), dict(select_block=512), stream,
                dict(stream, STREAM_ROWS=64), dict(stream, STREAM_BE=64), dict(stream, STREAM_BE=256),
                dict(stream, stream_stages=3), dict(stream, stream_warps=4), dict(stream, STREAM_ROWS=256),
                dict(schedule="stream_topk"), dict(schedule="stream_topk", STREAM_ROWS=64),
                dict(schedule="stream_topk", STREAM_ROWS=256), dict(schedule="stream_topk", stream_warps=4)):
        # with the compressed branch's LSE, as the NSA step runs it (the LSE pass is timed once below)
        ms = _timed(lambda: nsa_select_triton.nsa_select_triton(*sel_args, config=cfg, lse=var.extra["cmp_lse"]))
        print(f"tune nsa_select {T}: {cfg} -> {ms}", flush=True)
    ms = _timed(lambda: nsa_select_triton.nsa_select_triton(*sel_args))
    print(f"tune nsa_select {T}: own LSE pass, default config -> {ms}", flush=True)
    with torch.no_grad():
        sel = var.select()
        for part, fn in (("compressed", lambda: var.attend_part("compressed", sel)),
                         ("selected", lambda: var.attend_part("selected", sel)),
                         ("window", lambda: var.attend_part("window", sel))):
            print(f"tune nsa attention part {part} {T}: {bench(fn):.3f} ms", flush=True)
        # the selected branch's tiles: tokens per tile x the 16 heads that share a selection
        from sparsezoo.kernels import sparse_attention_triton as sat

        for cfg in (dict(TM=1), dict(TM=2), dict(TM=4), dict(TM=8), dict(TM=1, num_warps=2), dict(TM=2, BN=32)):
            ms = _timed(lambda: sat.block_sparse_attention_triton(var.q, var.k, var.v, sel.to(torch.int32), c["lsel"],
                                                                  var.scale, config=cfg))
            print(f"tune nsa selected attention {T}: {cfg} -> {ms}", flush=True)


def _timed(fn) -> float | str:
    try:
        return bench(fn)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:80]}"


def _tune_csa_attention(T: int) -> None:
    """Gather-attention tiles at CSA's equal-budget prefill point (window + top-k entries)."""
    from sparsezoo.kernels import gather_attention_triton as ga
    from sparsezoo.ops.entry_pooling import entry_ids

    var = Variant("csa", CONFIGS["csa"]["published"], 1, T, T, False)
    with torch.no_grad():
        idx = entry_ids(var.select(), T)
        # K = V here (v is k): BN_SHARED is the tile in use; BN applies to separate K and V
        for cfg in ({}, dict(NF_CHECK="tile"), dict(BN_SHARED=64), dict(BN_SHARED=256), dict(num_warps=8),
                    dict(num_stages=4), dict(num_warps=8, num_stages=2)):
            ms = _timed(lambda: ga.gather_attention_triton(var.q, var.k, var.v, idx, var.scale, config=cfg,
                                                           k2=var.extra["kc"], v2=var.extra["kc"],
                                                           window=var.cfg["w"]))
            print(f"tune gather csa {T}: {cfg} -> {ms}", flush=True)
    del var


def _tune_moba_select(T: int) -> None:
    """MoBA gate + top-k tiles: prefill at T; decode over T keys at batch 8 from the cached block means (1 and
    4 queries, CUDA-graph timed). DECODE_T=0 runs the split + merge path that the decode kernel replaces."""
    from sparsezoo.kernels import moba_select_triton as ms_kernel

    var = Variant("moba", CONFIGS["moba"]["equal_budget"], 1, T, T, False)
    c = var.cfg
    for cfg in ({}, dict(ROWS=64, TM=16), dict(ROWS=256, TM=64), dict(BN=128), dict(BN=32), dict(num_warps=4),
                dict(TARGET_PROGRAMS=528), dict(TARGET_PROGRAMS=1056, MIN_SPLIT_CHUNKS=2)):
        ms = _timed(lambda: ms_kernel.moba_select_triton(var.q, var.k, c["block"], c["topk"], config=cfg))
        print(f"tune moba_select b1 T{T} S{T}: {cfg} -> {ms}", flush=True)
    del var
    for Tq in (1, 4):
        var = Variant("moba", CONFIGS["moba"]["equal_budget"], 8, Tq, T, False)
        means = ms_kernel.moba_block_means(var.k, c["block"])[:, :, :(T - 1) // c["block"]]
        for cfg in ({}, dict(DECODE_T=0), dict(DECODE_T=0, TARGET_PROGRAMS=528),
                    dict(DECODE_T=0, TARGET_PROGRAMS=1056, MIN_SPLIT_CHUNKS=2),
                    dict(DECODE_HG=2), dict(DECODE_HG=8), dict(DECODE_HG=16), dict(DECODE_WARPS=4),
                    dict(DECODE_HG=8, DECODE_WARPS=16), dict(DECODE_BN=32), dict(DECODE_BN=128),
                    dict(DECODE_STAGES=2), dict(DECODE_STAGES=4), dict(DECODE_BN=128, DECODE_STAGES=2),
                    dict(DECODE_TOPK_ELEMS=2048),
                    dict(DECODE_TOPK_ELEMS=8192), dict(DECODE_HG=8, DECODE_TOPK_ELEMS=8192)):
            try:
                ms = "%.4f (graphed %s)" % bench_graph(
                    lambda: ms_kernel.moba_select_from_means(var.q, means, T, c["block"], c["topk"], config=cfg))
            except Exception as exc:
                ms = f"{type(exc).__name__}: {str(exc)[:80]}"
            print(f"tune moba_select decode b8 T{Tq} S{T}: {cfg} -> {ms}", flush=True)
        del var, means


def _tune_moba_attention(T: int) -> None:
    """Block-sparse attention at MoBA's and MSA's equal-budget prefill and NSA's selected branch: query-major
    tilings (G1_CONFIG, the union builder) against the key-major schedule's configs, the two schedules'
    largest difference, and the key-major kernels' device times."""
    from sparsezoo.kernels import sparse_attention_keys as sak
    from sparsezoo.kernels import sparse_attention_triton as sat

    query_cfgs = {"moba": ({}, dict(TM=32), dict(num_warps=8, num_stages=2)), "msa": ({}, dict(UNION="torch")),
                  "nsa": ({},)}
    sweep = ({}, dict(FAST=False), dict(BM=128, num_warps=8), dict(R=8), dict(R=32), dict(num_stages=2),
             dict(MERGE_ROWS=64), dict(MERGE_ROWS=32), dict(MERGE_ROWS=128, MERGE_WARPS=8),
             dict(MERGE_ROWS=256, MERGE_WARPS=8))
    key_cfgs = {"moba": sweep, "msa": sweep, "nsa": sweep[:3]}
    for name in ("moba", "msa", "nsa"):  # NSA: its selected branch (64-key blocks)
        var = Variant(name, CONFIGS[name].get("equal_budget", CONFIGS[name]["published"]), 1, T, T, False)
        args = (var.q, var.k, var.v)
        with torch.no_grad():
            sel = var.select()
            blk = var.cfg.get("block") or var.cfg["lsel"]
            for cfg in query_cfgs[name]:
                ms = _timed(lambda: sat.block_sparse_attention_triton(*args, sel, blk, var.scale, config=cfg))
                print(f"tune {name} attention query-major {T}: {cfg} -> {ms}", flush=True)
            for cfg in key_cfgs[name]:
                ms = _timed(lambda: sak.block_sparse_attention_keys(*args, sel, blk, var.scale, config=cfg))
                print(f"tune {name} attention key-major {T}: {cfg} -> {ms}", flush=True)
            a = sat.block_sparse_attention_triton(*args, sel, blk, var.scale)
            b = sak.block_sparse_attention_keys(*args, sel, blk, var.scale)
            print(f"tune {name} attention {T}: schedules differ by at most {(a.float() - b.float()).abs().max():.3g}",
                  flush=True)
            del a, b
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                sak.block_sparse_attention_keys(*args, sel, blk, var.scale)
                torch.cuda.synchronize()
            for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]:
                if e.device_time_total > 0:
                    ms = e.device_time_total / 1e3
                    print(f"tune {name} attention key-major {T} kernel: {e.key[:60]} {ms:.3f} ms x{e.count}", flush=True)
        del var, args, sel


def _tune_indexer_decode(T: int) -> None:
    """The decode indexer's knobs at batch 8 over T keys (DSA tokens, CSA entries), CUDA-graph timed as the
    zoo's decode points are; the floor is the index keys at the copy bandwidth."""
    from sparsezoo.kernels import indexer_decode_triton as idk

    bw = copy_bandwidth()
    rows_major = dict(key_major=False)
    for name in ("dsa", "csa"):
        var = Variant(name, CONFIGS[name]["published"], 8, 1, T, False)
        e, c = var.extra, var.cfg
        floor_ms = e["k_i"].numel() * e["k_i"].element_size() / bw * 1e3
        for cfg in ({}, rows_major, dict(cap=256), dict(cap=1024), dict(cap=2048), dict(finish="kernel"),
                    dict(hist_bins=256), dict(segments_per_sm=4), dict(select_warps=4), dict(write_block=512),
                    dict(block=1024), dict(block=4096)):
            try:
                ms = bench_graph(lambda: idk.indexer_topk_decode_triton(
                    e["q_i"], e["w"], e["k_i"], e["key_end"], T, c["topk"], 1 / math.sqrt(c["Di"]), config=cfg))[0]
            except Exception as exc:
                ms = f"{type(exc).__name__}: {str(exc)[:80]}"
            print(f"tune indexer decode {name} b8 {T}: {cfg} -> {ms} ms (index keys at copy bandwidth "
                  f"{floor_ms:.4f} ms)", flush=True)
        del var


def _tune_nsa_decode(T: int) -> None:
    """The fused NSA decode's knobs at batch 8, one new token over T keys (CUDA-graph timed), against its floor."""
    from sparsezoo.kernels import nsa_decode_triton as nd

    var = Variant("nsa", CONFIGS["nsa"]["published"], 8, 1, T, False)
    e, c = var.extra, var.cfg
    floor_ms = var.B * var.decode_bytes()["variant"] / copy_bandwidth() * 1e3
    for cfg in ({}, dict(block_sums="dot"), dict(block_sums="dot", BE=128), dict(NB_reshape=16),
                dict(NB_reshape=16, BJ=512), dict(NB_reshape=64), dict(cmp_stages=3), dict(cmp_warps=8),
                dict(programs_per_sm=1), dict(programs_per_sm=3), dict(programs_per_sm=4), dict(cmp_splits=16),
                dict(BJ=128), dict(BJ=512), dict(segments=4), dict(BN=32), dict(BN=128), dict(attn_splits=16),
                dict(attn_stages=3), dict(merge_cols=64)):
        try:
            ms = bench_graph(lambda: nd.nsa_decode_triton(var.q, e["kc"], e["vc"], var.k, var.v, var.k, var.v, c["l"],
                                                          c["d"], c["lsel"], c["n"], c["w"], var.scale, config=cfg))[0]
        except Exception as exc:
            ms = f"{type(exc).__name__}: {str(exc)[:80]}"
        print(f"tune nsa decode b8 {T}: {cfg} -> {ms} ms (floor {floor_ms:.4f} ms)", flush=True)
    del var


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(CONFIGS))
    p.add_argument("--modes", default="prefill,fwd+bwd,decode")
    p.add_argument("--lengths", default="32768,131072", help="prefill lengths")
    p.add_argument("--train-lengths", default="32768,131072")
    p.add_argument("--decode-len", type=int, default=131072)
    p.add_argument("--decode-batches", default="1,8,32")
    p.add_argument("--configs", default="published,equal_budget")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dense-flex", default="prefill,fwd+bwd,decode",
                   help="modes whose dense baseline also times compiled flex, the default every mode (each new "
                        "shape compiles, ~30 s); fewer modes make a quicker run whose ratios say so")
    p.add_argument("--reps", type=int, default=5, help="timed repeats of ops longer than 20 ms (median)")
    p.add_argument("--peers-only", action="store_true", help="time the peers alone")
    p.add_argument("--peer", default="", help="only the peers whose name contains this (one process per peer: "
                                              "a peer's illegal memory access poisons the CUDA context)")
    p.add_argument("--peer-timeout", type=int, default=90, help="seconds per peer, compile and autotune included")
    p.add_argument("--out", default="out/zoo")
    p.add_argument("--tune", action="store_true", help="time kernel tilings of the selection ops at 128k, then exit")
    p.add_argument("--tune-parts", default="indexer,gather,moba,nsa")
    p.add_argument("--render", nargs="+", metavar="JSON",
                   help="no GPU: merge the records of earlier runs' JSON files and write the reports to --out")
    p.add_argument("--note", action="append", default=[], metavar="TEXT", help="a line for the report's notes")
    return p.parse_args(argv)


def render(paths: list[str], out: Path, notes: list[str] = ()) -> None:
    """One report from several runs (e.g. one GPU call for prefill + decode, another for fwd+bwd); where two
    runs measured the same point, the later file's record is kept."""
    records, peers, cmds = {}, {}, []
    for path in paths:  # a later file's point replaces an earlier file's
        data = json.loads(Path(path).read_text())
        for r in data["records"]:
            records[(r["variant"], r["config"], r["mode"], r["seq_len"], r["batch"])] = r
        for r in data.get("peers", []):
            peers[(r["peer"], r["seq_len"])] = r
        cmds.append(data["command"])
    records, peers = list(records.values()), list(peers.values())
    order = {"prefill": 0, "fwd+bwd": 1, "decode": 2}
    records.sort(key=lambda r: (list(CONFIGS).index(r["variant"]), r["config"], order[r["mode"]], r["seq_len"],
                                r["batch"]))
    write(records, peers, out, records[0]["card"], " ; ".join(dict.fromkeys(cmds)), notes)


def configs_of(name: str, wanted: list[str]) -> list[tuple[list[str], dict]]:
    """[(config names served, params)]: one run per distinct parameter set."""
    per = {c: CONFIGS[name].get(c, CONFIGS[name]["published"]) for c in wanted}
    runs: list[tuple[list[str], dict]] = []
    for c, params in per.items():
        for names, p in runs:
            if p == params:
                names.append(c)
                break
        else:
            runs.append(([c], params))
    return runs


def main(argv=None):
    args = parse(argv)
    if args.render:
        return render(args.render, Path(args.out), args.note)
    if args.tune:
        return tune(ints_of(args.lengths)[-1], args.tune_parts.split(","))
    if not torch.cuda.is_available():
        sys.exit("benchmarks/zoo.py needs a CUDA device")
    cmd = "python benchmarks/zoo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    card = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"{card}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    ints = ints_of
    modes = args.modes.split(",")
    points = []
    for mode in modes:
        if mode == "prefill":
            points += [(mode, T, T, 1) for T in ints(args.lengths)]
        elif mode == "fwd+bwd":
            points += [(mode, T, T, 1) for T in ints(args.train_lengths)]
        elif mode == "decode":
            points += [(mode, 1, args.decode_len, B) for B in ints(args.decode_batches)]
        else:
            sys.exit(f"unknown mode {mode!r}; choose from prefill, fwd+bwd, decode")
    records = []
    out = Path(args.out)
    for name in [] if args.peers_only else args.variants.split(","):
        if name not in CONFIGS:
            sys.exit(f"unknown variant {name!r}; choose from {sorted(CONFIGS)}")
        for config_names, cfg in configs_of(name, args.configs.split(",")):
            for mode, T, S, B in points:
                t0 = time.time()
                try:
                    recs = run_point(name, config_names, cfg, mode, T, S, B, bw, args)
                except Exception as exc:
                    print(f"  {name} {config_names} {mode} {S} b{B}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    traceback.print_exc()
                    continue
                r = recs[0]
                print(f"  {name:5s} {'/'.join(config_names):26s} {mode:8s} {S // 1024:4d}k b{B:<3d} "
                      f"dense {r['dense_ms']:9.3f} ({r['dense_impl']}) var {r['variant_ms']:9.3f} "
                      f"[sel {r['selection_ms']:.3f} attn {r['attention_ms']:.3f}] {r['speedup']:6.2f}x "
                      f"lim {r['limit_speedup']:5.1f}x {r['limit_fraction']:5.0%} err {r['check_rel_err']} "
                      f"ovl {r['selection_overlap']} {r['implementations']} ({time.time() - t0:.0f}s)", flush=True)
                records += recs
                write(records, [], out, card, cmd)
    peers = run_peers(ints(args.lengths), args) if args.peers else []
    write(records, peers, out, card, cmd)


if __name__ == "__main__":
    main()
