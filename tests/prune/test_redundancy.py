"""The fbn ``redundancy`` rule and its correlation control (fbnprune/prune/redundancy.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from fbnprune.arch import get_adapter
from fbnprune.discover.networks import pack_bits
from fbnprune.errors import UserError
from fbnprune.prune import ScoreContext, apply_plan_, make_plan, score_neurons
from fbnprune.prune.compensate import compensate_
from fbnprune.prune.redundancy import correlation_like, redundancy_order, residual_sse, residual_sse_many
from tests.conftest import tiny_model
from tests.prune.conftest import fake_networks, make_store


def gram_of(h: torch.Tensor) -> torch.Tensor:
    ha = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
    return ha.T @ ha


def planted(rows: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Six neurons: 1 = 2 * 0 (+ tiny noise), 3 = 0.5 * 2 + noise of sd 0.3, 4 and 5 independent."""
    g0 = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, 6, generator=g0, dtype=torch.float64) + 1.0
    h[:, 1] = 2 * h[:, 0] + 1e-3 * torch.randn(rows, generator=g0, dtype=torch.float64)
    h[:, 3] = 0.5 * h[:, 2] + 0.3 * torch.randn(rows, generator=g0, dtype=torch.float64)
    share = torch.zeros(6, 6, dtype=torch.bool)
    for a, b in ((0, 1), (2, 3)):
        share[a, b] = share[b, a] = True
    return h, share


@pytest.mark.parametrize("ridge", [1e-3, 0.0])
def test_batched_residuals_equal_one_neuron_solves(ridge):
    """Padding, grouping by list length, several batches and the fallback for a dead neuron (singular at ridge 0)
    change nothing against solving each neuron alone."""
    g0 = torch.Generator().manual_seed(1)
    n, rows = 90, 400
    h = torch.randn(rows, 20, generator=g0, dtype=torch.float64) @ torch.randn(20, n, generator=g0,
                                                                                dtype=torch.float64)
    h += 0.1 * torch.randn(rows, n, generator=g0, dtype=torch.float64)
    h[:, 7] = 0.0  # dead: its neighbours' systems stay fine, its own column/row is all zero
    g = gram_of(h)
    ps = torch.arange(n)
    nbs = []
    for p in range(n):
        nb = torch.randperm(n, generator=g0)[: int(torch.randint(0, 30, (1,), generator=g0))]
        nbs.append(nb[nb != p])
    nbs[3] = torch.tensor([7, 8, 9])  # a dead neighbour: singular without ridge
    ref = torch.tensor([residual_sse(g, p, nb, ridge) for p, nb in zip(ps.tolist(), nbs, strict=True)],
                       dtype=torch.float64)
    got = residual_sse_many(g, ps, nbs, ridge, max_elems=4000)  # forces many small batches
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-6 * float(ref.max()))
    assert len(residual_sse_many(g, ps[:0], [], ridge)) == 0


def test_residual_without_neighbours_is_the_variance_and_with_an_exact_copy_is_zero():
    h, _ = planted()
    g = gram_of(h)
    rows = h.shape[0]
    torch.testing.assert_close(residual_sse(g, 4, torch.tensor([], dtype=torch.long), 0.0) / rows,
                               float(h[:, 4].var(correction=0)), rtol=1e-9, atol=1e-12)
    assert residual_sse(g, 1, torch.tensor([0]), 0.0) / rows < 1e-5
    # partial redundancy: the residual is the planted noise (sd 0.3)
    assert residual_sse(g, 3, torch.tensor([2]), 0.0) / rows == pytest.approx(0.09, rel=0.15)


def test_redundant_network_member_goes_first_and_a_prefix_cut_reproduces_the_rounds():
    h, share = planted()
    g = gram_of(h)
    w = torch.ones(4, 6, dtype=torch.float64)  # equal column norms: only the residual variance decides
    s = redundancy_order(g, w, n_keep=4, neighbours=lambda alive: share, steps=2, ridge=0.0)
    order = torch.argsort(s).tolist()
    assert order[0] in (0, 1)  # one of the copies goes first...
    assert order[1] in (2, 3)  # ...then the other copy has no kept neighbour left, so the partial pair is next
    assert len(set(s.tolist())) == 6  # strictly ordered scores
    # without networks the same rule is FLAP's fluctuation score: the copies are no longer cheap
    alone = redundancy_order(g, w, n_keep=6, neighbours=lambda alive: torch.zeros_like(share), steps=1, ridge=0.0)
    var = h.var(0, correction=0) * 4
    assert torch.argsort(alone).tolist() == torch.argsort(var).tolist()


def test_correlation_control_gives_each_neuron_as_many_neighbours_by_correlation():
    g0 = torch.Generator().manual_seed(3)
    h = torch.randn(500, 5, generator=g0, dtype=torch.float64)
    h[:, 4] = h[:, 2] + 0.01 * torch.randn(500, generator=g0, dtype=torch.float64)  # 4 ~ 2
    share = torch.zeros(5, 5, dtype=torch.bool)
    share[4, 0] = share[0, 4] = True  # its network says neuron 0 (one neighbour)
    nb = correlation_like(gram_of(h), share)
    alive = torch.ones(5, dtype=torch.bool)
    out = nb(alive)
    assert out[4].nonzero().flatten().tolist() == [2]  # same count, the correlated neuron
    assert out.sum(1).tolist() == share.sum(1).tolist()
    alive[2] = False  # a dead neighbour is never chosen
    assert 2 not in nb(alive)[4].nonzero().flatten().tolist()
    assert not nb(alive).diagonal().any()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_model("llama")
    store = make_store(model, tmp_path_factory.mktemp("store"))
    return model, get_adapter(model), store


def test_fbn_redundancy_rule_and_control_run_through_the_engine(setup, tmp_path):
    model, adapter, store = setup
    width = adapter.width(adapter.mlps(model)[0])
    nets = fake_networks(tmp_path, [torch.zeros(width), torch.zeros(width)])
    members = torch.zeros(3, width, dtype=torch.bool)  # three networks of 16 neurons per layer, one run
    for k in range(3):
        members[k, 16 * k: 16 * (k + 1)] = True
    for i in range(2):
        nets._t[f"net_members.{i}"] = pack_bits(members)[None]
    assert torch.equal(nets.networks(0), members)

    def ctx(**o):
        return ScoreContext(model=model, adapter=adapter, store=store, seed=0, progress=False, networks=nets,
                            sparsity=0.25, **o)

    fbn = score_neurons("fbn", ctx(fbn_rule="redundancy"))
    ctl = score_neurons("corr_redundancy", ctx())
    flap = score_neurons("flap", ctx())
    plan = make_plan(fbn, sparsity=0.25, round_to=8)
    assert plan.kept_widths == [96, 96]
    # outside the networks the rule is FLAP's score; so the neurons in no network are ordered as FLAP orders them
    out = torch.arange(48, width)
    for i in range(2):
        assert torch.argsort(fbn[i][out]).tolist() == torch.argsort(flap[i][out]).tolist()
    assert any(not torch.equal(a, b) for a, b in zip(fbn, ctl, strict=True))
    pruned = copy.deepcopy(model)
    compensate_(pruned, plan, store, "netrefit", networks=nets)
    apply_plan_(pruned, plan, mode="slice")
    assert [adapter.width(m) for m in adapter.mlps(pruned)] == [96, 96]
    with pytest.raises(UserError, match="sparsity"):
        score_neurons("corr_redundancy", ScoreContext(model=model, adapter=adapter, store=store, seed=0,
                                                      progress=False, networks=nets))
