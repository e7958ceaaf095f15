"""run_discovery: blocks, recurrence, retries, windows, caching and the artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fbnprune.discover import DiscoverConfig, NetworkSet, discover_networks, run_discovery
from fbnprune.discover import decompose as dec
from fbnprune.discover.networks import jaccard_matrix, match_networks, network_recurrence
from fbnprune.errors import UserError

from .conftest import best_jaccard

FAST = dict(n_components=4, n_restarts=2, block_texts=4, threshold=4.0, max_iter=100)


def test_runs_recover_planted_networks_and_they_recur(planted_store, tmp_path):
    store, sets = planted_store
    nets = run_discovery(store, DiscoverConfig(**FAST), root=tmp_path / "nets", progress=False)
    s = nets.summary
    assert s["runs_total"] == 3 and s["runs_ok"] == 3 and s["runs_failed"] == 0
    assert s["split"]["blocks"] == 3 and s["split"]["texts"] == 12
    for layer, planted_sets in enumerate(sets):
        members = set().union(*planted_sets)
        found = set(torch.nonzero(nets.membership[layer]).flatten().tolist())
        assert len(found & members) / len(found | members) >= 0.9
        # every planted neuron is a member in every run: recurrence 1
        assert float(nets.recurrence[layer][sorted(members)].min()) == 1.0
        assert nets.run_scores[layer].shape == (3, store.widths[layer])
        assert torch.equal(nets.scores[layer], nets.run_scores[layer].amax(0))
        for run in range(3):
            assert min(best_jaccard(nets.networks(layer, run), planted_sets)) >= 0.9
        # each planted network recurs in both other runs
        rec = nets.network_recurrence(layer)
        assert int((rec == 1.0).sum()) >= 3 * len(planted_sets)
        info = s["per_layer"][layer]
        assert info["networks_recurring_half"] > 0 and info["members"] == len(found)


def test_cache_is_reused_and_keyed_on_parameters(planted_store, tmp_path, monkeypatch):
    store, _ = planted_store
    root = tmp_path / "nets"
    a = run_discovery(store, DiscoverConfig(**FAST), root=root, progress=False)
    calls = []
    monkeypatch.setattr("fbnprune.discover.discovery.discover_networks",
                        lambda *a, **k: calls.append(1) or discover_networks(*a, **k))
    b = run_discovery(store, DiscoverConfig(**FAST), root=root, progress=False)
    assert b.path == a.path and calls == []
    c = run_discovery(store, DiscoverConfig(**{**FAST, "threshold": 2.5}), root=root, progress=False)
    assert c.path != a.path and calls == [1]
    assert not list(root.glob(".*partial*"))
    loaded = NetworkSet.load(a.path)
    assert all(torch.equal(x, y) for x, y in zip(loaded.scores, a.scores, strict=True))
    summary = json.loads((a.path / "summary.json").read_text())
    assert summary["data_sha256"] == store.meta["data_sha256"] and summary["params"]["n_components"] == FAST["n_components"]


def test_failed_run_is_retried_with_another_seed_and_counted(planted_store, monkeypatch):
    store, _ = planted_store
    real = dec.decompose
    seen: list[int] = []

    def flaky(blocks, **kw):
        seen.append(kw["seed"])
        out = real(blocks, **kw)
        if len(seen) == 2:  # the second run's first attempt overflows in every restart
            out[0] = dec.ICAOutcome(None, -1, out[0].n_iter, [False] * 2, [False] * 2)
        return out

    monkeypatch.setattr("fbnprune.discover.discovery.decompose", flaky)
    _, s = discover_networks(store, DiscoverConfig(**FAST), progress=False)
    assert s["runs_ok"] == 3 and s["runs_retried"] == 1 and s["runs_failed"] == 0
    attempts = s["runs"][1]["attempts"]
    assert len(attempts) == 2 and attempts[0]["failed_windows"] == [0]
    assert attempts[1]["seed"] != attempts[0]["seed"]


def test_run_failing_every_retry_is_counted_not_dropped(planted_store, monkeypatch):
    store, _ = planted_store
    real = dec.decompose
    state = {"n": 0}

    def broken_first_run(blocks, **kw):
        state["n"] += 1
        out = real(blocks, **kw)
        if state["n"] <= 2:  # run 0, attempts 0 and 1
            out[1] = dec.ICAOutcome(None, -1, out[1].n_iter, [False] * 2, [False] * 2)
        return out

    monkeypatch.setattr("fbnprune.discover.discovery.decompose", broken_first_run)
    tensors, s = discover_networks(store, DiscoverConfig(**FAST, max_retries=1), progress=False)
    assert s["runs_failed"] == 1 and s["runs_ok"] == 2 and not s["runs"][0]["ok"]
    assert tensors["run_scores.0"].shape[0] == 2


def test_windowed_ica_covers_each_layer(planted_store):
    store, sets = planted_store
    tensors, s = discover_networks(store, DiscoverConfig(**{**FAST, "n_components": 7}, window=2), progress=False)
    assert s["windows"] == 1
    for layer, planted_sets in enumerate(sets):
        members = set().union(*planted_sets)
        found = set(torch.nonzero(tensors[f"membership.{layer}"]).flatten().tolist())
        assert len(found & members) / len(members) >= 0.9


def test_temporal_method_runs(planted_store):
    store, sets = planted_store
    tensors, s = discover_networks(store, DiscoverConfig(**{**FAST, "n_components": 4, "n_restarts": 1}, method="fastica",
                                                         fun="logcosh"), progress=False)
    assert s["runs_ok"] == 3
    found = set(torch.nonzero(tensors["membership.0"]).flatten().tolist())
    assert len(found & set().union(*sets[0])) >= 0.9 * 40


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"n_components": 500}, "larger than the neurons"),
        ({"block_texts": 20}, "fewer than block_texts"),
        ({"n_runs": 5}, "only has 3 complete blocks"),
        ({"window": 3}, "larger than the model's 2 layers"),
    ],
)
def test_bad_parameters_against_the_store(planted_store, kw, match):
    store, _ = planted_store
    with pytest.raises(UserError, match=match):
        discover_networks(store, DiscoverConfig(**{**FAST, **kw}), progress=False)


def test_tokens_limit_components(planted_store):
    store, _ = planted_store
    with pytest.raises(UserError, match=r"tokens \(100\)"):
        discover_networks(store, DiscoverConfig(**{**FAST, "block_texts": None, "block_rows": 100,
                                                   "n_components": 150}), progress=False)


def test_matching_and_recurrence_helpers():
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    j = jaccard_matrix(a, b)
    assert j[0, 1] == pytest.approx(2 / 3) and j[1, 0] == 1.0 and j[2, 2] == 0.0
    rows, cols, jac = match_networks(a, b)
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True))[1] == 0
    rec = network_recurrence([a, b, a], threshold=0.6)
    assert rec[0, 0] == 1.0 and rec[0, 1] == 1.0 and rec[0, 2] == 0.0
    assert np.isnan(network_recurrence([a], 0.5)).all()


def _store_with_sinks(path, layers, docs, *, with_sinks: bool):
    """A store whose texts start at position 0 (kept, ``drop_first=0``) or at 1 (dropped), with a huge outlier at
    every position 0, as SmolLM2's attention sink has."""
    from fbnprune.collect.store import StoreWriter

    starts = np.r_[True, docs[1:] != docs[:-1]]
    keep = np.ones(len(docs), dtype=bool) if with_sinks else ~starts
    pos = np.concatenate([np.arange(c) for c in np.unique(docs, return_counts=True)[1]])
    w = StoreWriter(path, [a.shape[1] for a in layers], int(keep.sum()), True,
                    {"data_sha256": "sinks", "model": {"source": "synthetic"}, "drop_first": 0 if with_sinks else 1})
    w.rows[:, 0] = docs[keep]
    w.rows[:, 1] = pos[keep]
    w.rows[:, 2] = docs[keep]
    for i, a in enumerate(layers):
        a = a.copy()
        a[starts] *= 500.0  # the sink outlier: it would dominate every neuron's z-score
        w.add(i, 0, torch.from_numpy(a[keep]))
    return w.finish()


def test_discovery_skips_sink_positions_the_store_kept(tmp_path):
    """A store that kept position 0 (for scorers and re-fits) gives the same networks as one that dropped it."""
    from .conftest import planted

    docs = np.repeat(np.arange(12), 250)
    a0, _ = planted(t=len(docs), n=400, groups=4, size=10, seed=1)
    kept = _store_with_sinks(tmp_path / "kept", [a0], docs, with_sinks=True)
    dropped = _store_with_sinks(tmp_path / "dropped", [a0], docs, with_sinks=False)
    assert kept.n_rows == dropped.n_rows + 12
    t_kept, s_kept = discover_networks(kept, DiscoverConfig(**FAST), progress=False)
    t_drop, _ = discover_networks(dropped, DiscoverConfig(**FAST), progress=False)
    assert s_kept["split"]["skipped_first"] == 1
    assert torch.allclose(t_kept["score.0"], t_drop["score.0"], atol=1e-4)
    # without the skip, the sinks are in the ICA and the scores change
    t_raw, _ = discover_networks(kept, DiscoverConfig(**FAST, skip_first=0), progress=False)
    assert not torch.allclose(t_raw["score.0"], t_drop["score.0"], atol=1e-2)
