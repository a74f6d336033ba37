"""DSA ops (variants.md): the lightning indexer, token-level top-k, attention over gathered keys
(reference and FlexAttention), and the indexer's KL loss. CSA reuses them over compressed entries.

Shapes: index queries q_i [B, Hs, T, J, D_i] (Hs selection heads: 1 for a layer-shared selection or
Hkv for one per KV group, J index heads each), per-head weights w [B, Hs, T, J], one shared index
key k_i [B, N, D_i]. Key n "ends" at position key_end[n] (the token itself, or the last token of a
compressed entry) and is visible to a query at position p when key_end[n] <= p.
Index logits: I[t, n] = scale * sum_j w[t, j] * relu(<q_i[t, j], k_i[n]>).
Token selections are int [B, Hs, T, k]: ids into the N keys, -1 padding (any order).
"""

from __future__ import annotations

import torch

from .dispatch import record
from .flex import run_flex
from .nsa import check_keys, needs_grad, resolve_backend
from .reference import upcast_grouped, _CHUNK_ELEMENTS, _chunk_len, _compute_dtype, gather_rows, masked_softmax_lse, query_positions


def index_logits(q_i: torch.Tensor, w: torch.Tensor, k_i: torch.Tensor, scale: float) -> torch.Tensor:
    """q_i [B, Hs, Tc, J, D_i], w [B, Hs, Tc, J], k_i [B, N, D_i] -> [B, Hs, Tc, N]."""
    dots = torch.einsum("bhtjd,bnd->bhtjn", q_i, k_i)
    return torch.einsum("bhtj,bhtjn->bhtn", w, torch.relu(dots)) * scale


def gathered_index_logits(q_i, w, k_i_rows, scale):
    """As index_logits with per-query keys k_i_rows [B, Hs, Tc, K, D_i] -> [B, Hs, Tc, K]."""
    dots = torch.einsum("bhtjd,bhtkd->bhtjk", q_i, k_i_rows)
    return torch.einsum("bhtj,bhtjk->bhtk", w, torch.relu(dots)) * scale


def _check_indexer(q_i, w, k_i, key_end):
    if q_i.dim() != 5 or w.shape != q_i.shape[:4] or k_i.dim() != 3 or k_i.shape[2] != q_i.shape[4] \
            or k_i.shape[0] != q_i.shape[0] or key_end.shape != (k_i.shape[1],):
        raise ValueError(f"indexer inputs must be q_i [B, Hs, T, J, D_i], w [B, Hs, T, J], k_i [B, N, D_i], "
                         f"key_end [N]; got {tuple(q_i.shape)}, {tuple(w.shape)}, {tuple(k_i.shape)}, "
                         f"{tuple(key_end.shape)}")


