"""The fused NSA decode (sparsezoo/kernels/nsa_decode_triton.py, sparsezoo.ops.nsa_decode) against the branch ops'
references.

On the CPU the kernels run under TRITON_INTERPRET=1 in fp32 (fp16 once) on tiny shapes: T in 1..4, S from
below one compressed block to a few hundred tokens (not multiples of the block sizes, shorter and longer than
the window), several geometries, forced split counts. Per call:
- the output, under random gates, equals the gated sum of the fp64 compressed and window references and of
  the selected-blocks reference on the kernel's own selection (1e-5 relative to the largest value);
- the compressed branch's LSE equals the reference's (-inf where no entry is visible);
- the selection is well formed and set-equal to the reference's up to near-ties (test_nsa_select_kernel's
  check: forced blocks exact, free blocks' importances equal as multisets).
Non-finite values (docs/ops.md) as tests/test_nonfinite.py checks them: a row is NaN iff it reads a
non-finite value, every other row is bit-identical to the all-finite run. The op, its dispatch and the NSA
module's cached decode path, the custom op, and on the GPU (marked gpu) bf16 at the paper's configuration and
CUDA-graph capture.
"""

from __future__ import annotations

import pytest
import torch

from sparsezoo import ops
from sparsezoo.ops.compressed_attention import n_compressed

triton = pytest.importorskip("triton")

from sparsezoo.kernels.nsa_decode_triton import nsa_decode_triton  # noqa: E402
from tests.test_nsa_select_kernel import EPS_CPU, EPS_GPU, ascending, assert_selection_matches  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU_ONLY = pytest.mark.skipif(DEV.type == "cuda", reason="the interpreter runs on the CPU only")
NAN, INF = float("nan"), float("inf")


def make_inputs(B, Hkv, G, T, S, D, block_len, stride, seed, dtype=torch.float32, device=DEV):
    """(q, kc, vc, k, v, k_win, v_win, gates): q spread wider than the keys, so the selection is not flat."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)
    Sc = n_compressed(S, block_len, stride)
    q = r(B, Hkv * G, T, D) * 1.5
    kv = [r(B, Hkv, Sc, D), r(B, Hkv, Sc, D)] + [r(B, Hkv, S, D) for _ in range(4)]
    gates = torch.rand(3, B, Hkv * G, T, generator=g)
    return [x.to(device, dtype) for x in (q, *kv)] + [gates.to(device)]


def reference_parts(q, kc, vc, k, v, k_win, v_win, sel, block_len, stride, sel_block, window, scale):
    """fp64 (o_cmp, lse_cmp, o_slc on the given selection, o_win), on the inputs' device."""
    q, kc, vc, k, v, k_win, v_win = (x.double() for x in (q, kc, vc, k, v, k_win, v_win))
    S = k.shape[2]
    o_cmp, lse = ops.compressed_attention(q, kc, vc, S=S, block_len=block_len, stride=stride, scale=scale,
                                          return_lse=True, backend="reference")
    o_slc = ops.block_sparse_attention(q, k, v, sel, block_size=sel_block, scale=scale, backend="reference")
    o_win = ops.window_attention(q, k_win, v_win, window=window, scale=scale, backend="reference")
    return o_cmp, lse, o_slc, o_win


def check_against_reference(inputs, geom, topk, window, scale, config=None, tol=1e-5, eps=EPS_CPU, gated=True,
                            sel_dtype=torch.float64):
    q, kc, vc, k, v, k_win, v_win, gates = inputs
    block_len, stride, sel_block = geom
    out, sel, lse = nsa_decode_triton(q, kc, vc, k, v, k_win, v_win, block_len, stride, sel_block, topk, window,
                                      scale, gates=gates if gated else None, config=config)
    o_cmp, lse_ref, o_slc, o_win = reference_parts(q, kc, vc, k, v, k_win, v_win, sel, block_len, stride, sel_block,
                                                   window, scale)
    g = gates.double()[..., None] if gated else torch.ones(3, 1, 1, 1, 1, dtype=torch.float64, device=q.device)
    want = g[0] * o_cmp + g[1] * o_slc + g[2] * o_win
    assert out.dtype == q.dtype and out.shape == q.shape
    err = (out.double() - want).abs().max().item()
    assert err <= tol * want.abs().max().item(), f"output error {err}"
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] == -INF).all()
    torch.testing.assert_close(lse.double()[finite], lse_ref.double()[finite], atol=tol, rtol=tol)
    assert_selection_matches(sel, q, kc, k.shape[2], block_len, stride, sel_block, topk, scale, eps, sel_dtype)
    return out, sel, lse


