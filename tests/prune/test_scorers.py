"""Every scorer ranks a planted important neuron above a planted dead one; scorer-specific checks."""

from __future__ import annotations

import copy

import pytest
import torch

from fbnprune.arch import get_adapter
from fbnprune.errors import UserError
from fbnprune.prune import SCORERS, ScoreContext, score_neurons
from fbnprune.prune.obs import obs_order
from fbnprune.prune.taylor import per_neuron_sum
from tests.conftest import tiny_model
from tests.prune.conftest import calib_batch, make_store

DATA_SCORERS = ["magnitude", "wanda_sp", "flap", "taylor", "obs"]
DEAD, HOT = 5, 17


def planted(model_type: str):
    """Layer 0: neuron DEAD has all-zero weights; neuron HOT has 4x larger input and output weights."""
    model = tiny_model(model_type)
    ad = get_adapter(model)
    mlp = ad.mlps(model)[0]
    width = ad.width(mlp)
    with torch.no_grad():
        for w in ad.in_weights(mlp):
            w[DEAD] = 0
            w[HOT] *= 4
        for p in ad.in_projs:
            b = getattr(getattr(mlp, p), "bias", None)
            if b is not None:
                rows = [DEAD, DEAD + width] if ad.style == "fused_gated" else [DEAD]
                b[rows] = 0
        ad.down_weight(mlp)[:, DEAD] = 0
        ad.down_weight(mlp)[:, HOT] *= 4
    return model


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
@pytest.mark.parametrize("method", DATA_SCORERS)
def test_planted_important_neuron_outranks_dead_one(tmp_path, model_type, method):
    model = planted(model_type)
    batch = calib_batch()
    store = make_store(model, tmp_path / "s", batch)
    ctx = ScoreContext(model=model, adapter=get_adapter(model), store=store, sequences=batch.sequences,
                       sparsity=0.5)
    s = score_neurons(method, ctx)[0]
    assert s[HOT] > s[DEAD]
    rank = int((s > s[HOT]).sum())
    assert rank < 0.1 * len(s), f"{method}: planted neuron ranked {rank} of {len(s)}"
    assert int((s < s[DEAD]).sum()) == 0 or method == "obs"  # dead neurons score lowest (obs: nearly)
    assert int((s < s[DEAD]).sum()) < 0.25 * len(s)


def test_every_baseline_is_registered():
    assert {"random", *DATA_SCORERS} <= set(SCORERS.names())


def test_random_is_seeded():
    model = tiny_model("llama")
    ad = get_adapter(model)
    a = score_neurons("random", ScoreContext(model=model, adapter=ad, seed=1))
    b = score_neurons("random", ScoreContext(model=model, adapter=ad, seed=1))
    c = score_neurons("random", ScoreContext(model=model, adapter=ad, seed=2))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and not torch.equal(a[0], c[0])


def test_wanda_and_flap_formulas(tmp_path):
    model = tiny_model("llama")
    ad = get_adapter(model)
    store = make_store(model, tmp_path / "s")
    ctx = ScoreContext(model=model, adapter=ad, store=store)
    h = torch.from_numpy(store.layer(1).copy()).double()
    dn = ad.down_weight(ad.mlps(model)[1]).detach().double().norm(dim=0)
    torch.testing.assert_close(score_neurons("wanda_sp", ctx)[1], h.norm(dim=0) * dn)
    torch.testing.assert_close(score_neurons("flap", ctx)[1], h.var(dim=0) * dn**2)


def test_taylor_matches_a_hand_computation():
    model = tiny_model("llama")
    ad = get_adapter(model)
    seqs = calib_batch(n_seq=2).sequences
    ref = copy.deepcopy(model)
    x = torch.stack(seqs)
    ref(input_ids=x, labels=x).loss.backward()
    m = ad.mlps(ref)[1]
    want = sum((getattr(m, p).weight * getattr(m, p).weight.grad).abs().sum(1) for p in ("gate_proj", "up_proj"))
    want = want + (m.down_proj.weight * m.down_proj.weight.grad).abs().sum(0)
    got = score_neurons("taylor", ScoreContext(model=model, adapter=ad, sequences=seqs,
                                               taylor_batch_size=2))
    torch.testing.assert_close(got[1], want.detach().double(), rtol=1e-4, atol=1e-8)
    assert all(p.grad is None for p in model.parameters())  # gradients cleaned up
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    vec = score_neurons("taylor", ScoreContext(model=model, adapter=ad, sequences=seqs,
                                               taylor_variant="vector", taylor_batch_size=2))
    assert (vec[1] <= got[1] + 1e-9).all()  # |sum| <= sum |.|


def test_per_neuron_sum_covers_each_parameter_once():
    for mt in ("llama", "phi3", "gpt2"):
        model = tiny_model(mt)
        ad = get_adapter(model)
        mlp = ad.mlps(model)[0]
        s = per_neuron_sum(ad, mlp, torch.ones_like)
        d = ad.down_weight(mlp).shape[0]
        n_bias = 1 if mt == "gpt2" else 0
        assert torch.all(s == len(ad.in_weights(mlp)) * d + d + n_bias)


def test_obs_removes_a_redundant_copy_first():
    """A neuron that duplicates another can be absorbed by the re-fit, so OBS drops it first."""
    g = torch.Generator().manual_seed(0)
    n, d, rows = 12, 6, 400
    h = torch.randn(rows, n, generator=g, dtype=torch.float64)
    h[:, 3] = 2.0 * h[:, 7]  # exact copy (scaled)
    w = torch.randn(d, n, generator=g, dtype=torch.float64)
    w[:, 3] *= 10  # large weight: magnitude-style scores would keep it
    ha = torch.cat([h, torch.ones(rows, 1, dtype=torch.float64)], 1)
    s = obs_order(ha.T @ ha, w, n_keep=6, steps=3, ridge=1e-6)
    assert int(torch.argmin(s)) in (3, 7)
    assert len(set(s.tolist())) == n  # strictly ordered, no ties


def test_obs_single_round_removes_the_cheapest_single_removals():
    """With one round the removed set is the k smallest ||W*_j||^2 / [G^-1]_jj on the full set."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(300, 16, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 16, dtype=torch.float64)
    ha = torch.cat([h, torch.ones(300, 1, dtype=torch.float64)], 1)
    w = torch.randn(4, 16, generator=g, dtype=torch.float64)
    gram = ha.T @ ha
    s1 = obs_order(gram, w, n_keep=8, steps=1, ridge=0.0)
    inv = torch.linalg.inv(gram)
    wstar = (inv @ gram[:, :16] @ w.T)[:16]  # = W^T on the full set
    cost = (wstar**2).sum(1) / inv.diagonal()[:16]
    assert set(torch.argsort(s1)[:8].tolist()) == set(torch.argsort(cost)[:8].tolist())
    s8 = obs_order(gram, w, n_keep=8, steps=8, ridge=0.0)
    assert torch.isfinite(s8).all() and len(set(s8.tolist())) == 16


def test_missing_inputs_are_user_errors():
    model = tiny_model("llama")
    ad = get_adapter(model)
    for method in ("wanda_sp", "flap", "obs"):
        with pytest.raises(UserError, match="calibration"):
            score_neurons(method, ScoreContext(model=model, adapter=ad))
    with pytest.raises(UserError, match="sequences"):
        score_neurons("taylor", ScoreContext(model=model, adapter=ad))
    with pytest.raises(UserError, match="taylor_variant"):
        score_neurons("taylor", ScoreContext(model=model, adapter=ad, sequences=[torch.arange(8)],
                                             taylor_variant="second"))
