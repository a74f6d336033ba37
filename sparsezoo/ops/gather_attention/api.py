"""gather_attention: validation and dispatch."""

from __future__ import annotations

import torch

from .. import checks
from ..dispatch import Op, Request, needs_grad

OP = Op("gather_attention", __package__, ("triton", "flex", "reference"))


def gather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, *, scale: float,
                     backend: str = "auto", return_lse: bool = False, k_extra: torch.Tensor | None = None,
                     v_extra: torch.Tensor | None = None, window: int = 0, sink: torch.Tensor | None = None,
                     extra_ids: bool = False):
    """Exact softmax attention of q [B, Hq, T, D] over the keys idx [B, Hs, T, K] names in k, v
    [B, Hkv, N, D]; Hs is 1 (one list for every KV head) or Hkv. -1 is an empty slot; ids outside
    [0, N) are never read (treated as empty). Causality is the selection's job. A query with no key
    gets output 0 (and LSE -inf). Memory is bounded by chunk x K x D: no T x N tensor.

    A second key pool k_extra, v_extra [B, Hkv, N2, D] (CSA's compressed entries beside the raw
    tokens) acts as if concatenated after k, v without the copy: ids in [N, N + N2) read
    k_extra/v_extra[:, :, id - N]. Differentiable w.r.t. every key tensor. extra_ids=True: idx names rows
    of the second pool instead (ids in [0, N2), read as N + id; CSA's selected entries beside its window),
    so a caller need not rewrite its selection (the Triton kernels add N as they load the ids).

    window > 0: each query also attends to its last `window` tokens of k, v (positions p - window + 1
    .. p, where query t sits at p = N - T + t), as if they were listed before its ids (CSA's sliding
    window; the Triton kernel computes them instead of reading a list). idx then names the other keys.

    sink [Hq] (optional): a learned logit per query head in every query's softmax, with a zero value
    (DeepSeek-V4's attention sink): p_j = exp(s_j) / (exp(sink) + sum_i exp(s_i)), so the output shrinks
    by sigmoid(lse - sink) and the LSE becomes logaddexp(lse, sink). Differentiable w.r.t. sink too.
    v may be k and v_extra may be k_extra (one shared K = V pool, as V4's MQA entries)."""
    checks.check_keys(q, k, v)
    Hkv, N = k.shape[1], k.shape[2]
    _check_extra(k, k_extra, v_extra)
    if extra_ids and k_extra is None:
        raise ValueError("extra_ids=True names rows of the second pool: pass k_extra and v_extra")
    if idx.dim() != 4 or idx.shape[0] != q.shape[0] or idx.shape[2] != q.shape[2] or idx.shape[1] not in (1, Hkv):
        raise ValueError(f"idx must be [B={q.shape[0]}, Hs=1 or {Hkv}, T={q.shape[2]}, K], got {tuple(idx.shape)}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx must be int32 (or int64), got {idx.dtype}")
    checks.check_non_negative_int("window", window)
    if window and q.shape[2] > N:
        raise ValueError(f"a window needs the {q.shape[2]} queries to be the last of the {N} tokens of k")
    _check_sink(q, sink)
    req = Request.of(q, needs_grad(q, k, v, k_extra, v_extra, sink), group=q.shape[1] // Hkv,
                     head_dim=q.shape[3], return_lse=return_lse, sink=sink is not None)
    return OP.run(backend, req, q, k, v, idx, scale, return_lse, k_extra=k_extra, v_extra=v_extra, window=window,
                  sink=sink, extra_ids=extra_ids)


def _check_sink(q: torch.Tensor, sink: torch.Tensor | None) -> None:
    if sink is None:
        return
    if not isinstance(sink, torch.Tensor) or not sink.is_floating_point() or tuple(sink.shape) != (q.shape[1],):
        got = tuple(sink.shape) if isinstance(sink, torch.Tensor) else type(sink).__name__
        raise ValueError(f"sink must be a float tensor [Hq={q.shape[1]}] (one logit per query head), got {got}")
    if sink.device != q.device:
        raise ValueError(f"sink must be on q's device {q.device}, got {sink.device}")


def explicit_keys(idx, k, v, k_extra, v_extra, window: int, extra_ids: bool = False):
    """(idx, k, v) with ids outside both pools dropped (-1), ids of the second pool shifted past the first
    (extra_ids), the window listed in idx and the second pool concatenated after k, v: the plain form the
    reference and flex paths read (the Triton kernel does all of it itself, without copies or extra launches)."""
    N2 = 0 if k_extra is None else k_extra.shape[2]
    if extra_ids:
        idx = checks.drop_out_of_range(idx, N2)
        idx = torch.where(idx >= 0, idx + k.shape[2], -1)
    idx = checks.drop_out_of_range(idx, k.shape[2] + N2)
    if window:
        idx = window_ids(idx, window, k.shape[2])
    if k_extra is not None:
        k, v = torch.cat([k, k_extra], dim=2), torch.cat([v, v_extra], dim=2)
    return idx, k, v


def window_ids(idx: torch.Tensor, window: int, N: int) -> torch.Tensor:
    """idx [B, Hs, T, K] -> int32 [B, Hs, T, window + K]: each query's last `window` token ids (query t at
    position N - T + t; -1 before token 0), then its own ids. Built in int32 in place."""
    B, Hs, T, K = idx.shape
    out = torch.empty((B, Hs, T, window + K), dtype=torch.int32, device=idx.device)
    pos = torch.arange(N - T, N, device=idx.device, dtype=torch.int32)
    win = pos[:, None] - (window - 1) + torch.arange(window, device=idx.device, dtype=torch.int32)[None, :]
    out[..., :window] = torch.where(win >= 0, win, -1)
    out[..., window:] = idx
    return out


def _check_extra(k: torch.Tensor, k_extra: torch.Tensor | None, v_extra: torch.Tensor | None) -> int:
    """N2, the second pool's rows (0 without one), after checking it matches k's batch, heads, dim, dtype."""
    if (k_extra is None) != (v_extra is None):
        raise ValueError("k_extra and v_extra go together: give both or neither")
    if k_extra is None:
        return 0
    for name, t in (("k_extra", k_extra), ("v_extra", v_extra)):
        checks.check_rank(name, t, 4, "[B, Hkv, N2, D]")
        checks.check_same("k", k, name, t)
    if k_extra.shape != v_extra.shape:
        raise ValueError(f"k_extra and v_extra must have one shape, got {tuple(k_extra.shape)} and "
                         f"{tuple(v_extra.shape)}")
    B, Hkv, _, D = k.shape
    if k_extra.shape[0] != B or k_extra.shape[1] != Hkv or k_extra.shape[3] != D:
        raise ValueError(f"k_extra must be [B={B}, Hkv={Hkv}, N2, D={D}] like k, got {tuple(k_extra.shape)}")
    return k_extra.shape[2]
