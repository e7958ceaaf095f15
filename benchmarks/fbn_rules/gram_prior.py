"""Gram priors for the calibration-regimes study: shrink the activation covariance that OBS and the re-fit read
towards a structure, so that a covariance estimated from little text over-fits less.

OBS (scoring) and every re-fit read a layer's augmented Gram ``G = [H, 1]^T [H, 1]`` of the calibration
activations. Written as ``n (C + m m^T)`` (covariance ``C``, mean ``m``), a prior changes ``C`` only; the means
and the count stay as measured. Kinds, each with a strength ``lam``:

* ``net``: covariances between two neurons that share no recurring functional network are scaled by
  ``1 - lam``; pairs inside a recurring network and the variances are kept;
* ``rand``: the same, with the network mask's neurons permuted at random (seeded): as many pairs kept, as much
  shrinkage, but no network structure, the control that says whether the networks' pairs are the right ones;
* ``diag``: every covariance between two neurons scaled by ``1 - lam`` (shrinkage towards the diagonal; the
  product's ``prune.gram_shrink``, :func:`fbnprune.prune.gram.shrink_to_diagonal`);
* ``ridge``: ``lam`` times the mean variance added to every variance (what the methods' own ``ridge`` does at
  1e-3, here at the strength a study would tune).

Recurring networks: the networks of a layer's stored runs that recur in at least ``MIN_RECURRENCE`` of the other
runs (all of them when the layer has one run, e.g. when the calibration text fills one discovery block). They
overlap (a neuron can belong to several, and every run finds its own copy of a recurring network), and a mask
of overlapping blocks is not positive semi-definite: shrinking by it can give the covariance negative
eigenvalues, which OBS and the re-fit then invert (perplexities in the hundred-thousands at 1,024 tokens). So the
networks are first made a partition: the most recurrent (then the largest) network takes its members, the next
takes those of its members that are still free, and so on. The kept pairs then form disjoint blocks, the shrink
factor matrix ``(1 - lam) 11^T + lam B`` is positive semi-definite, and by the Schur product theorem so is the
shrunk covariance, at every strength; ``rand`` permutes the same partition, ``diag`` is its singleton case.

Study code, not a product option: it patches the Gram function where the scorers and compensations look it up,
for the duration of a ``with applied(...)`` block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

import fbnprune.prune.compensate as _compensate
import fbnprune.prune.obs as _obs
import fbnprune.prune.redundancy as _redundancy
from fbnprune.prune.gram import moments, shrink_to_diagonal

KINDS = ("net", "rand", "diag", "ridge")
MIN_RECURRENCE = 0.5
_USERS = (_obs, _redundancy, _compensate)


def recurring_groups(nets: Any, layer: int, min_recurrence: float = MIN_RECURRENCE) -> torch.Tensor:
    """``(N,)`` long: each neuron's group in the partition made of ``layer``'s recurring networks (see module doc),
    ``-1`` for a neuron in none of them."""
    n = nets.widths[layer]
    runs = nets.n_runs(layer)
    rec = nets.network_recurrence(layer)
    found: list[tuple[float, int, int, int, torch.Tensor]] = []
    for r in range(runs):
        members = nets.networks(layer, r)  # (n_net, N)
        for i, m in enumerate(members):
            score = 1.0 if runs < 2 else float(rec[r][i])
            if score >= min_recurrence:
                found.append((score, int(m.sum()), r, i, m))
    found.sort(key=lambda f: (-f[0], -f[1], f[2], f[3]))
    group = torch.full((n,), -1, dtype=torch.long)
    for k, (*_, m) in enumerate(found):
        group[m & (group < 0)] = k
    return group


def recurring_mask(nets: Any, layer: int, min_recurrence: float = MIN_RECURRENCE) -> torch.Tensor:
    """Boolean ``(N, N)``: neurons ``i`` and ``j`` are in one group of :func:`recurring_groups` (diagonal true),
    so the kept pairs form disjoint blocks."""
    g = recurring_groups(nets, layer, min_recurrence)
    return (g[:, None] == g[None, :]) & (g[:, None] >= 0) | torch.eye(len(g), dtype=torch.bool)


def permuted(mask: torch.Tensor, seed: int) -> torch.Tensor:
    """``mask`` with its neurons relabelled by a seeded random permutation (same number of pairs)."""
    p = torch.randperm(mask.shape[0], generator=torch.Generator().manual_seed(seed))
    return mask[p][:, p]


def shrink(g: torch.Tensor, kind: str, lam: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The augmented Gram ``g`` with its covariance part shrunk (see module doc); a new tensor unless ``lam`` is 0."""
    if kind not in KINDS:
        raise ValueError(f"unknown Gram prior {kind!r}; choose one of {KINDS}")
    if lam == 0:  # no prior: the measured Gram itself, not a rounding of it
        return g
    if kind == "diag":  # the product's own option (prune.gram_shrink)
        return shrink_to_diagonal(g, lam)
    n = g.shape[0] - 1
    rows, mean, cov = moments(g)
    if kind == "ridge":
        cov = cov + lam * float(cov.diagonal().mean()) * torch.eye(n, dtype=g.dtype)
    else:
        if mask is None:
            raise ValueError(f"Gram prior {kind!r} needs a mask")
        cov = torch.where(mask, cov, (1.0 - lam) * cov)
    out = g.clone()
    out[:n, :n] = (cov + torch.outer(mean, mean)) * rows
    return out


@contextlib.contextmanager
def applied(kind: str, lam: float, nets: Any = None, seed: int = 0) -> Iterator[None]:
    """Within the block, every Gram the scorers and compensations read has the prior applied (``nets``: the
    :class:`fbnprune.discover.networks.NetworkSet` whose recurring networks ``net`` and ``rand`` use)."""
    if kind in ("net", "rand") and nets is None:
        raise ValueError(f"Gram prior {kind!r} needs networks")
    original = _obs.augmented_gram
    masks: dict[int, torch.Tensor] = {}

    def with_prior(store: Any, layer: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        g = original(store, layer, *args, **kwargs)
        mask = None
        if kind in ("net", "rand"):
            if layer not in masks:
                m = recurring_mask(nets, layer)
                masks[layer] = permuted(m, seed + layer) if kind == "rand" else m
            mask = masks[layer]
        return shrink(g, kind, lam, mask)

    for mod in _USERS:
        mod.augmented_gram = with_prior  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for mod in _USERS:
            mod.augmented_gram = original  # type: ignore[attr-defined]


def mask_density(nets: Any) -> list[float]:
    """Per layer, the fraction of neuron pairs that ``net`` keeps (how much it shrinks less than ``diag``)."""
    out = []
    for layer in range(nets.n_layers):
        m = recurring_mask(nets, layer)
        n = m.shape[0]
        out.append(float((m.sum() - n) / max(n * (n - 1), 1)))
    return out