# ----------------------------------------------------------------------------- CPU (interpreter)

# (T, S, geometry (block_len, stride, sel_block), topk, window, config): S below one compressed block and below
# the window, S not a multiple of either block, every T, entries that reach into the next chunk (block_len >
# stride), reaching two selection blocks (sel_block < block_len), none (block_len = stride), forced splits.
CASES = [
    (1, 5, (8, 4, 16), 4, 12, None),
    (2, 7, (8, 4, 16), 4, 12, None),
    (1, 37, (8, 4, 16), 3, 12, None),
    (3, 100, (8, 4, 16), 5, 12, None),
    (4, 261, (8, 4, 16), 6, 40, None),
    (1, 203, (12, 4, 16), 5, 300, {"cmp_splits": 3, "segments": 2, "attn_splits": 5}),
    (2, 150, (16, 8, 8), 7, 20, {"cmp_splits": 2, "segments": 3}),
    (3, 131, (4, 4, 8), 4, 24, {"attn_splits": 1}),
    (4, 90, (16, 8, 32), 2, 9, None),
    # the same geometries through the overlap-map dot sums ('auto' takes the reshape sums for all of them)
    (3, 100, (8, 4, 16), 5, 12, {"block_sums": "dot"}),
    (1, 203, (12, 4, 16), 5, 300, {"block_sums": "dot", "cmp_splits": 3}),
    (2, 150, (16, 8, 8), 7, 20, {"block_sums": "dot", "cmp_splits": 2}),
    (4, 90, (16, 8, 32), 2, 9, {"block_sums": "dot"}),
    # a geometry only the dot sums tile: sel_block / stride = 3
    (2, 160, (8, 4, 12), 4, 12, None),
]


@CPU_ONLY
@pytest.mark.parametrize("T,S,geom,topk,window,config", CASES)
def test_matches_reference(T, S, geom, topk, window, config):
    inputs = make_inputs(1, 2, 2, T, S, 16, geom[0], geom[1], seed=T * 1000 + S)
    check_against_reference(inputs, geom, topk, window, 0.25, config)


@CPU_ONLY
@pytest.mark.parametrize("block_sums", ["reshape", "dot"])
def test_entry_straddling_two_chunks_counts_in_both(block_sums):
    """A dominant compressed entry overlapping the last block of one chunk and the first of the next (that
    chunk's halo): with NB = 8 blocks of 16 tokens per chunk, entry 31 covers tokens 124..131, blocks 7 and 8,
    which must take the two free slots."""
    inputs = make_inputs(1, 2, 2, 1, 300, 16, 8, 4, seed=13)
    q, kc = inputs[0], inputs[1]
    for g in range(2):
        direction = q[0, 2 * g:2 * g + 2, 0].sum(0)
        kc[0, g, 31] = 20 * direction / direction.norm()
    _, sel, _ = check_against_reference(inputs, (8, 4, 16), 5, 12, 0.25, config={"NB": 8, "block_sums": block_sums})
    assert all({7, 8} <= set(sel[0, g, 0].tolist()) for g in range(2))


@CPU_ONLY
def test_unit_gates_group_of_three_and_strided_inputs():
    """gates=None sums the branches; G = 3 pads the heads; q, k and v in [B, T, H, D] storage."""
    inputs = make_inputs(2, 1, 3, 2, 70, 24, 8, 4, seed=7)
    q, kc, vc, k, v, k_win, v_win, gates = inputs
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    check_against_reference([q, kc, vc, k, v, k_win, v_win, gates], (8, 4, 16), 4, 16, 0.3, gated=False)


@CPU_ONLY
def test_fp16_block_sums():
    """fp16 inputs: the block sums go through the fp16 hi/lo split (the GPU's 16-bit path)."""
    inputs = make_inputs(1, 2, 2, 2, 180, 16, 8, 4, seed=11, dtype=torch.float16)
    check_against_reference(inputs, (8, 4, 16), 6, 20, 0.25, config={"block_sums": "dot"}, tol=2e-3, eps=1e-4)


