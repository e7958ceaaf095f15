"""``obs`` scorer: structured optimal-brain-surgeon selection (in the spirit of SlimGPT / ZipLM).

Per layer, with ``G`` the augmented Gram matrix of the calibration activations (:mod:`fbnprune.prune.gram`):
removing neuron ``j`` from the current kept set ``S`` and re-fitting the other down-projection columns (and the
bias) by least squares raises the layer's squared output error by ``||W'_j||^2 / [G_S^{-1}]_jj``, where ``W'`` is
the current re-fitted weight. In ``steps`` rounds (default 10) the neurons with the smallest such cost are
removed, and the costs are recomputed on the survivors. Pair it with ``refit`` compensation, which applies the
re-fit this scorer assumes.

The scores encode the elimination order (earlier = lower) with the removal cost as magnitude (a running maximum,
strictly increasing), so any plan that removes a prefix of the order removes exactly what the rounds removed.

Settings (:class:`~fbnprune.prune.scorers.ScoreContext` fields): ``sparsity`` (how far to eliminate: the plan's
target, which the pipeline passes; default 0.5), ``obs_steps`` (10), ``ridge`` (1e-3, relative damping as in
compensation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from fbnprune import distributed as dist
from fbnprune.collect.store import ActivationStore
from fbnprune.errors import UserError
from fbnprune.prune.gram import augmented_gram, shrink_to_diagonal
from fbnprune.prune.scorers import Needs, ScoreContext, register_scorer

log = logging.getLogger(__name__)


def _damped_inverse(g: torch.Tensor, idx: torch.Tensor, ridge: float) -> torch.Tensor:
    a = g[idx][:, idx].clone()
    diag = a.diagonal()
    lam = ridge * float(diag[:-1].mean()) if len(idx) > 1 else 0.0
    diag[:-1] += max(lam, 1e-12)
    try:
        return torch.cholesky_inverse(torch.linalg.cholesky(a))
    except torch.linalg.LinAlgError:
        return torch.linalg.pinv(a)


def obs_order(g: torch.Tensor, w: torch.Tensor, n_keep: int, steps: int = 10, ridge: float = 1e-3,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """Scores for one layer: ``g`` augmented Gram ``(n+1, n+1)``, ``w`` down weight ``(d, n)`` (float64).

    ``weight`` (>= 0, one per neuron; None = all 1) multiplies each neuron's removal cost, so a caller can
    protect or expose neurons (the recurrence-weighted OBS of the study in ``benchmarks/fbn_rules``).
    """
    n = w.shape[1]
    if weight is not None:
        weight = weight.double()
        if weight.shape != (n,) or not torch.isfinite(weight).all() or (weight < 0).any():
            raise UserError("weighted OBS: weights must be finite, non-negative, one per neuron")
    n_keep = min(max(int(n_keep), 1), n)
    rhs_all = g[:, :n] @ w.T  # [H, 1]^T H W^T, (n+1, d)

    def costs(alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.cat([alive.nonzero().flatten(), torch.tensor([n])])
        inv = _damped_inverse(g, idx, ridge)
        x = inv @ rhs_all[idx]  # re-fitted [W'^T; b]
        c = (x[:-1] ** 2).sum(1) / inv.diagonal()[:-1].clamp_min(1e-300)
        return idx[:-1], c if weight is None else c * weight[idx[:-1]]

    return elimination_scores(n, n_keep, steps, costs)


def elimination_scores(n: int, n_keep: int, steps: int, costs: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
                       ) -> torch.Tensor:
    """Greedy elimination in ``steps`` rounds, as scores a plan can cut anywhere.

    ``costs(alive)`` gives ``(columns, removal costs)`` of the neurons still alive. Each round removes the cheapest
    share of the ``n - n_keep`` neurons to drop, then the costs are recomputed on the survivors. The scores are a
    strictly increasing running maximum of the costs in elimination order, so removing any prefix of the order
    removes exactly what the rounds removed (and a plan that keeps ``n_keep`` reproduces them).
    """
    alive = torch.ones(n, dtype=torch.bool)
    score = torch.empty(n, dtype=torch.float64)
    prev = -math.inf
    n_drop = n - n_keep
    bounds = [round(n_drop * (t + 1) / steps) for t in range(steps)] if n_drop else []
    done = 0

    def assign(cols: torch.Tensor, cost: torch.Tensor) -> None:
        nonlocal prev
        for j in torch.argsort(cost, stable=True).tolist():
            v = max(float(cost[j]), prev)
            if v <= prev:
                v = math.nextafter(prev, math.inf)
            score[cols[j]] = v
            prev = v

    for b in bounds:
        k = b - done
        if k <= 0:
            continue
        cols, cost = costs(alive)
        order = torch.argsort(cost, stable=True)[:k]
        assign(cols[order], cost[order])
        alive[cols[order]] = False
        done = b
    cols, cost = costs(alive)
    assign(cols, cost)
    return score


def checked_store(ctx: ScoreContext, name: str) -> ActivationStore:
    """The activation store, after checking that it was captured from a model of these layer widths."""
    store = ctx.require_store(name)
    if store.widths != [ctx.adapter.width(m) for m in ctx.adapter.mlps(ctx.model)]:
        raise UserError(f"scorer {name!r}: activation store widths do not match the model")
    return store


def elimination_options(ctx: ScoreContext, name: str, steps: int, steps_name: str,
                        default_sparsity: float | None = None) -> tuple[float, int, float]:
    """Checked (sparsity, steps, ridge) of an elimination scorer (``steps``: its rounds, the context field
    ``steps_name``): it eliminates down to the plan's own target, so a missing target is an error unless the
    scorer has a documented fallback (``default_sparsity``)."""
    sparsity = ctx.sparsity
    if sparsity is None:
        if default_sparsity is None:
            raise UserError(f"scorer {name!r} needs the plan's target (ScoreContext.sparsity)")
        log.warning("%s scorer: no target sparsity given; eliminating down to %.0f%% of each layer",
                    name, 100 * (1 - default_sparsity))
        sparsity = default_sparsity
    sparsity = float(sparsity)
    steps = int(steps)
    ridge = float(ctx.ridge)
    if not 0.0 <= sparsity < 1.0 or steps < 1 or ridge < 0:
        raise UserError(f"{name}: need 0 <= sparsity < 1, {steps_name} >= 1 and ridge >= 0 "
                        f"(got sparsity {sparsity}, {steps_name} {steps}, ridge {ridge})")
    return sparsity, steps, ridge


@register_scorer("obs", needs=Needs(calibration=True, activations=True))
def obs_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    """Iterative OBS elimination per layer, from the stored activations' Gram matrices."""
    store = checked_store(ctx, "obs")
    sparsity, steps, ridge = elimination_options(ctx, "obs", ctx.obs_steps, "obs_steps", default_sparsity=0.5)
    mlps = ctx.adapter.mlps(ctx.model)
    by_layer = dist.sharding_layers(len(mlps))  # several processes: each layer on one rank, Gram included

    def one(i: int) -> torch.Tensor:
        w = ctx.adapter.down_weight(mlps[i]).detach().double().cpu()
        n = w.shape[1]
        g = shrink_to_diagonal(augmented_gram(store, i, reduce=not by_layer), ctx.gram_shrink)
        return obs_order(g, w, round(n * (1 - sparsity)), steps, ridge)

    return [s for _, s in tqdm(dist.layer_results(len(mlps), one, "obs scoring"), total=len(mlps),
                               desc="obs scoring", unit="layer", disable=not ctx.progress)]
