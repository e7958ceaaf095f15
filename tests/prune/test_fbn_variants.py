"""fbn study scorers (fbn_obs, fbn_alloc, obs_global) on a tiny Llama with planted network statistics."""

from __future__ import annotations

import pytest
import torch

from fbnprune.arch import get_adapter
from fbnprune.discover import NetworkSet
from fbnprune.errors import UserError
from fbnprune.prune import ScoreContext, make_plan, score_neurons
from fbnprune.prune.fbn_variants import density_widths, weighted_obs_order
from fbnprune.prune.gram import augmented_gram
from fbnprune.prune.obs import obs_order
from tests.conftest import tiny_model
from tests.prune.conftest import make_store

WIDTH = 128


def fake_networks(tmp_path, recurrence: list[torch.Tensor], scores: list[torch.Tensor] | None = None) -> NetworkSet:
    """A NetworkSet with given per-neuron recurrence (and max |z|) per layer; nothing else is read by the scorers."""
    scores = scores or [torch.rand(len(r), generator=torch.Generator().manual_seed(i)) * 5 for i, r in
                        enumerate(recurrence)]
    t = {}
    for i, (r, s) in enumerate(zip(recurrence, scores, strict=True)):
        t[f"recurrence.{i}"], t[f"score.{i}"] = r.float(), s.float()
    summary = {"layers": len(recurrence), "widths": [len(r) for r in recurrence], "params": {"threshold": 3.6}}
    return NetworkSet(tmp_path / "nets", t, summary)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_model("llama")
    store = make_store(model, tmp_path_factory.mktemp("store"))
    return model, get_adapter(model), store


def ctx_of(setup, **options) -> ScoreContext:
    model, adapter, store = setup
    return ScoreContext(model=model, adapter=adapter, store=store, seed=0, options={"progress": False, **options})


def test_weighted_obs_without_weights_is_obs(setup):
    model, adapter, store = setup
    w = adapter.down_weight(adapter.mlps(model)[0]).detach().double()
    g = augmented_gram(store, 0)
    assert torch.equal(weighted_obs_order(g, w, 90, None, 5, 1e-3), obs_order(g, w, 90, 5, 1e-3))


def test_fbn_obs_beta_zero_equals_obs_and_beta_protects_recurrent_members(setup, tmp_path):
    rec = [torch.zeros(WIDTH), torch.zeros(WIDTH)]
    protected = torch.arange(0, WIDTH, 4)  # 32 "stable network members" per layer
    for r in rec:
        r[protected] = 1.0
    nets = fake_networks(tmp_path, rec)
    base = score_neurons("obs", ctx_of(setup, sparsity=0.5))
    zero = score_neurons("fbn_obs", ctx_of(setup, sparsity=0.5, networks=nets, fbn_beta=0.0))
    assert all(torch.equal(a, b) for a, b in zip(base, zero, strict=True))
    strong = score_neurons("fbn_obs", ctx_of(setup, sparsity=0.5, networks=nets, fbn_beta=1e9))
    plan_obs = make_plan(base, sparsity=0.5, round_to=8)
    plan = make_plan(strong, sparsity=0.5, round_to=8)
    for i in range(2):
        kept = set(plan.keep[i].tolist())
        assert set(protected.tolist()) <= kept  # every protected neuron survives
        # ...while plain obs drops some of them, so the weight changed the selection
        assert not set(protected.tolist()) <= set(plan_obs.keep[i].tolist())


def test_density_widths_meet_budget_and_follow_gamma():
    widths = [1536] * 6
    dens = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    for gamma in (0.25, -0.25, 0.0):
        k = density_widths(dens, widths, 0.3, gamma)
        assert all(x % 8 == 0 and 0.2 * 1536 <= x <= 1536 for x in k)
        assert abs(sum(k) - 0.7 * 6 * 1536) <= 8 * 6
        if gamma > 0:
            assert k == sorted(k) and k[-1] > k[0]
        elif gamma < 0:
            assert k == sorted(k, reverse=True) and k[0] > k[-1]
        else:
            assert len(set(k)) == 1


def test_fbn_alloc_gives_density_widths_through_a_global_plan(setup, tmp_path):
    rec = [torch.full((WIDTH,), 0.1), torch.full((WIDTH,), 0.9)]  # layer 1 is network-dense
    nets = fake_networks(tmp_path, rec)
    s = score_neurons("fbn_alloc", ctx_of(setup, sparsity=0.5, networks=nets, fbn_gamma=0.5))
    want = density_widths([0.1, 0.9], [WIDTH, WIDTH], 0.5, 0.5)
    assert [int((x > 0).sum()) for x in s] == want and want[1] > want[0]
    plan = make_plan(s, sparsity=0.5, allocation="global", normalize="none", round_to=8)
    assert plan.kept_widths == want
    # inside a layer the kept neurons are the ones OBS keeps at that width
    model, adapter, store = setup
    w = adapter.down_weight(adapter.mlps(model)[1]).detach().double()
    ref = weighted_obs_order(augmented_gram(store, 1), w, want[1], None, 10, 1e-3)
    assert set(plan.keep[1].tolist()) == set(torch.argsort(ref, descending=True)[: want[1]].tolist())


def test_obs_global_meets_budget(setup):
    s = score_neurons("obs_global", ctx_of(setup, sparsity=0.5))
    plan = make_plan(s, sparsity=0.5, allocation="global", normalize="none", round_to=8)
    assert sum(plan.kept_widths) == WIDTH  # half of 2 x 128
    assert all(w % 8 == 0 for w in plan.kept_widths)


