"""Input validation shared by every op. Each failure names what was expected."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def check_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        _fail(f"{name} must have rank {rank} ({layout}), got shape {tuple(t.shape)}")


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        _fail(f"{name_a} and {name_b} must share a dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        _fail(f"{name_a} and {name_b} must be on one device, got {a.device} and {b.device}")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        _fail(f"{name} must be one of {[str(d) for d in FLOAT_DTYPES]}, got {t.dtype}")


def check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(f"{name} must be an integer >= 1, got {value!r}")


def check_non_negative_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        _fail(f"{name} must be an integer >= 0, got {value!r}")


def check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        _fail(f"{name} holds NaN or Inf values")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """q [B, Hq, T, D], k/v [B, Hkv, S, D]; queries are the last T of S positions."""
    check_rank("q", q, 4, "[B, Hq, T, D]")
    check_rank("k", k, 4, "[B, Hkv, S, D]")
    check_rank("v", v, 4, "[B, Hkv, S, D]")
    check_float("q", q)
    check_same("q", q, "k", k)
    check_same("q", q, "v", v)
    B, Hq, T, D = q.shape
    if k.shape != v.shape:
        _fail(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Hkv, S, Dk = k.shape
    if Bk != B:
        _fail(f"q and k must share the batch size, got {B} and {Bk}")
    if Dk != D:
        _fail(f"q and k must share the head dim, got {D} and {Dk}")
    if Hkv < 1 or Hq % Hkv != 0:
        _fail(f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    if T > S:
        _fail(f"queries are the last T of S positions, so T ({T}) must be <= S ({S})")
    if T < 1:
        _fail("q must hold at least one query (T >= 1)")
    return B, Hq, Hkv, T, S, D


def check_block_idx(block_idx: torch.Tensor, B: int, heads: int | tuple[int, ...], T: int, S: int,
                    block_size: int, values: bool = False) -> int:
    """Selections are int32 [B, H, T, k] (H one of `heads`): valid ids first, then -1 padding."""
    check_rank("block_idx", block_idx, 4, "[B, H, T, k]")
    if block_idx.dtype not in (torch.int32, torch.int64):
        _fail(f"block_idx must be int32 (or int64), got {block_idx.dtype}")
    heads = (heads,) if isinstance(heads, int) else tuple(dict.fromkeys(heads))
    B_, H, T_ = block_idx.shape[:3]
    if (B_, T_) != (B, T) or H not in heads:
        names = " or ".join(str(h) for h in heads)
        _fail(f"block_idx must be [B={B}, H={names}, T={T}, k], got {tuple(block_idx.shape)}")
    K = block_idx.shape[-1]
    if K < 1:
        _fail("block_idx must hold at least one block per query (k >= 1)")
    if values:
        check_selection_values(block_idx, T, S, block_size)
    return K


def drop_out_of_range(idx: torch.Tensor, n: int) -> torch.Tensor:
    """int32 ids with every id outside [0, n) replaced by -1, so no kernel ever acts on one (int64 ids
    that would wrap in int32 included). No host sync."""
    bad = (idx < 0) | (idx >= n)
    return torch.where(bad, -1, idx).to(torch.int32)


def check_selection_values(block_idx: torch.Tensor, T: int, S: int, block_size: int) -> None:
    """Valid ids form a prefix, are unique and causal; padding is -1."""
    idx = block_idx.long()
    valid = idx >= 0
    if (idx < -1).any():
        _fail("block_idx holds ids below -1; padding must be -1")
    if (valid[..., 1:] & ~valid[..., :-1]).any():
        _fail("block_idx valid ids must form a prefix, with -1 padding after them")
    pos = (S - T) + torch.arange(T, device=idx.device)
    local = (pos // block_size).view(1, 1, T, 1)
    if (valid & (idx > local)).any():
        _fail("block_idx selects a block after the query's own (local) block: not causal")
    srt = torch.sort(torch.where(valid, idx, -1 - torch.arange(idx.shape[-1], device=idx.device)), dim=-1).values
    if (srt[..., 1:] == srt[..., :-1]).any():
        _fail("block_idx holds a repeated block id within one query's selection")


def check_indexer(q_i: torch.Tensor, w: torch.Tensor, k_i: torch.Tensor, key_end: torch.Tensor) -> None:
    """Lightning-indexer inputs: q_i [B, Hs, T, J, D_i], w [B, Hs, T, J], k_i [B, N, D_i], key_end [N]."""
    for name, t in (("q_i", q_i), ("w", w), ("k_i", k_i), ("key_end", key_end)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q_i.dim() != 5 or w.shape != q_i.shape[:4] or k_i.dim() != 3 or k_i.shape[2] != q_i.shape[4] \
            or k_i.shape[0] != q_i.shape[0] or key_end.shape != (k_i.shape[1],):
        _fail(f"indexer inputs must be q_i [B, Hs, T, J, D_i], w [B, Hs, T, J], k_i [B, N, D_i], "
              f"key_end [N]; got {tuple(q_i.shape)}, {tuple(w.shape)}, {tuple(k_i.shape)}, {tuple(key_end.shape)}")
    check_float("q_i", q_i)
    check_same("q_i", q_i, "k_i", k_i)
    check_same("q_i", q_i, "w", w)
    if key_end.dtype.is_floating_point or key_end.dtype == torch.bool:
        _fail(f"key_end must hold integer positions, got {key_end.dtype}")


def check_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q [B, Hq, T, D]; k, v [B, Hkv, N, D] with any N (compressed or gathered keys)."""
    for name, t, layout in (("q", q, "[B, Hq, T, D]"), ("k", k, "[B, Hkv, N, D]"), ("v", v, "[B, Hkv, N, D]")):
        check_rank(name, t, 4, layout)
    check_float("q", q)
    check_same("q", q, "k", k)
    check_same("q", q, "v", v)
    if k.shape != v.shape:
        _fail(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        _fail(f"k must be [B={q.shape[0]}, Hkv dividing Hq={q.shape[1]}, N, D={q.shape[3]}], got {tuple(k.shape)}")

