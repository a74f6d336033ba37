"""Dense attention through torch's scaled_dot_product_attention (flash, cuDNN, efficient or math).

Non-finite values (docs/ops.md): SDPA cannot be changed inside, so a pre-pass zeroes the non-finite
rows of q, k, v and the rows that attend to one are set to NaN afterwards (sparsezoo.ops.nonfinite).
It costs one read of q, k, v, a zeroed copy of them, and O(S) for the per-key-head cumulative counts:
negligible next to a prefill's O(T*S*D) attention. For one new token without gradients (decode) every
key is visible, so k and v are only read (no copy), about the attention's own K/V traffic once more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import needs_grad
from ..nonfinite import clean_qkv, finish, rows_seeing_key_ranges


def supports(req) -> str | None:
    if req.get("return_lse"):
        return "sdpa returns no LSE; use 'flex' or 'reference'"
    return None


def run(q, k, v, scale: float, return_lse: bool = False):
    Hq, T, S = q.shape[1], q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    q, k, v, q_bad, kv_bad = clean_qkv(q, k, v, zero_kv=T > 1 or needs_grad(q, k, v))
    if T == S:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        from torch.nn.attention.bias import causal_lower_right

        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, S), scale=scale,
                                             enable_gqa=gqa)
    pos = torch.arange(S - T, S, device=q.device)
    return finish(out, q_bad | rows_seeing_key_ranges(kv_bad, torch.zeros_like(pos), pos + 1, Hq))
