"""Every bundled recipe and every leaderboard grid recipe validates; malformed recipes list all their errors with
dotted paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from fbnprune.recipe import RecipeError, bundled_recipes, load_recipe
from fbnprune.recipe.load import dump_recipe

GRID = Path(__file__).resolve().parents[2] / "benchmarks" / "leaderboard" / "grid"
GRID_RECIPES = sorted(GRID.glob("*/*.yaml"))


@pytest.mark.parametrize("name", sorted(bundled_recipes()))
def test_bundled_recipe_validates(name):
    r = load_recipe(name)
    assert r.name and r.model.source


def test_bundled_recipes_are_the_ones_to_pick():
    """`fbnprune recipes` lists quickstart and the analyze recipes, not the leaderboard's generated grid."""
    names = set(bundled_recipes())
    assert {"quickstart", "analyze-smollm2-135m", "analyze-gemma3-270m"} <= names
    assert not any("/" in n for n in names)


def test_grid_has_every_model():
    assert {p.parent.name for p in GRID_RECIPES} == {"smollm2-135m", "gemma3-270m"}


@pytest.mark.parametrize("path", GRID_RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_grid_recipe_validates(path):
    r = load_recipe(path)
    assert r.name == f"{path.parent.name}-{path.stem}" and r.model.source == path.parent.name


def test_bad_recipe_reports_every_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nmodell: {source: smollm2-135m}\nprune: {sparsity: 1.5, metod: random}\n")
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    errs = ei.value.errors
    text = "\n".join(errs)
    assert "model: required field missing" in text
    assert "modell: unknown key" in text
    assert "prune.sparsity" in text
    assert "prune.metod: unknown key" in text
    assert str(p) in str(ei.value)


def test_root_must_be_mapping(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="root must be a mapping"):
        load_recipe(p)


def test_unknown_method_suggests(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nmodel: {source: smollm2-135m}\nprune: {method: wanda_s}\n")
    with pytest.raises(RecipeError, match="unknown scorer 'wanda_s'.*Did you mean"):
        load_recipe(p)


def test_overrides_take_precedence_and_round_trip(tmp_path):
    r = load_recipe("quickstart", ["prune.sparsity=0.3", "collect.n_tokens=1024", "output_dir=/tmp/o"])
    assert r.prune.sparsity == 0.3 and r.collect.n_tokens == 1024 and r.output_dir == "/tmp/o"
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_recipe(r))
    assert load_recipe(p) == r


def test_param_fraction_replaces_default_sparsity():
    r = load_recipe("quickstart", ["prune.sparsity=null", "prune.param_fraction=0.1"])
    assert r.prune.sparsity is None and r.prune.param_fraction == 0.1
    with pytest.raises(RecipeError, match="exactly one of sparsity or param_fraction"):
        load_recipe("quickstart", ["prune.param_fraction=0.1", "prune.sparsity=0.2"])


def test_discover_blocks_must_match_collect_mode():
    with pytest.raises(RecipeError, match="block_texts needs collect.mode: document"):
        load_recipe("quickstart", ["prune.method=fbn", "collect.keep_activations=true", "discover.block_texts=40"])
    r = load_recipe("quickstart", ["prune.method=fbn", "collect.keep_activations=true", "collect.mode=document",
                                   "discover.block_texts=40"])
    assert r.discover.block_texts == 40
    with pytest.raises(RecipeError, match="need stored activations"):
        load_recipe("quickstart", ["prune.method=obs", "collect.keep_activations=false"])
    with pytest.raises(RecipeError, match="only used by the fbn methods"):
        load_recipe("quickstart", ["prune.method=wanda_sp", "discover.n_components=8"])


def test_compensate_auto_resolves_to_the_rules_own_refit():
    fbn = ["prune.method=fbn", "collect.keep_activations=true"]
    assert load_recipe("quickstart", fbn).prune.compensate == "refit"  # the redundancy rule's rebuild
    assert load_recipe("quickstart", [*fbn, "prune.fbn_rule=max_z"]).prune.compensate == "none"
    assert load_recipe("quickstart", [*fbn, "prune.compensate=bias"]).prune.compensate == "bias"
    assert load_recipe("quickstart", ["prune.method=corr_redundancy", "collect.keep_activations=true"]
                       ).prune.compensate == "refit"
    assert load_recipe("quickstart").prune.compensate == "refit"  # the quickstart prunes with fbn
    assert load_recipe("quickstart", ["prune.method=wanda_sp"]).prune.compensate == "none"  # baselines as published
    r = load_recipe("quickstart", fbn)
    assert "compensate: refit" in dump_recipe(r)  # the saved recipe says what was done
