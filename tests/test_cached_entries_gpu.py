"""NSA and CSA keep compressed entries in the decode cache; on a GPU their cached steps run the fast paths
(`auto`). A chunked prefill followed by decode steps must equal one fp32 reference prefill of the same
weights, and the ops that ran are recorded (no silent reference fallback on CUDA).

Tolerance: bf16 layers against an fp32 reference, errors measured against the output's largest value
(2.5e-2), since bf16 rounding of q/k moves scores by ~1e-2 relative.
"""

from __future__ import annotations

import pytest
import torch

import sparsezoo
from sparsezoo import LayerCache, ops

pytestmark = pytest.mark.gpu

DIMS = dict(d_model=512, n_heads=8, n_kv_heads=2, head_dim=64)
CONFIGS = {
    "nsa": dict(variant="nsa", cmp_block=32, cmp_stride=16, sel_block=64, sel_topk=4, window=128),
    "csa": dict(variant="csa", compress_ratio=4, topk=64, window=128),
}
T_PREFILL, CHUNKS, N_DECODE = 1200, (700, 500), 6


def layers(name: str):
    torch.manual_seed(0)
    ref = sparsezoo.create_attention(CONFIGS[name], backend="reference", select_backend="reference", **DIMS)
    fast = sparsezoo.create_attention(CONFIGS[name], backend="auto", select_backend="auto", **DIMS)
    fast.load_state_dict(ref.state_dict())
    return ref.cuda().float().eval(), fast.cuda().to(torch.bfloat16).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_cached_steps_on_fast_paths_equal_one_reference_prefill(name):
    ref, fast = layers(name)
    T = T_PREFILL + N_DECODE
    x = torch.randn(2, T, DIMS["d_model"], device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    want = ref(x)
    cache = LayerCache(2, T)
    xb = x.to(torch.bfloat16)
    with ops.track_implementations() as used:
        steps, start = [], 0
        for n in CHUNKS:
            steps.append(fast(xb[:, start : start + n], cache=cache))
            start += n
        for t in range(start, T):
            steps.append(fast(xb[:, t : t + 1], cache=cache))
    got = torch.cat(steps, 1).float()
    err = (got - want).abs().max() / want.abs().max()
    assert err < 2.5e-2, f"{name}: relative max error {float(err):.3g}"
    slow = {op: impl for op, impl in used.items() if impl == "reference"}
    assert not slow, f"{name} ran reference ops on CUDA: {slow}"
