"""The fbn study's own scorers (benchmarks/fbn_rules/variants.py: fbn_obs, fbn_alloc, obs_global) on a tiny Llama
with planted network statistics; they are registered only where the study imports them."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from fbnprune.arch import get_adapter
from fbnprune.errors import UserError
from fbnprune.prune import SCORERS, make_plan, score_neurons
from fbnprune.prune.gram import augmented_gram
from fbnprune.prune.obs import obs_order
from tests.benchmarks import BENCHMARKS
from tests.conftest import tiny_model
from tests.prune.conftest import fake_networks, make_store

WIDTH = 128


@pytest.fixture(scope="module")
def variants():
    """The module as the study scripts import it (by its name ``variants``: it registers once per process); its
    scorers leave the registry again afterwards, so later tests see the product's registry."""
    saved = dict(SCORERS._items)
    sys.path.insert(0, str(BENCHMARKS / "fbn_rules"))
    try:
        yield importlib.import_module("variants")
    finally:
        sys.path.remove(str(BENCHMARKS / "fbn_rules"))
        sys.modules.pop("variants", None)
        SCORERS._items.clear()
        SCORERS._items.update(saved)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_model("llama")
    store = make_store(model, tmp_path_factory.mktemp("store"))
    return model, get_adapter(model), store


def ctx_of(variants, setup, **settings):
    model, adapter, store = setup
    return variants.context(model, adapter, store=store, seed=0, progress=False, **settings)


def test_study_scorers_register_only_on_import(variants):
    assert {"fbn_obs", "fbn_alloc", "obs_global"} <= set(SCORERS.names())
    ctx = variants.context(None, None, sparsity=0.3, fbn_beta=2.0)
    assert ctx.sparsity == 0.3 and ctx.extra == {"fbn_beta": 2.0}
    assert ctx.options["fbn_beta"] == 2.0 and ctx.options["sparsity"] == 0.3  # one read-only view of both


def test_weighted_obs_without_weights_is_obs(variants, setup):
    model, adapter, store = setup
    w = adapter.down_weight(adapter.mlps(model)[0]).detach().double()
    g = augmented_gram(store, 0)
    assert torch.equal(variants.weighted_obs_order(g, w, 90, None, 5, 1e-3), obs_order(g, w, 90, 5, 1e-3))


def test_fbn_obs_beta_zero_equals_obs_and_beta_protects_recurrent_members(variants, setup, tmp_path):
    rec = [torch.zeros(WIDTH), torch.zeros(WIDTH)]
    protected = torch.arange(0, WIDTH, 4)  # 32 "stable network members" per layer
    for r in rec:
        r[protected] = 1.0
    nets = fake_networks(tmp_path, rec)
    base = score_neurons("obs", ctx_of(variants, setup, sparsity=0.5))
    zero = score_neurons("fbn_obs", ctx_of(variants, setup, sparsity=0.5, networks=nets, fbn_beta=0.0))
    assert all(torch.equal(a, b) for a, b in zip(base, zero, strict=True))
    strong = score_neurons("fbn_obs", ctx_of(variants, setup, sparsity=0.5, networks=nets, fbn_beta=1e9))
    plan_obs = make_plan(base, sparsity=0.5, round_to=8)
    plan = make_plan(strong, sparsity=0.5, round_to=8)
    for i in range(2):
        kept = set(plan.keep[i].tolist())
        assert set(protected.tolist()) <= kept  # every protected neuron survives
        # ...while plain obs drops some of them, so the weight changed the selection
        assert not set(protected.tolist()) <= set(plan_obs.keep[i].tolist())


