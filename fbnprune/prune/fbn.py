"""The ``fbn`` scorer: prune with functional networks (arXiv 2508.05239, method notes §3).

Scores (higher = keep), by the rule registered in :data:`FBN_RULES` that ``ctx.fbn_rule`` names:

* ``redundancy`` (default): remove the neurons their own networks can rebuild: ``||W_p||^2`` times the variance of
  ``h_p`` left after a least-squares fit on the kept members of its networks (:mod:`fbnprune.prune.redundancy`).
  It needs a rebuild: a recipe's ``compensate: auto`` (the default) gives it ``refit``, the ridge re-fit of all kept
  down columns, which measured better than the neighbour rebuilds (``corrrefit``, ``netrefit``) once the
  calibration keeps the attention-sink position. Chosen from the study in docs/fbn-study.md, which says where it
  wins, where it loses (OBS with the same re-fit is better on both models), and by how much.
* ``max_z``: the naive rule, ``s_j = max over runs and components of |z|``. Cutting at the budget keeps exactly the
  neurons the reference's union rule keeps at the matching threshold tau. It prunes about as badly as random.
* ``recurrence``: the fraction of runs in which the neuron is a network member at tau (ties broken by ``max_z``).
* ``max_z_x_recurrence``: ``max_z * recurrence`` (members in many runs with strong loadings first; neurons that
  are never members are ordered by ``max_z``).

Networks come from ``ctx.networks`` (a :class:`NetworkSet` or its directory) when given, else from
:func:`fbnprune.discover.run_discovery` on ``ctx.store`` with the ``ctx.discover`` settings (cached, so a second
call is free); see :func:`fbnprune.prune.networks.scoring_networks`.

Example recipe::

    prune: {method: fbn, sparsity: 0.2}            # redundancy rule + refit compensation
    discover: {n_components: 128, n_restarts: 10, block_texts: 40, threshold: 3.6}
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fbnprune.discover import NetworkSet
from fbnprune.prune.networks import scoring_networks
from fbnprune.prune.redundancy import redundancy_scores
from fbnprune.prune.scorers import Needs, ScoreContext, register_scorer
from fbnprune.registry import Registry

FbnRule = Callable[[ScoreContext, NetworkSet], list[torch.Tensor]]
#: how the fbn scorer turns networks into neuron scores; the recipe's ``prune.fbn_rule`` choices
FBN_RULES: Registry[FbnRule] = Registry("fbn_rule")
DEFAULT_RULE = "redundancy"


@register_scorer("fbn", needs=Needs(calibration=True, activations=True, networks=True))
def fbn_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    rule = FBN_RULES.get(ctx.fbn_rule or DEFAULT_RULE)  # an unknown rule fails before any discovery
    return rule(ctx, scoring_networks(ctx, "fbn"))


@FBN_RULES.register("redundancy")
def _redundancy(ctx: ScoreContext, nets: NetworkSet) -> list[torch.Tensor]:
    return redundancy_scores(ctx, nets)


@FBN_RULES.register("max_z")
def _max_z(ctx: ScoreContext, nets: NetworkSet) -> list[torch.Tensor]:
    return [s.double() for s in nets.scores]


@FBN_RULES.register("recurrence")
def _recurrence(ctx: ScoreContext, nets: NetworkSet) -> list[torch.Tensor]:
    out = []
    for s, r in zip(nets.scores, nets.recurrence, strict=True):
        s, r = s.double(), r.double()
        out.append(r + 1e-6 * s / s.max().clamp_min(1e-12))  # recurrence first, max |z| breaks ties
    return out


@FBN_RULES.register("max_z_x_recurrence")
def _max_z_x_recurrence(ctx: ScoreContext, nets: NetworkSet) -> list[torch.Tensor]:
    return [s.double() * r.double() + 1e-6 * s.double() for s, r in zip(nets.scores, nets.recurrence, strict=True)]
