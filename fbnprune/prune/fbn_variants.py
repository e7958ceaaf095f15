"""Functional-network pruning rules studied in ``benchmarks/fbn_rules`` (issue 9; see ``docs/fbn-study.md``).

The naive ``fbn`` rule (keep the neurons with the largest z-scored ICA loading) ignores how much a neuron
contributes to the layer output, and loses badly to activation-weighted scores. When the kept down-projection
columns are re-fitted (``refit`` compensation), the question becomes which neurons the re-fit can absorb, and the
structured OBS scorer (``obs``) answers it from the full activation Gram matrix. The rules here put functional
networks on top of that selection in the places where they could add information the Gram matrix of one
calibration set does not hold:

* ``fbn_obs``: OBS elimination with each neuron's removal cost scaled by ``1 + beta * r_j``, where ``r_j`` is the
  neuron's network recurrence (fraction of discovery runs in which it is a member of some network at tau). Members
  of networks that recur across disjoint calibration blocks are protected in proportion to their stability.
  ``beta = 0`` is exactly ``obs``. Options: ``fbn_beta`` (1.0), ``fbn_signal`` (``recurrence`` | ``max_z``: the
  weight is then ``max_z / max over the layer``), plus the ``obs`` options (``sparsity``, ``obs_steps``, ``ridge``).
* ``fbn_alloc``: non-uniform layer widths from the network density of each layer (mean recurrence over the
  layer's neurons), OBS order inside each layer. Layer ``i`` keeps ``n (1 - s) (1 + gamma z_i)`` neurons (``z_i``:
  standardised density, clipped so every layer keeps between ``fbn_alloc_min`` (0.2) and all of its neurons),
  rescaled to the budget. ``gamma > 0`` keeps more of the dense layers, ``gamma < 0`` fewer. The scores are
  ``k_i - rank`` (positive exactly for the neurons the layer keeps), so use them with ``allocation: global`` and
  ``normalize: none``. Options: ``fbn_gamma`` (0.25), ``fbn_alloc_min`` (0.2), ``fbn_within`` (``obs`` or
  ``wanda_sp``: the order inside a layer), ``sparsity``, ``obs_steps``, ``ridge``.
* ``obs_global``: the control for ``fbn_alloc`` without networks: the same ``k_i - rank`` construction with the
  widths chosen by one ranking of OBS removal costs across layers (the costs are squared output errors in the
  shared residual space, so they are comparable across layers without normalisation).

Networks come from ``options["networks"]`` or :func:`fbnprune.discover.run_discovery` (cached), as for ``fbn``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from fbnprune.errors import UserError
from fbnprune.prune.fbn import _networks
from fbnprune.prune.gram import abs_correlation, augmented_gram, ridge_solve
from fbnprune.prune.obs import checked_store, elimination_options, obs_order
from fbnprune.prune.plan import KeepPlan
from fbnprune.prune.scorers import SCORERS, ScoreContext


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
    signal = ctx.options.get("fbn_signal", "recurrence")
    if signal not in ("recurrence", "max_z"):
        raise UserError(f"{name}: fbn_signal must be 'recurrence' or 'max_z', got {signal!r}")
    nets = _networks(ctx)
    widths = [ctx.adapter.width(m) for m in ctx.adapter.mlps(ctx.model)]
    if nets.widths != widths:
        raise UserError(f"networks at {nets.path} were found for layer widths {nets.widths}, the model has {widths}")
    if signal == "recurrence":
        return [r.double().nan_to_num(0.0).clamp(0, 1) for r in nets.recurrence]
    return [s.double() / s.double().max().clamp_min(1e-12) for s in nets.scores]


@SCORERS.register("fbn_obs")
def fbn_obs_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    """OBS elimination with removal costs raised for stable network members (``1 + beta * r_j``)."""
    store = checked_store(ctx, "fbn_obs")
    sparsity, steps, ridge = elimination_options(ctx, "fbn_obs")
    beta = float(ctx.options.get("fbn_beta", 1.0))
    if not math.isfinite(beta) or beta < 0:
        raise UserError(f"fbn_obs: fbn_beta must be >= 0, got {beta}")
    weights = _network_weights(ctx, "fbn_obs")
    out = []
    mlps = ctx.adapter.mlps(ctx.model)
    for i, m in enumerate(tqdm(mlps, desc="fbn_obs scoring", unit="layer", disable=not ctx.options.get("progress", True))):
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


@SCORERS.register("fbn_alloc")
def fbn_alloc_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    """Layer widths from network density, OBS order inside each layer (use allocation global, normalize none)."""
    store = checked_store(ctx, "fbn_alloc")
    sparsity, steps, ridge = elimination_options(ctx, "fbn_alloc")
    gamma = float(ctx.options.get("fbn_gamma", 0.25))
    min_frac = float(ctx.options.get("fbn_alloc_min", 0.2))
    if not math.isfinite(gamma) or not 0 < min_frac <= 1:
        raise UserError("fbn_alloc: fbn_gamma must be finite and 0 < fbn_alloc_min <= 1")
    weights = _network_weights(ctx, "fbn_alloc")
    mlps = ctx.adapter.mlps(ctx.model)
    widths = [ctx.adapter.width(m) for m in mlps]
    keep = density_widths([float(x.mean()) for x in weights], widths, sparsity, gamma, min_frac)
    within = ctx.options.get("fbn_within", "obs")
    if within not in ("obs", "wanda_sp"):
        raise UserError(f"fbn_alloc: fbn_within must be 'obs' or 'wanda_sp', got {within!r}")
    out = []
    for i, m in enumerate(tqdm(mlps, desc="fbn_alloc scoring", unit="layer", disable=not ctx.options.get("progress", True))):
        w = ctx.adapter.down_weight(m).detach().double().cpu()
        if within == "wanda_sp":
            order = store.stats(i).l2.double() * w.norm(dim=0)
        else:
            order = weighted_obs_order(augmented_gram(store, i), w, keep[i], None, steps, ridge)
        out.append(_rank_scores(order, keep[i]))
    return out


@SCORERS.register("obs_global")
def obs_global_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    """Control for ``fbn_alloc``: widths from one cross-layer ranking of OBS removal costs, no networks.

    Each layer is eliminated down to ``fbn_alloc_min`` of its width; the costs (squared output error in the
    residual space) are ranked across layers to pick the budget, then expressed as ``k_i - rank`` scores.
    """
    store = checked_store(ctx, "obs_global")
    sparsity, steps, ridge = elimination_options(ctx, "obs_global")
    min_frac = float(ctx.options.get("fbn_alloc_min", 0.2))
    mlps = ctx.adapter.mlps(ctx.model)
    raw = []
    for i, m in enumerate(tqdm(mlps, desc="obs_global scoring", unit="layer", disable=not ctx.options.get("progress", True))):
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


def network_neighbourhoods(nets: Any, layer: int, run: int | None = None) -> torch.Tensor:
    """Boolean ``(N, N)``: ``[p, q]`` is true when neurons p and q share a network (of ``run``, or of any run when
    ``run`` is None); the diagonal is false."""
    runs = range(int(nets._t[f"net_members.{layer}"].shape[0])) if run is None else [run]
    share = torch.zeros(nets.widths[layer], nets.widths[layer], dtype=torch.bool)
    for r in runs:
        m = nets.networks(layer, r).double()  # (n_net, N)
        share |= (m.T @ m) > 0
    share.fill_diagonal_(False)
    return share


def network_refit_weights(g: torch.Tensor, w: torch.Tensor, keep_mask: torch.Tensor, share: torch.Tensor,
                          ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Down weight ``(d, N)`` with pruned contributions folded into network neighbours, the bias, and the number
    of pruned neurons that had no kept neighbour (their mean went to the bias). ``g``: augmented Gram."""
    n = w.shape[1]
    new_w = w.clone()
    delta = torch.zeros(w.shape[0], dtype=torch.float64)
    n_rows = float(g[n, n])
    n_alone = 0
    for p in (~keep_mask).nonzero().flatten().tolist():
        nb = (share[p] & keep_mask).nonzero().flatten()
        if len(nb) == 0:
            delta += w[:, p] * (g[n, p] / n_rows)  # the mean of h_p (FLAP's bias)
            n_alone += 1
            continue
        idx = torch.cat([nb, torch.tensor([n])])
        a = ridge_solve(g, g[idx, p : p + 1], idx, ridge).flatten()  # (|nb| + 1,)
        new_w[:, nb] += w[:, p : p + 1] * a[:-1]
        delta += w[:, p] * a[-1]
    return new_w, delta, n_alone


