"""Gather attention through FlexAttention: each query becomes its own batch row against its gathered
keys, chunked over queries (the gathered K/V copies are the chunk's memory). Non-finite values
(docs/ops.md): the gathered rows are checked and zeroed (sparsezoo.ops.nonfinite), so the cost scales
with the copies, not with the pools. A sink is one more gathered slot with zero key and value whose score
a score_mod replaces by the head's sink logit."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from ..common import CHUNK_ELEMENTS, expand_selection, gather_rows
from ..flex_utils import run_flex
from .api import explicit_keys
from ..nonfinite import finish, nonfinite_rows, zero_rows


def supports(req) -> str | None:
    if req.get("return_lse"):
        return "the flex gather path returns no LSE; use 'triton' or 'reference'"
    return None


def gather_attention_flex(q, k, v, idx, scale: float, return_lse: bool = False, k_extra=None, v_extra=None,
                          window: int = 0, sink=None, extra_ids: bool = False):
    """Each query becomes its own batch row: q [B*Tc, Hq, 1, D] against its gathered keys
    [B*Tc, Hkv, K, D]; a mask_mod drops the -1 slots. Chunked over queries. A second pool k_extra,
    v_extra is concatenated after k, v (the gathered rows are copied anyway)."""
    idx, k, v = explicit_keys(idx, k, v, k_extra, v_extra, window, extra_ids)
    B, Hq, T, D = q.shape
    Hkv, K = k.shape[1], idx.shape[-1]
    idx = expand_selection(idx, Hkv)
    G = Hq // Hkv
    slots = K + (sink is not None)  # the sink's slot comes last
    score_mod = None
    if sink is not None:
        sink32 = sink.float()

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(kv_idx == K, sink32[h], score)

    q_bad = nonfinite_rows(q)
    q = zero_rows(q, q_bad)
    tile = 128
    n_kv = -(-slots // tile)
    outs, seen = [], []
    step = max(1, min(T, CHUNK_ELEMENTS // max(B * Hkv * K * D, 1)))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        R = B * (t1 - t0)
        sel = idx[:, :, t0:t1].long()
        ok = (sel >= 0).permute(0, 2, 1, 3).reshape(R, Hkv, K)
        fold = lambda x: x.permute(0, 2, 1, 3, 4).reshape(R, Hkv, K, D)
        kg, vg = fold(gather_rows(k, sel.clamp_min(0))), fold(gather_rows(v, sel.clamp_min(0)))
        kv_bad = nonfinite_rows(kg) | nonfinite_rows(vg)  # [R, Hkv, K]
        kg, vg = zero_rows(kg, kv_bad), zero_rows(vg, kv_bad)
        seen.append((kv_bad & ok).any(-1).view(B, t1 - t0, Hkv).transpose(1, 2))
        if sink is not None:  # a zero key and value in the last slot, always allowed
            kg, vg = F.pad(kg, (0, 0, 0, 1)), F.pad(vg, (0, 0, 0, 1))
            ok = F.pad(ok, (0, 1), value=True)
        ok = ok.contiguous()
        qr = q[:, :, t0:t1].permute(0, 2, 1, 3).reshape(R, Hq, 1, D)

        def selected(b, h, q_idx, kv_idx):
            return ok[b, h // G, kv_idx]

        counts = torch.full((R, 1, 1), n_kv, dtype=torch.int32, device=q.device)
        ids = torch.arange(n_kv, dtype=torch.int32, device=q.device).expand(R, 1, 1, n_kv).contiguous()
        mask = BlockMask.from_kv_blocks(counts, ids, BLOCK_SIZE=(tile, tile), mask_mod=selected,
                                        seq_lengths=(1, slots))
        o = run_flex(qr, kg, vg, mask, scale, False, enable_gqa=G > 1, score_mod=score_mod)
        outs.append(o.view(B, t1 - t0, Hq, D).permute(0, 2, 1, 3))
    seen = torch.cat(seen, dim=2).repeat_interleave(G, dim=1)  # [B, Hq, T]
    return finish(torch.cat(outs, dim=2), q_bad | seen)


run = gather_attention_flex
