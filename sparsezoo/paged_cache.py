"""Paged KV + index-key cache and the MSA decode step (plan once per step, run once per layer).

Layout (one layer):
- K, V: [num_pages, Hkv, page, D] in the model dtype.
- Index keys (MSA's one shared index-key head): [num_pages, page, D_i], in the model dtype or fp8
  e4m3 with an fp32 scale per page ([num_pages]) or per token ([num_pages, page]).
- A request owns a list of pages; its page table row maps logical block j (tokens j*page ...
  j*page + page - 1) to a physical page. Page = MSA block (128 tokens by default).
- The storage holds one scratch page beyond `num_pages` (row num_pages, which is also row -1): an
  appended token without a valid page (-1 padding, a length past the table) is written there, never
  into a page it does not own, without a host sync. `check=True` / `plan` raise on such input instead.

Decode step (docs/decode.md; the selection rule: docs/msa.md):
    dec = MSADecoder(num_q_heads=64, num_kv_heads=4, head_dim=128, index_dim=128)
    cache.append(page_table, seq_lens, k_new, v_new, k_idx_new)   # per layer
    dec.plan(seq_lens, page_table, q_len)                          # once per step
    out = dec.run(q, q_idx, cache)                                 # per layer
`run` launches two Triton kernel pairs (indexer, sparse attention) on static buffers, without host
syncs, so a whole decode step can be captured in a CUDA graph and replayed after each `plan`.
"""

from __future__ import annotations

import math
import numbers

import torch

from sparsezoo.ops.dispatch import record

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCALE_MODES = ("page", "token")


def _err(msg: str):
    raise ValueError(msg)


def pages_needed(n_tokens: int, page_size: int) -> int:
    return math.ceil(n_tokens / page_size)


