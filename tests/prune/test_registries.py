"""The prune registries: which scorers, fbn rules and compensations the product has, what each needs, and that
``compensate_`` and the settings reach them through the registry."""

from __future__ import annotations

import copy
from dataclasses import FrozenInstanceError

import pytest
import torch

from fbnprune.arch import get_adapter
from fbnprune.errors import UserError
from fbnprune.prune import (
    COMPENSATIONS,
    FBN_RULES,
    SCORERS,
    Needs,
    ScoreContext,
    compensate_,
    make_plan,
    needs,
)
from fbnprune.prune.compensate import CompensateOptions, Compensation
from tests.conftest import tiny_model
from tests.prune.conftest import make_store

PRODUCT_SCORERS = {"random", "magnitude", "wanda_sp", "flap", "taylor", "obs", "fbn", "corr_redundancy"}


def test_the_product_registries():
    assert set(SCORERS.names()) == PRODUCT_SCORERS  # the study's fbn_obs, fbn_alloc, obs_global are not here
    assert set(FBN_RULES.names()) == {"redundancy", "max_z", "recurrence", "max_z_x_recurrence"}
    assert set(COMPENSATIONS.names()) == {"none", "bias", "refit", "anchored", "netrefit", "corrrefit", "auto"}


def test_needs_come_from_the_registered_entries():
    assert needs("random", "none") == Needs()
    assert needs("wanda_sp", "bias") == Needs(calibration=True)
    assert needs("wanda", "refit") == Needs(calibration=True, activations=True)  # an alias names the same entry
    assert needs("obs", "netrefit").networks and needs("fbn", "none").networks
    assert needs("fbn", "auto") == needs("fbn", "refit")  # auto stands for what it resolves to
    assert needs("magnitude", "auto", "max_z") == Needs()


def test_compensate_dispatches_through_the_registry_with_uniform_settings(monkeypatch):
    seen = []
    monkeypatch.setitem(COMPENSATIONS._items, "bias", Compensation(lambda m, p, s, o: seen.append(o), Needs()))
    compensate_("model", "plan", "store", "bias", ridge=0.5, method="obs")
    assert seen == [CompensateOptions(ridge=0.5, method="obs")]
    with pytest.raises(FrozenInstanceError):
        seen[0].ridge = 1.0
    with pytest.raises(UserError, match=r"unknown compensation 'lora'; known: anchored, auto, bias, corrrefit"):
        compensate_("model", "plan", "store", "lora")


def test_auto_resolves_from_the_method(tmp_path):
    dense = tiny_model("llama")
    store = make_store(dense, tmp_path / "s")
    ad = get_adapter(dense)
    plan = make_plan([torch.rand(ad.width(m), generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                      for i, m in enumerate(ad.mlps(dense))], sparsity=0.5)
    rep = compensate_(copy.deepcopy(dense), plan, store, "auto", method="fbn", ridge=1e-3, progress=False)
    assert set(rep["layers"]) == {0, 1}  # fbn's redundancy rule: the re-fit
    assert compensate_(copy.deepcopy(dense), plan, store, "auto", method="fbn", fbn_rule="max_z") is None
    with pytest.raises(UserError, match="needs the scorer"):
        compensate_(copy.deepcopy(dense), plan, store, "auto")
    with pytest.raises(UserError, match="needs discovered networks"):
        compensate_(copy.deepcopy(dense), plan, store, "netrefit")


def test_score_context_settings_are_typed_and_viewable_by_name():
    ctx = ScoreContext(model=None, adapter=None, sparsity=0.3, fbn_rule="max_z", extra={"fbn_beta": 2.0})
    view = ctx.options
    assert view["sparsity"] == 0.3 and view["fbn_rule"] == "max_z" and view["ridge"] == 1e-3
    assert view["fbn_beta"] == 2.0 and "model" not in view
    with pytest.raises(TypeError):
        view["sparsity"] = 0.5  # read-only: settings are set on the context's fields
