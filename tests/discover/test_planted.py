"""Planted sparse networks in synthetic data are recovered."""

from __future__ import annotations

import pytest

from fbnprune.discover import CanICA, TemporalICA

from .conftest import best_jaccard, planted


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("seed", [0, 1])
def test_canica_recovers_planted_networks_without_noise(dtype, seed):
    x, sets = planted(t=2000, n=400, groups=5, size=12, noise=0.0, seed=seed)
    m = CanICA(n_components=10, n_restarts=3, dtype=dtype).fit(x)
    assert min(best_jaccard(m.networks(3.0), sets)) >= 0.9


def test_canica_recovers_planted_networks_under_noise():
    x, sets = planted(t=2000, n=400, groups=5, size=12, noise=1.0, seed=2)
    m = CanICA(n_components=10, n_restarts=3).fit(x)
    jac = best_jaccard(m.networks(3.0), sets)
    assert min(jac) >= 0.6 and sum(jac) / len(jac) >= 0.75


@pytest.mark.parametrize("noise,bound", [(0.0, 0.9), (0.5, 0.7)])
def test_temporal_ica_recovers_planted_networks(noise, bound):
    x, sets = planted(t=3000, n=300, groups=5, size=12, noise=noise, seed=3)
    m = TemporalICA(n_components=5, n_restarts=1, fun="logcosh").fit(x)
    assert min(best_jaccard(m.networks(3.0), sets)) >= bound


def test_scores_follow_the_union_rule():
    x, sets = planted(t=2000, n=400, groups=5, size=12, seed=4)
    m = CanICA(n_components=10, n_restarts=2).fit(x)
    assert ((m.scores_ > 3.0) == m.networks(3.0).any(0)).all()
    members = set().union(*sets)
    top = set(m.scores_.argsort(descending=True)[: len(members)].tolist())
    assert len(top & members) / len(members) >= 0.95