@torch.no_grad()
def network_refit_compensation_(model: Any, plan: KeepPlan, store: Any, nets: Any, ridge: float = 1e-3,
                                run: int | None = None, fallback: str = "bias") -> dict[str, Any]:
    """Re-fit restricted to functional networks (in place, before pruning).

    Each pruned neuron ``p`` is rebuilt, by ridge least squares on the calibration activations, from the kept
    neurons that share a network with it (plus a constant): ``h_p ~ H_{N(p)} a_p + c_p``, and its down column is
    folded into theirs (``W'_{N(p)} += W_p a_p^T``, bias ``+= W_p c_p``). A pruned neuron in no network gets only
    the constant (``fallback: bias``, FLAP's mean) or the global re-fit's share (``fallback: global``, not done
    here). It has far fewer free parameters than the global re-fit; it was built when the global re-fit seemed to
    over-fit, which turned out to be the calibration leaving out the attention-sink position (docs/fbn-study.md,
    session 6): with that position kept, the global re-fit rebuilds better. Returns per-layer relative output
    errors (calibration).
    """

    if fallback != "bias":
        raise UserError("network refit: only fallback 'bias' is implemented")
    return _neighbourhood_refit_(model, plan, store, ridge, lambda i, g, km: network_neighbourhoods(nets, i, run))


