"""Fixtures for prune tests: a tiny model with a calibration store collected from random tokens, and networks."""

from __future__ import annotations

import pytest
import torch

from fbnprune.collect import TokenBatch, capture_activations
from fbnprune.discover import NetworkSet


def calib_batch(n_seq: int = 6, seq_len: int = 24, seed: int = 1) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    return TokenBatch.build([torch.randint(0, 256, (seq_len,), generator=g) for _ in range(n_seq)], "test", "pack")


def make_store(model, path, batch: TokenBatch | None = None):
    return capture_activations(model, batch or calib_batch(), path, batch_size=3, progress=False)


@pytest.fixture
def batch() -> TokenBatch:
    return calib_batch()


def fake_networks(tmp_path, recurrence: list[torch.Tensor], scores: list[torch.Tensor] | None = None) -> NetworkSet:
    """A NetworkSet with given per-neuron recurrence (and max |z|) per layer; nothing else is read by the scorers."""
    scores = scores or [torch.rand(len(r), generator=torch.Generator().manual_seed(i)) * 5 for i, r in
                        enumerate(recurrence)]
    t = {}
    for i, (r, s) in enumerate(zip(recurrence, scores, strict=True)):
        t[f"recurrence.{i}"], t[f"score.{i}"] = r.float(), s.float()
    summary = {"layers": len(recurrence), "widths": [len(r) for r in recurrence], "params": {"threshold": 3.6}}
    return NetworkSet(tmp_path / "nets", t, summary)