def test_options_are_validated(setup, tmp_path):
    nets = fake_networks(tmp_path, [torch.zeros(WIDTH), torch.zeros(WIDTH)])
    with pytest.raises(UserError, match="sparsity"):
        score_neurons("fbn_obs", ctx_of(setup, networks=nets))
    with pytest.raises(UserError, match="fbn_beta"):
        score_neurons("fbn_obs", ctx_of(setup, sparsity=0.3, networks=nets, fbn_beta=-1))
    with pytest.raises(UserError, match="fbn_signal"):
        score_neurons("fbn_obs", ctx_of(setup, sparsity=0.3, networks=nets, fbn_signal="nope"))
    wrong = fake_networks(tmp_path, [torch.zeros(64), torch.zeros(64)])
    with pytest.raises(UserError, match="layer widths"):
        score_neurons("fbn_alloc", ctx_of(setup, sparsity=0.3, networks=wrong))


def test_network_refit_rebuilds_a_pruned_copy_from_its_network_and_biases_the_loners():
    from fbnprune.prune.fbn_variants import network_refit_weights

    g0 = torch.Generator().manual_seed(0)
    h = torch.randn(400, 6, generator=g0, dtype=torch.float64) + 1.0
    h[:, 1] = 2 * h[:, 0]  # neuron 1 = 2 x neuron 0: same network, fully redundant
    ha = torch.cat([h, torch.ones(400, 1, dtype=torch.float64)], 1)
    g = ha.T @ ha
    w = torch.randn(3, 6, generator=g0, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True, True, False])  # prune 1 (in a network) and 5 (alone)
    share = torch.zeros(6, 6, dtype=torch.bool)
    share[0, 1] = share[1, 0] = True
    new_w, delta, alone = network_refit_weights(g, w, keep, share, ridge=0.0)
    assert alone == 1
    torch.testing.assert_close(new_w[:, 0], w[:, 0] + 2 * w[:, 1])  # neuron 1's column folded into neuron 0
    torch.testing.assert_close(new_w[:, 2:5], w[:, 2:5])  # others untouched
    torch.testing.assert_close(delta, w[:, 5] * h[:, 5].mean(), rtol=1e-6, atol=1e-6)  # loner: its mean


def test_fbn_alloc_with_wanda_order_inside_layers(setup, tmp_path):
    rec = [torch.full((WIDTH,), 0.9), torch.full((WIDTH,), 0.1)]
    nets = fake_networks(tmp_path, rec)
    s = score_neurons("fbn_alloc", ctx_of(setup, sparsity=0.5, networks=nets, fbn_gamma=0.5, fbn_within="wanda_sp"))
    wanda = score_neurons("wanda_sp", ctx_of(setup))
    want = density_widths([0.9, 0.1], [WIDTH, WIDTH], 0.5, 0.5)
    for i in range(2):
        assert set((s[i] > 0).nonzero().flatten().tolist()) == set(
            torch.argsort(wanda[i], descending=True, stable=True)[: want[i]].tolist())
    with pytest.raises(UserError, match="fbn_within"):
        score_neurons("fbn_alloc", ctx_of(setup, sparsity=0.5, networks=nets, fbn_within="x"))


def test_anchored_refit_tends_to_bias_compensation_and_beats_it_on_calibration(setup):
    import copy

    from fbnprune.prune.compensate import bias_compensation_
    from fbnprune.prune.fbn_variants import anchored_refit_compensation_

    model, adapter, store = setup
    plan = make_plan(score_neurons("wanda_sp", ctx_of(setup)), sparsity=0.5, round_to=8)
    big, ref = copy.deepcopy(model), copy.deepcopy(model)
    anchored_refit_compensation_(big, plan, store, ridge=1e6)
    bias_compensation_(ref, plan, store)
    for mb, mr in zip(adapter.mlps(big), adapter.mlps(ref), strict=True):
        torch.testing.assert_close(adapter.down_weight(mb), adapter.down_weight(mr), rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(adapter.down_module(mb).bias, adapter.down_module(mr).bias, rtol=1e-3, atol=1e-4)
    rep = anchored_refit_compensation_(copy.deepcopy(model), plan, store, ridge=0.1)
    for lay in rep["layers"].values():
        assert lay["refit"] < lay["pruned"]
    with pytest.raises(UserError, match="ridge"):
        anchored_refit_compensation_(copy.deepcopy(model), plan, store, ridge=0.0)


def test_correlation_neighbourhoods_match_network_sizes_and_pick_correlated_neurons():
    from fbnprune.prune.fbn_variants import correlation_neighbourhoods

    g0 = torch.Generator().manual_seed(3)
    h = torch.randn(500, 5, generator=g0, dtype=torch.float64)
    h[:, 4] = h[:, 2] + 0.01 * torch.randn(500, generator=g0, dtype=torch.float64)  # 4 ~ 2
    ha = torch.cat([h, torch.ones(500, 1, dtype=torch.float64)], 1)
    keep = torch.tensor([True, True, True, True, False])
    share = torch.zeros(5, 5, dtype=torch.bool)
    share[4, 0] = share[0, 4] = True  # its network says neuron 0 (one neighbour)
    out = correlation_neighbourhoods(ha.T @ ha, keep, share)
    assert out[4].nonzero().flatten().tolist() == [2]  # same count, but the correlated neuron
    assert not out[:4].any()