def test_block_sums_follow_the_geometry():
    """'auto' takes the reshape sums where sel_block is a power-of-two multiple of stride and no entry reaches
    past the next block; 'reshape' says why it cannot tile another geometry; a bad value is an error."""
    from sparsezoo.kernels.nsa_decode_triton import block_sums_for, reshape_geometry

    assert block_sums_for(32, 16, 64, DEV) == "reshape"  # the paper's NSA
    assert block_sums_for(32, 16, 64, DEV, {"block_sums": "dot"}) == "dot"
    assert reshape_geometry(32, 16, 64, 16) == (16, 64, 64, 1)
    for geom, why in (((8, 4, 12), "power of two"), ((8, 3, 16), "multiple of stride"), ((40, 4, 16), "at most one")):
        assert block_sums_for(*geom, DEV) == "dot"
        with pytest.raises(ValueError, match=why):
            block_sums_for(*geom, DEV, {"block_sums": "reshape"})
    with pytest.raises(ValueError, match="block_sums must be one of"):
        block_sums_for(32, 16, 64, DEV, {"block_sums": "fast"})


def test_launch_mode_follows_the_device():
    """Kernels 2-4 launch as programmatic dependent launches by default on sm_90+, plainly elsewhere; pdl=True
    insists (an error where the device cannot), a value that is not a bool or None is an error."""
    from sparsezoo.kernels.nsa_decode_triton import launch_mode_for
    from sparsezoo.kernels.pdl import pdl_supported

    assert launch_mode_for(DEV) == ("pdl" if pdl_supported(DEV) else "plain")
    assert launch_mode_for(DEV, False) == "plain"
    if not pdl_supported(DEV):
        with pytest.raises(ValueError, match="compute capability 9.0"):
            launch_mode_for(DEV, True)
    with pytest.raises(ValueError, match=r"pdl must be None \(automatic\), True or False"):
        launch_mode_for(DEV, "on")


def test_rejects_what_it_cannot_run():
    q, kc, vc, k, v, k_win, v_win, _ = make_inputs(1, 1, 2, 1, 40, 16, 8, 4, seed=0)
    args = (q, kc, vc, k, v, k_win, v_win)
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        nsa_decode_triton(*(x.double() for x in args), 8, 4, 16, 4, 8, 0.25)
    with pytest.raises(ValueError, match="branch ops"):
        nsa_decode_triton(*args, 8, 24, 64, 4, 8, 0.25)  # no run of 2^n blocks holds whole entries
    with pytest.raises(ValueError, match="unknown"):
        nsa_decode_triton(*args, 8, 4, 16, 4, 8, 0.25, config={"splits": 2})
    with pytest.raises(ValueError, match="power of two"):
        nsa_decode_triton(*args, 8, 4, 16, 4, 8, 0.25, config={"BE": 24})
    with pytest.raises(ValueError, match="gates"):
        nsa_decode_triton(*args, 8, 4, 16, 4, 8, 0.25, gates=torch.ones(3, 1, 2, 2, device=DEV))
    with pytest.raises(ValueError, match="k = v = k_win"):
        nsa_decode_triton(q, kc, vc, k, v, k_win[:, :, 1:], v_win, 8, 4, 16, 4, 8, 0.25)


# ----------------------------------------------------------------------------- non-finite values

NF_T, NF_S, NF_GEOM, NF_TOPK, NF_WINDOW = 4, 90, (8, 4, 16), 4, 12
NF_POS = torch.arange(NF_S - NF_T, NF_S)
# (tensor, kv or query head, row, column): a compressed entry that ends at S - 2 (seen by queries 2 and 3),
# a raw token at S - 2 (in every query's forced local block, seen by queries 2 and 3), a window token seen by
# query 0 only, one query row
NF_ENTRY = (NF_S - 2 - NF_GEOM[0] + 1) // NF_GEOM[1]
NF_CASES = [("kc", 1, NF_ENTRY, 3, NAN), ("vc", 0, NF_ENTRY, 5, INF), ("k", 1, NF_S - 2, 0, -INF),
            ("v", 0, NF_S - 2, 2, NAN), ("k_win", 1, NF_S - NF_T - NF_WINDOW + 1, 1, INF),
            ("v_win", 0, NF_S - NF_T - NF_WINDOW + 1, 4, NAN), ("q", 2, 1, 0, -INF)]
NAMES = ("q", "kc", "vc", "k", "v", "k_win", "v_win")


@pytest.fixture(scope="module")
def clean_run():
    inputs = make_inputs(1, 2, 2, NF_T, NF_S, 16, NF_GEOM[0], NF_GEOM[1], seed=3)
    return inputs, _run_nf(inputs)


def _run_nf(inputs):
    out, sel, lse = nsa_decode_triton(*inputs[:7], *NF_GEOM, NF_TOPK, NF_WINDOW, 0.25, gates=inputs[7])
    return out.cpu(), sel.cpu(), lse.cpu()