def test_density_widths_meet_budget_and_follow_gamma(variants):
    widths = [1536] * 6
    dens = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    for gamma in (0.25, -0.25, 0.0):
        k = variants.density_widths(dens, widths, 0.3, gamma)
        assert all(x % 8 == 0 and 0.2 * 1536 <= x <= 1536 for x in k)
        assert abs(sum(k) - 0.7 * 6 * 1536) <= 8 * 6
        if gamma > 0:
            assert k == sorted(k) and k[-1] > k[0]
        elif gamma < 0:
            assert k == sorted(k, reverse=True) and k[0] > k[-1]
        else:
            assert len(set(k)) == 1


def test_fbn_alloc_gives_density_widths_through_a_global_plan(variants, setup, tmp_path):
    rec = [torch.full((WIDTH,), 0.1), torch.full((WIDTH,), 0.9)]  # layer 1 is network-dense
    nets = fake_networks(tmp_path, rec)
    s = score_neurons("fbn_alloc", ctx_of(variants, setup, sparsity=0.5, networks=nets, fbn_gamma=0.5))
    want = variants.density_widths([0.1, 0.9], [WIDTH, WIDTH], 0.5, 0.5)
    assert [int((x > 0).sum()) for x in s] == want and want[1] > want[0]
    plan = make_plan(s, sparsity=0.5, allocation="global", normalize="none", round_to=8)
    assert plan.kept_widths == want
    # inside a layer the kept neurons are the ones OBS keeps at that width
    model, adapter, store = setup
    w = adapter.down_weight(adapter.mlps(model)[1]).detach().double()
    ref = variants.weighted_obs_order(augmented_gram(store, 1), w, want[1], None, 10, 1e-3)
    assert set(plan.keep[1].tolist()) == set(torch.argsort(ref, descending=True)[: want[1]].tolist())


def test_obs_global_meets_budget(variants, setup):
    s = score_neurons("obs_global", ctx_of(variants, setup, sparsity=0.5))
    plan = make_plan(s, sparsity=0.5, allocation="global", normalize="none", round_to=8)
    assert sum(plan.kept_widths) == WIDTH  # half of 2 x 128
    assert all(w % 8 == 0 for w in plan.kept_widths)


def test_options_are_validated(variants, setup, tmp_path):
    nets = fake_networks(tmp_path, [torch.zeros(WIDTH), torch.zeros(WIDTH)])
    with pytest.raises(UserError, match="sparsity"):
        score_neurons("fbn_obs", ctx_of(variants, setup, networks=nets))
    with pytest.raises(UserError, match="fbn_beta"):
        score_neurons("fbn_obs", ctx_of(variants, setup, sparsity=0.3, networks=nets, fbn_beta=-1))
    with pytest.raises(UserError, match="fbn_signal"):
        score_neurons("fbn_obs", ctx_of(variants, setup, sparsity=0.3, networks=nets, fbn_signal="nope"))
    wrong = fake_networks(tmp_path, [torch.zeros(64), torch.zeros(64)])
    with pytest.raises(UserError, match="layer widths"):
        score_neurons("fbn_alloc", ctx_of(variants, setup, sparsity=0.3, networks=wrong))


def test_fbn_alloc_with_wanda_order_inside_layers(variants, setup, tmp_path):
    rec = [torch.full((WIDTH,), 0.9), torch.full((WIDTH,), 0.1)]
    nets = fake_networks(tmp_path, rec)
    s = score_neurons("fbn_alloc", ctx_of(variants, setup, sparsity=0.5, networks=nets, fbn_gamma=0.5,
                                          fbn_within="wanda_sp"))
    wanda = score_neurons("wanda_sp", ctx_of(variants, setup))
    want = variants.density_widths([0.9, 0.1], [WIDTH, WIDTH], 0.5, 0.5)
    for i in range(2):
        assert set((s[i] > 0).nonzero().flatten().tolist()) == set(
            torch.argsort(wanda[i], descending=True, stable=True)[: want[i]].tolist())
    with pytest.raises(UserError, match="fbn_within"):
        score_neurons("fbn_alloc", ctx_of(variants, setup, sparsity=0.5, networks=nets, fbn_within="x"))
