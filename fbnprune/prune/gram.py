"""Per-layer Gram matrices of stored calibration activations, for re-fit compensation and the ``obs`` scorer.

``G = [H, 1]^T [H, 1]`` (float64, ``(width + 1)^2``): the last row/column is the bias (constant) input, so a
least-squares fit of the down projection with a free bias needs nothing else. ``H`` is read from the store's
memory map in row chunks, so at most one layer's Gram (and one chunk of rows) is in memory at a time unless the
cache is asked to keep more. In a multi-process run, per-layer work is shared out by layer and each layer's
Gram is computed by the rank that owns the layer (``reduce=False``); where every rank needs the same layer (the
one layer of a sequential step), each rank sums its share of the chunks and the partial Grams are all-reduced, so
every rank gets the whole Gram (to float rounding) for ``1 / world`` of the work.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from fbnprune import distributed as dist
from fbnprune.collect.store import ActivationStore
from fbnprune.errors import UserError

_CACHE: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
_CACHE_MAX = 2  # Grams kept across calls (e.g. obs scoring then refit on the same store); raise for grid runs


def set_gram_cache_size(n: int) -> None:
    """Keep up to ``n`` layer Grams in memory between calls (0 disables). A 1536-wide layer takes 19 MB."""
    global _CACHE_MAX
    _CACHE_MAX = max(int(n), 0)
    while len(_CACHE) > _CACHE_MAX:
        _CACHE.popitem(last=False)


def clear_gram_cache() -> None:
    _CACHE.clear()


def augmented_gram(store: ActivationStore, layer: int, chunk_rows: int = 2048, reduce: bool = True) -> torch.Tensor:
    """``[H, 1]^T [H, 1]`` of ``layer`` in float64 (accumulated chunk by chunk from float32 products).

    ``reduce`` (several processes): the ranks share the chunks out and all-reduce, so every rank must call it for
    the layer; ``False``: this rank computes the whole Gram alone (per-layer work shared out by layer, see
    :func:`fbnprune.distributed.layer_results`). Always the measured Gram; readers that regularise it apply
    :func:`shrink_to_diagonal` to their own copy."""
    key = (str(store.path), int(layer))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    if not store.has_activations:
        raise UserError(
            "this needs the calibration activations themselves (their Gram matrix), but the store kept "
            "statistics only: collect with keep_activations: true"
        )
    arr = store.layer(layer)
    n, w = arr.shape
    g = torch.zeros(w + 1, w + 1, dtype=torch.float64)
    starts = list(range(0, n, chunk_rows))
    # every chunk in one process (or with reduce=False); chunk c on rank c % world in several
    for c in dist.shard(len(starts)) if reduce else range(len(starts)):
        h = torch.from_numpy(np.array(arr[starts[c] : starts[c] + chunk_rows], dtype=np.float32))
        g[:w, :w] += (h.T @ h).double()
        g[:w, w] += h.double().sum(0)
    if reduce:
        dist.all_reduce_(g, what=f"Gram matrix of layer {layer}")
    g[w, :w] = g[:w, w]
    g[w, w] = n
    if _CACHE_MAX > 0:
        _CACHE[key] = g
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    return g


def moments(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The row count, the activations' means ``(N,)`` and their covariance ``(N, N)`` (population) from the
    augmented Gram ``g`` (the bias/count at index N): ``g[:N, :N] = rows * (cov + mean mean^T)``."""
    n = g.shape[0] - 1
    rows = g[n, n]
    mean = g[n, :n] / rows
    return rows, mean, g[:n, :n] / rows - torch.outer(mean, mean)


def shrink_to_diagonal(g: torch.Tensor, lam: float) -> torch.Tensor:
    """The augmented Gram ``g`` with every covariance between two neurons scaled by ``1 - lam`` (variances, means
    and the row count as measured); ``g`` itself when ``lam`` is 0.

    Why: OBS and the re-fits invert the Gram. Estimated from little calibration text (fewer rows than a few times
    the MLP width) its small eigenvalues are noise, and the inverse fits that noise: on SmolLM2 at 30 % with 1,024
    calibration tokens, OBS + re-fit reaches 88 ppl@2048 (dense 19.6) and 31 with ``lam = 0.5``, a larger gain
    than any plain ridge (``benchmarks/fbn_rules/regimes.md``, network prior). Shrinking towards the diagonal
    (Ledoit-Wolf's target) keeps the matrix positive semi-definite at every ``lam`` in [0, 1]."""
    if not 0.0 <= lam <= 1.0:
        raise UserError(f"gram_shrink must be in [0, 1], got {lam}")
    if lam == 0:
        return g
    n = g.shape[0] - 1
    rows, mean, cov = moments(g)
    cov = (1.0 - lam) * cov + lam * torch.diag(cov.diagonal())
    out = g.clone()
    out[:n, :n] = (cov + torch.outer(mean, mean)) * rows
    return out


def abs_correlation(g: torch.Tensor) -> torch.Tensor:
    """``|corr(h_i, h_j)|`` of the activations, from the augmented Gram ``g`` (the bias/count at index N)."""
    _, _, cov = moments(g)
    sd = cov.diagonal().clamp_min(1e-30).sqrt()
    return (cov / torch.outer(sd, sd)).abs()


def ridge_solve(g: torch.Tensor, rhs: torch.Tensor, idx: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve ``(G[idx, idx] + lam * I') X = rhs`` where ``I'`` skips the bias entry (the last index of ``g``).

    ``lam = ridge * mean(diag(G[idx, idx]))`` (relative damping, as GPTQ/SparseGPT do), so ``ridge`` is unitless.
    """
    a = g[idx][:, idx].clone()
    bias_pos = (idx == g.shape[0] - 1).nonzero().flatten()
    diag = a.diagonal()
    not_bias = torch.ones(len(idx), dtype=torch.bool)
    not_bias[bias_pos] = False
    lam = ridge * float(diag[not_bias].mean()) if not_bias.any() else 0.0
    diag[not_bias] += max(lam, 1e-12)
    try:
        chol = torch.linalg.cholesky(a)
    except torch.linalg.LinAlgError:
        # rank-deficient (e.g. dead neurons and ridge=0): fall back to a least-squares solve
        return torch.linalg.lstsq(a, rhs).solution
    return torch.cholesky_solve(rhs, chol)