@torch.no_grad()
def indexer_topk(q_i, w, k_i, key_end: torch.Tensor, *, S: int, topk: int, scale: float) -> torch.Tensor:
    """Top-k visible keys per query by index logit (ties to the smaller id) -> int32 [B, Hs, T, topk],
    best first, -1 padding when fewer than topk keys are visible. Chunked over queries."""
    _check_indexer(q_i, w, k_i, key_end)
    B, Hs, T, J, _ = q_i.shape
    N = k_i.shape[1]
    dt = _compute_dtype(q_i)
    qf, wf, kf = q_i.to(dt), w.to(dt), k_i.to(dt)
    out = torch.empty((B, Hs, T, topk), dtype=torch.int32, device=q_i.device)
    n = min(topk, N)
    step = _chunk_len(B * Hs * J * max(N, 1), T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        pos = query_positions(T, S, t0, t1, q_i.device)
        ok = key_end[None, :] <= pos[:, None]  # [Tc, N]
        z = index_logits(qf[:, :, t0:t1], wf[:, :, t0:t1], kf, scale).masked_fill(~ok, float("-inf"))
        order = torch.sort(z, dim=-1, descending=True, stable=True).indices[..., :n]
        keep = torch.arange(n, device=z.device)[None, :] < ok.sum(-1)[:, None]
        out[:, :, t0:t1] = -1
        out[:, :, t0:t1, :n] = torch.where(keep, order, -1).to(torch.int32)
    record("indexer_topk", "reference")
    return out


def expand_selection(idx: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """[B, Hs, T, k] with Hs in (1, Hkv) -> [B, Hkv, T, k]."""
    if idx.shape[1] not in (1, n_kv_heads):
        raise ValueError(f"selection heads must be 1 or Hkv={n_kv_heads}, got {idx.shape[1]}")
    return idx.expand(idx.shape[0], n_kv_heads, *idx.shape[2:])


# -- attention over gathered keys ----------------------------------------------------------------
def gather_attention(q, k, v, idx: torch.Tensor, *, scale: float, backend: str = "auto") -> torch.Tensor:
    """Exact softmax attention of q [B, Hq, T, D] over the keys idx [B, Hs, T, K] names in k, v
    [B, Hkv, N, D] (-1 = no key). Causality is the selection's job. Memory is bounded by
    chunk x K x D: no T x N tensor. A query with no key gets output 0."""
    check_keys(q, k, v)
    if idx.dim() != 4 or idx.shape[0] != q.shape[0] or idx.shape[2] != q.shape[2]:
        raise ValueError(f"idx must be [B={q.shape[0]}, Hs, T={q.shape[2]}, K], got {tuple(idx.shape)}")
    idx = expand_selection(idx, k.shape[1])
    impl = resolve_backend("gather_attention", backend, q.device, needs_grad(q, k, v))
    if impl == "flex":
        out = gather_attention_flex(q, k, v, idx, scale)
    else:
        out = gather_attention_reference(q, k, v, idx, scale)
    record("gather_attention", impl)
    return out


def gather_attention_reference(q, k, v, idx, scale: float):
    B, Hq, T, D = q.shape
    Hkv, K = k.shape[1], idx.shape[-1]
    G = Hq // Hkv
    qg, kf, vf = upcast_grouped(q, k, v)
    outs = []
    step = _chunk_len(B * Hkv * K * max(D, G), T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        sel = idx[:, :, t0:t1].long()
        tok, ok = sel.clamp_min(0), sel >= 0
        s = torch.einsum("bhgtd,bhtnd->bhgtn", qg[:, :, :, t0:t1], gather_rows(kf, tok)) * scale
        p, _ = masked_softmax_lse(s, ok[:, :, None])
        outs.append(torch.einsum("bhgtn,bhtnd->bhgtd", p, gather_rows(vf, tok)))
    return torch.cat(outs, dim=3).reshape(B, Hq, T, D).to(q.dtype)


def gather_attention_flex(q, k, v, idx, scale: float):
    """Each query becomes its own batch row: q [B*Tc, Hq, 1, D] against its gathered keys
    [B*Tc, Hkv, K, D]; a mask_mod drops the -1 slots. Chunked over queries."""
    from torch.nn.attention.flex_attention import BlockMask

    B, Hq, T, D = q.shape
    Hkv, K = k.shape[1], idx.shape[-1]
    G = Hq // Hkv
    tile = 128
    n_kv = -(-K // tile)
    outs = []
    step = max(1, min(T, _CHUNK_ELEMENTS // max(B * Hkv * K * D, 1)))
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        R = B * (t1 - t0)
        sel = idx[:, :, t0:t1].long()
        ok = (sel >= 0).permute(0, 2, 1, 3).reshape(R, Hkv, K).contiguous()
        fold = lambda x: x.permute(0, 2, 1, 3, 4).reshape(R, Hkv, K, D)
        kg, vg = fold(gather_rows(k, sel.clamp_min(0))), fold(gather_rows(v, sel.clamp_min(0)))
        qr = q[:, :, t0:t1].permute(0, 2, 1, 3).reshape(R, Hq, 1, D)

        def selected(b, h, q_idx, kv_idx):
            return ok[b, h // G, kv_idx]

        counts = torch.full((R, 1, 1), n_kv, dtype=torch.int32, device=q.device)
        ids = torch.arange(n_kv, dtype=torch.int32, device=q.device).expand(R, 1, 1, n_kv).contiguous()
        mask = BlockMask.from_kv_blocks(counts, ids, BLOCK_SIZE=(tile, tile), mask_mod=selected,
                                        seq_lengths=(1, K))
        o = run_flex(qr, kg, vg, mask, scale, False, enable_gqa=G > 1)
        outs.append(o.view(B, t1 - t0, Hq, D).permute(0, 2, 1, 3))
    return torch.cat(outs, dim=2)


# -- the indexer's KL loss ------------------------------------------------------------------------
def index_kl(q, k, q_i, w, k_i, key_end: torch.Tensor, idx: torch.Tensor | None, *, S: int, scale: float,
             index_scale: float, coeff: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """DSA's indexer loss: coeff * mean over (b, selection head, t) of KL(P || Q) over a key set M.

    P (teacher, detached): the main attention of the query heads that share the selection head,
    summed over those heads and L1-normalised. Q (student): softmax of the index logits / temperature
    over M. idx=None: M = every visible key (dense warm-up); else M = the selected keys (sparse
    training). q, k [B, Hq|Hkv, T|N, D] are the main queries and keys (k indexed like k_i).
    Only q_i, w, k_i receive gradients.
    """
    _check_indexer(q_i, w, k_i, key_end)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, Hq, T, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    Hs, J = q_i.shape[1], q_i.shape[3]
    if Hs not in (1, Hkv):
        raise ValueError(f"selection heads must be 1 or Hkv={Hkv}, got {Hs}")
    dt = _compute_dtype(q_i)
    qh = q.detach().to(dt).view(B, Hs, Hq // Hs, T, D)
    kf = k.detach().to(dt)
    qi, wf, ki = q_i.to(dt), w.to(dt), k_i.to(dt)
    K = N if idx is None else idx.shape[-1]
    total = qi.new_zeros(())
    step = _chunk_len(B * Hq * K * max(D, J), T)
    for t0 in range(0, T, step):
        t1 = min(T, t0 + step)
        pos = query_positions(T, S, t0, t1, q.device)
        if idx is None:
            tok = torch.arange(N, device=q.device).expand(B, Hs, t1 - t0, N)
            ok = (key_end[None, :] <= pos[:, None]).expand(B, Hs, t1 - t0, N)
        else:
            sel = idx[:, :, t0:t1].long()
            tok, ok = sel.clamp_min(0), sel >= 0
        with torch.no_grad():
            k_rows = gather_rows(kf, expand_selection(tok, Hkv))  # [B, Hkv, Tc, K, D]
            s = teacher_scores(qh[:, :, :, t0:t1], k_rows, Hs) * scale
            p = masked_softmax_lse(s, ok[:, :, None])[0].sum(2)
            teacher = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(dt).tiny)
        z = gathered_index_logits(qi[:, :, t0:t1], wf[:, :, t0:t1], gather_rows(ki, tok), index_scale / temperature)
        log_q = torch.log_softmax(z.masked_fill(~ok, float("-inf")), dim=-1)
        log_q = torch.where(ok, log_q, torch.zeros_like(log_q))
        total = total + (torch.xlogy(teacher, teacher) - teacher * log_q).sum()
    record("index_kl", "reference")
    return coeff * total / (B * Hs * T)


def teacher_scores(qh: torch.Tensor, k_rows: torch.Tensor, Hs: int) -> torch.Tensor:
    """qh [B, Hs, Gs, Tc, D] (query heads grouped by selection head), k_rows [B, Hkv, Tc, K, D] ->
    scores [B, Hs, Gs, Tc, K], each query head against its own KV head's rows."""
    B, _, Gs, Tc, D = qh.shape
    Hkv = k_rows.shape[1]
    if Hs == Hkv:
        return torch.einsum("bhgtd,bhtkd->bhgtk", qh, k_rows)
    G = Gs // Hkv  # Hs == 1: the Hq heads are Hkv groups of G
    s = torch.einsum("bhgtd,bhtkd->bhgtk", qh.view(B, Hkv, G, Tc, D), k_rows)
    return s.reshape(B, 1, Gs, Tc, -1)
