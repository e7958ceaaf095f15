"""The study-only scorers of the fbn rule study: functional networks on top of OBS selection.

Importing this module registers them in :data:`fbnprune.prune.SCORERS` for this process only, so ``run.py``
scores with them through the same engine as every product method, while ``python -m fbnprune`` and recipes never
see them (they lost to the product's ``fbn``; see ``docs/fbn-study.md``).

The naive ``fbn`` rule (keep the neurons with the largest z-scored ICA loading) ignores how much a neuron
contributes to the layer output, and loses badly to activation-weighted scores. When the kept down-projection
columns are re-fitted (``refit`` compensation), the question becomes which neurons the re-fit can absorb, and the
structured OBS scorer (``obs``) answers it from the full activation Gram matrix. The rules here put functional
networks on top of that selection in the places where they could add information the Gram matrix of one
calibration set does not hold:

* ``fbn_obs``: OBS elimination with each neuron's removal cost scaled by ``1 + beta * r_j``, where ``r_j`` is the
  neuron's network recurrence (fraction of discovery runs in which it is a member of some network at tau). Members
  of networks that recur across disjoint calibration blocks are protected in proportion to their stability.
  ``beta = 0`` is exactly ``obs``. Settings in ``ctx.extra``: ``fbn_beta`` (1.0), ``fbn_signal`` (``recurrence`` |
  ``max_z``: the weight is then ``max_z / max over the layer``); plus the ``obs`` fields of the context
  (``sparsity``, ``obs_steps``, ``ridge``).
* ``fbn_alloc``: non-uniform layer widths from the network density of each layer (mean recurrence over the
  layer's neurons), OBS order inside each layer. Layer ``i`` keeps ``n (1 - s) (1 + gamma z_i)`` neurons (``z_i``:
  standardised density, clipped so every layer keeps between ``fbn_alloc_min`` (0.2) and all of its neurons),
  rescaled to the budget. ``gamma > 0`` keeps more of the dense layers, ``gamma < 0`` fewer. The scores are
  ``k_i - rank`` (positive exactly for the neurons the layer keeps), so use them with ``allocation: global`` and
  ``normalize: none``. Settings in ``ctx.extra``: ``fbn_gamma`` (0.25), ``fbn_alloc_min`` (0.2), ``fbn_within``
  (``obs`` or ``wanda_sp``: the order inside a layer).
* ``obs_global``: the control for ``fbn_alloc`` without networks: the same ``k_i - rank`` construction with the
  widths chosen by one ranking of OBS removal costs across layers (the costs are squared output errors in the
  shared residual space, so they are comparable across layers without normalisation).

Networks come from ``ctx.networks`` or discovery on the store (cached), as for ``fbn``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from tqdm.auto import tqdm

from fbnprune.errors import UserError
from fbnprune.prune import Needs, ScoreContext, register_scorer
from fbnprune.prune.gram import augmented_gram
from fbnprune.prune.networks import scoring_networks
from fbnprune.prune.obs import checked_store, elimination_options, obs_order

_NETWORKS = Needs(calibration=True, activations=True, networks=True)
_FIELDS = {f.name for f in dataclasses.fields(ScoreContext)} - {"extra"}


def context(model: Any, adapter: Any, **settings: Any) -> ScoreContext:
    """A :class:`ScoreContext` from settings by name: the context's own fields go there, the rest (this module's
    ``fbn_beta``, ``fbn_gamma`` ...) into ``extra``."""
    own = {k: v for k, v in settings.items() if k in _FIELDS}
    extra = {k: v for k, v in settings.items() if k not in _FIELDS}
    return ScoreContext(model=model, adapter=adapter, **own, extra=extra)


def weighted_obs_order(
    g: torch.Tensor, w: torch.Tensor, n_keep: int, weight: torch.Tensor | None = None, steps: int = 10,
    ridge: float = 1e-3,
) -> torch.Tensor:
    """Iterative structured OBS elimination with per-neuron cost multipliers (``weight`` >= 0; None = all 1).

    Same contract as :func:`fbnprune.prune.obs.obs_order`: returns a strictly increasing running maximum of the
    (weighted) removal cost in elimination order, so removing a prefix reproduces the rounds.
    """
    return obs_order(g, w, n_keep, steps, ridge, weight=weight)


def _network_weights(ctx: ScoreContext, name: str) -> list[torch.Tensor]:
    """Per-layer network signal in [0, 1] (recurrence, or max |z| over the layer's maximum)."""
    signal = ctx.extra.get("fbn_signal", "recurrence")
    if signal not in ("recurrence", "max_z"):
        raise UserError(f"{name}: fbn_signal must be 'recurrence' or 'max_z', got {signal!r}")
    nets = scoring_networks(ctx, name)
    if signal == "recurrence":
        return [r.double().nan_to_num(0.0).clamp(0, 1) for r in nets.recurrence]
    return [s.double() / s.double().max().clamp_min(1e-12) for s in nets.scores]


@register_scorer("fbn_obs", needs=_NETWORKS)
def fbn_obs_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    """OBS elimination with removal costs raised for stable network members (``1 + beta * r_j``)."""
    store = checked_store(ctx, "fbn_obs")
    sparsity, steps, ridge = elimination_options(ctx, "fbn_obs", ctx.obs_steps, "obs_steps")
    beta = float(ctx.extra.get("fbn_beta", 1.0))
    if not math.isfinite(beta) or beta < 0:
        raise UserError(f"fbn_obs: fbn_beta must be >= 0, got {beta}")
    weights = _network_weights(ctx, "fbn_obs")
    out = []
    mlps = ctx.adapter.mlps(ctx.model)
    for i, m in enumerate(tqdm(mlps, desc="fbn_obs scoring", unit="layer", disable=not ctx.progress)):
        w = ctx.adapter.down_weight(m).detach().double().cpu()
        n = w.shape[1]
        out.append(weighted_obs_order(augmented_gram(store, i), w, round(n * (1 - sparsity)), 1 + beta * weights[i],
                                      steps, ridge))
    return out


def density_widths(density: list[float], widths: list[int], sparsity: float, gamma: float, min_frac: float = 0.2,
                   round_to: int = 8) -> list[int]:
    """Kept width per layer: ``n (1 - s)(1 + gamma z)`` with ``z`` the standardised density, on budget.

    Widths are multiples of ``round_to`` (or the full width), between ``min_frac * n`` and ``n``, and sum to the
    uniform budget ``sum n (1 - s)`` up to one ``round_to`` step per layer.
    """
    d = torch.tensor(density, dtype=torch.float64)
    n = torch.tensor(widths, dtype=torch.float64)
    z = (d - d.mean()) / d.std().clamp_min(1e-12) if len(d) > 1 else torch.zeros_like(d)
    target = float((n * (1 - sparsity)).sum())
    raw = n * (1 - sparsity) * (1 + gamma * z).clamp_min(0.0)
    lo, hi = n * min_frac, n
    # rescale so the clipped widths meet the budget (bisection on the scale factor)
    a, b = 0.0, 10.0
    for _ in range(100):
        c = (a + b) / 2
        if float(torch.minimum(torch.maximum(raw * c, lo), hi).sum()) < target:
            a = c
        else:
            b = c
    k = torch.minimum(torch.maximum(raw * b, lo), hi)
    out = []
    for ki, ni in zip(k.tolist(), widths, strict=True):
        r = int(round(ki / round_to) * round_to)
        out.append(ni if r >= ni else max(round_to, r))
    return out


def _rank_scores(order_scores: torch.Tensor, k: int) -> torch.Tensor:
    """``k - rank`` (rank 0 = best by ``order_scores``): positive exactly for the top ``k``."""
    rank = torch.empty_like(order_scores)
    rank[torch.argsort(order_scores, descending=True, stable=True)] = torch.arange(len(order_scores),
                                                                                   dtype=torch.float64)
    return k - rank


@register_scorer("fbn_alloc", needs=_NETWORKS)
def fbn_alloc_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    """Layer widths from network density, OBS order inside each layer (use allocation global, normalize none)."""
    store = checked_store(ctx, "fbn_alloc")
    sparsity, steps, ridge = elimination_options(ctx, "fbn_alloc", ctx.obs_steps, "obs_steps")
    gamma = float(ctx.extra.get("fbn_gamma", 0.25))
    min_frac = float(ctx.extra.get("fbn_alloc_min", 0.2))
    if not math.isfinite(gamma) or not 0 < min_frac <= 1:
        raise UserError("fbn_alloc: fbn_gamma must be finite and 0 < fbn_alloc_min <= 1")
    weights = _network_weights(ctx, "fbn_alloc")
    mlps = ctx.adapter.mlps(ctx.model)
    widths = [ctx.adapter.width(m) for m in mlps]
    keep = density_widths([float(x.mean()) for x in weights], widths, sparsity, gamma, min_frac)
    within = ctx.extra.get("fbn_within", "obs")
    if within not in ("obs", "wanda_sp"):
        raise UserError(f"fbn_alloc: fbn_within must be 'obs' or 'wanda_sp', got {within!r}")
    out = []
    for i, m in enumerate(tqdm(mlps, desc="fbn_alloc scoring", unit="layer", disable=not ctx.progress)):
        w = ctx.adapter.down_weight(m).detach().double().cpu()
        if within == "wanda_sp":
            order = store.stats(i).l2.double() * w.norm(dim=0)
        else:
            order = weighted_obs_order(augmented_gram(store, i), w, keep[i], None, steps, ridge)
        out.append(_rank_scores(order, keep[i]))
    return out


@register_scorer("obs_global", needs=Needs(calibration=True, activations=True))
def obs_global_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    """Control for ``fbn_alloc``: widths from one cross-layer ranking of OBS removal costs, no networks.

    Each layer is eliminated down to ``fbn_alloc_min`` of its width; the costs (squared output error in the
    residual space) are ranked across layers to pick the budget, then expressed as ``k_i - rank`` scores.
    """
    store = checked_store(ctx, "obs_global")
    sparsity, steps, ridge = elimination_options(ctx, "obs_global", ctx.obs_steps, "obs_steps")
    min_frac = float(ctx.extra.get("fbn_alloc_min", 0.2))
    mlps = ctx.adapter.mlps(ctx.model)
    raw = []
    for i, m in enumerate(tqdm(mlps, desc="obs_global scoring", unit="layer", disable=not ctx.progress)):
        w = ctx.adapter.down_weight(m).detach().double().cpu()
        n = w.shape[1]
        raw.append(weighted_obs_order(augmented_gram(store, i), w, max(1, round(n * min_frac)), None,
                                      steps * 2, ridge))
    widths = [len(s) for s in raw]
    n_keep = round(sum(widths) * (1 - sparsity))
    floor = [max(1, round(n * min_frac)) for n in widths]
    # the floor neurons are always kept; the rest are ranked globally by removal cost
    cand = torch.cat([torch.sort(s, descending=True).values[f:] for s, f in zip(raw, floor, strict=True)])
    extra = n_keep - sum(floor)
    thr = torch.sort(cand, descending=True).values[extra - 1] if extra > 0 else math.inf
    keep = [f + int((torch.sort(s, descending=True).values[f:] >= thr).sum()) for s, f in zip(raw, floor, strict=True)]
    keep = [min(n, max(8, int(round(k / 8) * 8))) for k, n in zip(keep, widths, strict=True)]
    return [_rank_scores(s, k) for s, k in zip(raw, keep, strict=True)]
