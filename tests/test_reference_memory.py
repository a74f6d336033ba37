"""The references keep no O(T·S) tensor for the backward: each query chunk is recomputed there.

Measured by the bytes autograd saves during the forward (saved_tensors_hooks). Before chunks were
recomputed, the dense warm-up KL saved every chunk's gathered keys (T x S x D_i floats); MSA training
with `routing: dense` then took 12.3 GB at 8k tokens on a CPU (2.3 GB after, for the whole layer).
"""

import torch

from sparsezoo import ops

T = S = 512
DI = 16


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of fn()."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.backward()
    return sum(storages.values())


def test_msa_dense_warmup_kl_saves_no_token_by_key_tensor():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, T, 16, generator=g), torch.randn(1, 2, S, 16, generator=g)
    q_idx = torch.randn(1, 2, T, DI, generator=g, requires_grad=True)
    k_idx = torch.randn(1, S, DI, generator=g, requires_grad=True)
    used = saved_bytes(lambda: ops.msa_index_kl(q, k, q_idx, k_idx, None, block_size=16, backend="reference"))
    assert used < T * S * DI * 4 / 8, f"autograd saved {used} bytes"


def test_dsa_dense_warmup_kl_saves_no_token_by_key_tensor():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 4, T, 16, generator=g), torch.randn(1, 2, S, 16, generator=g)
    q_i = torch.randn(1, 1, T, 2, DI, generator=g, requires_grad=True)
    w = torch.randn(1, 1, T, 2, generator=g, requires_grad=True)
    k_i = torch.randn(1, S, DI, generator=g, requires_grad=True)
    fn = lambda: ops.index_kl(q, k, q_i, w, k_i, torch.arange(S), None, S=S, scale=0.25, index_scale=0.25,
                              backend="reference")
    assert saved_bytes(fn) < T * S * DI * 4 / 8


def test_reference_attention_saves_no_token_by_key_tensor():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, T, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, S, 16, generator=g, requires_grad=True) for _ in range(2))
    used = saved_bytes(lambda: ops.dense_attention(q, k, v, backend="reference").sum())
    assert used < 4 * T * S * 4 / 8  # the [Hq, T, S] probabilities would be 4 * T * S floats
