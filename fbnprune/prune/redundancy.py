"""Redundancy scores: remove the neurons their functional network can rebuild (fbn rule ``redundancy``).

Why: with the ``netrefit`` compensation, a pruned neuron ``p`` is rebuilt from the kept members of its networks,
``h_p ~ H_N(p) a_p + c_p``, and its down column is folded into theirs. What the layer output then loses is only
the part of ``h_p`` its network cannot explain, sent through ``p``'s down column:

    cost_p = ||W_p||^2 * E[(h_p - H_N(p) a_p - c_p)^2]        (least squares a_p, c_p; the same ridge as netrefit)

A neuron in no network keeps only the constant, so its cost is ``||W_p||^2 Var(h_p)``: FLAP's fluctuation score.
So this rule is FLAP with the variance measured after the network has explained what it can, and it asks the
question the pruning study ended on (docs/fbn-study.md): not "which neurons matter" but "which neurons can the
rest absorb". ``netrefit`` is the rebuild the cost describes exactly; the rebuild that measured best after this
selection is the global ``refit`` once the calibration keeps the attention-sink position (without it,
``corrrefit`` looked better), so that is what ``compensate: auto`` pairs it with (docs/fbn-study.md).
Neighbourhoods shrink as neurons go, so the costs are recomputed in ``redundancy_steps`` rounds on the survivors
(as ``obs`` does; :func:`fbnprune.prune.obs.elimination_scores`).

``corr_redundancy`` is its control without networks: each neuron gets as many neighbours as its networks would
give it, but the most correlated ones (as ``corrrefit`` does for the compensation); ``auto`` pairs it with ``refit``.

Costs of different pruned neurons are treated as independent (their residuals' cross terms are ignored), as
FLAP and Wanda-sp also do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from fbnprune import distributed as dist
from fbnprune.discover import NetworkSet
from fbnprune.prune.gram import abs_correlation, augmented_gram, ridge_solve, shrink_to_diagonal
from fbnprune.prune.networks import network_neighbourhoods, scoring_networks
from fbnprune.prune.obs import checked_store, elimination_options, elimination_scores
from fbnprune.prune.scorers import Needs, ScoreContext, register_scorer

Neighbours = Callable[[torch.Tensor], torch.Tensor]  # alive mask (N,) -> boolean (N, N), row p = neighbours of p


def residual_sse(g: torch.Tensor, p: int, nb: torch.Tensor, ridge: float) -> float:
    """Sum over calibration rows of the squared residual of ``h_p`` after the ridge fit on ``nb`` plus a constant
    (``g``: augmented Gram, the bias at index N). With no neighbours it is ``rows * Var(h_p)``."""
    n = g.shape[0] - 1
    idx = torch.cat([nb, torch.tensor([n])])
    b = g[idx, p]
    x = ridge_solve(g, b[:, None], idx, ridge).flatten()
    sse = float(g[p, p] - 2 * (x @ b) + x @ (g[idx][:, idx] @ x))
    return max(sse, 0.0)


def residual_sse_many(g: torch.Tensor, ps: torch.Tensor, nbs: list[torch.Tensor], ridge: float,
                      max_elems: int = 1 << 24) -> torch.Tensor:
    """:func:`residual_sse` of many neurons at once (``nbs[j]``: the neighbours of ``ps[j]``), as batched
    Cholesky solves (a SmolLM2 layer took 3.5 s with one solve per neuron, 1.8 s batched).

    Neighbour lists of different lengths are padded with inert entries (identity rows, zero right-hand side), so
    their solutions are zero and they add nothing. Neurons are grouped by list length so padding stays small, in
    batches of at most ``max_elems`` matrix entries. A system that is not positive definite (dead neurons with
    ``ridge=0``) falls back to the one-neuron least-squares path."""
    n = g.shape[0] - 1
    out = torch.empty(len(ps), dtype=torch.float64)
    if len(ps) == 0:
        return out
    sizes = torch.tensor([len(nb) for nb in nbs]) + 1  # + the bias input
    order = torch.argsort(sizes, stable=True).tolist()
    start = 0
    while start < len(order):
        stop = start + 1
        # grow the batch while the padded size (set by its largest member) stays inside the budget
        while stop < len(order) and (stop + 1 - start) * int(sizes[order[stop]]) ** 2 <= max_elems:
            stop += 1
        js = order[start:stop]
        m = int(sizes[js[-1]])
        b = len(js)
        idx = torch.full((b, m), n, dtype=torch.long)
        real = torch.zeros(b, m, dtype=torch.bool)
        for r, j in enumerate(js):
            k = len(nbs[j])
            idx[r, :k] = nbs[j]
            real[r, : k + 1] = True  # neighbours, then the bias at position k
        p_idx = ps[js]
        a = g[idx[:, :, None], idx[:, None, :]]  # (b, m, m)
        pair = real[:, :, None] & real[:, None, :]
        a = torch.where(pair, a, torch.zeros((), dtype=a.dtype))
        rhs = torch.where(real, g[idx, p_idx[:, None]], torch.zeros((), dtype=a.dtype))
        # damped entries: the real neighbours, not the bias (at each row's position k; padding also indexes n)
        neuron = real.clone()
        neuron[torch.arange(b), sizes[js] - 1] = False
        diag = a.diagonal(dim1=1, dim2=2)
        cnt = neuron.sum(1)
        mean_diag = torch.where(cnt > 0, (diag * neuron).sum(1) / cnt.clamp_min(1), torch.zeros(()))
        lam = (ridge * mean_diag).clamp_min(1e-12)
        reg = a.clone()
        reg.diagonal(dim1=1, dim2=2).add_(neuron * lam[:, None] + (~real).double())
        chol, info = torch.linalg.cholesky_ex(reg)
        x = torch.cholesky_solve(rhs[:, :, None], chol).squeeze(2)
        sse = g[p_idx, p_idx] - 2 * (x * rhs).sum(1) + (x * (a @ x[:, :, None]).squeeze(2)).sum(1)
        for r, j in enumerate(js):
            out[j] = residual_sse(g, int(ps[j]), nbs[j], ridge) if int(info[r]) != 0 else max(float(sse[r]), 0.0)
        start = stop
    return out


def redundancy_order(g: torch.Tensor, w: torch.Tensor, n_keep: int, neighbours: Neighbours, steps: int = 4,
                     ridge: float = 1e-3) -> torch.Tensor:
    """Scores for one layer (higher = keep): elimination by ``||W_p||^2 * residual variance`` in ``steps`` rounds.

    ``g``: augmented Gram ``(N+1, N+1)``; ``w``: down weight ``(d, N)``; ``neighbours(alive)``: who may rebuild whom.
    """
    n = w.shape[1]
    col_sq = (w.double() ** 2).sum(0)
    rows = float(g[n, n])

    def costs(alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        share = neighbours(alive)
        cols = alive.nonzero().flatten()
        nbs = [(share[p] & alive).nonzero().flatten() for p in cols.tolist()]
        return cols, col_sq[cols] * residual_sse_many(g, cols, nbs, ridge) / rows

    return elimination_scores(n, min(max(int(n_keep), 1), n), steps, costs)


def correlation_like(g: torch.Tensor, share: torch.Tensor) -> Neighbours:
    """Control neighbourhoods: for each alive neuron, as many alive neighbours as ``share`` gives it, taken by
    absolute activation correlation instead of shared networks."""
    n = share.shape[0]
    corr = abs_correlation(g)
    corr.fill_diagonal_(-1.0)

    def neighbours(alive: torch.Tensor) -> torch.Tensor:
        m = (share & alive[None, :]).sum(1)
        c = corr.clone()
        c[:, ~alive] = -2.0
        order = torch.argsort(c, dim=1, descending=True, stable=True)
        out = torch.zeros_like(share)
        rank = torch.arange(n)[None, :] < m[:, None]  # the first m_p of each row's order
        out.scatter_(1, order, rank)
        return out

    return neighbours


def redundancy_scores(ctx: ScoreContext, nets: NetworkSet, control: bool = False) -> list[torch.Tensor]:
    """Per-layer redundancy scores from the stored activations and the networks (``control``: correlation
    neighbourhoods of the same sizes)."""
    name = "corr_redundancy" if control else "fbn (redundancy)"
    store = checked_store(ctx, name)
    mlps = ctx.adapter.mlps(ctx.model)
    sparsity, steps, ridge = elimination_options(ctx, name, ctx.redundancy_steps, "redundancy_steps")
    by_layer = dist.sharding_layers(len(mlps))  # several processes: each layer on one rank, Gram included

    def one(i: int) -> torch.Tensor:
        w = ctx.adapter.down_weight(mlps[i]).detach().double().cpu()
        g = shrink_to_diagonal(augmented_gram(store, i, reduce=not by_layer), ctx.gram_shrink)
        share = network_neighbourhoods(nets, i)
        nb: Neighbours = correlation_like(g, share) if control else (lambda alive, s=share: s)
        return redundancy_order(g, w, round(w.shape[1] * (1 - sparsity)), nb, steps, ridge)

    return [s for _, s in tqdm(dist.layer_results(len(mlps), one, f"{name} scoring"), total=len(mlps),
                               desc=f"{name} scoring", unit="layer", disable=not ctx.progress)]


@register_scorer("corr_redundancy", needs=Needs(calibration=True, activations=True, networks=True))
def corr_redundancy_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    """Control for the fbn ``redundancy`` rule: neighbours by activation correlation (sizes from the networks)."""
    return redundancy_scores(ctx, scoring_networks(ctx, "corr_redundancy"), control=True)
