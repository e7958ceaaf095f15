"""Prune stage: score neurons, turn scores into an exact-budget :class:`KeepPlan`, and apply it.

Every method (fbn and all baselines) goes through the same plan and surgery code, so a comparison between
methods measures the scoring rule and nothing else.
"""

from __future__ import annotations

from fbnprune.prune.ops import apply_plan_
from fbnprune.prune.plan import KeepPlan, make_plan
from fbnprune.prune.scorers import SCORERS, ScoreContext, score_neurons

__all__ = ["SCORERS", "KeepPlan", "ScoreContext", "apply_plan_", "make_plan", "score_neurons"]
