"""The synthetic retrieval tasks (sparsezoo/models/data.py): every scored token has exactly one right answer,
and that answer is in the context before the query.

Invariant for both tasks: at a scored position t the model reads x[t] (a recall key, or a passkey token;
QUERY asks for the token after NEEDLE) and must give y[t]. Every earlier occurrence of that lookup token must
be followed by y[t], and there must be at least one, so the answer is a copy the context fully determines.
Also: labels sit only at the answer positions, the layout's token ranges do not mix, rows are BOS-first,
batches are a pure function of (seed, step) and the length curriculum keeps the tokens per step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsezoo.config import ConfigError
from sparsezoo.models.data import BOS, NEEDLE, QUERY, Data, DataConfig, Layout, NeedleTask, batch_generator

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512


def successors(row: torch.Tensor, token: int, before: int) -> set[int]:
    """The tokens that follow `token` at positions < before (the context a query at `before` sees)."""
    at = (row[:before] == token).nonzero().flatten().tolist()
    return {int(row[i + 1]) for i in at}


def check_unique_answers(x: torch.Tensor, y: torch.Tensor, task: str) -> int:
    """Assert the invariant on every row; return the number of scored tokens checked."""
    checked = 0
    for row_x, row_y in zip(x, y):
        for t in (row_y != -100).nonzero().flatten().tolist():
            lookup = int(row_x[t])
            if task == "needle" and lookup == QUERY:
                lookup = NEEDLE
            found = successors(row_x, lookup, t)
            assert found == {int(row_y[t])}, (task, t, lookup, found, int(row_y[t]))
            checked += 1
    return checked


def data_for(task: str, seq_len: int, **fields) -> Data:
    return Data(DataConfig(task=task, seq_len=seq_len, **fields), vocab_size=VOCAB)


@given(
    seed=st.integers(0, 10**6), passkey_len=st.integers(1, 8), n_values=st.integers(8, 16), seq_len=st.integers(24, 200)
)
def test_needle_has_one_answer_per_scored_token(seed, passkey_len, n_values, seq_len):
    # few values: with repeats allowed, most passkeys of 4+ tokens would repeat one
    data = data_for("needle", seq_len, passkey_len=passkey_len, n_values=n_values, n_keys=16)
    x, y = data.batch("needle", 4, seq_len, batch_generator(seed, 0))
    assert check_unique_answers(x, y, "needle") == 4 * passkey_len
    lo, hi = data.layout.values
    for row_x, row_y in zip(x, y):
        at = int((row_x == NEEDLE).nonzero()[0])
        key = row_x[at + 1 : at + 1 + passkey_len]
        assert len(set(key.tolist())) == passkey_len and ((key >= lo) & (key < hi)).all()
        assert row_x[-passkey_len] == QUERY and row_y[-passkey_len:].tolist() == key.tolist()
        values_in_row = ((row_x >= lo) & (row_x < hi)).sum()
        assert values_in_row == 2 * passkey_len - 1  # the needle and the answer (its last token is only a label)


@settings(max_examples=6)
@given(seed=st.integers(0, 10**6), seq_len=st.integers(64, 160))
def test_needle_in_text_has_one_answer_per_scored_token(seed, seq_len):
    data = data_for(
        "needle",
        seq_len,
        passkey_len=4,
        n_values=8,
        needle_filler="text",
        text_path=str(REPO / "docs"),
        text_glob="*.md",
    )
    for split in ("train", "val"):
        x, y = data.batch("needle", 3, seq_len, batch_generator(seed, 0), split)
        assert check_unique_answers(x, y, "needle") == 3 * 4
        assert ((x == NEEDLE).sum(1) == 1).all() and ((x == QUERY).sum(1) == 1).all()


@given(
    seed=st.integers(0, 10**6),
    n_pairs=st.integers(1, 12),
    n_values=st.integers(2, 8),
    seq_len=st.integers(49, 160),  # 2 * 12 pairs + 2 * 12 queries + the query mark fit
    data=st.data(),
)
def test_recall_has_one_answer_per_scored_token(seed, n_pairs, n_values, seq_len, data):
    n_queries = data.draw(st.integers(1, n_pairs))
    cfg = dict(n_pairs=n_pairs, n_queries=n_queries, n_keys=16, n_values=n_values)
    x, y = data_for("recall", seq_len, **cfg).batch("recall", 4, seq_len, batch_generator(seed, 0))
    assert check_unique_answers(x, y, "recall") == 4 * n_queries
    layout = Layout(VOCAB, n_values, 16)
    for row_x in x:
        keys = row_x[(row_x >= layout.keys[0]) & (row_x < layout.keys[1])].tolist()
        assert len(keys) == n_pairs + n_queries  # each key once in the pairs, each queried key once more
        assert len(set(keys)) == n_pairs
        assert (row_x == QUERY).sum() == 1


@pytest.mark.parametrize("task", ["needle", "recall"])
def test_labels_only_at_answer_positions_and_rows_start_with_bos(task):
    data = data_for("mix", 96, passkey_len=3, n_pairs=6, n_queries=4, mix={"needle": 1, "recall": 1})
    x, y = data.batch(task, 5, 96, batch_generator(3, 1))
    assert x.shape == y.shape == (5, 96) and (x[:, 0] == BOS).all()
    n = 3 if task == "needle" else 4
    for row_x, row_y in zip(x, y):
        scored = (row_y != -100).nonzero().flatten()
        q = int((row_x == QUERY).nonzero()[0])
        if task == "needle":  # the answer: the last n targets, from QUERY on
            assert scored.tolist() == list(range(96 - n, 96)) and q == 96 - n
        else:  # each queried key's position (its value is the target), after QUERY
            assert scored.tolist() == list(range(q + 1, 96, 2)) and len(scored) == n
        lo, hi = data.layout.values
        assert ((row_y[scored] >= lo) & (row_y[scored] < hi)).all()  # answers are value tokens


def test_old_sampling_with_repeats_would_fail_the_invariant():
    """The check can fail: a passkey with a repeated token has two answers after that token."""
    x = torch.tensor([[BOS, 600, NEEDLE, 300, 301, 300, 302, 601, QUERY, 300, 301, 300]])
    y = torch.full_like(x, -100)
    y[0, -4:] = torch.tensor([300, 301, 300, 302])
    with pytest.raises(AssertionError):
        check_unique_answers(x, y, "needle")


def test_batches_are_a_pure_function_of_seed_and_step_and_the_curriculum_keeps_tokens():
    cfg = DataConfig(task="recall", seq_len=128, n_pairs=4, n_queries=2, curriculum_len=32, curriculum_steps=3)
    a, b = Data(cfg, VOCAB, seed=5), Data(cfg, VOCAB, seed=5)
    for step in (0, 2, 3, 7):
        ta, xa, ya = a.train_batch(step, 2)
        tb, xb, yb = b.train_batch(step, 2)
        assert ta == tb and torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.numel() == 2 * 128 and xa.shape[1] == (32 if step < 3 else 128)
    assert not torch.equal(a.train_batch(0, 2)[1], Data(cfg, VOCAB, seed=6).train_batch(0, 2)[1])


def test_passkey_longer_than_the_values_is_refused():
    with pytest.raises(ConfigError, match="passkey_len .* distinct"):
        DataConfig(task="needle", passkey_len=9, n_values=8)
    with pytest.raises(ValueError, match="distinct tokens needs n_values >= 9"):
        NeedleTask(Layout(VOCAB, 8, 8), 9)
