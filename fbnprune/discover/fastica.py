"""Batched FastICA in torch: the parallel (symmetric) fixed-point algorithm of Hyvärinen & Oja (2000), the one
``sklearn.decomposition.fastica(algorithm="parallel")`` runs, written for a whole batch of problems at once.

A "problem" is one (layer, restart) pair: all restarts of all layers in a chunk iterate as one tensor, and a
problem that has converged stops costing anything (it is dropped from the active set), exactly as if it had been
run on its own. Only the convergence test syncs with the host, once per iteration, never per element.

Why the two decorrelation modes: scikit-learn orthogonalises with an eigendecomposition of ``W W^T`` each
iteration. Batched ``eigh`` on 128 x 128 matrices is slow on CPU (and on GPU), so the default in float32 is a
Newton-Schulz polar iteration (matmuls only; it converges to the same orthogonal polar factor). ``eigh`` is kept
for float64, where the trajectory then matches scikit-learn's to rounding error given the same ``w_init``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FUNS = ("cube", "logcosh", "exp")


def contrast(y: torch.Tensor, fun: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``g(y)`` and the per-row mean of ``g'(y)`` for the FastICA contrasts (``y``: ``(..., k, n)``)."""
    if fun == "cube":
        return y * y * y, 3.0 * (y * y).mean(-1)
    if fun == "logcosh":  # alpha = 1, scikit-learn's default
        gy = torch.tanh(y)
        return gy, (1.0 - gy * gy).mean(-1)
    if fun == "exp":
        y2 = y * y
        e = torch.exp(-0.5 * y2)
        return y * e, ((1.0 - y2) * e).mean(-1)
    raise ValueError(f"unknown FastICA contrast {fun!r}; choose one of {FUNS}")


def sym_decorrelation(w: torch.Tensor, method: str = "eigh", *, ns_tol: float = 1e-6, ns_max: int = 40) -> torch.Tensor:
    """Orthogonal polar factor ``(W W^T)^{-1/2} W`` of every matrix in the batch ``w`` (``(..., k, k)``).

    ``eigh`` follows scikit-learn; ``ns`` uses the cubic Newton-Schulz iteration
    ``Z <- 1.5 Z - 0.5 Z Z^T Z`` from ``Z0 = W / ||W||_F`` (all singular values in (0, 1]), which converges to the same
    factor using only batched matmuls.
    """
    if method == "eigh":
        s, u = torch.linalg.eigh(w @ w.mT)
        s = s.clamp_min(torch.finfo(w.dtype).tiny)
        return (u * s.rsqrt().unsqueeze(-2)) @ u.mT @ w
    if method != "ns":
        raise ValueError(f"unknown decorrelation {method!r}")
    z = w / w.flatten(-2).norm(dim=-1).clamp_min(torch.finfo(w.dtype).tiny)[..., None, None]
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
    for i in range(ns_max):
        zzt = z @ z.mT
        z = 1.5 * z - 0.5 * (zzt @ z)
        if i % 4 == 3 and float((zzt - eye).abs().amax()) < ns_tol:
            break
    return z


@dataclass
class ICAResult:
    """Unmixing matrices of a batch of problems and how each one ended."""

    w: torch.Tensor  # (P, k, k)
    n_iter: torch.Tensor  # (P,) int
    converged: torch.Tensor  # (P,) bool
    finite: torch.Tensor  # (P,) bool: False when the iteration overflowed (cube on heavy tails)


def fastica_parallel(
    x: torch.Tensor,
    w_init: torch.Tensor,
    *,
    index: torch.Tensor | None = None,
    fun: str = "cube",
    max_iter: int = 200,
    tol: float = 1e-4,
    decorrelation: str = "ns",
) -> ICAResult:
    """Run parallel FastICA on whitened data for a batch of problems.

    Args:
        x: whitened data ``(D, k, n)`` (``k`` features, ``n`` samples, identity covariance), one per dataset.
        w_init: initial unmixing matrices ``(P, k, k)``.
        index: ``(P,)`` dataset of each problem (default: problem ``p`` uses ``x[p]``). Restarts share data.
        fun, max_iter, tol: as in scikit-learn (convergence: ``max |abs(diag(W1 W^T)) - 1| < tol``).
        decorrelation: ``eigh`` (scikit-learn's) or ``ns`` (Newton-Schulz, matmul only).
    """
    n_prob = w_init.shape[0]
    if index is None:
        index = torch.arange(n_prob, device=x.device)
    n = x.shape[-1]
    w = sym_decorrelation(w_init.to(x.dtype), decorrelation)
    n_iter = torch.full((n_prob,), max_iter, dtype=torch.long)
    converged = torch.zeros(n_prob, dtype=torch.bool)
    finite = torch.ones(n_prob, dtype=torch.bool)
    active = torch.arange(n_prob, device=x.device)
    for it in range(max_iter):
        wa = w[active]
        xa = x[index[active]]
        y = wa @ xa
        gy, gp = contrast(y, fun)
        w1 = (gy @ xa.mT) / n - gp.unsqueeze(-1) * wa
        w1 = sym_decorrelation(w1, decorrelation)
        lim = ((w1 * wa).sum(-1).abs() - 1.0).abs().amax(-1)
        ok = torch.isfinite(w1).flatten(1).all(-1)
        w[active] = torch.where(ok[:, None, None], w1, wa)
        done = (lim < tol) & ok
        stop = done | ~ok
        if bool(stop.any()):
            ended = active[stop].cpu()
            n_iter[ended] = it + 1
            converged[ended] = done[stop].cpu()
            finite[ended] = ok[stop].cpu()
            active = active[~stop]
            if active.numel() == 0:
                break
    return ICAResult(w=w, n_iter=n_iter, converged=converged, finite=finite)


def whiten_features(xt: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's ``whiten="unit-variance"`` pre-whitening of ``xt`` (``(D, p, n)``: ``p`` features, ``n`` samples).

    Returns ``(x1, u, d, mean)``: whitened data ``(D, k, n)`` with identity sample covariance, the top-``k`` left
    singular vectors ``u`` ``(D, p, k)`` (sign fixed so the first row is positive, as scikit-learn does), the singular
    values ``d`` ``(D, k)`` and the feature means ``(D, p)``. Uses the ``p x p`` Gram matrix in float64, which is
    exact and cheap when ``p`` is small (the CanICA case: ``p`` = components).
    """
    mean = xt.mean(-1, keepdim=True)
    xc = xt - mean
    gram = (xc @ xc.mT).double()
    s, u = torch.linalg.eigh(gram)  # ascending
    s, u = s.flip(-1)[..., :k], u.flip(-1)[..., :k]
    d = s.clamp_min(0).sqrt()
    u = u * torch.sign(u[..., :1, :] + (u[..., :1, :] == 0).to(u.dtype))
    u = u.to(xt.dtype)
    d = d.to(xt.dtype)
    n = xt.shape[-1]
    x1 = (u.mT @ xc) / d.clamp_min(torch.finfo(d.dtype).tiny).unsqueeze(-1) * (n**0.5)
    return x1, u, d, mean.squeeze(-1)
