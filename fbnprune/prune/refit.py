"""The least-squares math of the re-fit compensations, on the augmented Gram matrix of one layer.

Every function here works on tensors only: ``g = [H, 1]^T [H, 1]`` (float64, the bias input at index N, from
:func:`fbnprune.prune.gram.augmented_gram`), the layer's down weight ``w`` ``(d, N)`` in float64 and the kept
neurons. :mod:`fbnprune.prune.compensate` turns them into in-place compensations of a model. Kept apart so the
math can be tested on planted activations and reused by studies without a model.

* :func:`ridge_refit`: ``min ||H W^T - (H_K W'^T + 1 b^T)||^2 + lam ||W'||^2`` (the ``refit`` compensation).
* :func:`anchored_refit`: the same with the ridge pulling ``W'`` toward the original kept columns (``anchored``).
* :func:`network_refit_weights`: each pruned neuron rebuilt from its neighbours only (``netrefit``/``corrrefit``),
  with neighbourhoods from :func:`fbnprune.prune.networks.network_neighbourhoods` or
  :func:`correlation_neighbourhoods`.
* :func:`rel_errors`: the relative output error on the calibration rows before and after, for reports.
"""

from __future__ import annotations

import torch

from fbnprune.prune.gram import abs_correlation, ridge_solve


def ridge_refit(g: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, ridge: float,
                cross: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """New kept columns ``(d, k)`` and bias ``(d,)`` reproducing ``H W^T`` from ``H_K``, ridge toward zero
    (``lam = ridge * mean diag(H_K^T H_K)``).

    ``cross = [H, 1]^T T`` ``(N+1, N)`` changes the target to ``T W^T`` for other activations ``T`` of the same
    tokens: sequential pruning passes the dense model's activations, so the fit also undoes earlier layers' error.
    """
    width = w.shape[1]
    idx = torch.cat([keep, torch.tensor([width])])  # kept neurons + the bias input
    rhs = (g[idx, :width] if cross is None else cross[idx]) @ w.T  # [H_K, 1]^T T W^T, (k+1, d)
    x = ridge_solve(g, rhs, idx, ridge)  # (k+1, d)
    return x[:-1].T, x[-1]


def anchored_refit(g: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`ridge_refit`, but the ridge shrinks toward the ORIGINAL kept columns:
    ``min ||H W^T - H_K W'^T - 1 b^T||^2 + lam ||W' - W_K||^2``, ``lam = ridge * mean diag(G_KK)``.

    A large ``lam`` tends to plain pruning plus the best bias; :func:`ridge_refit` tends to zero weights instead,
    which is why raising its ridge makes things worse.
    """
    n = w.shape[1]
    idx = torch.cat([keep, torch.tensor([n])])
    a = g[idx][:, idx].clone()
    lam = ridge * float(a.diagonal()[:-1].mean())
    a.diagonal()[:-1] += lam
    rhs = g[idx, :n] @ w.T
    rhs[:-1] += lam * w[:, keep].T
    x = torch.linalg.solve(a, rhs)
    return x[:-1].T, x[-1]


def network_refit_weights(g: torch.Tensor, w: torch.Tensor, keep_mask: torch.Tensor, share: torch.Tensor,
                          ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Down weight ``(d, N)`` with pruned contributions folded into their kept neighbours (``share[p]``), the
    bias, and the number of pruned neurons that had no kept neighbour (their mean went to the bias).

    Each pruned ``p`` is fitted as ``h_p ~ H_N(p) a_p + c_p`` (ridge least squares); then ``W'_N(p) += W_p a_p^T``
    and the bias gets ``W_p c_p``.
    """
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


def correlation_neighbourhoods(g: torch.Tensor, keep_mask: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """Control for network neighbourhoods: each pruned neuron gets as many kept neighbours as its networks give
    it (``share``), but chosen by absolute activation correlation (from ``g``) instead of networks."""
    corr = abs_correlation(g)
    corr[:, ~keep_mask] = -1.0
    out = torch.zeros_like(share)
    for p in (~keep_mask).nonzero().flatten().tolist():
        m = int((share[p] & keep_mask).sum())
        if m:
            out[p, torch.argsort(corr[p], descending=True, stable=True)[:m]] = True
    return out


def rel_errors(g: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, new_w: torch.Tensor, b: torch.Tensor) -> dict:
    """Relative squared output error on the calibration rows: plain pruning vs after re-fit (from the Gram)."""
    width = w.shape[1]
    full = torch.cat([w, torch.zeros(w.shape[0], 1, dtype=w.dtype)], 1)  # (d, width+1)
    ref = float((full @ g @ full.T).trace())

    def err(cand: torch.Tensor) -> float:
        diff = full - cand
        return float((diff @ g @ diff.T).trace()) / max(ref, 1e-30)

    pruned_only = torch.zeros_like(full)
    pruned_only[:, keep] = w[:, keep]
    fitted = torch.zeros_like(full)
    fitted[:, keep] = new_w
    fitted[:, width] = b
    return {"pruned": err(pruned_only), "refit": err(fitted)}
