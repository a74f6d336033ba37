"""ops.branch_sum: the one-pass Triton kernel (sparsezoo/kernels/branch_sum_triton.py) against the reference's torch ops,
forward and gradients of outs and gates (fp32 under the interpreter, tolerance 1e-5 relative to the largest
reference value; bf16 on the GPU, 1e-2), and the errors for bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsezoo import ops

pytest.importorskip("triton")

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n, shape, gated, dtype, seed, permuted_gates=False):
    g = torch.Generator().manual_seed(seed)
    outs = [torch.randn(*shape, generator=g).to(DEV, dtype).requires_grad_() for _ in range(n)]
    gates = None
    if gated:
        if permuted_gates:  # [B, T, H, N] permuted, as a gate projection's output
            gates = torch.rand(shape[0], shape[2], shape[1], n, generator=g).permute(3, 0, 2, 1)
        else:
            gates = torch.rand(n, *shape[:3], generator=g)
        gates = gates.to(DEV, dtype).requires_grad_()
    return outs, gates


def _check(n, shape, gated, dtype, seed, tol, permuted_gates=False):
    outs, gates = _inputs(n, shape, gated, dtype, seed, permuted_gates)
    ref_outs = [o.detach().double().cpu().requires_grad_() for o in outs]
    ref_gates = None if gates is None else gates.detach().double().cpu().requires_grad_()
    with ops.track_implementations() as used:
        got = ops.branch_sum(outs, gates, backend="triton")
    assert used["branch_sum"] == "triton" and got.dtype == dtype
    want = ops.branch_sum(ref_outs, ref_gates, backend="reference")
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    got.backward(dout.to(DEV, dtype))
    want.backward(dout)
    pairs = [(got, want)] + list(zip([o.grad for o in outs], [o.grad for o in ref_outs]))
    if gates is not None:
        pairs.append((gates.grad, ref_gates.grad))
    for a, b in pairs:
        err = (a.detach().double().cpu() - b.detach()).abs().max().item()
        assert err <= tol * b.abs().max().item() + 1e-6


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 4), B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 40),
       D=st.sampled_from([8, 16, 24, 64]), gated=st.booleans(), permuted=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_reference(n, B, H, T, D, gated, permuted, seed):
    _check(n, (B, H, T, D), gated, torch.float32, seed, 1e-5, permuted)


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="needs a GPU")
def test_gpu_bf16_nsa_shape():
    _check(3, (1, 64, 4096, 128), True, torch.bfloat16, 7, 1e-2, permuted_gates=True)


def test_auto_and_bad_input():
    outs = [torch.randn(1, 2, 5, 8) for _ in range(3)]
    ops.branch_sum(outs)
    assert ops.last_implementation("branch_sum") == "reference"  # auto: the kernel on CUDA only
    with pytest.raises(ValueError, match="1 to 4 branch outputs"):
        ops.branch_sum([])
    with pytest.raises(ValueError, match="branch output 1 is"):
        ops.branch_sum([outs[0], outs[1][..., :4]])
    with pytest.raises(ValueError, match=r"gates must be a float \[N, B, H, T\]"):
        ops.branch_sum(outs, torch.rand(3, 1, 2, 5, 1))
    with pytest.raises(ValueError, match="contiguous"):
        ops.branch_sum([o.transpose(1, 2) for o in outs], backend="triton")
    with pytest.raises(ValueError, match="fp64"):
        ops.branch_sum([o.double() for o in outs], backend="triton")
