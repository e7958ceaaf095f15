"""Synthetic data with planted functional networks, and tiny activation stores built from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fbnprune.collect.store import ActivationStore, StoreWriter


def planted(
    *, t: int = 2000, n: int = 400, groups: int = 5, size: int = 12, noise: float = 0.0, seed: int = 0
) -> tuple[np.ndarray, list[set[int]]]:
    """``(T, N)`` activations: ``groups`` disjoint sparse neuron groups, each driven by its own Laplace time course
    (plus ``noise`` x Gaussian on members); every other neuron is independent Gaussian background."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    sets = [set(perm[g * size : (g + 1) * size].tolist()) for g in range(groups)]
    x = rng.normal(size=(t, n))
    for members in sets:
        idx = np.array(sorted(members))
        tc = rng.laplace(size=(t, 1))
        x[:, idx] = tc * rng.uniform(1.0, 2.0, size=(1, len(idx))) + noise * rng.normal(size=(t, len(idx)))
    return x.astype(np.float32), sets


def best_jaccard(nets: torch.Tensor, sets: list[set[int]]) -> list[float]:
    """For each planted set, the best Jaccard overlap with any recovered network (rows of ``nets``)."""
    out = []
    for s in sets:
        best = 0.0
        for row in nets:
            found = set(torch.nonzero(row).flatten().tolist())
            if found:
                best = max(best, len(s & found) / len(s | found))
        out.append(best)
    return out


def make_store(path: Path, layers: list[np.ndarray], docs: np.ndarray, meta: dict | None = None) -> ActivationStore:
    """An activation store holding ``layers`` (each ``(rows, width)``) whose rows belong to documents ``docs``."""
    n_rows = layers[0].shape[0]
    w = StoreWriter(path, [a.shape[1] for a in layers], n_rows, True,
                    dict(meta or {}, data_sha256="synthetic-" + str(n_rows), model={"source": "synthetic"},
                         drop_first=1))
    w.rows[:, 0] = docs
    w.rows[:, 1] = np.arange(n_rows)
    w.rows[:, 2] = docs
    for i, a in enumerate(layers):
        w.add(i, 0, torch.from_numpy(a))
    return w.finish()


@pytest.fixture
def planted_store(tmp_path: Path):
    """Two layers x 3 blocks of 4 texts (250 rows per text): the same planted networks in every block of layer 0,
    a different planted set in layer 1."""
    rows_per_doc, docs_n = 250, 12
    t = rows_per_doc * docs_n
    a0, sets0 = planted(t=t, n=400, groups=4, size=10, seed=1)
    a1, sets1 = planted(t=t, n=320, groups=3, size=10, seed=2)
    docs = np.repeat(np.arange(docs_n), rows_per_doc)
    store = make_store(tmp_path / "store", [a0, a1], docs)
    return store, [sets0, sets1]
