"""The gated sum of attention branches in one pass (Triton): out = sum_i gate_i * out_i, as NSA combines its
compressed, selected and window branches.

outs: N (1..4) contiguous tensors of one shape [..., D], read as rows x D; gates: fp [N, rows] (any strides over
the leading dims: a view of the model's gate projection), or none (unit gates). fp32 accumulation, the output
in the outs' dtype. The backward writes every d out_i = gate_i * dO and d gate_i = rowsum(dO * out_i) in one
pass (unit gates: d out_i = dO, nothing to compute). One read of each input, one write of each output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsezoo.kernels.sizes import pow2 as _pow2

MAX_BRANCHES = 4
_ROWS = 16  # rows per program


@triton.jit
def _gate(G, r, ok, i, sgi, sgb, sgh, sgt, H, T):
    """The gate of branch i at rows r ([BR]), fp32."""
    off = i * sgi + (r // (H * T)) * sgb + (r // T % H) * sgh + (r % T) * sgt
    return tl.load(G + off, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _sum_kernel(O0, O1, O2, O3, G, OUT, n_rows, H, T, sgi, sgb, sgh, sgt,
                N: tl.constexpr, GATED: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    ok = r < n_rows
    m = ok[:, None] & (d[None, :] < D)
    off = r[:, None] * D + d[None, :]
    acc = tl.zeros([BR, BD], tl.float32)
    for i in tl.static_range(N):
        src = O0 if i == 0 else O1 if i == 1 else O2 if i == 2 else O3
        x = tl.load(src + off, mask=m, other=0.0).to(tl.float32)
        if GATED:
            x = x * _gate(G, r, ok, i, sgi, sgb, sgh, sgt, H, T)[:, None]
        acc += x
    tl.store(OUT + off, acc.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _sum_backward_kernel(DO, O0, O1, O2, O3, G, DX, DG, n_rows, H, T, sgi, sgb, sgh, sgt,
                         N: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    """DX [N, rows, D]: gate_i * dO; DG fp32 [N, rows]: rowsum(dO * out_i)."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    ok = r < n_rows
    m = ok[:, None] & (d[None, :] < D)
    off = r[:, None] * D + d[None, :]
    do = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
    for i in tl.static_range(N):
        src = O0 if i == 0 else O1 if i == 1 else O2 if i == 2 else O3
        x = tl.load(src + off, mask=m, other=0.0).to(tl.float32)
        g = _gate(G, r, ok, i, sgi, sgb, sgh, sgt, H, T)
        tl.store(DX + i * n_rows * D + off, (do * g[:, None]).to(DX.dtype.element_ty), mask=m)
        tl.store(DG + i * n_rows + r, tl.sum(do * x, axis=1), mask=ok)


def _layout(outs, gates):
    """(rows, H, T, D, the gates' strides over (branch, batch, head, token)) for outs [B, H, T, D]."""
    B, H, T, D = outs[0].shape
    strides = (0, 0, 0, 0) if gates is None else gates.stride()
    return B * H * T, H, T, D, strides


def _pointers(outs):
    return [*outs, *[outs[0]] * (MAX_BRANCHES - len(outs))]


class _BranchSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates, *outs):
        n_rows, H, T, D, gs = _layout(outs, gates)
        out = torch.empty_like(outs[0])
        if n_rows:
            BD = max(_pow2(D), 16)
            _sum_kernel[(triton.cdiv(n_rows, _ROWS),)](
                *_pointers(outs), outs[0] if gates is None else gates, out, n_rows, H, T, *gs, N=len(outs),
                GATED=gates is not None, D=D, BD=BD, BR=_ROWS)
        ctx.n = len(outs)
        ctx.save_for_backward(*(() if gates is None else (gates, *outs)))  # unit gates: the backward reads nothing
        return out

    @staticmethod
    def backward(ctx, dout):
        if not ctx.saved_tensors:
            return (None, *[dout] * ctx.n)
        gates, *outs = ctx.saved_tensors
        n_rows, H, T, D, gs = _layout(outs, gates)
        dout = dout.contiguous()
        dx = torch.empty((len(outs), *outs[0].shape), dtype=outs[0].dtype, device=dout.device)
        dg = torch.empty((len(outs), *outs[0].shape[:3]), dtype=torch.float32, device=dout.device)
        if n_rows:
            _sum_backward_kernel[(triton.cdiv(n_rows, _ROWS),)](
                dout, *_pointers(outs), gates, dx, dg, n_rows, H, T, *gs, N=len(outs), D=D,
                BD=max(_pow2(D), 16), BR=_ROWS)
        return (dg.to(gates.dtype), *dx.unbind(0))


def branch_sum_triton(outs: list[torch.Tensor], gates: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i gates[i] * outs[i] (unit gates when None) for outs [B, H, T, D] contiguous (one shape and dtype) and
    gates [N, B, H, T] (any strides). Differentiable w.r.t. outs and gates."""
    return _BranchSum.apply(gates, *outs)
