"""The restricted re-fits (netrefit's neighbour rebuild, its correlation control, anchored) on planted data."""

from __future__ import annotations

import copy

import pytest
import torch

from fbnprune.arch import get_adapter
from fbnprune.errors import UserError
from fbnprune.prune import ScoreContext, make_plan, score_neurons
from fbnprune.prune.compensate import anchored_refit_compensation_, bias_compensation_
from fbnprune.prune.refit import correlation_neighbourhoods, network_refit_weights
from tests.conftest import tiny_model
from tests.prune.conftest import make_store


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_model("llama")
    store = make_store(model, tmp_path_factory.mktemp("store"))
    return model, get_adapter(model), store


def test_network_refit_rebuilds_a_pruned_copy_from_its_network_and_biases_the_loners():
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


def test_anchored_refit_tends_to_bias_compensation_and_beats_it_on_calibration(setup):
    model, adapter, store = setup
    ctx = ScoreContext(model=model, adapter=adapter, store=store, seed=0, progress=False)
    plan = make_plan(score_neurons("wanda_sp", ctx), sparsity=0.5, round_to=8)
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
