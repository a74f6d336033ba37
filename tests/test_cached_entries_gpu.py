"""NSA and CSA keep compressed entries in the decode cache; on a GPU their cached steps run the fast paths
(`auto`). A chunked prefill followed by decode steps must equal one fp32 reference prefill of the same
weights, and the ops that ran are recorded (no silent reference fallback on CUDA).

Both layers run in fp32 (the fast kernels take IEEE fp32 dots), so outputs differ by rounding only, except
where a near-tie in a selection score flips: a chunk's projections are matmuls of another shape than the
one-prefill's, and a ~1e-7 difference can swap one selected entry of one query. So a row counts as
matching at 1e-4 of the output's largest value, and at most 1% of rows may miss it (a wrong cache breaks
most rows); no row may be off by more than 10%.
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
    return ref.cuda().float().eval(), fast.cuda().float().eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_cached_steps_on_fast_paths_equal_one_reference_prefill(name):
    ref, fast = layers(name)
    T = T_PREFILL + N_DECODE
    x = torch.randn(2, T, DIMS["d_model"], device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    want = ref(x)
    cache = LayerCache(2, T)
    with ops.track_implementations() as used:
        steps, start = [], 0
        for n in CHUNKS:
            steps.append(fast(x[:, start : start + n], cache=cache))
            start += n
        for t in range(start, T):
            steps.append(fast(x[:, t : t + 1], cache=cache))
    got = torch.cat(steps, 1)
    row_err = (got - want).abs().amax(-1) / want.abs().max()  # [B, T]
    missed = (row_err > 1e-4).float().mean().item()
    per_call = [float(e.max()) for e in row_err.split([*CHUNKS, *[1] * N_DECODE], 1)]
    assert missed <= 0.01 and row_err.max() < 0.1, f"{name}: {missed:.2%} of rows off; worst per call {per_call}"
    slow = {op: impl for op, impl in used.items() if impl == "reference"}
    assert not slow, f"{name} ran reference ops on CUDA: {slow}"
