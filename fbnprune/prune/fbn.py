"""The ``fbn`` scorer: prune with functional networks (arXiv 2508.05239, method notes §3).

Scores (higher = keep), chosen by ``ctx.options["fbn_rule"]``:

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

Networks come from ``ctx.options["networks"]`` (a :class:`NetworkSet`) when given, else from
:func:`fbnprune.discover.run_discovery` on ``ctx.store`` with ``DiscoverConfig(**ctx.options.get("discover", {}))``
(cached, so a second call is free).

Example recipe::

    prune: {method: fbn, sparsity: 0.2}            # redundancy rule + refit compensation
    discover: {n_components: 128, n_restarts: 10, block_texts: 40, threshold: 3.6}
"""

from __future__ import annotations

import torch
from pydantic import ValidationError

from fbnprune.errors import UserError
from fbnprune.prune.scorers import SCORERS, ScoreContext

RULES = ("redundancy", "max_z", "recurrence", "max_z_x_recurrence")
DEFAULT_RULE = "redundancy"


def _networks(ctx: ScoreContext):  # -> NetworkSet (imported lazily: discover imports collect, not prune)
    from fbnprune.discover import DiscoverConfig, NetworkSet, run_discovery

    nets = ctx.options.get("networks")
    if nets is not None:
        if not isinstance(nets, NetworkSet):
            nets = NetworkSet.load(nets)
        return nets
    store = ctx.require_store("fbn")
    opts = ctx.options.get("discover", {}) or {}
    try:
        cfg = opts if isinstance(opts, DiscoverConfig) else DiscoverConfig(**dict(opts))
    except ValidationError as e:
        msgs = "; ".join(f"discover.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise UserError(f"invalid discover options: {msgs}") from None
    return run_discovery(store, cfg, progress=bool(ctx.options.get("progress", True)))


@SCORERS.register("fbn")
def fbn_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    rule = ctx.options.get("fbn_rule", DEFAULT_RULE)
    if rule not in RULES:
        raise UserError(f"unknown fbn_rule {rule!r}; choose one of {', '.join(RULES)}")
    nets = _networks(ctx)
    widths = [ctx.adapter.width(m) for m in ctx.adapter.mlps(ctx.model)]
    if nets.widths != widths:
        raise UserError(f"networks at {nets.path} were found for layer widths {nets.widths}, the model has {widths}")
    if rule == "redundancy":
        from fbnprune.prune.redundancy import redundancy_scores

        return redundancy_scores(ctx, nets)
    out = []
    for s, r in zip(nets.scores, nets.recurrence, strict=True):
        s, r = s.double(), r.double()
        if rule == "max_z":
            out.append(s)
        elif rule == "recurrence":
            out.append(r + 1e-6 * s / s.max().clamp_min(1e-12))  # recurrence first, max |z| breaks ties
        else:
            out.append(s * r + 1e-6 * s)
    return out
