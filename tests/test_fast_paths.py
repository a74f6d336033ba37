"""Every op's Triton path, reached through the public op, against its plain-PyTorch reference.

One registry of cases (op, input maker); each case runs on the CPU under the Triton interpreter in
fp32 (backend="triton") and, marked gpu, in bf16 under backend="auto", which must pick Triton (by name where
an op prefers another implementation for calls with gradients).
Attention ops compare outputs and gradients (fp32: 1e-4 relative to the largest reference value;
bf16: 3e-2); selection ops compare with the reference as sets, allowing a few near-tie swaps
(fp32: at most 2% of the ids; bf16: 10%), and must keep the selection format.
"""

from __future__ import annotations

import pytest
import torch

from sparsezoo import ops

pytest.importorskip("triton")

GPU = torch.cuda.is_available()


def _rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _block_sparse(g, per_head: bool):
    B, Hq, Hkv, T, S, D, bs, K = 2, 4, 2, 40, 80, 16, 16, 3
    q, k, v = _rand(g, B, Hq, T, D), _rand(g, B, Hkv, S, D), _rand(g, B, Hkv, S, D)
    Hs = Hq if per_head else Hkv
    sel = ops.msa_select(_rand(g, B, Hs, T, 16), _rand(g, B, S, 16), block_size=bs, topk=K, backend="reference")
    return (q, k, v, sel), dict(block_size=bs)


def _gather(g, layer_shared: bool):
    B, Hq, Hkv, T, N, D, K = 2, 4, 2, 20, 50, 16, 12
    q, k, v = _rand(g, B, Hq, T, D), _rand(g, B, Hkv, N, D), _rand(g, B, Hkv, N, D)
    idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B * (1 if layer_shared else Hkv) * T)])
    idx = idx.view(B, 1 if layer_shared else Hkv, T, K).to(torch.int32)
    idx[..., -2:] = -1
    return (q, k, v, idx), dict(scale=0.3)


def _window(g, G: int):
    B, Hkv, T, S, D = 2, 2, 40, 90, 16  # a chunk: the last 40 of 90 positions
    q, k, v = _rand(g, B, Hkv * G, T, D), _rand(g, B, Hkv, S, D), _rand(g, B, Hkv, S, D)
    return (q, k, v), dict(window=70, scale=0.3)


ATTENTION = {
    "block_sparse_attention[group]": ("block_sparse_attention", lambda g: _block_sparse(g, False)),
    "block_sparse_attention[per_head]": ("block_sparse_attention", lambda g: _block_sparse(g, True)),
    "gather_attention[layer]": ("gather_attention", lambda g: _gather(g, True)),
    "gather_attention[group]": ("gather_attention", lambda g: _gather(g, False)),
    "window_attention[group]": ("window_attention", lambda g: _window(g, 2)),
    "window_attention[mha]": ("window_attention", lambda g: _window(g, 1)),
}


def _msa_select(g):
    return (_rand(g, 2, 2, 30, 16), _rand(g, 2, 60, 16)), dict(block_size=8, topk=4)


def _nsa_select(g):
    return (_rand(g, 2, 4, 30, 16), _rand(g, 2, 2, 13, 16)), dict(S=60, block_len=8, stride=4, sel_block=8, topk=5,
                                                                   scale=0.25)


def _indexer(g):
    S = 70
    return (_rand(g, 2, 1, 30, 4, 16), _rand(g, 2, 1, 30, 4), _rand(g, 2, S, 16), torch.arange(S)), \
        dict(S=S, topk=20, scale=0.25)


def _moba(g):
    return (_rand(g, 2, 4, 30, 16), _rand(g, 2, 2, 60, 16)), dict(block_size=8, topk=4)


SELECTION = {"msa_select": _msa_select, "nsa_select": _nsa_select, "indexer_topk": _indexer, "moba_select": _moba}


def _to(args, dtype, device, grad=False):
    out = []
    for a in args:
        if a.is_floating_point():
            a = a.to(device=device, dtype=dtype).requires_grad_(grad)
        else:
            a = a.to(device)
        out.append(a)
    return out


