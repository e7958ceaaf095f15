"""The loop's parts: the schedule over the budget, a time budget that stops training, and the data order (every
window once per pass)."""

from __future__ import annotations

import math

import pytest
import torch

from fbnprune.recover import recover_
from fbnprune.recover.train import State, _next_rows, lr_factor, progress_of
from tests.conftest import word_tokenizer
from tests.recover.helpers import config, env, pair


def test_schedule_warms_up_then_follows_a_cosine_to_zero():
    assert lr_factor(0.025, 0.05, "cosine") == pytest.approx(0.5)
    assert lr_factor(0.05, 0.05, "cosine") == pytest.approx(1.0)
    assert lr_factor(0.525, 0.05, "cosine") == pytest.approx(0.5)
    assert lr_factor(1.0, 0.05, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0.7, 0.0, "constant") == 1.0 and lr_factor(0.01, 0.1, "constant") == pytest.approx(0.1)
    assert lr_factor(0.3, 0.0, "cosine") == pytest.approx(0.5 * (1 + math.cos(0.3 * math.pi)))


def test_progress_is_the_larger_spent_fraction(tmp_path):
    cfg = config(tmp_path, max_tokens=1000, max_minutes=1.0)
    assert progress_of(cfg, 250, 30.0) == 0.5 and progress_of(cfg, 750, 30.0) == 0.75


def test_every_window_once_per_pass():
    state = State()
    rows = [_next_rows(state, 10, 3, seed=0) for _ in range(6)]  # 3 micro-batches per pass; the last window waits
    first, second = torch.cat(rows[:3]), torch.cat(rows[3:])
    assert len(set(first.tolist())) == 9 and len(set(second.tolist())) == 9 and state.epoch == 1
    assert first.tolist() != second.tolist()  # a new order each pass


def test_time_budget_stops_training(tmp_path):
    root = env(tmp_path)
    teacher, student = pair()
    rec = recover_(teacher, student, word_tokenizer(), config(root, max_tokens=None, max_minutes=0.004, lr=1e-2),
                   progress=False)
    assert rec["stop"] == "max_minutes" and rec["steps"] >= 1 and 0.004 <= rec["minutes"] < 0.1
    lrs = [row[3] for row in rec["curve"]]
    assert lrs == sorted(lrs, reverse=True)  # cosine over the clock: the learning rate only falls (no warm-up)


def test_warmup_steps_ramp_the_first_steps(tmp_path):
    """With few steps the budget's warm-up is shorter than one step; ``warmup_steps`` ramps the first N anyway."""
    root = env(tmp_path)
    teacher, a = pair()
    _, b = pair()
    plain = recover_(teacher, a, word_tokenizer(), config(root, method="full"), progress=False)
    ramped = recover_(teacher, b, word_tokenizer(), config(root, method="full", warmup_steps=4), progress=False)
    lr_plain = [row[3] for row in plain["curve"]]
    lr_ramped = [row[3] for row in ramped["curve"]]
    assert lr_plain[0] > 0.5 * 3e-3  # 12 steps, 5 % warm-up: the first step is already near the peak rate
    assert lr_ramped[:4] == pytest.approx([lr_plain[i] * (i + 1) / 4 for i in range(4)])
    assert lr_ramped[4:] == pytest.approx(lr_plain[4:])
