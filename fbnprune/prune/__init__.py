"""Prune stage: score neurons, turn scores into an exact-budget :class:`KeepPlan`, compensate, and apply it.

Every method (fbn and all baselines) goes through the same plan and surgery code, so a comparison between
methods measures the scoring rule and nothing else.
"""

from __future__ import annotations

from fbnprune.prune.ops import apply_plan_
from fbnprune.prune.plan import KeepPlan, count_params, make_plan
from fbnprune.prune.scorers import SCORERS, ScoreContext, score_neurons

# Scorers in their own modules register on import.
from fbnprune.prune import fbn, fbn_variants, obs, redundancy, taylor  # noqa: E402,F401  isort: skip

from fbnprune.prune.compensate import bias_compensation_, compensate_, refit_compensation_  # noqa: E402

__all__ = [
    "SCORERS",
    "KeepPlan",
    "ScoreContext",
    "apply_plan_",
    "bias_compensation_",
    "compensate_",
    "count_params",
    "make_plan",
    "refit_compensation_",
    "score_neurons",
]
