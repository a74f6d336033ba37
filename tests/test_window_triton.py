"""Sliding-window attention through the block-sparse Triton kernels (sparsezoo/ops/window_attention/triton.py)
against the fp64 reference, forward and gradients.

On the CPU the kernels run under TRITON_INTERPRET=1 in fp32 on hypothesis-drawn shapes, with blocks of 8 or 16
keys so that windows span many blocks (tolerance 1e-4 relative to the largest reference value, plus 1e-6 for
gradients that are 0 in the reference); marked gpu, in bf16 with the default blocks, eager and under
torch.compile (3e-2).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsezoo import ops
from sparsezoo.ops.window_attention import triton as window_triton

pytest.importorskip("triton")

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


def _max_err(got, want):
    return (got.detach().double().cpu() - want.detach().double().cpu()).abs().max().item()


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 200), extra=st.integers(0, 100), window=st.integers(1, 400))
def test_window_blocks_cover_each_window_exactly(T, extra, window):
    """The blocks listed for a query intersect its window, and together they hold all of it."""
    S, bs = T + extra, window_triton.WINDOW_BLOCK
    ids = window_triton.window_blocks(1, 1, T, S, window, "cpu")[0, 0]
    for t in range(T):
        p = S - T + t
        blocks = ids[t][ids[t] >= 0]
        assert blocks.unique().numel() == blocks.numel()
        covered = set()
        for j in blocks.tolist():
            keys = set(range(j * bs, (j + 1) * bs)) & set(range(max(0, p - window + 1), p + 1))
            assert keys, f"block {j} misses the window of position {p}"
            covered |= keys
        assert covered == set(range(max(0, p - window + 1), p + 1))


@settings(max_examples=5, deadline=None)
@given(T=st.integers(1, 24), extra=st.integers(0, 20), window=st.integers(1, 50), G=st.sampled_from([1, 2, 4]),
       block=st.sampled_from([8, 16]), seed=st.integers(0, 2**16))
def test_matches_reference(T, extra, window, G, block, seed):
    """Output and gradients of q, k, v against the fp64 reference (fp32 under the interpreter; on a GPU fp32
    too, with blocks of 16 keys, the smallest tensor-core tile)."""
    if GPU:
        block = 16
    S = T + extra
    g = torch.Generator().manual_seed(seed)
    q64, k64, v64 = (torch.randn(*shape, generator=g, dtype=torch.float64)
                     for shape in ((1, 2 * G, T, 16), (1, 2, S, 16), (1, 2, S, 16)))
    go = torch.randn(1, 2 * G, T, 16, generator=g, dtype=torch.float64)
    fast = [x.to(DEV, torch.float32).requires_grad_() for x in (q64, k64, v64)]
    ref = [x.clone().requires_grad_() for x in (q64, k64, v64)]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(window_triton, "WINDOW_BLOCK", block)
        out = ops.window_attention(*fast, window=window, scale=0.3, backend="triton")
    want = ops.window_attention(*ref, window=window, scale=0.3, backend="reference")
    out.backward(go.to(DEV, torch.float32))
    want.backward(go)
    for got, exp, what in [(out, want, "out")] + [(a.grad, b.grad, f"grad {i}") for i, (a, b) in
                                                  enumerate(zip(fast, ref))]:
        assert _max_err(got, exp) <= 1e-4 * exp.abs().max().item() + 1e-6, what  # 1e-6: gradients that are 0


def test_records_triton_and_refuses_fp64():
    q, k, v = (torch.randn(1, 2, 20, 16, device=DEV) for _ in range(3))
    with ops.track_implementations() as used:
        ops.window_attention(q, k, v, window=5, backend="triton")
    assert used["window_attention"] == "triton"
    with pytest.raises(ValueError, match="window_attention: backend 'triton' cannot run this call.*fp64"):
        ops.window_attention(q.double(), k.double(), v.double(), window=5, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_bf16(compiled):
    """NSA's window (512 keys, 16 query heads per key head) in bf16, eager and compiled: output and gradients of the
    Triton path match the fp32 reference on the same inputs; auto picks it without gradients, flex with them."""
    g = torch.Generator().manual_seed(3)
    T, S = 3000, 4000
    q, k, v = (torch.randn(*shape, generator=g).to("cuda", torch.bfloat16).requires_grad_()
               for shape in ((1, 32, T, 128), (1, 2, S, 128), (1, 2, S, 128)))
    run = lambda *x: ops.window_attention(*x, window=512, backend="triton")
    fn = torch.compile(run, fullgraph=True) if compiled else run
    out = fn(q, k, v)
    ref_in = [x.detach().float().requires_grad_() for x in (q, k, v)]
    want = ops.window_attention(*ref_in, window=512, backend="reference")
    go = torch.randn(out.shape, generator=g).to("cuda")
    out.backward(go.bfloat16())
    want.backward(go)
    for got, exp in [(out, want)] + [(a.grad, b.grad) for a, b in zip((q, k, v), ref_in)]:
        assert _max_err(got, exp) <= 3e-2 * exp.abs().max().item()
    if not compiled:
        for grad, impl in ((False, "triton"), (True, "flex")):
            with torch.set_grad_enabled(grad), ops.track_implementations() as used:
                ops.window_attention(q, k, v, window=512)
            assert used["window_attention"] == impl