def _neighbourhood_refit_(model: Any, plan: KeepPlan, store: Any, ridge: float,
                          neighbours: Any) -> dict[str, Any]:
    """The network re-fit and its correlation control; ``neighbours(layer, gram, keep_mask)`` gives the ``(N, N)``
    boolean neighbourhoods, the only thing in which they differ."""

    def solve(i: int, g: torch.Tensor, w64: torch.Tensor, keep: torch.Tensor) -> tuple[Any, Any, dict[str, Any]]:
        km = plan.keep_mask(i)
        new_w, delta, n_alone = network_refit_weights(g, w64, km, neighbours(i, g, km), ridge)
        return new_w[:, keep], delta, {"alone": n_alone / (plan.widths[i] - len(keep))}

    return _refit_layers_(model, plan, store, ridge, solve)


def _refit_layers_(model: Any, plan: KeepPlan, store: Any, ridge: float, solve: Any) -> dict[str, Any]:
    """The per-layer loop every re-fit variant here shares: ``solve(layer, gram, down_weight_f64, keep)`` returns the
    new kept down columns ``(d, k)``, the bias delta ``(d,)`` and extra report fields; this writes them in place."""
    from fbnprune.arch import get_adapter
    from fbnprune.prune.compensate import _mark_bias, _rel_errors

    adapter = get_adapter(model)
    report: dict[str, Any] = {"ridge": ridge, "layers": {}}
    for i, mlp in enumerate(adapter.mlps(model)):
        w = adapter.down_weight(mlp)
        keep = plan.keep[i]
        if len(keep) == plan.widths[i]:
            adapter.add_down_bias_(mlp, torch.zeros(w.shape[0], dtype=torch.float64))
            continue
        g = augmented_gram(store, i)
        w64 = w.detach().double().cpu()
        cols, delta, extra = solve(i, g, w64, keep)
        report["layers"][i] = {**_rel_errors(g, w64, keep, cols, delta), **extra}
        w[:, keep.to(w.device)] = cols.to(dtype=w.dtype, device=w.device)
        adapter.add_down_bias_(mlp, delta)
    _mark_bias(model, adapter, "refit")
    return report


@torch.no_grad()
def anchored_refit_compensation_(model: Any, plan: KeepPlan, store: Any, ridge: float = 0.1) -> dict[str, Any]:
    """Re-fit whose ridge shrinks toward the ORIGINAL kept columns, not toward zero (in place, before pruning).

    ``min ||H W^T - H_K W'^T - 1 b^T||^2 + lam ||W' - W_K||^2``, ``lam = ridge * mean diag(G_KK)``. A large
    ``lam`` tends to plain pruning plus the best bias; the engine's ``refit`` tends to zero weights instead, which
    is why raising its ridge makes things worse. Found while studying why ``refit`` seemed to over-fit, before the
    missing attention-sink position was found to be the cause (docs/fbn-study.md).
    """
    if ridge <= 0:
        raise UserError(f"anchored refit: ridge must be > 0, got {ridge}")

    def solve(i: int, g: torch.Tensor, w64: torch.Tensor, keep: torch.Tensor) -> tuple[Any, Any, dict[str, Any]]:
        n = plan.widths[i]
        idx = torch.cat([keep, torch.tensor([n])])
        a = g[idx][:, idx].clone()
        lam = ridge * float(a.diagonal()[:-1].mean())
        a.diagonal()[:-1] += lam
        rhs = g[idx, :n] @ w64.T
        rhs[:-1] += lam * w64[:, keep].T
        x = torch.linalg.solve(a, rhs)
        return x[:-1].T, x[-1], {}

    return _refit_layers_(model, plan, store, ridge, solve)


def correlation_neighbourhoods(g: torch.Tensor, keep_mask: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """Control for :func:`network_neighbourhoods`: each pruned neuron gets as many kept neighbours as its networks
    give it, but chosen by absolute activation correlation (from the augmented Gram ``g``) instead of networks."""
    corr = abs_correlation(g)
    corr[:, ~keep_mask] = -1.0
    out = torch.zeros_like(share)
    for p in (~keep_mask).nonzero().flatten().tolist():
        m = int((share[p] & keep_mask).sum())
        if m:
            out[p, torch.argsort(corr[p], descending=True, stable=True)[:m]] = True
    return out


@torch.no_grad()
def correlation_refit_compensation_(model: Any, plan: KeepPlan, store: Any, nets: Any, ridge: float = 1e-3
                                    ) -> dict[str, Any]:
    """Control for :func:`network_refit_compensation_`: same neighbourhood sizes, neighbours by correlation."""
    return _neighbourhood_refit_(model, plan, store, ridge, lambda i, g, km: correlation_neighbourhoods(
        g, km, network_neighbourhoods(nets, i)))
