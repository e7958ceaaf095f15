"""Prune stage: score neurons, turn scores into an exact-budget :class:`KeepPlan`, compensate, and apply it.

Every method (fbn and all baselines) goes through the same plan and surgery code, so a comparison between
methods measures the scoring rule and nothing else. Scorers, fbn rules and compensations live in registries
(:data:`SCORERS`, :data:`FBN_RULES`, :data:`COMPENSATIONS`) filled by the imports below; the recipe schema takes
its choices from them.
"""

from __future__ import annotations

# each module registers its scorers (and fbn its rules) on import
from fbnprune.prune import fbn, obs, redundancy, taylor  # noqa: F401
from fbnprune.prune.compensate import (
    COMPENSATIONS,
    bias_compensation_,
    compensate_,
    default_compensation,
    refit_compensation_,
)
from fbnprune.prune.fbn import DEFAULT_RULE, FBN_RULES
from fbnprune.prune.ops import apply_plan_
from fbnprune.prune.plan import KeepPlan, count_params, make_plan
from fbnprune.prune.scorers import SCORERS, Needs, ScoreContext, register_scorer, score_neurons

__all__ = [
    "COMPENSATIONS",
    "DEFAULT_RULE",
    "FBN_RULES",
    "SCORERS",
    "KeepPlan",
    "Needs",
    "ScoreContext",
    "apply_plan_",
    "bias_compensation_",
    "compensate_",
    "count_params",
    "default_compensation",
    "make_plan",
    "needs",
    "refit_compensation_",
    "register_scorer",
    "score_neurons",
]


def needs(method: str, compensate: str, fbn_rule: str = DEFAULT_RULE) -> Needs:
    """What scoring with ``method`` and compensating with ``compensate`` need from the earlier stages (``auto``
    stands for the compensation it resolves to)."""
    if compensate == "auto":
        compensate = default_compensation(SCORERS.canonical(method), fbn_rule)
    return SCORERS.get(method).needs | COMPENSATIONS.get(compensate).needs
