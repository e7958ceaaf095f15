"""The 'fbn' scorer on a tiny random Llama: discovery from the store, rules, and a given NetworkSet."""

from __future__ import annotations

import pytest
import torch

from fbnprune.arch import get_adapter
from fbnprune.collect.capture import capture_activations
from fbnprune.collect.sources import TokenBatch
from fbnprune.discover import DiscoverConfig, run_discovery
from fbnprune.errors import UserError
from fbnprune.prune import SCORERS, ScoreContext, score_neurons
from tests.conftest import tiny_model

DISC = {"n_components": 8, "n_restarts": 2, "block_texts": 4, "threshold": 2.5, "max_iter": 100}


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    monkeypatch.setenv("FBNPRUNE_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (65,), generator=g) for _ in range(8)]
    batch = TokenBatch.build(seqs, "synthetic", "document", list(range(8)))
    store = capture_activations(model, batch, tmp_path / "store", progress=False)
    return ScoreContext(model=model, adapter=get_adapter(model), store=store, discover=DISC, progress=False)


def test_fbn_is_registered_and_scores_every_neuron(ctx):
    assert "fbn" in SCORERS._items
    ctx.fbn_rule = "max_z"  # the naive rule: the networks' own max |z| scores
    scores = score_neurons("fbn", ctx)
    assert [s.shape for s in scores] == [(128,), (128,)]
    nets = run_discovery(ctx.store, DiscoverConfig(**DISC), progress=False)  # cached: same result
    assert all(torch.equal(s, n.double()) for s, n in zip(scores, nets.scores, strict=True))
    assert nets.summary["runs_ok"] == 2


def test_rules_and_given_network_set(ctx):
    nets = run_discovery(ctx.store, DiscoverConfig(**DISC), progress=False)
    ctx.networks, ctx.fbn_rule = nets, "recurrence"
    rec = score_neurons("fbn", ctx)
    for r, ref in zip(rec, nets.recurrence, strict=True):
        assert torch.allclose(r, ref.double(), atol=1e-5)
        members = ref > 0
        assert r[members].min() > r[~members].max() if bool(members.any()) and bool((~members).any()) else True
    ctx.networks, ctx.fbn_rule = str(nets.path), "max_z_x_recurrence"
    prod = score_neurons("fbn", ctx)
    assert torch.allclose(prod[0], (nets.scores[0] * nets.recurrence[0]).double(), atol=1e-4)
    ctx.networks, ctx.fbn_rule = nets, "nope"
    with pytest.raises(UserError, match="unknown fbn_rule"):
        score_neurons("fbn", ctx)


def test_bad_discover_options_are_user_errors(ctx):
    ctx.discover = {**DISC, "threshold": 0}
    with pytest.raises(UserError, match="discover.threshold"):
        score_neurons("fbn", ctx)
