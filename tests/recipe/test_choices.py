"""The recipe's choices are the registries' entries: nothing the product does not register validates, and an
unknown choice is one line that names the valid ones."""

from __future__ import annotations

import pytest

from fbnprune.prune import COMPENSATIONS, FBN_RULES, SCORERS
from fbnprune.recipe import RecipeError, load_recipe

DATA = ["collect.keep_activations=true"]


def accepted(key: str, candidates: set[str]) -> set[str]:
    ok = set()
    for c in candidates:
        try:
            load_recipe("quickstart", [*DATA, f"prune.{key}={c}"])
            ok.add(c)
        except RecipeError:
            pass
    return ok


def test_accepted_methods_are_the_registered_product_scorers():
    study = {"fbn_obs", "fbn_alloc", "obs_global"}  # benchmarks/fbn_rules registers these for itself only
    assert accepted("method", set(SCORERS.names()) | study) == set(SCORERS.names())
    assert set(SCORERS.names()) == {"random", "magnitude", "wanda_sp", "flap", "taylor", "obs", "fbn",
                                    "corr_redundancy"}


def test_accepted_rules_and_compensations_are_the_registered_ones():
    assert accepted("fbn_rule", set(FBN_RULES.names()) | {"z"}) == set(FBN_RULES.names())
    assert accepted("compensate", set(COMPENSATIONS.names()) | {"lora"}) == set(COMPENSATIONS.names())


@pytest.mark.parametrize(("key", "value", "kind"), [("method", "fbn_obs", "scorer"),
                                                     ("fbn_rule", "maxz", "fbn_rule"),
                                                     ("compensate", "lora", "compensation")])
def test_unknown_choice_is_one_line_naming_the_valid_ones(key, value, kind):
    with pytest.raises(RecipeError) as ei:
        load_recipe("quickstart", [f"prune.{key}={value}"])
    (err,) = ei.value.errors
    assert err.startswith(f"prune.{key}: unknown {kind} {value!r}; known: ") and "\n" not in err
    registry = {"scorer": SCORERS, "fbn_rule": FBN_RULES, "compensation": COMPENSATIONS}[kind]
    assert all(name in err for name in registry.names())
