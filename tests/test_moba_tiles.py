"""Large per-head tiles in the block-sparse attention (sparsezoo/kernels/sparse_attention_triton.py): tiles of TM > 16
tokens with membership computed in-kernel from the selection, the Triton tile-union kernel, and the dK/dV
work lists whose columns join the selection heads of one kv head. On the CPU under TRITON_INTERPRET=1
(fp32/fp16, tiny shapes, large tiles forced with config TM); bf16 at a MoBA-like shape on the GPU (marked gpu).

Selections are messy on purpose: repeated ids, -1 anywhere, ids past the query's block (causally masked),
ids outside [0, n_blocks) (int32 and int64, 2**32 included), always the query's own (local) block. The
kernel treats a repeated id once and ignores out-of-range ids, so the reference gets the canonical
selection (valid, deduplicated ids). Tolerances: fp32 outputs/LSE 1e-4, gradients 1e-4 of the largest
entry; fp16 2e-3 / 5e-3; bf16 (GPU) as tests/test_moba_kernel.py: atol=rtol=3e-2, LSE 2e-2, gradients 3e-2
of the largest entry.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsezoo.ops import references as ref

triton = pytest.importorskip("triton")

from sparsezoo.kernels import sparse_attention_triton as sat  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- inputs and oracles

def messy_selection(B, H, T, S, block, topk, gen, dtype=torch.int32):
    """[B, H, T, topk]: the local block first, then random earlier/later/out-of-range ids, repeats and -1."""
    n_blocks = math.ceil(S / block)
    local = (S - T + torch.arange(T)) // block
    sel = (torch.rand(B, H, T, topk, generator=gen) * (local[:, None] + 2).float()).long()  # up to local + 1
    sel[..., 0] = local
    u = torch.rand(B, H, T, topk, generator=gen)
    sel = torch.where(u < 0.1, -1, sel)
    sel = torch.where((u >= 0.1) & (u < 0.15), n_blocks + 3, sel)
    if topk > 2:  # repeats
        sel[..., 2] = torch.where(torch.rand(B, H, T, generator=gen) < 0.3, sel[..., 1], sel[..., 2])
    if dtype == torch.int64:  # would wrap to a valid int32 id
        sel = torch.where((u >= 0.15) & (u < 0.2), 2**32 + (sel.clamp_min(0) % n_blocks), sel)
    else:
        sel = torch.where((u >= 0.15) & (u < 0.2), -7, sel)
    return sel.to(DEV, dtype)


def canonical(sel, n_blocks):
    """The selection the kernel acts on: ids in [0, n_blocks), each once, the rest -1 (int64)."""
    x = sel.long()
    x = torch.where((x >= 0) & (x < n_blocks), x, -1).sort(-1).values
    dup = torch.zeros_like(x, dtype=torch.bool)
    dup[..., 1:] = (x[..., 1:] == x[..., :-1]) & (x[..., 1:] >= 0)
    return torch.where(dup, -1, x)


def naive_unions(sel, tok, TM, n_blocks):
    """Per tile (tokens in the order tok): the sorted union and, per entry, the set of tile rows that chose it."""
    B, H, T, _ = sel.shape
    out = {}
    for b in range(B):
        for h in range(H):
            order = tok[b, h].tolist()
            for n in range(len(order) // TM):
                rows = {}
                for r, t in enumerate(order[n * TM:(n + 1) * TM]):
                    if t < T:
                        for i in sel[b, h, t].tolist():
                            if 0 <= i < n_blocks:
                                rows.setdefault(i, set()).add(r)
                out[(b, h, n)] = sorted(rows.items())
    return out


def assert_plan_matches(plan, sel, TM, n_blocks):
    tok, cnt, ids, bits = plan
    want = naive_unions(sel.cpu(), tok.cpu(), TM, n_blocks)
    assert ids.shape[-1] == min(TM * sel.shape[-1], n_blocks)
    for (b, h, n), entries in want.items():
        c = int(cnt[b, h, n])
        assert ids[b, h, n, :c].tolist() == [i for i, _ in entries], (b, h, n)
        if bits is not None:
            assert bits[b, h, n, :c].tolist() == [sum(1 << r for r in rows) for _, rows in entries], (b, h, n)


def make_qkv(B, Hq, Hkv, T, S, D, gen, dtype):
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEV, dtype).requires_grad_()
    return mk(B, Hq, T, D), mk(B, Hkv, S, D), mk(B, Hkv, S, D)


def compare_with_reference(q, k, v, sel, block, scale, config, tol, grad_tol):
    """Forward, LSE and the gradients of sum(out * go) + sum(lse * gl) vs the fp64 reference on the
    canonical selection (K/V repeated per selection head)."""
    out, lse = sat.block_sparse_attention_triton(q, k, v, sel, block, scale, True, config)
    n_blocks = math.ceil(k.shape[2] / block)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    rout, rlse = ref.block_sparse_attention_reference(q64, k64, v64, canonical(sel, n_blocks), block, scale, True)
    torch.testing.assert_close(out.double(), rout, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), rlse, atol=tol, rtol=0)
    gen = torch.Generator().manual_seed(7)
    go = torch.randn(out.shape, generator=gen).to(DEV)
    gl = torch.randn(lse.shape, generator=gen).to(DEV)
    fin = torch.isfinite(rlse)
    grads = torch.autograd.grad((out.float() * go).sum() + (torch.where(fin, lse, 0) * gl).sum(), (q, k, v))
    rgrads = torch.autograd.grad((rout * go.double()).sum() + (torch.where(fin, rlse, 0) * gl.double()).sum(),
                                 (q64, k64, v64))
    for name, g, rg in zip("qkv", grads, rgrads):
        err = (g.double() - rg).abs().max().item() / (rg.abs().max().item() + 1e-6)
        assert err < grad_tol, f"d{name}: max error {err:.3g} of the largest entry"


# ----------------------------------------------------------------------------- tile unions

@settings(max_examples=6)
@given(B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(1, 40), extra=st.integers(0, 30),
       block=st.sampled_from([2, 4, 8]), topk=st.integers(1, 6), TM=st.sampled_from([4, 16, 32, 64]),
       window=st.sampled_from([1, 8]), wide=st.booleans(), seed=st.integers(0, 2**16))
def test_union_kernel_matches_torch_and_naive(B, H, T, extra, block, topk, TM, window, wide, seed):
    gen = torch.Generator().manual_seed(seed)
    S = T + extra
    sel = messy_selection(B, H, T, S, block, topk, gen, torch.int64 if wide else torch.int32)
    n_blocks = math.ceil(S / block)
    got = sat.tile_plan(sel, TM, window, n_blocks, "triton")
    want = sat.tile_plan(sel, TM, window, n_blocks, "torch")
    assert (got[3] is None) == (want[3] is None) == (TM > sat.BITS_MAX_TM)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for n_tile in range(got[1].shape[-1]):
        c = got[1][..., n_tile]
        keep = torch.arange(got[2].shape[-1], device=DEV) < c[..., None]
        assert torch.equal(got[2][..., n_tile, :][keep], want[2][..., n_tile, :][keep])
        if got[3] is not None:
            assert torch.equal(got[3][..., n_tile, :][keep], want[3][..., n_tile, :][keep])
    assert_plan_matches(got, sel, TM, n_blocks)


def test_union_keeps_each_token_once_in_the_bitmask():
    # token 0 selects block 1 three times: bit 0 once (a summed bitmask would carry into token 1's bit)
    sel = torch.tensor([[[[1, 1, 1], [2, -1, -1]]]], dtype=torch.int32, device=DEV)
    for union in ("triton", "torch"):
        tok, cnt, ids, bits = sat.tile_plan(sel, 2, 1, 4, union)
        assert cnt.tolist() == [[[2]]] and ids[0, 0, 0, :2].tolist() == [1, 2]
        assert bits[0, 0, 0, :2].tolist() == [0b01, 0b10]


# ----------------------------------------------------------------------------- dK/dV work lists

def test_key_list_chunks_keep_kv_heads_together(monkeypatch):
    monkeypatch.setattr(sat, "_KEY_LIST_CHUNK", 10)
    assert sat._head_chunks([3, 3, 3, 3, 3, 3], 2) == [(0, 2), (2, 4), (4, 6)]  # 9 would split a kv head
    assert sat._head_chunks([2, 2, 2, 2, 9, 9, 1, 1], 2) == [(0, 4), (4, 5), (5, 6), (6, 8)]
    assert sat._head_chunks([20, 1, 1, 1], 1) == [(0, 1), (1, 4)]
    assert sat._head_chunks([0, 0], 2) == [(0, 2)]


@pytest.mark.parametrize("kv_div,chunk", [(1, 1 << 24), (3, 1 << 24), (3, 1), (3, 40)])
def test_key_block_lists_cover_each_union_entry_once(kv_div, chunk, monkeypatch):
    # chunk 1: one selection head per transposition chunk (a kv head's columns split over chunks), so the
    # starts must be offset across chunks; chunk 40: some kv heads together, some split
    monkeypatch.setattr(sat, "_KEY_LIST_CHUNK", chunk)
    gen = torch.Generator().manual_seed(kv_div)
    B, Hkv, T, S, block, TM, seg = 2, 2, 21, 30, 4, 8, 3
    Hs, n_blocks = Hkv * kv_div, math.ceil(S / block)
    sel = messy_selection(B, Hs, T, S, block, 4, gen)
    tok, cnt, ids, bits = sat.tile_plan(sel, TM, 1, n_blocks)
    items, length, entries, ebits = sat.key_block_lists(cnt, ids, bits, n_blocks, seg, kv_div)
    NT = cnt.shape[-1]
    seen = []
    for (group, blk, start), n in zip(items.tolist(), length.tolist()):
        assert 1 <= n <= seg
        b, kv = divmod(group, Hkv)
        for e, eb in zip(entries[start:start + n].tolist(), ebits[start:start + n].tolist()):
            s, tile = kv * kv_div + e // NT, e % NT
            c = int(cnt[b, s, tile])
            slot = ids[b, s, tile, :c].tolist().index(blk)
            assert eb == int(bits[b, s, tile, slot])
            seen.append((b, s, tile, blk))
    want = [(b, s, n, i) for b in range(B) for s in range(Hs) for n in range(NT)
            for i in ids[b, s, n, :int(cnt[b, s, n])].tolist()]
    assert sorted(seen) == sorted(want) and len(seen) == len(set(seen))
    # each column's entries in (selection head, tile) order over its segments; columns in turn unless
    # the chunks split a kv head
    cols = [(g, blk) for (g, blk, _), n in zip(items.tolist(), length.tolist()) for _ in range(n)]
    by_col = {}
    for c, e in zip(cols, entries.tolist()):
        by_col.setdefault(c, []).append(e)
    assert all(es == sorted(es) for es in by_col.values())
    if chunk == 1 << 24:  # one chunk
        assert cols == sorted(cols)


# ----------------------------------------------------------------------------- attention, large tiles

@pytest.mark.parametrize("B,Hkv,TM,G,kv_div,window,wide", [(2, 1, 64, 1, 2, 1, False), (1, 2, 32, 1, 1, 8, True),
                                                            (1, 1, 32, 2, 2, 1, False)])
def test_large_tiles_match_reference(B, Hkv, TM, G, kv_div, window, wide):
    # G = 1: MoBA (one selection per query head); G = 2: rows are (token, head) pairs of a selection head
    gen = torch.Generator().manual_seed(TM + G + kv_div)
    T, S, D, block, topk = 70, 83, 16, 8, 5  # T < S: queries are the last T positions; a partial last tile
    Hs = Hkv * kv_div
    q, k, v = make_qkv(B, Hs * G, Hkv, T, S, D, gen, torch.float32)
    sel = messy_selection(B, Hs, T, S, block, topk, gen, torch.int64 if wide else torch.int32)
    compare_with_reference(q, k, v, sel, block, 0.25, {"TM": TM, "WINDOW": window}, 1e-4, 1e-4)


@pytest.mark.parametrize("union", ["torch", "wide"])
def test_large_tiles_with_torch_unions(union, monkeypatch):
    # the torch unions: chosen by config, or because a tile's TM * k ids do not fit the union kernel
    if union == "wide":
        monkeypatch.setattr(sat, "UNION_MAX_W", 16)
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(1, 4, 2, 40, 40, 16, gen, torch.float32)
    sel = messy_selection(1, 4, 40, 40, 8, 3, gen)
    compare_with_reference(q, k, v, sel, 8, 0.25, {"TM": 32, "UNION": "torch" if union == "torch" else "triton"},
                           1e-4, 1e-4)


def test_large_tiles_fp16():
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(1, 4, 1, 64, 64, 16, gen, torch.float16)
    sel = messy_selection(1, 4, 64, 64, 8, 4, gen)
    compare_with_reference(q, k, v, sel, 8, 0.25, {"TM": 64}, 2e-3, 5e-3)


def test_large_tiles_lse_only_and_rows_config():
    # sparse_lse (the LSE-only forward) with 64-token tiles, unless k is too wide for in-kernel membership;
    # G1_CONFIG applies to one head per tile only
    gen = torch.Generator().manual_seed(5)
    q, k, _ = make_qkv(1, 4, 2, 50, 60, 16, gen, torch.float32)
    sel = messy_selection(1, 4, 50, 60, 4, 4, gen)
    lse = sat.sparse_lse(q, k, sel, 4, 0.3, {"TM": 64})
    want = ref.block_sparse_attention_reference(q.double(), k.double(), k.double(), canonical(sel, 15), 4, 0.3,
                                                True)[1]
    torch.testing.assert_close(lse.double(), want, atol=1e-4, rtol=0)
    plan = sat._forward(q, k, k, sel, 4, 0.3, True, {"TM": 64})[2]
    assert plan[0].shape[-1] // plan[1].shape[-1] == 64 and plan[3] is None  # in-kernel membership
    wide_k = torch.cat([sel] * 17, -1)  # k = 68 > SEL_MAX_K: bitmask tiles of 16 tokens instead
    plan = sat._forward(q, k, k, wide_k, 4, 0.3, True, {"TM": 64})[2]
    assert plan[0].shape[-1] // plan[1].shape[-1] == 16 and plan[3] is not None
    assert sat.resolve_config(1, None)["TM"] is None
    try:
        sat.G1_CONFIG["TM"] = 64
        assert sat.resolve_config(1, None)["TM"] == 64 and sat.resolve_config(2, None)["TM"] is None
        assert sat.resolve_config(1, {"TM": 32})["TM"] == 32
    finally:
        sat.G1_CONFIG.pop("TM")
    assert sat._tiling(1, 128, torch.device("cuda"), sat.resolve_config(1))[:2] == (64, 64)
    assert sat._tiling(16, 128, torch.device("cuda"), sat.resolve_config(16))[:2] == (4, 64)
    assert sat._tiling(1, 128, torch.device("cuda"), sat.resolve_config(1, {"ROWS": 128}))[:2] == (128, 128)


# ----------------------------------------------------------------------------- GPU, bf16

@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, {"TM": 32}, {"TM": 128, "num_warps": 8, "num_stages": 2}])
def test_gpu_moba_large_tiles_bf16(config):
    from sparsezoo.kernels import moba_select_triton as mst
    from tests.test_moba_kernel import dense_masked_reference

    B, Hq, Hkv, T, S, D, block, topk = 1, 8, 2, 4096, 4096, 128, 128, 8
    torch.manual_seed(0)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16).requires_grad_()
    q, k, v = mk(B, Hq, T, D), mk(B, Hkv, S, D), mk(B, Hkv, S, D)
    drift = torch.cumsum(torch.randn(B, Hq, T, D, device="cuda"), 2) / 8  # selecting queries drift over tokens
    sel = mst.moba_select_triton(drift.bfloat16(), k.detach(), block, topk)
    scale = 1 / math.sqrt(D)
    out, lse = sat.block_sparse_attention_triton(q, k, v, sel, block, scale, True, config)
    gen = torch.Generator().manual_seed(7)
    go = torch.randn(out.shape, generator=gen).to("cuda")
    gl = torch.randn(lse.shape, generator=gen).to("cuda")
    grads = torch.autograd.grad((out.float() * go).sum() + (lse * gl).sum(), (q, k, v))
    rout, rlse, *rgrads = dense_masked_reference(q, k, v, sel, block, scale, go, gl)
    torch.testing.assert_close(out.float(), rout, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(lse, rlse, atol=2e-2, rtol=0)
    for name, g, rg in zip("qkv", grads, rgrads):
        err = (g.float() - rg).abs().max().item() / rg.abs().max().item()
        assert err < 3e-2, f"d{name}: max error {err:.3g} of the largest entry"
