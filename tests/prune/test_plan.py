"""Keep plans: exact budgets for both allocations, protected layers, rounding, serialisation, clear errors."""

from __future__ import annotations

import pytest
import torch

from fbnprune.arch import get_adapter
from fbnprune.errors import UserError
from fbnprune.prune.plan import KeepPlan, count_params, make_plan, params_per_neuron
from tests.conftest import tiny_model


def rand_scores(n_layers: int = 4, width: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(width, generator=g, dtype=torch.float64) * (i + 1) for i in range(n_layers)]


@pytest.mark.parametrize("sparsity", [0.125, 0.25, 0.5, 0.75])
def test_uniform_meets_budget_exactly_when_achievable(sparsity):
    scores = rand_scores()
    plan = make_plan(scores, sparsity=sparsity, allocation="uniform", round_to=8, min_width=8)
    assert plan.n_removed == sparsity * 4 * 64
    assert plan.uniform and plan.info["budget_error"] == 0
    # the kept neurons of each layer are its top-k by score
    for s, k in zip(scores, plan.keep, strict=True):
        kept_min = s[k].min()
        dropped = torch.ones(64, dtype=torch.bool)
        dropped[k] = False
        assert kept_min >= s[dropped].max()


@pytest.mark.parametrize("sparsity", [0.1, 0.2, 0.3, 0.5, 0.77])
def test_global_meets_budget_exactly_with_round_to_1(sparsity):
    scores = rand_scores()
    plan = make_plan(scores, sparsity=sparsity, allocation="global", round_to=1, min_width=1)
    assert plan.n_removed == round(sparsity * 256)


@pytest.mark.parametrize("n_remove", [8, 64, 104, 160])
def test_global_meets_budget_exactly_with_round_to_8(n_remove):
    scores = rand_scores()
    plan = make_plan(scores, sparsity=n_remove / 256, allocation="global", round_to=8, min_width=8)
    assert plan.n_removed == n_remove
    assert all(w % 8 == 0 for w in plan.kept_widths)
    assert not plan.uniform or n_remove % 32 == 0


def test_inexact_budget_is_nearest_and_reported():
    scores = rand_scores()
    plan = make_plan(scores, sparsity=0.3, allocation="uniform", round_to=8)  # 76.8 neurons -> 64 or 96
    assert plan.n_removed == 64
    assert plan.info["budget_error"] == pytest.approx(64 - 76.8)
    plan = make_plan(scores, sparsity=0.3, allocation="global", round_to=8)
    assert plan.n_removed == 80  # nearest multiple of 8
    plan = make_plan(scores, sparsity=0.3, allocation="uniform", round_to=1)
    assert plan.n_removed == 76  # 19 per layer


def test_global_gives_more_width_to_layers_with_better_scores():
    g = torch.Generator().manual_seed(3)
    scores = [torch.rand(64, generator=g, dtype=torch.float64) for _ in range(3)]
    scores[1] = scores[1] ** 4  # heavy low tail: many unimportant neurons in layer 1
    plan = make_plan(scores, sparsity=0.4, allocation="global", round_to=1, min_width=4, normalize="mean")
    assert plan.kept_widths[1] < plan.kept_widths[0] and plan.kept_widths[1] < plan.kept_widths[2]
    assert plan.n_removed == round(0.4 * 192)


def test_protected_layers_are_untouched_and_budget_comes_from_the_rest():
    scores = rand_scores()
    plan = make_plan(scores, sparsity=0.25, allocation="uniform", protected=[0, 3], round_to=8)
    assert plan.kept_widths[0] == 64 and plan.kept_widths[3] == 64
    assert plan.n_removed == 64 and plan.kept_widths[1] == plan.kept_widths[2] == 32
    plan = make_plan(scores, sparsity=0.25, allocation="global", protected=[3], round_to=1)
    assert plan.kept_widths[3] == 64 and plan.n_removed == 64


def test_min_width_and_round_to_are_respected():
    scores = rand_scores()
    scores[0] = scores[0] * 1e-6  # global ranking wants to empty layer 0
    plan = make_plan(scores, sparsity=0.6, allocation="global", min_width=16, round_to=8)
    assert min(plan.kept_widths) >= 16
    assert all(w % 8 == 0 for w in plan.kept_widths)
    assert plan.n_removed == round(0.6 * 256 / 8) * 8


def test_param_fraction_counts_parameters_from_the_model():
    model = tiny_model("llama")
    ad = get_adapter(model)
    ppn = params_per_neuron(model, ad)
    assert ppn == 3 * 64  # gate row + up row + down column, hidden 64
    total = count_params(model)
    scores = [torch.rand(128, dtype=torch.float64) for _ in range(2)]
    frac = 32 * ppn / total  # exactly 32 neurons' worth of parameters
    plan = make_plan(scores, param_fraction=frac, model=model, adapter=ad, allocation="global", round_to=1)
    assert plan.n_removed == 32
    assert plan.info["params_removed"] == 32 * ppn
    assert plan.info["budget"]["model_params"] == total


def test_ties_are_deterministic():
    scores = [torch.ones(16, dtype=torch.float64)] * 2
    a = make_plan(scores, sparsity=0.5, round_to=1, min_width=1)
    assert [k.tolist() for k in a.keep] == [list(range(8))] * 2


def test_plan_json_round_trip(tmp_path):
    plan = make_plan(rand_scores(), sparsity=0.3, allocation="global", round_to=4, protected=[1])
    plan.save(tmp_path / "p.json")
    back = KeepPlan.load(tmp_path / "p.json")
    assert back.widths == plan.widths and back.info == plan.info
    assert all(torch.equal(a, b) for a, b in zip(back.keep, plan.keep, strict=True))


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(sparsity=0.2, param_fraction=0.1), "exactly one"),
        (dict(), "exactly one"),
        (dict(sparsity=1.0), r"\[0, 1\)"),
        (dict(sparsity=0.2, protected=[7]), "out of range"),
        (dict(sparsity=0.2, protected=[0, 1, 2, 3]), "every layer is protected"),
        (dict(sparsity=0.95, min_width=16), "at most"),
        (dict(sparsity=0.2, allocation="greedy"), "unknown allocation"),
        (dict(sparsity=0.2, protected="auto"), "auto_protected_layers"),
        (dict(param_fraction=0.2), "needs the model"),
        (dict(sparsity=0.2, normalize="max"), "unknown normalize"),
    ],
)
def test_bad_input_is_a_user_error(kwargs, msg):
    with pytest.raises(UserError, match=msg):
        make_plan(rand_scores(), **kwargs)


def test_bad_plans_are_rejected(tmp_path):
    with pytest.raises(UserError, match="out of range"):
        KeepPlan(widths=[4], keep=[torch.tensor([0, 4])])
    with pytest.raises(UserError, match="duplicate"):
        KeepPlan(widths=[4], keep=[torch.tensor([1, 1])])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        KeepPlan.load(tmp_path / "bad.json")
    with pytest.raises(UserError, match="not found"):
        KeepPlan.load(tmp_path / "missing.json")
