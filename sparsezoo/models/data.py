"""Training data for the example GPT, made on the fly (no downloads).

Tasks (each gives inputs x [B, L] and targets y [B, L], -100 where nothing is scored):
- `needle`: passkey retrieval. Filler tokens, somewhere `NEEDLE p1..pn`, at the end `QUERY p1..pn`;
  only the answer p1..pn is scored. The passkey tokens are distinct, so each answer token is the one
  that follows its predecessor (NEEDLE for p1) in the needle: a single right answer. `needle_filler:
  text` takes the haystack from the local text (a contiguous byte span, `text_path`) instead of random
  filler tokens.
- `recall`: multi-query associative recall. Key-value pairs scattered through filler, then `QUERY`
  and n queried keys, each followed by its value; only the values after the keys are scored. Keys are
  distinct and asked once each, so every queried key occurs once before its query (values may repeat).
- `text`: byte-level language modelling on a local text file or folder (every byte is scored).
- `mix`: one of the above per step, drawn by weight (each step is one task, so its loss is the mean
  over that task's scored tokens).

One token layout serves all tasks, so a single model learns them together:
    0..255 bytes | 256.. specials (PAD, BOS, NEEDLE, QUERY) | values | keys | filler up to vocab_size

Batches are a pure function of (seed, step, rank): resuming or adding ranks needs no data state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from sparsezoo.config import CheckedConfig, ConfigError, from_known_fields

N_BYTES = 256
PAD, BOS, NEEDLE, QUERY = 256, 257, 258, 259
FIRST_FREE = 264  # specials reserve 256..263
TASKS = ("needle", "recall", "text", "mix")


@dataclass
class DataConfig(CheckedConfig):
    task: str = "mix"
    seq_len: int = 256
    n_values: int = 64  # passkey digits and recall values
    n_keys: int = 64  # recall keys
    passkey_len: int = 4
    n_pairs: int = 16
    n_queries: int = 16
    text_path: str | None = None  # a file or folder of text (for `text`, and `mix` if set)
    text_glob: str = "**/*"
    needle_filler: str = "random"  # random filler tokens | text (bytes of text_path)
    val_fraction: float = 0.1
    mix: dict[str, float] = field(default_factory=lambda: {"needle": 1.0, "recall": 1.0, "text": 1.0})
    # length curriculum: the first `curriculum_steps` train at `curriculum_len` with the same tokens
    # per step (batch x seq_len / curriculum_len rows), then at seq_len
    curriculum_len: int | None = None
    curriculum_steps: int = 0
    # a ladder of such stages, shortest first: [[128, 600], [1024, 200]] trains 600 steps at 128 tokens, then
    # 200 at 1,024, then at seq_len (instead of curriculum_len / curriculum_steps, not with them)
    curriculum: list[list[int]] | None = None

    LABEL: ClassVar[str] = "data"
    CHOICES: ClassVar[dict[str, tuple]] = {"task": TASKS, "needle_filler": ("random", "text")}
    POSITIVE: ClassVar[tuple[str, ...]] = ("seq_len", "n_values", "n_keys", "passkey_len", "n_pairs", "n_queries",
                                           "curriculum_len")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("curriculum_steps",)

    def __post_init__(self) -> None:
        self.check_fields()
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if any(w < 0 for w in self.mix.values()):
            raise ConfigError(f"data.mix weights must be >= 0, got {self.mix}")
        if self.curriculum_steps and self.curriculum_len is None:
            raise ConfigError("data.curriculum_steps needs data.curriculum_len")
        if self.curriculum_len is not None and not (
                0 < self.curriculum_len <= self.seq_len and self.seq_len % self.curriculum_len == 0):
            raise ConfigError(f"data.curriculum_len = {self.curriculum_len} must divide seq_len = {self.seq_len} "
                              f"(so every step trains on the same number of tokens)")
        self._check_ladder()
        bad = sorted(set(self.mix) - {"needle", "recall", "text"})
        if bad:
            raise ConfigError(f"data.mix names unknown task(s) {bad}; choose among ['needle', 'recall', 'text']")
        if self.n_queries > self.n_pairs:
            raise ConfigError(f"n_queries ({self.n_queries}) must be <= n_pairs ({self.n_pairs})")
        if self.n_pairs > self.n_keys:
            raise ConfigError(f"n_pairs ({self.n_pairs}) must be <= n_keys ({self.n_keys}): keys are unique")
        if self.task in ("needle", "mix") and self.passkey_len > self.n_values:
            raise ConfigError(f"passkey_len ({self.passkey_len}) must be <= n_values ({self.n_values}): passkey "
                              f"tokens are distinct")

    def _check_ladder(self) -> None:
        if self.curriculum is None:
            return
        if self.curriculum_len is not None or self.curriculum_steps:
            raise ConfigError("data.curriculum replaces data.curriculum_len / curriculum_steps: give one of them")
        last = 0
        for stage in self.curriculum:
            if len(stage) != 2:
                raise ConfigError(f"data.curriculum stages are [length, steps] pairs, got {stage!r}")
            length, steps = stage
            if not (last < length <= self.seq_len and self.seq_len % length == 0):
                raise ConfigError(f"data.curriculum length {length} must divide seq_len = {self.seq_len} and grow "
                                  f"from stage to stage (so every step trains on the same number of tokens)")
            if steps <= 0:
                raise ConfigError(f"data.curriculum stage {stage!r}: steps must be > 0")
            last = length

    def stage_ends(self) -> list[tuple[int, int]]:
        """(length, first step after the stage) for each curriculum stage before seq_len."""
        stages = self.curriculum or ([[self.curriculum_len, self.curriculum_steps]] if self.curriculum_len else [])
        out, end = [], 0
        for length, steps in stages:
            end += steps
            out.append((length, end))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DataConfig":
        return from_known_fields(cls, data, "data")


@dataclass(frozen=True)
class Layout:
    """Token id ranges of the shared vocabulary."""
    vocab_size: int
    n_values: int
    n_keys: int

    @property
    def values(self) -> tuple[int, int]:
        return FIRST_FREE, FIRST_FREE + self.n_values

    @property
    def keys(self) -> tuple[int, int]:
        return self.values[1], self.values[1] + self.n_keys

    @property
    def filler(self) -> tuple[int, int]:
        return self.keys[1], self.vocab_size

    def check(self) -> None:
        lo, hi = self.filler
        if hi - lo < 16:
            raise ConfigError(f"vocab_size {self.vocab_size} leaves {hi - lo} filler tokens after bytes, specials, "
                              f"{self.n_values} values and {self.n_keys} keys; use vocab_size >= {lo + 16}")


def batch_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    """The CPU generator for one batch: a pure function of its arguments."""
    key = ((seed * 1_000_003 + stream) * 1_000_003 + rank) * 1_000_003 + step
    return torch.Generator().manual_seed(key % (2**63 - 1))  # manual_seed takes a 64-bit value


def _randint(lo_hi: tuple[int, int], n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(lo_hi[0], lo_hi[1], (n,), generator=g)


class NeedleTask:
    name = "needle"

    def __init__(self, layout: Layout, passkey_len: int, text: "TextTask | None" = None):
        if passkey_len > layout.n_values:
            raise ValueError(f"a passkey of {passkey_len} distinct tokens needs n_values >= {passkey_len}, "
                             f"got {layout.n_values}")
        self.layout, self.n, self.text = layout, passkey_len, text

    def row(self, length: int, g: torch.Generator, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        # distinct tokens: with a repeat, "the token after p_j" would have two answers
        key = self.layout.values[0] + torch.randperm(self.layout.n_values, generator=g)[: self.n]
        hay = length + 1 - 1 - 2 * (self.n + 1)
        if hay < 1:
            raise ValueError(f"seq_len {length} is too short for a passkey of {self.n} tokens")
        filler = _randint(self.layout.filler, hay, g) if self.text is None else self.text.row(hay - 1, g, split)[0]
        depth = int(torch.randint(0, hay + 1, (1,), generator=g))
        needle = torch.cat([torch.tensor([NEEDLE]), key])
        tail = torch.cat([torch.tensor([QUERY]), key])
        seq = torch.cat([torch.tensor([BOS]), filler[:depth], needle, filler[depth:], tail])
        scored = torch.zeros(length + 1, dtype=torch.bool)
        scored[-self.n:] = True
        return seq, scored


class RecallTask:
    name = "recall"

    def __init__(self, layout: Layout, n_pairs: int, n_queries: int):
        self.layout, self.n_pairs, self.n_queries = layout, n_pairs, n_queries

    def row(self, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        lo = self.layout.keys[0]
        keys = lo + torch.randperm(self.layout.n_keys, generator=g)[: self.n_pairs]
        values = _randint(self.layout.values, self.n_pairs, g)
        hay = length + 1 - 1 - 2 * self.n_pairs - 1 - 2 * self.n_queries
        if hay < 0:
            raise ValueError(f"seq_len {length} is too short for {self.n_pairs} pairs and {self.n_queries} queries")
        filler = _randint(self.layout.filler, hay, g)
        cuts = torch.sort(torch.randint(0, hay + 1, (self.n_pairs,), generator=g)).values.tolist()
        parts, prev = [torch.tensor([BOS])], 0
        for i, cut in enumerate(cuts):
            parts += [filler[prev:cut], torch.stack([keys[i], values[i]])]
            prev = cut
        parts.append(filler[prev:])
        asked = torch.randperm(self.n_pairs, generator=g)[: self.n_queries]
        parts += [torch.tensor([QUERY]), torch.stack([keys[asked], values[asked]], 1).flatten()]
        seq = torch.cat(parts)
        scored = torch.zeros(length + 1, dtype=torch.bool)
        scored[-2 * self.n_queries + 1::2] = True  # the values of the queried pairs
        return seq, scored


class TextTask:
    name = "text"

    def __init__(self, path: str | Path, glob: str = "**/*", val_fraction: float = 0.1):
        self.path = Path(path)
        data, self.files, self.skipped = read_text_bytes(self.path, glob)
        cut = int(len(data) * (1 - val_fraction))
        self.splits = {"train": data[:cut], "val": data[cut:]}

    def row(self, length: int, g: torch.Generator, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        data = self.splits[split]
        if len(data) < length + 1:
            raise ValueError(f"the {split} split of {self.path} holds {len(data)} bytes, fewer than seq_len + 1 = "
                             f"{length + 1}; point text_path at more text or shorten seq_len")
        start = int(torch.randint(0, len(data) - length, (1,), generator=g))
        return data[start:start + length + 1].long(), torch.ones(length + 1, dtype=torch.bool)


def read_text_bytes(path: Path, glob: str = "**/*") -> tuple[torch.Tensor, list[Path], list[Path]]:
    """All text files of `path` (a file or a folder, sorted) as one uint8 tensor; binary files (with a
    NUL byte) are skipped and listed."""
    if not path.exists():
        raise FileNotFoundError(f"text_path {path} does not exist")
    candidates = [path] if path.is_file() else sorted(p for p in path.glob(glob) if p.is_file())
    chunks, files, skipped = [], [], []
    for p in candidates:
        hidden = path.is_dir() and any(part.startswith(".") for part in p.relative_to(path).parts)
        raw = b"" if hidden else p.read_bytes()
        if hidden or b"\0" in raw:
            skipped.append(p)
            continue
        chunks.append(raw)
        files.append(p)
    if not chunks:
        raise ValueError(f"no text files under {path} (glob {glob!r}); skipped {len(skipped)} binary/hidden files")
    if not any(chunks):
        raise ValueError(f"no text in {path}: {len(files)} empty file(s) (glob {glob!r})")
    data = torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8)
    return data, files, skipped


class Data:
    """Batches for training and evaluation, of any length (synthetic tasks) or seq_len (text)."""

    def __init__(self, config: DataConfig, vocab_size: int, seed: int = 0):
        self.config, self.seed = config, seed
        self.layout = Layout(vocab_size, config.n_values, config.n_keys)
        self.tasks: dict[str, Any] = {}
        if config.task in ("needle", "mix"):
            self.layout.check()
            text = None
            if config.needle_filler == "text":
                if not config.text_path:
                    raise ConfigError("data.needle_filler 'text' needs data.text_path (a local file or folder)")
                text = TextTask(config.text_path, config.text_glob, config.val_fraction)
            self.tasks["needle"] = NeedleTask(self.layout, config.passkey_len, text)
        if config.task in ("recall", "mix"):
            self.layout.check()
            self.tasks["recall"] = RecallTask(self.layout, config.n_pairs, config.n_queries)
        if config.task == "text" or (config.task == "mix" and config.text_path and config.mix.get("text", 0) > 0):
            if not config.text_path:
                raise ConfigError("data.task 'text' needs data.text_path (a local file or folder)")
            if vocab_size < N_BYTES:
                raise ConfigError(f"byte-level text needs vocab_size >= 256, got {vocab_size}")
            self.tasks["text"] = TextTask(config.text_path, config.text_glob, config.val_fraction)
        weights = config.mix if config.task == "mix" else {config.task: 1.0}
        self.weights = {k: float(w) for k, w in weights.items() if k in self.tasks and w > 0}
        if not self.weights:
            raise ConfigError(f"data config selects no task: task {config.task!r}, mix {config.mix}")

    def task_for_step(self, step: int) -> str:
        names = sorted(self.weights)
        if len(names) == 1:
            return names[0]
        w = torch.tensor([self.weights[n] for n in names])
        return names[int(torch.multinomial(w, 1, generator=batch_generator(self.seed, step, stream=1)))]

    def batch(self, task: str, batch_size: int, length: int, g: torch.Generator, split: str = "train",
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for _ in range(batch_size):
            if task in ("text", "needle"):
                rows.append(self.tasks[task].row(length, g, split))
            else:
                rows.append(self.tasks[task].row(length, g))
        seq = torch.stack([r[0] for r in rows])
        scored = torch.stack([r[1] for r in rows])
        x, y = seq[:, :-1], seq[:, 1:].masked_fill(~scored[:, 1:], -100)
        return x.to(device), y.to(device)

    def train_shape(self, step: int, batch_size: int) -> tuple[int, int]:
        """(rows, length) of a training step's batch: the curriculum's stages first, then seq_len."""
        c = self.config
        for length, end in c.stage_ends():
            if step < end:
                return batch_size * (c.seq_len // length), length
        return batch_size, c.seq_len

    def train_batch(self, step: int, batch_size: int, rank: int = 0, device="cpu"):
        """(task name, x, y) for a training step; rank-specific, deterministic."""
        task = self.task_for_step(step)
        g = batch_generator(self.seed, step, rank)
        rows, length = self.train_shape(step, batch_size)
        return task, *self.batch(task, rows, length, g, "train", device)

    def eval_batches(self, task: str, n_batches: int, batch_size: int, length: int | None = None, device="cpu"):
        """Fixed held-out batches (a separate seed stream; text comes from the val split)."""
        for i in range(n_batches):
            g = batch_generator(self.seed, i, stream=2 + TASKS.index(task))
            yield self.batch(task, batch_size, length or self.config.seq_len, g, "val", device)


@torch.no_grad()
def score(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int, int, int]:
    """(correct scored tokens, scored tokens, rows with every scored token right, rows with any scored).

    With teacher forcing, a row is all-correct exactly when greedy decoding would produce its answer.
    """
    mask = y != -100
    hit = (logits.argmax(-1) == y) & mask
    rows = mask.any(-1)
    exact = ((hit | ~mask).all(-1) & rows)
    return int(hit.sum()), int(mask.sum()), int(exact.sum()), int(rows.sum())


def decode(ids: list[int], layout: Layout | None = None) -> str:
    """Readable text for token ids: bytes as UTF-8, other tokens as <NEEDLE>, <v3>, <k7>, <f12>."""
    names = {PAD: "<PAD>", BOS: "<BOS>", NEEDLE: "<NEEDLE>", QUERY: "<QUERY>"}
    out, raw = [], bytearray()
    for t in ids:
        if t < N_BYTES:
            raw.append(t)
            continue
        out.append(raw.decode("utf-8", errors="replace"))
        raw = bytearray()
        if t in names:
            out.append(names[t])
        elif layout is not None:
            for tag, (lo, hi) in (("v", layout.values), ("k", layout.keys), ("f", layout.filler)):
                if lo <= t < hi:
                    out.append(f"<{tag}{t - lo}>")
                    break
        else:
            out.append(f"<{t}>")
    out.append(raw.decode("utf-8", errors="replace"))
    return "".join(out)
