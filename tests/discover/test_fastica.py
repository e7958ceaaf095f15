"""The torch FastICA against scikit-learn, and its building blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fbnprune.discover import CanICA, TemporalICA
from fbnprune.discover.decompose import initial_unmixing, restart_seeds
from fbnprune.discover.fastica import fastica_parallel, sym_decorrelation

from .conftest import planted


def test_newton_schulz_equals_eigh_polar_factor():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 32, 32, generator=g, dtype=torch.float64) * torch.rand(6, 32, 1, generator=g, dtype=torch.float64)
    a = sym_decorrelation(w, "eigh")
    b = sym_decorrelation(w, "ns", ns_tol=1e-12, ns_max=200)
    eye = torch.eye(32, dtype=torch.float64)
    assert torch.allclose(a @ a.mT, eye.expand_as(a), atol=1e-10)
    assert torch.allclose(a, b, atol=1e-8)


def test_seeds_match_the_reference_draw():
    assert restart_seeds(327, 3) == [int(s) for s in np.random.RandomState(327).randint(2**31 - 1, size=3)]
    w = initial_unmixing(327, 2, 4)
    assert np.array_equal(w[1], np.random.RandomState(restart_seeds(327, 2)[1]).normal(size=(4, 4)))


def test_float64_torch_follows_sklearn_exactly():
    """Same data, same w_init: the torch solver in float64 takes the same iterations and lands on the same maps."""
    x, _ = planted(t=1500, n=300, groups=6, size=10, noise=0.3, seed=3)
    a = CanICA(n_components=8, n_restarts=3, backend="torch", solver="fastica", dtype="float64").fit(x)
    b = CanICA(n_components=8, n_restarts=3, backend="sklearn").fit(x)
    assert a.n_iter_ == b.n_iter_
    assert a.chosen_restart_ == b.chosen_restart_
    assert torch.allclose(a.components_, b.components_, atol=1e-4)


def test_float32_matches_sklearn_up_to_sign_and_order():
    x, _ = planted(t=1500, n=300, groups=6, size=10, noise=0.3, seed=4)
    a = CanICA(n_components=6, n_restarts=2).fit(x)
    b = CanICA(n_components=6, n_restarts=2, backend="sklearn").fit(x)
    corr = (a.components_.double() @ b.components_.double().T) / x.shape[1]
    assert corr.abs().amax(1).min() > 0.99


def test_fixed_seed_gives_identical_results_and_other_seed_differs():
    x, _ = planted(t=1000, n=200, groups=4, size=10, noise=0.3, seed=5)
    a = CanICA(n_components=4, n_restarts=2, random_state=7).fit(x)
    b = CanICA(n_components=4, n_restarts=2, random_state=7).fit(x)
    c = CanICA(n_components=4, n_restarts=2, random_state=8).fit(x)
    assert torch.equal(a.components_, b.components_)
    assert not torch.equal(a.components_, c.components_)


def test_nonconvergence_is_reported_and_overflow_marks_failure():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(1, 8, 500)))  # Gaussian: no independent directions to find
    x = x / x.std(-1, keepdim=True)
    res = fastica_parallel(x, torch.randn(1, 8, 8, dtype=torch.float64), fun="logcosh", max_iter=3, tol=1e-12,
                           decorrelation="eigh")
    assert not bool(res.converged[0]) and int(res.n_iter[0]) == 3 and bool(res.finite[0])
    bad = x.clone()
    bad[0, 0, 0] = float("inf")
    res = fastica_parallel(bad, torch.randn(1, 8, 8, dtype=torch.float64), fun="cube", max_iter=5)
    assert not bool(res.finite[0]) and not bool(res.converged[0])


@pytest.mark.parametrize("fun", ["cube", "logcosh", "exp"])
def test_temporal_ica_torch_and_sklearn_agree(fun):
    x, _ = planted(t=1500, n=120, groups=4, size=10, noise=0.2, seed=6)
    a = TemporalICA(n_components=4, n_restarts=1, fun=fun, solver="fastica", dtype="float64").fit(x)
    b = TemporalICA(n_components=4, n_restarts=1, fun=fun, backend="sklearn").fit(x)
    corr = (a.components_.double() @ b.components_.double().T) / x.shape[1]
    assert corr.abs().amax(1).min() > 0.999


@pytest.mark.parametrize("fun", ["cube", "logcosh"])
def test_picard_o_reaches_the_fastica_solution(fun):
    """Same objective and starting points: Picard-O lands on FastICA's converged maps."""
    x, _ = planted(t=1500, n=300, groups=6, size=10, noise=0.3, seed=7)
    kw = dict(n_components=6, n_restarts=3, fun=fun, tol=1e-6, max_iter=500)
    pic = CanICA(solver="picard-o", **kw).fit(x)
    fic = CanICA(solver="fastica", dtype="float64", **kw).fit(x)
    assert all(pic.converged_) and all(fic.converged_)
    corr = (pic.components_.double() @ fic.components_.double().T) / x.shape[1]
    assert corr.abs().amax(1).min() > 0.999
