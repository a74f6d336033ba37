"""Dense attention through torch's scaled_dot_product_attention (flash, cuDNN, efficient or math)."""

from __future__ import annotations

import torch.nn.functional as F


def supports(req) -> str | None:
    if req.get("return_lse"):
        return "sdpa returns no LSE; use 'flex' or 'reference'"
    return None


def run(q, k, v, scale: float, return_lse: bool = False):
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, S), scale=scale,
                                          enable_gqa=gqa)