class PageAllocator:
    """Free-list of physical pages and a page list per request id."""

    def __init__(self, num_pages: int, page_size: int = 128):
        for name, val in (("num_pages", num_pages), ("page_size", page_size)):
            if not isinstance(val, numbers.Integral) or val < 1:
                _err(f"{name} must be an integer >= 1, got {val!r}")
        self.num_pages, self.page_size = int(num_pages), int(page_size)
        self._free = list(range(num_pages - 1, -1, -1))
        self.pages: dict[object, list[int]] = {}
        self.lengths: dict[object, int] = {}

    def reserve(self, seq_id, n_tokens: int) -> list[int]:
        """Make room for `n_tokens` more tokens of `seq_id`; returns its page list. Nothing changes
        when it raises."""
        if not isinstance(n_tokens, numbers.Integral) or n_tokens < 0:
            _err(f"n_tokens must be an integer >= 0, got {n_tokens!r}")
        pages = self.pages.get(seq_id, [])
        new_len = self.lengths.get(seq_id, 0) + n_tokens
        need = pages_needed(new_len, self.page_size) - len(pages)
        if need > len(self._free):
            _err(f"out of pages: request {seq_id!r} needs {need} more, {len(self._free)} free "
                 f"of {self.num_pages}")
        pages.extend(self._free.pop() for _ in range(need))
        self.pages[seq_id], self.lengths[seq_id] = pages, new_len
        return pages

    def free(self, seq_id) -> None:
        if seq_id not in self.pages:
            _err(f"unknown request {seq_id!r}; known: {list(self.pages)}")
        self._free.extend(reversed(self.pages.pop(seq_id)))
        self.lengths.pop(seq_id)

    def page_table(self, seq_ids, width: int | None = None, device=None) -> torch.Tensor:
        """int32 [len(seq_ids), width] page table, padded with -1."""
        rows = [self.pages[i] for i in seq_ids]
        width = max(len(r) for r in rows) if width is None else width
        if any(len(r) > width for r in rows):
            _err(f"page table width {width} is smaller than a request's {max(len(r) for r in rows)} pages")
        table = torch.full((len(rows), width), -1, dtype=torch.int32)
        for i, r in enumerate(rows):
            table[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
        return table.to(device) if device is not None else table

    def seq_lens(self, seq_ids, device=None) -> torch.Tensor:
        return torch.tensor([self.lengths[i] for i in seq_ids], dtype=torch.int32, device=device)


class PagedKVCache:
    """One layer's paged K, V and MSA index-key storage (see the module doc for the layout)."""

    def __init__(self, num_pages: int, num_kv_heads: int, head_dim: int, index_dim: int, *,
                 page_size: int = 128, dtype: torch.dtype = torch.bfloat16,
                 index_dtype: torch.dtype | None = None, index_scale: str | None = None, device=None):
        for name, val in (("num_pages", num_pages), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("index_dim", index_dim), ("page_size", page_size)):
            if not isinstance(val, int) or val < 1:
                _err(f"{name} must be an integer >= 1, got {val!r}")
        if dtype not in KV_DTYPES:
            _err(f"dtype must be one of {[str(d) for d in KV_DTYPES]}, got {dtype}")
        index_dtype = dtype if index_dtype is None else index_dtype
        if index_dtype not in (dtype, FP8):
            _err(f"index_dtype must be the cache dtype ({dtype}) or {FP8}, got {index_dtype}")
        if index_dtype == FP8:
            index_scale = "token" if index_scale is None else index_scale
            if index_scale not in SCALE_MODES:
                _err(f"index_scale must be one of {list(SCALE_MODES)} for fp8 index keys, got {index_scale!r}")
        elif index_scale is not None:
            _err(f"index_scale applies to fp8 index keys only; got {index_scale!r} with {index_dtype}")
        self.num_pages, self.page_size = num_pages, page_size
        self.num_kv_heads, self.head_dim, self.index_dim = num_kv_heads, head_dim, index_dim
        self.dtype, self.index_dtype, self.index_scale_mode = dtype, index_dtype, index_scale
        rows = num_pages + 1  # the last one is the scratch page (module doc)
        shape = (rows, num_kv_heads, page_size, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k_idx = torch.empty((rows, page_size, index_dim), dtype=index_dtype, device=device)
        self.k_idx_scale = None
        if index_scale == "page":
            self.k_idx_scale = torch.ones(rows, dtype=torch.float32, device=device)
        elif index_scale == "token":
            self.k_idx_scale = torch.ones((rows, page_size), dtype=torch.float32, device=device)

    @property
    def device(self) -> torch.device:
        return self.k.device

    # ---- validation ------------------------------------------------------------------------
    def _check_tensor(self, name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype | None = None):
        if not isinstance(t, torch.Tensor):
            _err(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(shape):
            _err(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
        want = self.dtype if dtype is None else dtype
        if t.dtype != want:
            _err(f"{name} must be {want} (the cache dtype), got {t.dtype}")
        if t.device != self.device:
            _err(f"{name} must be on {self.device}, got {t.device}")

    def check_pages(self, pages: torch.Tensor, what: str = "page ids") -> None:
        """Out-of-range or negative page ids raise (a host sync: keep it out of captured code)."""
        if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= self.num_pages):
            _err(f"{what} must lie in [0, {self.num_pages}), got values in "
                 f"[{int(pages.min())}, {int(pages.max())}]")

    # ---- writes ----------------------------------------------------------------------------
    def fill(self, pages, k: torch.Tensor, v: torch.Tensor, k_idx: torch.Tensor) -> None:
        """Prefill-fill one request: k, v [Hkv, S, D] and k_idx [S, D_i] into its pages (in order)."""
        pages = torch.as_tensor(pages, dtype=torch.long, device=self.device).flatten()
        S = k.shape[1] if k.dim() == 3 else -1
        self._check_tensor("k", k, (self.num_kv_heads, S, self.head_dim))
        self._check_tensor("v", v, (self.num_kv_heads, S, self.head_dim))
        self._check_tensor("k_idx", k_idx, (S, self.index_dim))
        n = pages_needed(S, self.page_size)
        if n > pages.numel():
            _err(f"a sequence of {S} tokens needs {n} pages of {self.page_size}, got {pages.numel()}")
        pages = pages[:n]
        self.check_pages(pages)
        if len(set(pages.tolist())) != n:
            _err("fill() got a repeated page id")
        pad = n * self.page_size - S
        P = self.page_size

        def paged(x):  # [H, S, D] -> [n, H, P, D]
            x = torch.nn.functional.pad(x, (0, 0, 0, pad))
            return x.view(x.shape[0], n, P, x.shape[-1]).transpose(0, 1)

        self.k[pages] = paged(k)
        self.v[pages] = paged(v)
        self._store_index(pages, torch.nn.functional.pad(k_idx, (0, 0, 0, pad)).view(n, P, self.index_dim))

    def _store_index(self, pages: torch.Tensor, ki: torch.Tensor) -> None:
        """Whole pages of index keys [n, page, D_i], quantised (with fresh scales) for fp8."""
        if self.index_dtype != FP8:
            self.k_idx[pages] = ki
            return
        kf = ki.float()
        if self.index_scale_mode == "token":
            scale = _fp8_scale(kf.abs().amax(-1))
            self.k_idx_scale[pages] = scale
            self.k_idx[pages] = (kf / scale[..., None]).to(FP8)
        else:
            scale = _fp8_scale(kf.abs().amax((-1, -2)))
            self.k_idx_scale[pages] = scale
            self.k_idx[pages] = (kf / scale[:, None, None]).to(FP8)

    def append(self, page_table: torch.Tensor, seq_lens: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               k_idx: torch.Tensor, check: bool = False) -> None:
        """Write the Q new tokens of each request: k, v [B, Hkv, Q, D], k_idx [B, Q, D_i]; seq_lens
        int32 [B] are the lengths *after* the append (token j sits at len - Q + j). Device-side
        indexing only, so it can sit in a CUDA graph: a token without a valid page goes to the scratch
        page. `check=True` raises on such tokens instead (host sync)."""
        B, _, Q, _ = k.shape if k.dim() == 4 else (-1, 0, -1, 0)
        self._check_tensor("k", k, (B, self.num_kv_heads, Q, self.head_dim))
        self._check_tensor("v", v, (B, self.num_kv_heads, Q, self.head_dim))
        self._check_tensor("k_idx", k_idx, (B, Q, self.index_dim))
        _check_table(page_table, seq_lens, B, self.device)
        pos = seq_lens.long()[:, None] - Q + torch.arange(Q, device=self.device)  # [B, Q]
        blk = pos // self.page_size
        if check:
            if bool((pos < 0).any()):
                _err("seq_lens must be >= the number of appended tokens")
            if int(blk.max()) >= page_table.shape[1]:
                _err(f"a sequence of {int(seq_lens.max())} tokens needs more than the page table's "
                     f"{page_table.shape[1]} pages")
        page = torch.gather(page_table.long(), 1, blk.clamp(0, page_table.shape[1] - 1))  # [B, Q]
        if check:
            self.check_pages(page, "page table entries of the appended tokens")
        owned = (pos >= 0) & (blk < page_table.shape[1]) & (page >= 0) & (page < self.num_pages)
        page = torch.where(owned, page, self.num_pages)  # the scratch page
        slot = pos % self.page_size
        self.k[page, :, slot] = k.transpose(1, 2)
        self.v[page, :, slot] = v.transpose(1, 2)
        if self.index_dtype != FP8:
            self.k_idx[page, slot] = k_idx
        elif self.index_scale_mode == "token":
            kf = k_idx.float()
            scale = _fp8_scale(kf.abs().amax(-1))
            self.k_idx_scale[page, slot] = scale
            self.k_idx[page, slot] = (kf / scale[..., None]).to(FP8)
        else:
            for j in range(Q):  # tokens of one request may share a page: one at a time
                self._append_page_scaled(page[:, j], slot[:, j], k_idx[:, j].float())

    def _append_page_scaled(self, page, slot, x):
        """Per-page scale: grow the page's scale to cover the new token and requantise the page
        (a fresh page, slot 0, starts over)."""
        fresh = (slot == 0)[:, None, None]
        old_scale = self.k_idx_scale[page]
        old = torch.where(fresh, 0.0, self.k_idx[page].float() * old_scale[:, None, None])
        old[torch.arange(page.numel(), device=page.device), slot] = x
        scale = torch.maximum(torch.where(fresh[:, 0, 0], 0.0, old_scale), _fp8_scale(x.abs().amax(-1)))
        self.k_idx_scale[page] = scale
        self.k_idx[page] = (old / scale[:, None, None]).to(FP8)

    def with_index_dtype(self, index_dtype: torch.dtype, index_scale: str | None = None) -> "PagedKVCache":
        """A cache sharing this one's K/V storage with the index keys re-stored in `index_dtype`
        (e.g. fp8 e4m3 from bf16), page by page."""
        other = PagedKVCache(1, self.num_kv_heads, self.head_dim, self.index_dim, page_size=self.page_size,
                             dtype=self.dtype, index_dtype=index_dtype, index_scale=index_scale, device=self.device)
        other.num_pages, other.k, other.v = self.num_pages, self.k, self.v
        rows = self.num_pages + 1  # with the scratch page
        other.k_idx = torch.empty((rows, self.page_size, self.index_dim), dtype=index_dtype, device=self.device)
        if other.index_scale_mode is not None:
            shape = (rows,) if other.index_scale_mode == "page" else (rows, self.page_size)
            other.k_idx_scale = torch.ones(shape, dtype=torch.float32, device=self.device)
        step = max(1, (1 << 24) // (self.page_size * self.index_dim))
        for p0 in range(0, self.num_pages, step):
            pages = torch.arange(p0, min(self.num_pages, p0 + step), device=self.device)
            other._store_index(pages, self.index_keys(pages).to(torch.float32 if index_dtype == FP8 else index_dtype))
        return other

    # ---- reads (reference path, tests) ------------------------------------------------------
    def gather(self, pages, length: int):
        """Contiguous (k [Hkv, S, D], v [Hkv, S, D], k_idx [S, D_i] dequantised) of one request."""
        pages = torch.as_tensor(pages, dtype=torch.long, device=self.device).flatten()
        n = pages_needed(length, self.page_size)
        if n > pages.numel():
            _err(f"a sequence of {length} tokens needs {n} pages, got {pages.numel()}")
        pages = pages[:n]
        self.check_pages(pages)
        k = self.k[pages].transpose(0, 1).reshape(self.num_kv_heads, -1, self.head_dim)[:, :length]
        v = self.v[pages].transpose(0, 1).reshape(self.num_kv_heads, -1, self.head_dim)[:, :length]
        return k, v, self.index_keys(pages).reshape(-1, self.index_dim)[:length]

    def index_keys(self, pages: torch.Tensor) -> torch.Tensor:
        """Dequantised index keys [n, page, D_i] (fp32 for fp8 caches)."""
        ki = self.k_idx[pages]
        if self.index_dtype != FP8:
            return ki
        s = self.k_idx_scale[pages]
        return ki.float() * (s[..., None] if self.index_scale_mode == "token" else s[:, None, None])


def _fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    return (amax / FP8_MAX).clamp_min(1e-12)


def _check_table(page_table, seq_lens, B, device):
    if not isinstance(page_table, torch.Tensor) or page_table.dim() != 2 or page_table.dtype != torch.int32:
        _err(f"page_table must be an int32 tensor [B, n_pages], got "
             f"{getattr(page_table, 'dtype', type(page_table))} {tuple(getattr(page_table, 'shape', ()))}")
    if not isinstance(seq_lens, torch.Tensor) or seq_lens.dim() != 1 or seq_lens.dtype != torch.int32:
        _err(f"seq_lens must be an int32 tensor [B], got "
             f"{getattr(seq_lens, 'dtype', type(seq_lens))} {tuple(getattr(seq_lens, 'shape', ()))}")
    if B >= 0 and (page_table.shape[0] != B or seq_lens.shape[0] != B):
        _err(f"page_table and seq_lens must have batch {B}, got {page_table.shape[0]} and {seq_lens.shape[0]}")
    if page_table.shape[0] != seq_lens.shape[0]:
        _err(f"page_table ({page_table.shape[0]} rows) and seq_lens ({seq_lens.shape[0]}) disagree on batch")
    if page_table.device != device or seq_lens.device != device:
        _err(f"page_table and seq_lens must be on {device}, got {page_table.device} and {seq_lens.device}")


# The decode indexer's launch settings (MSADecoder's index_config; sparsezoo/kernels/decode_indexer.decode_select).
INDEX_CONFIG = dict(programs_per_sm=2, min_blocks=8, num_warps=4, num_stages=3, pages_per_step=2, min_rows=16,
                    merge_warps=0, deferred_topk=False, rank_in_merge=False, merge="bound")
MERGE_RANKED_BLOCKS = 2048  # batch 1 up to this many blocks: rank_in_merge by default


def index_defaults(batch: int, fp8_index_queries: bool, max_blocks: int) -> dict:
    """INDEX_CONFIG, tuned for the batch, the page-table width (max_blocks) and the score dot (H200,
    benchmarks/decode_kernels.py and decode.py):
    - fp8 x fp8 scores from batch 2 on: a 64-row warpgroup dot (native fp8 on sm_90), one page per step and
      the top-k after the page loop, which leaves the loop 96 registers per thread, so 4 programs fit per
      SM (1M tokens, batch 8: the split kernel 0.274 ms against 0.327 ms, 3.9 TB/s);
    - batch 1 up to 2,048 blocks: splits of 4 blocks that only store their scores, ranked by the merge
      (128k: 0.0259 against 0.0287 ms a step; at 1M, 8,192 blocks, one merge program per row is slower)."""
    if fp8_index_queries and batch >= 2:
        return {**INDEX_CONFIG, "min_rows": 64, "deferred_topk": True, "programs_per_sm": 4, "pages_per_step": 1}
    if batch == 1 and max_blocks <= MERGE_RANKED_BLOCKS:
        return {**INDEX_CONFIG, "rank_in_merge": True, "min_blocks": 4}
    return dict(INDEX_CONFIG)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs are enough


class MSADecoder:
    """MSA decode step over a `PagedKVCache`: Triton indexer + split-K sparse GQA attention.

    plan(seq_lens, page_table, q_len) once per step (copies into static buffers, validates);
    run(q, q_idx, cache) once per layer (no host syncs; CUDA-graph capturable once planned).
    The selection of the last run stays in `self.selection` (int32 [B, H_i, Q, topk]).
    fp8_index_queries (caches with fp8 index keys): the index queries are rounded to e4m3 too, per row
    scaled to its largest magnitude, so the index scores are an fp8 x fp8 dot (native fp8 tensor cores
    on sm_90 with index_config min_rows=64, the default from batch 2 on; 16 rows unpack to fp16 there); the
    selection then equals the reference on `kernels.decode_indexer.fp8_query_round_trip(q_idx)`.
    pdl (CUDA, compute capability 9.0+): the step's second to fourth kernels are programmatic dependent
    launches (`sparsezoo/kernels/pdl.py`), each started while the one before it runs, so their launch latency and
    their loads of the step's inputs overlap it. Same results. None (the default) turns it on for batch 1
    on such a GPU, where it saves 2-3 us of a 30-100 us step on an H200, and off otherwise (at batch 8 it
    cost 1-6%: the early kernels hold SM slots); `plan()` decides and `run()` records the choice
    (`msa_decode_launch`: `pdl` or `plain`). True insists (an error without such a GPU), False never.
    """

    def __init__(self, *, num_q_heads: int, num_kv_heads: int, head_dim: int, index_dim: int,
                 block_size: int = 128, topk: int = 16, scale: float | None = None,
                 index_scale: float | None = None, max_q_len: int = 16, index_config: dict | None = None,
                 fp8_index_queries: bool = False, pdl: bool | None = None):
        if num_q_heads % num_kv_heads:
            _err(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if topk < 2:
            _err(f"topk must be >= 2 (the local block + at least one ranked block), got {topk}")
        self.hq, self.hkv, self.d, self.di = num_q_heads, num_kv_heads, head_dim, index_dim
        self.block_size, self.topk, self.max_q_len = block_size, topk, max_q_len
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        self.index_scale = 1.0 / math.sqrt(index_dim) if index_scale is None else index_scale
        # with an fp8 index-key cache: round the index queries to e4m3 as well (an fp8 x fp8 score dot)
        self.fp8_index_queries = bool(fp8_index_queries)
        if pdl not in (None, True, False):
            _err(f"pdl must be None (automatic), True or False, got {pdl!r}")
        self.pdl_setting = None if pdl is None else bool(pdl)
        self.pdl = False  # whether the planned steps use it (plan() decides)
        self._key = None  # (B, width, q_len, device) the static buffers were sized for
        # Indexer launch tuning: programs per SM, minimum blocks per split, warps, pipeline stages, pages per
        # step, the score dot's minimum rows (64: a native fp8 warpgroup dot with fp8_index_queries on sm_90),
        # the top-k merge's warps (0: one for the bound merge, else by candidate count), whether the split
        # kernel ranks its blocks after its page loop (deferred_topk) instead of in it, or leaves every block's
        # score to the merge to rank (rank_in_merge, which overrides deferred_topk and merge), and how the merge
        # picks a row's top-k from the splits' candidates (merge: "bound", only the k-1 splits with the best
        # keys, or "extract", k-1 maxima over all of them). `plan()` resolves the defaults for the batch
        # (`index_defaults`); the keys given here override them.
        unknown = set(index_config or {}) - set(INDEX_CONFIG)
        if unknown:
            _err(f"unknown index_config keys {sorted(unknown)}; valid: {sorted(INDEX_CONFIG)}")
        from sparsezoo.kernels.decode_indexer import MERGES

        self.index_overrides = dict(index_config or {})
        self.index_config = {**INDEX_CONFIG, **self.index_overrides}  # plan() resolves it for the batch
        if self.index_config["merge"] not in MERGES:
            _err(f"index_config merge must be one of {MERGES}, got {self.index_config['merge']!r}")

    def plan(self, seq_lens: torch.Tensor, page_table: torch.Tensor, q_len: int, *,
             num_pages: int | None = None, check: bool = True) -> None:
        """Set this step's lengths (int32 [B], including the q_len new tokens) and page table (int32
        [B, n_pages]). Re-planning with the same B, width and q_len reuses every buffer, so a
        captured graph stays valid. `check` validates lengths and (with num_pages) page ids."""
        if not isinstance(q_len, int) or not 1 <= q_len <= self.max_q_len:
            _err(f"q_len must be an integer in [1, {self.max_q_len}], got {q_len!r}")
        device = page_table.device if isinstance(page_table, torch.Tensor) else None
        _check_table(page_table, seq_lens, -1, device)
        B, width = page_table.shape
        from sparsezoo.kernels.pdl import resolve_pdl

        self.pdl = resolve_pdl(self.pdl_setting, device, auto=B == 1)
        if check:
            lens = seq_lens.tolist()
            if min(lens) < q_len:
                _err(f"every seq_len must be >= q_len ({q_len}), got min {min(lens)}")
            need = pages_needed(max(lens), self.block_size)
            if need > width:
                _err(f"a sequence of {max(lens)} tokens needs {need} pages of {self.block_size}, "
                     f"but the page table holds {width}")
            if num_pages is not None:
                cols = torch.arange(width, device=device)[None, :]
                used = cols < ((seq_lens.long()[:, None] + self.block_size - 1) // self.block_size)
                ids = page_table[used]
                if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_pages):
                    _err(f"page ids must lie in [0, {num_pages}), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
        key = (B, width, q_len, device)
        if key != self._key:
            self._allocate(B, width, q_len, device)
            self._key = key
        self.page_table.copy_(page_table)
        self.seq_lens.copy_(seq_lens)

    def _allocate(self, B, width, q_len, device):
        from sparsezoo.kernels import decode_attention as att
        from sparsezoo.kernels import decode_indexer as idx

        sms = _num_sms(device)
        self.B, self.q_len = B, q_len
        self.index_config = {**index_defaults(B, self.fp8_index_queries, width), **self.index_overrides}
        self.page_table = torch.zeros((B, width), dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(B, dtype=torch.int32, device=device)
        self.selection = torch.full((B, self.hkv, q_len, self.topk), -1, dtype=torch.int32, device=device)
        cfg = self.index_config
        self.index_split = idx.plan_splits(B, width, sms, min_blocks=cfg["min_blocks"] if device.type == "cuda" else 2,
                                           programs_per_sm=cfg["programs_per_sm"])
        self.index_ws = idx.index_workspace(B, q_len, self.hkv, self.topk, self.index_split[1], device)
        self.index_scores = (idx.score_workspace(B, q_len, self.hkv, *self.index_split, device)
                             if cfg["deferred_topk"] or cfg["rank_in_merge"] else None)
        self.attn_split = att.plan_splits(B * self.hkv * q_len, self.topk, sms)
        self.attn_ws = att.attention_workspace(B, self.hkv, q_len, self.hq // self.hkv, self.d,
                                               self.attn_split[1], device)

    def run(self, q: torch.Tensor, q_idx: torch.Tensor, cache: PagedKVCache, *,
            return_lse: bool = False, out: torch.Tensor | None = None):
        """q [B, Hq, Q, D], q_idx [B, H_i = Hkv, Q, D_i] -> out [B, Hq, Q, D] (and the natural-log
        LSE [B, Hq, Q] when return_lse). Shape/dtype checks only: no host syncs."""
        self._check_run(q, q_idx, cache)
        self.select(q_idx, cache, _checked=True)
        out = self.attend(q, cache, return_lse=return_lse, out=out, _checked=True)
        record("msa_decode", "triton")
        record("msa_decode_launch", "pdl" if self.pdl else "plain")
        return out

    def select(self, q_idx: torch.Tensor, cache: PagedKVCache, *, _checked: bool = False) -> torch.Tensor:
        """The indexer alone: fills and returns `self.selection` (int32 [B, H_i, Q, topk])."""
        from sparsezoo.kernels import decode_indexer as idx

        if not _checked:
            self._check_run(None, q_idx, cache)
        return idx.decode_select(q_idx, cache.k_idx, cache.k_idx_scale, cache.index_scale_mode, self.page_table,
                                 self.seq_lens, topk=self.topk, scale=self.index_scale,
                                 blocks_per_split=self.index_split[0], n_splits=self.index_split[1],
                                 out=self.selection, workspace=self.index_ws,
                                 num_warps=self.index_config["num_warps"], num_stages=self.index_config["num_stages"],
                                 pages_per_step=self.index_config["pages_per_step"],
                                 fp8_queries=self.fp8_index_queries, min_rows=self.index_config["min_rows"],
                                 merge_warps=self.index_config["merge_warps"], pdl=self.pdl,
                                 scores=self.index_scores, rank_in_merge=self.index_config["rank_in_merge"],
                                 merge=self.index_config["merge"])

    def attend(self, q: torch.Tensor, cache: PagedKVCache, *, return_lse: bool = False,
               out: torch.Tensor | None = None, _checked: bool = False):
        """Sparse attention alone, over the current `self.selection`."""
        from sparsezoo.kernels import decode_attention as att

        if not _checked:
            self._check_run(q, None, cache)
        out = torch.empty_like(q) if out is None else out
        if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
            _err(f"out must be a {q.dtype} tensor of shape {tuple(q.shape)} with unit last stride")
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device) if return_lse else None
        att.decode_attention(q, cache.k, cache.v, self.page_table, self.seq_lens, self.selection,
                             scale=self.scale, blocks_per_split=self.attn_split[0],
                             n_splits=self.attn_split[1], out=out, workspace=self.attn_ws, lse=lse, pdl=self.pdl)
        return (out, lse) if return_lse else out

    def _check_run(self, q, q_idx, cache):
        if not isinstance(cache, PagedKVCache):
            _err(f"cache must be a PagedKVCache, got {type(cache).__name__}")
        if self.fp8_index_queries and cache.index_dtype != FP8:
            _err(f"fp8_index_queries needs a cache with fp8 index keys (index_dtype={FP8}), got {cache.index_dtype}")
        if self._key is None:
            _err("call plan(seq_lens, page_table, q_len) before run()")
        want = {"q": (self.B, self.hq, self.q_len, self.d), "q_idx": (self.B, self.hkv, self.q_len, self.di)}
        for name, t in (("q", q), ("q_idx", q_idx)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want[name]:
                _err(f"{name} must have shape {want[name]} ([B, heads, q_len, dim] as planned), got "
                     f"{tuple(getattr(t, 'shape', ()))}")
            if t.dtype != cache.dtype:
                _err(f"{name} must match the cache dtype {cache.dtype}, got {t.dtype}")
            if t.device != cache.device or self.page_table.device != cache.device:
                _err(f"{name}, the plan and the cache must share one device, got {t.device}, "
                     f"{self.page_table.device}, {cache.device}")
            if t.stride(-1) != 1:
                _err(f"{name} needs a unit stride on the last dim")
        if (cache.num_kv_heads, cache.head_dim, cache.index_dim, cache.page_size) != (
                self.hkv, self.d, self.di, self.block_size):
            _err(f"cache (Hkv={cache.num_kv_heads}, D={cache.head_dim}, D_i={cache.index_dim}, "
                 f"page={cache.page_size}) does not match the decoder (Hkv={self.hkv}, D={self.d}, "
                 f"D_i={self.di}, block={self.block_size})")


class MSAPagedLayerCache:
    """One MSA layer's cache kept in pages, so that its decode steps run the Triton kernels.

    The model-facing twin of `sparsezoo.LayerCache` (same `pos` / `advance` contract) for a batch whose
    requests advance together: request b owns pages b * pages_per_request ... onwards. Prefill fills
    the pages; decode steps (q_len <= the decoder's max) append and run `MSADecoder`; a longer chunk
    after the first is computed on a contiguous gather (the reference/flex path).
    """

    def __init__(self, config, max_batch_size: int, max_seq_len: int, index_dtype: torch.dtype | None = None,
                 index_scale: str | None = None):
        c = config
        self.config, self.max_batch_size, self.max_seq_len = c, max_batch_size, max_seq_len
        self.index_dtype, self.index_scale = index_dtype, index_scale
        self.pages_per_request = pages_needed(max_seq_len, c.block_size)
        self.decoder = MSADecoder(num_q_heads=c.n_heads, num_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                                  index_dim=c.index_dim, block_size=c.block_size, topk=c.topk,
                                  index_scale=c.index_scale)
        self.pos = 0
        self.paged: PagedKVCache | None = None
        self.rows: list | None = None  # per-row caches of a padded batch (sparsezoo.LayerCache says how)

    def _allocate(self, B: int, dtype: torch.dtype, device: torch.device) -> None:
        c = self.config
        if B > self.max_batch_size:
            _err(f"batch {B} exceeds the cache's max_batch_size {self.max_batch_size}")
        self.paged = PagedKVCache(B * self.pages_per_request, c.n_kv_heads, c.head_dim, c.index_dim,
                                  page_size=c.block_size, dtype=dtype, index_dtype=self.index_dtype,
                                  index_scale=self.index_scale, device=device)
        self.page_table = torch.arange(B * self.pages_per_request, dtype=torch.int32, device=device).view(B, -1)

    def write(self, k: torch.Tensor, v: torch.Tensor, k_idx: torch.Tensor) -> None:
        """The T new tokens: k, v [B, Hkv, T, D], k_idx [B, T, D_i]."""
        B, T = k.shape[0], k.shape[2]
        if self.pos + T > self.max_seq_len:
            _err(f"cache overflow: {self.pos} + {T} tokens > max_seq_len {self.max_seq_len}")
        if self.paged is None or (self.pos == 0 and B != self.page_table.shape[0]):  # a new sequence
            self._allocate(B, k.dtype, k.device)
        if B != self.page_table.shape[0]:
            _err(f"this cache holds a batch of {self.page_table.shape[0]}, got {B}; reset() it to start a new "
                 f"sequence with another batch size")
        if self.pos == 0:
            for b in range(B):
                self.paged.fill(self.page_table[b], k[b], v[b], k_idx[b])
        else:
            lens = torch.full((B,), self.pos + T, dtype=torch.int32, device=k.device)
            self.paged.append(self.page_table, lens, k, v, k_idx)

    def is_decode_step(self, T: int) -> bool:
        return self.pos > 0 and T <= self.decoder.max_q_len

    def decode(self, q: torch.Tensor, q_idx: torch.Tensor) -> torch.Tensor:
        """Indexer + sparse attention for the T new queries (already written)."""
        B, T = q.shape[0], q.shape[2]
        lens = torch.full((B,), self.pos + T, dtype=torch.int32, device=q.device)
        self.decoder.plan(lens, self.page_table, T, check=False)
        return self.decoder.run(q, q_idx, self.paged)

    def gather(self, length: int):
        """Contiguous k, v [B, Hkv, L, D] and k_idx [B, L, D_i] of the first `length` tokens."""
        parts = [self.paged.gather(self.page_table[b], length) for b in range(self.page_table.shape[0])]
        k, v, ki = (torch.stack(p) for p in zip(*parts))
        return k, v, ki.to(k.dtype)

    def advance(self, T: int) -> None:
        self.pos += T

    def reset(self) -> None:
        self.pos = 0
        self.rows = None
