"""The MSA module decoding through the paged cache and the Triton decode kernels.

On a CPU the kernels run under the Triton interpreter (fp32); on a GPU natively (fp32 and bf16).
"""

from __future__ import annotations

import pytest
import torch

from sparsezoo import create_attention, ops
from sparsezoo.paged_cache import MSAPagedLayerCache

CFG = dict(variant="msa", d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, index_dim=16, block_size=16, topk=3,
           decode_backend="triton")


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _decode(layer, x, T0):
    """Prefill T0 tokens through the layer's own cache, then decode the rest one token a step."""
    B, T = x.shape[:2]
    cache = layer.make_cache(B, T, x.device)
    assert isinstance(cache, MSAPagedLayerCache)
    outs, sels = [layer(x[:, :T0], cache=cache)], []
    with ops.track_implementations() as used:
        for t in range(T0, T):
            outs.append(layer(x[:, t:t + 1], cache=cache))
            sels.append(layer.last_selection.clone())
    assert used.get("msa_decode") == "triton"
    return torch.cat(outs, dim=1).float(), sels


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_paged_triton_decode_equals_full_forward(dtype):
    dev = _device()
    torch.manual_seed(0)
    layer = create_attention(CFG).to(dev, dtype).eval()
    x = torch.randn(2, 76, 64, device=dev, dtype=dtype)
    with torch.no_grad():
        full = layer(x).float()
        got, _ = _decode(layer, x, 70)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (got - full).norm() / full.norm() < tol


@pytest.mark.gpu
def test_fp8_index_keys_change_only_near_tied_selections():
    torch.manual_seed(0)
    layer = create_attention(CFG).cuda().to(torch.bfloat16).eval()
    fp8 = create_attention({**CFG, "decode_index_dtype": "fp8"}).cuda().to(torch.bfloat16).eval()
    fp8.load_state_dict(layer.state_dict())
    x = torch.randn(2, 100, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref, ref_sel = _decode(layer, x, 70)
        got, got_sel = _decode(fp8, x, 70)
    same = overlap = 0
    for a, b in zip(ref_sel, got_sel):
        for row_a, row_b in zip(a.flatten(0, -2).tolist(), b.flatten(0, -2).tolist()):
            overlap += len(set(row_a) & set(row_b)) / len(row_a)
            same += 1
    assert overlap / same >= 0.9  # top-k overlap against model-dtype index keys
    steps_equal = [i for i, (a, b) in enumerate(zip(ref_sel, got_sel)) if torch.equal(a, b)]
    assert steps_equal, "fp8 index keys changed every step's selection"
    for i in steps_equal:  # identical selections: identical attention up to bf16 rounding
        torch.testing.assert_close(got[:, 70 + i], ref[:, 70 + i], atol=3e-2, rtol=3e-2)


def test_decode_backend_triton_refuses_unsupported_shapes():
    layer = create_attention({**CFG, "head_dim": 24, "d_model": 96})
    with pytest.raises(ValueError, match="powers of two"):
        layer.make_cache(1, 64, "cpu")


def test_fp8_index_keys_need_the_paged_cache():
    layer = create_attention({**CFG, "decode_backend": "reference", "decode_index_dtype": "fp8"})
    with pytest.raises(ValueError, match="fp8"):
        layer.make_cache(1, 64, "cpu")


def test_decode_backend_reference_keeps_the_contiguous_cache():
    from sparsezoo import LayerCache

    layer = create_attention({**CFG, "decode_backend": "reference"})
    assert isinstance(layer.make_cache(1, 64, "cpu"), LayerCache)


def test_chunked_prefill_through_the_paged_cache():
    dev = _device()
    torch.manual_seed(1)
    layer = create_attention(CFG).to(dev, torch.float32).eval()
    x = torch.randn(1, 90, 64, device=dev)
    with torch.no_grad():
        full = layer(x)
        cache = layer.make_cache(1, 90, dev)
        got = torch.cat([layer(x[:, :40], cache=cache), layer(x[:, 40:75], cache=cache),
                         layer(x[:, 75:76], cache=cache), layer(x[:, 76:], cache=cache)], dim=1)
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)
