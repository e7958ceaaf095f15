"""Fixtures for prune tests: a tiny model with a calibration store collected from random tokens."""

from __future__ import annotations

import pytest
import torch

from fbnprune.collect import TokenBatch, capture_activations


def calib_batch(n_seq: int = 6, seq_len: int = 24, seed: int = 1) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    return TokenBatch.build([torch.randint(0, 256, (seq_len,), generator=g) for _ in range(n_seq)], "test", "pack")


def make_store(model, path, batch: TokenBatch | None = None):
    return capture_activations(model, batch or calib_batch(), path, batch_size=3, progress=False)


@pytest.fixture
def batch() -> TokenBatch:
    return calib_batch()