def _run_attention(name, dtype, device, backend, seed):
    op, make = ATTENTION[name]
    g = torch.Generator().manual_seed(seed)
    args, kw = make(g)
    fast = _to(args, dtype, device, grad=True)
    ref = _to(args, torch.float64, "cpu", grad=True)
    fn = getattr(ops, op)
    out = fn(*fast, backend=backend, **kw)
    assert ops.last_implementation(op) == "triton"
    want = fn(*ref, backend="reference", **kw)
    go = torch.randn(want.shape, generator=g, dtype=torch.float64)
    out.backward(go.to(device=device, dtype=dtype))
    want.backward(go)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for got, exp, what in [(out, want, "out")] + [(a.grad, b.grad, f"grad {i}") for i, (a, b) in
                                                  enumerate(zip(fast, ref)) if b.grad is not None]:
        err = (got.detach().double().cpu() - exp.detach()).abs().max().item()
        assert err <= tol * exp.detach().abs().max().item() + 1e-12, f"{name} {what}: max error {err}"


def _run_selection(name, dtype, device, backend, seed, allowed):
    g = torch.Generator().manual_seed(seed)
    args, kw = SELECTION[name](g)
    fn = getattr(ops, name)
    got = fn(*_to(args, dtype, device), backend=backend, **kw).cpu()
    assert ops.last_implementation(name) == "triton"
    want = fn(*_to(args, torch.float64, "cpu"), backend="reference", **kw)
    assert got.shape == want.shape and got.dtype == torch.int32
    assert torch.equal((got >= 0).sum(-1), (want >= 0).sum(-1)), "number of selected ids per query"
    a, b = got.long().flatten(0, -2), want.long().flatten(0, -2)
    missing = sum(len(set(x[x >= 0].tolist()) - set(y[y >= 0].tolist())) for x, y in zip(a, b))
    for row in a:
        ids = row[row >= 0]
        assert ids.unique().numel() == ids.numel(), "repeated id in a selection"
    assert missing <= allowed * max((b >= 0).sum().item(), 1), f"{name}: {missing} ids differ from the reference"


@pytest.mark.skipif(GPU, reason="the interpreter runs on the CPU only")
@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_attention_triton_matches_reference_in_the_interpreter(name):
    _run_attention(name, torch.float32, "cpu", "triton", seed=1)


@pytest.mark.skipif(GPU, reason="the interpreter runs on the CPU only")
@pytest.mark.parametrize("name", sorted(SELECTION))
def test_selection_triton_matches_reference_in_the_interpreter(name):
    _run_selection(name, torch.float32, "cpu", "triton", seed=2, allowed=0.02)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_attention_auto_is_triton_and_exact_in_bf16(name):
    op = ops.op(ATTENTION[name][0])
    # an op whose calls with gradients prefer another implementation (grad_order) is asked for triton by name
    backend = "auto" if (op.grad_order or op.implementations)[0] == "triton" else "triton"
    _run_attention(name, torch.bfloat16, "cuda", backend, seed=3)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(SELECTION))
def test_selection_auto_is_triton_in_bf16(name):
    _run_selection(name, torch.bfloat16, "cuda", "auto", seed=4, allowed=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(SELECTION) + sorted(ATTENTION))
def test_fast_path_captures_in_a_cuda_graph(name):
    """Served decode replays the ops from CUDA graphs: no host copy or sync may hide in a launcher."""
    g = torch.Generator().manual_seed(5)
    op_name, make = (name, SELECTION[name]) if name in SELECTION else ATTENTION[name]
    args, kw = make(g)
    args = _to(args, torch.bfloat16, "cuda")
    fn = getattr(ops, op_name)
    want = fn(*args, **kw)  # warm-up: compiles the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = fn(*args, **kw)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want) if not got.is_floating_point() else torch.allclose(got, want)


def test_every_op_states_its_implementations_and_supports_rules():
    from sparsezoo.ops.dispatch import Request

    for name in ops.OPS:
        op = ops.op(name)
        assert op.implementations[-1] == "reference", f"{name}: the reference comes last under auto"
        for impl in op.implementations:
            why = op.module(impl).supports(Request(params={}) if impl == "reference" else _static(name))
            assert why is None or isinstance(why, str)


def _static(name):
    from sparsezoo.ops.dispatch import Request

    return Request(params=dict(block_size=128, group=4, selection_heads=4, n_kv_heads=4, head_dim=64, scale=1.0,
                               topk=16, index_dim=64, window=64, block_len=32, stride=16, sel_block=64))