def _reads(sel, bad_kv):
    """bool [B, Hq, T]: the row reads a bad row of one of the tensors (oracle built from positions)."""
    block_len, stride, sel_block = NF_GEOM
    Sc = bad_kv["kc"].shape[-1]
    seen_entry = (torch.arange(Sc) * stride + block_len - 1)[None, :] <= NF_POS[:, None]  # [T, Sc]
    keys = torch.arange(NF_S)
    in_window = (keys[None, :] <= NF_POS[:, None]) & (keys[None, :] > NF_POS[:, None] - NF_WINDOW)  # [T, S]
    in_sel = ((sel.long()[..., None] == (keys // sel_block)).any(-2)) & (keys <= NF_POS[:, None])  # [B, Hkv, T, S]
    hit = (seen_entry & (bad_kv["kc"] | bad_kv["vc"])[:, :, None]).any(-1) \
        | (in_sel & (bad_kv["k"] | bad_kv["v"])[:, :, None]).any(-1) \
        | (in_window & (bad_kv["k_win"] | bad_kv["v_win"])[:, :, None]).any(-1)
    return hit.repeat_interleave(2, dim=1)


@CPU_ONLY
@pytest.mark.parametrize("case", NF_CASES, ids=[c[0] for c in NF_CASES])
def test_nonfinite_reaches_exactly_the_rows_that_read_it(clean_run, case):
    inputs, (clean_out, clean_sel, clean_lse) = clean_run
    which, head, row, col, value = case
    bad_inputs = [x.clone() for x in inputs]
    bad_inputs[NAMES.index(which)][0, head, row, col] = value
    out, sel, lse = _run_nf(bad_inputs)
    bad_kv = {n: ~torch.isfinite(x.cpu()).all(-1) for n, x in zip(NAMES, bad_inputs[:7]) if n != "q"}
    q_bad = ~torch.isfinite(bad_inputs[0].cpu()).all(-1)
    bad = q_bad | _reads(sel, bad_kv)
    assert bad.any() and (~bad).any(), "the case must split the rows"
    assert torch.isnan(out[bad]).all(), "a row that reads a non-finite value must be NaN"
    # the selection reads q and kc: a NaN there reaches the group's selection at that query (its heads' rows)
    shared = q_bad.view(1, 2, 2, NF_T).any(2).repeat_interleave(2, dim=1) & ~bad
    assert torch.isfinite(out[shared]).all()
    keep = ~bad & ~shared
    assert torch.equal(out[keep], clean_out[keep]), "a row that does not read it must be unchanged"
    cmp_bad = q_bad | _reads(sel, {**{n: torch.zeros_like(x) for n, x in bad_kv.items()},
                                   "kc": bad_kv["kc"], "vc": bad_kv["vc"]})
    assert torch.equal(torch.isnan(lse), cmp_bad), "the compressed LSE is NaN exactly where its row is"
    assert torch.equal(lse[~cmp_bad], clean_lse[~cmp_bad])
    sel_rows = (q_bad.view(1, 2, 2, NF_T).any(2) | _reads_kc(bad_kv["kc"]))[..., None].expand_as(sel)
    assert torch.equal(sel[~sel_rows], clean_sel[~sel_rows]), "a selection that does not see it is unchanged"
    want = ops.nsa_select(bad_inputs[0].double(), bad_inputs[1].double(), S=NF_S, block_len=NF_GEOM[0],
                          stride=NF_GEOM[1], sel_block=NF_GEOM[2], topk=NF_TOPK, scale=0.25, backend="reference")
    assert torch.equal(sel[sel_rows], ascending(want.cpu())[sel_rows]), "one that does: NaN ranks first"


def _reads_kc(kc_bad):
    """bool [B, Hkv, T]: the query sees a bad compressed key (its group's selection reads it)."""
    Sc = kc_bad.shape[-1]
    seen_entry = (torch.arange(Sc) * NF_GEOM[1] + NF_GEOM[0] - 1)[None, :] <= NF_POS[:, None]
    return (seen_entry & kc_bad[:, :, None]).any(-1)


# ----------------------------------------------------------------------------- the op, its dispatch, the module

def _op_args(T=2, S=60, seed=5, dtype=torch.float32):
    q, kc, vc, k, v, k_win, v_win, gates = make_inputs(1, 2, 2, T, S, 16, 8, 4, seed=seed, dtype=dtype)
    kw = dict(block_len=8, stride=4, sel_block=16, topk=4, window=12, scale=0.25, gates=gates)
    return (q, kc, vc, k, v, k_win, v_win), kw


@CPU_ONLY
def test_op_triton_matches_reference_and_records_it():
    args, kw = _op_args()
    with ops.track_implementations() as used:
        out, sel = ops.nsa_decode(*args, **kw, backend="triton")
    assert used == {"nsa_decode": "triton", "nsa_decode_block_sums": "reshape", "nsa_decode_launch": "plain"}
    want, want_sel = ops.nsa_decode(*(x.double() for x in args), **kw, backend="reference")
    assert torch.equal(torch.sort(sel, -1).values, torch.sort(want_sel, -1).values)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_auto_without_the_fused_kernels_runs_the_branch_ops():
    """auto on a CPU (or with gradients) composes the branch ops, each under auto, with the same result."""
    args, kw = _op_args(dtype=torch.float64)
    with ops.track_implementations() as used:
        out, sel = ops.nsa_decode(*args, **kw)
    assert used["nsa_decode"] == "branch_ops" and used["compressed_attention"] == "reference"
    want, want_sel = ops.nsa_decode(*args, **kw, backend="reference")
    assert torch.equal(out, want) and torch.equal(sel, want_sel)


def test_triton_supports_rules():
    from sparsezoo.ops.dispatch import Request

    op = ops.op("nsa_decode")
    base = dict(block_len=32, stride=16, sel_block=64, topk=16, window=512, group=16, head_dim=128)
    assert op.reason("triton", Request("cuda", torch.bfloat16, False, {**base, "queries": 4})) is None
    assert "inference-only" in op.reason("triton", Request("cuda", torch.bfloat16, True, base))
    assert "at most 4" in op.reason("triton", Request("cuda", torch.bfloat16, False, {**base, "queries": 5}))
    assert "branch ops" in op.reason("triton", Request("cuda", torch.bfloat16, False, {**base, "stride": 24}))
    assert "rows" in op.reason("triton", Request("cuda", torch.bfloat16, False, {**base, "group": 64, "queries": 3}))
    with pytest.raises(ValueError, match="inference-only"):
        args, kw = _op_args()
        ops.nsa_decode(args[0].requires_grad_(), *args[1:], **kw, backend="triton")


@CPU_ONLY
def test_module_decode_steps_run_the_fused_op():
    """An NSA layer with a cache: prefill, then steps of 1 and 3 tokens through the fused op (backend
    'triton' in the interpreter) equal the reference layer's; a step with gradients takes the branch ops."""
    from sparsezoo import LayerCache, create_attention

    cfg = dict(variant="nsa", d_model=32, n_heads=4, n_kv_heads=2, head_dim=16, cmp_block=8, cmp_stride=4,
               sel_block=16, sel_topk=4, window=12, compressor_hidden=16)
    torch.manual_seed(0)
    ref = create_attention({**cfg, "backend": "reference"}).eval()
    fused = create_attention({**cfg, "backend": "triton"}).eval()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(1, 44, 32)
    caches = LayerCache(1, 44), LayerCache(1, 44)
    with torch.no_grad():
        for layer, cache in zip((ref, fused), caches):
            layer(x[:, :40], cache=cache)
        for t0, t1 in ((40, 41), (41, 44)):
            want = ref(x[:, t0:t1], cache=caches[0])
            with ops.track_implementations() as used:
                got = fused(x[:, t0:t1], cache=caches[1])
            assert used.get("nsa_decode") == "triton"
            assert torch.equal(torch.sort(fused.last_selection, -1).values, torch.sort(ref.last_selection, -1).values)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    cache = LayerCache(1, 44)
    with torch.no_grad():
        ref(x[:, :40], cache=cache)
    with ops.track_implementations() as used:
        ref(x[:, 40:41].requires_grad_(), cache=cache)
    assert "nsa_decode" not in used and "compressed_attention" in used


def test_tiles_fit_the_shared_memory_budget():
    from sparsezoo.kernels import nsa_decode_triton as nd
    from sparsezoo.kernels.sizes import fit_tiles

    cfg = dict(nd.CONFIG)
    for itemsize, BD, reshape in [(2, 128, True), (4, 128, True), (4, 256, True), (2, 256, False), (4, 256, False)]:
        NB, EC, BE, HALO, stages = nd.compressed_tiles(cfg, 32, 16, 64, BD, itemsize, reshape)
        assert 1 <= stages <= cfg["cmp_stages"] and stages * 2 * BE * BD * itemsize <= nd.SMEM_BUDGET
        assert EC % BE == 0 and BE >= 16
    assert nd.compressed_tiles(cfg, 32, 16, 64, 128, 2, True)[2:] == (128, 1, 3)  # bf16 m3: one chunk, 3 stages
    assert nd.compressed_tiles(cfg, 32, 16, 64, 256, 4, True)[2] == 64  # fp32 x 256: the tile halves
    for bytes_per_row in (2 * 128 * 2, 2 * 256 * 4, 2 * 1024 * 4, 2 * 8192 * 4):
        for tile, stages in ((64, 2), (128, 3), (16, 4)):
            got_tile, got_stages = fit_tiles(tile, stages, bytes_per_row)
            assert 16 <= got_tile <= tile and 1 <= got_stages <= stages
            assert got_tile == 16 or got_stages * got_tile * bytes_per_row <= nd.SMEM_BUDGET
            assert got_tile == tile or got_tile * 2 * bytes_per_row > nd.SMEM_BUDGET  # halved only when needed
    assert fit_tiles(64, 2, 2 * 128 * 2) == (64, 2)  # the bf16 m3 tiles as configured
    with pytest.raises(ValueError, match="cmp_programs_per_sm must be an int >= 1"):
        nd._resolve_config({"cmp_programs_per_sm": 0}, torch.device("cpu"))


@CPU_ONLY
def test_custom_op_passes_opcheck():
    args, kw = _op_args(T=1, S=20)
    torch.library.opcheck(torch.ops.sparsezoo.nsa_decode_triton,
                          (*args, kw["block_len"], kw["stride"], kw["sel_block"], kw["topk"], kw["window"],
                           kw["scale"], kw["gates"]))


# ----------------------------------------------------------------------------- GPU (bf16, paper config)

PAPER = dict(block_len=32, stride=16, sel_block=64, topk=16, window=512)


def _gpu_inputs(B, T, S, seed):
    return make_inputs(B, 4, 16, T, S, 128, 32, 16, seed=seed, dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,S", [(8, 1, 131072), (8, 4, 32768), (2, 3, 4099), (1, 1, 300)])
def test_gpu_bf16_paper_config(B, T, S):
    """bf16 at m3 heads: output within 2e-2 of the fp64 references on the kernel's selection, LSE within
    1e-2, selection set-equal to the fp32 reference's up to near-ties."""
    inputs = _gpu_inputs(B, T, S, seed=S + T)
    geom = (PAPER["block_len"], PAPER["stride"], PAPER["sel_block"])
    check_against_reference(inputs, geom, PAPER["topk"], PAPER["window"], 128 ** -0.5, tol=2e-2, eps=EPS_GPU,
                            sel_dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,D", [(torch.float32, 256), (torch.bfloat16, 256), (torch.float32, 128)])
def test_gpu_wide_tiles_fit_shared_memory(dtype, D):
    """fp32 and 256-wide heads: kernels 1 and 3 shed stages (and halve tiles) to fit, and stay exact."""
    inputs = make_inputs(2, 2, 4, 1, 5000, D, 32, 16, seed=D, dtype=dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
    check_against_reference(inputs, (32, 16, 64), 16, 512, D ** -0.5, tol=tol, eps=EPS_GPU, sel_dtype=torch.float32)


@pytest.mark.gpu
def test_gpu_auto_is_triton_and_captures_in_a_cuda_graph():
    inputs = _gpu_inputs(8, 1, 32768, seed=1)
    args, gates = inputs[:7], inputs[7]
    kw = dict(**PAPER, scale=128 ** -0.5, gates=gates)
    with ops.track_implementations() as used:
        want, want_sel = ops.nsa_decode(*args, **kw)  # warm-up: compiles the kernels outside the capture
    assert used == {"nsa_decode": "triton", "nsa_decode_block_sums": "reshape", "nsa_decode_launch": "pdl"}
    plain, plain_sel, _ = nsa_decode_triton(*args, **kw, pdl=False)  # the same step without pdl
    assert torch.equal(plain, want) and torch.equal(plain_sel, want_sel)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got, got_sel = ops.nsa_decode(*args, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want) and torch.equal(got_sel, want_sel)
    args[0].copy_(torch.randn_like(args[0]))  # replays recompute from the inputs in place
    graph.replay()
    fresh, fresh_sel = ops.nsa_decode(*args, **kw)
    torch.cuda.synchronize()
    assert torch.equal(got, fresh) and torch.equal(got_sel, fresh_sel) and not torch.equal(got, want)
