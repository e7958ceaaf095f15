"""ICA decomposers with a scikit-learn shape, and the batched torch core they share.

Two formulations (``docs/discovery.md``; method notes sections 2.1-2.2):

* **Spatial CanICA** (the pruning paper, P2): z-score each neuron over tokens, take the rank-``k`` spatial PCA of
  the neuron loadings ``U`` (``N x k``), run FastICA on ``U`` treated as ``N`` samples of ``k`` features with
  ``n_restarts`` seeds, keep the restart whose worst map is sparsest (smallest max-over-maps L1 norm, nilearn's
  rule), and z-score each of the ``k`` maps across neurons.
* **Temporal FastICA** (the first paper, P1): the ``k`` sources are token time courses; a neuron's map value is its
  loading (mixing weight) on a source, ``W diag(d) U^T`` up to per-map scale, z-scored across neurons.

Both share one PCA of the z-scored ``(T, N)`` block: the ``N x N`` (or ``T x T``) Gram matrix in float32 (one
BLAS call; its entries are sums of O(1) z-scores, so float32 keeps ~6 significant digits), then a randomized
subspace iteration on the Gram matrix in float64 with a Rayleigh-Ritz step. A pass over the Gram matrix costs
``N^2 (k + 10)`` instead of ``T N (k + 10)``, so the power iterations are almost free.

Seeds follow the reference exactly: restart ``r`` starts from ``RandomState(s_r).normal(size=(k, k))`` with
``s_r = RandomState(seed).randint(2**31 - 1, size=n_restarts)[r]``, so every backend starts from the same matrices.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from fbnprune.discover.fastica import fastica_parallel, picard_orthogonal, whiten_features
from fbnprune.errors import UserError

INT32_MAX = np.iinfo(np.int32).max
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def zscore_(x: torch.Tensor, ddof: int = 1) -> torch.Tensor:
    """Z-score the columns of ``x`` (``(T, N)``, in place) over rows; near-constant columns get std 1.

    Statistics are reduced in float64 whatever the dtype of ``x``.
    """
    t = x.shape[0]
    mean = x.sum(0, dtype=torch.float64) / t
    x -= mean.to(x.dtype)
    var = (x * x).sum(0, dtype=torch.float64) / max(t - ddof, 1)
    std = var.sqrt()
    std = torch.where(std < torch.finfo(x.dtype).eps, torch.ones_like(std), std)
    x /= std.to(x.dtype)
    return x


def restart_seeds(seed: int, n_restarts: int) -> list[int]:
    """Per-restart seeds as the reference draws them (``RandomState(seed).randint(int32 max, size=n)``)."""
    return [int(s) for s in np.random.RandomState(seed).randint(INT32_MAX, size=n_restarts)]


def initial_unmixing(seed: int, n_restarts: int, k: int) -> np.ndarray:
    """``(n_restarts, k, k)`` float64 initial matrices, identical to scikit-learn's for the same seeds."""
    return np.stack([np.random.RandomState(s).normal(size=(k, k)) for s in restart_seeds(seed, n_restarts)])


@dataclass
class PCABlock:
    """Rank-``k`` PCA of one z-scored block: loadings ``u`` ``(N, k)``, singular values ``d`` and, for temporal
    ICA, the whitened token scores ``x1 = sqrt(T) V^T`` ``(k, T)``."""

    u: torch.Tensor
    d: torch.Tensor
    x1: torch.Tensor | None = None


def pca_block(z: torch.Tensor, k: int, *, n_iter: int = 4, seed: int = 0, temporal: bool = False) -> PCABlock:
    """Top-``k`` PCA of a z-scored ``(T, N)`` block (see module docstring for the method).

    Columns of ``u`` are sign-fixed (largest-magnitude entry positive) so results are deterministic.
    """
    t, n = z.shape
    if k > min(t, n):
        raise UserError(f"n_components = {k} exceeds min(tokens, neurons) = min({t}, {n}) of this block")
    use_cols = t >= n
    gram = ((z.mT @ z) if use_cols else (z @ z.mT)).double()  # (m, m), m = min(T, N)
    m = gram.shape[0]
    q = min(k + 10, m)
    g = torch.Generator(device="cpu").manual_seed(seed)
    basis = torch.randn(m, q, generator=g, dtype=torch.float64).to(gram.device)
    for _ in range(n_iter + 1):
        basis, _ = torch.linalg.qr(gram @ basis)
    evals, evecs = torch.linalg.eigh(basis.mT @ gram @ basis)
    evals, evecs = evals.flip(-1)[:k], evecs.flip(-1)[:, :k]
    vec = basis @ evecs  # eigenvectors of the Gram matrix
    d = evals.clamp_min(0).sqrt()
    dz = d.clamp_min(1e-30)
    if use_cols:
        u = vec
    else:  # vec are the token-side singular vectors V: U = Z^T V / d
        u = (z.mT.double() @ vec) / dz
    idx = u.abs().argmax(0)
    sign = torch.sign(u[idx, torch.arange(k, device=u.device)])
    u = u * sign
    x1 = None
    if temporal:
        v = (z.double() @ u) / dz  # (T, k), orthonormal columns, zero-mean (z is centred)
        x1 = (v.mT * (t**0.5)).to(z.dtype)
    return PCABlock(u=u.to(z.dtype), d=d.to(z.dtype), x1=x1)


@dataclass
class ICAOutcome:
    """The chosen z-scored maps of one dataset (layer or window) and how each restart ended."""

    maps: torch.Tensor | None  # (k, N) float32 z-scored maps; None when every restart failed
    chosen: int
    n_iter: list[int] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)
    finite: list[bool] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.maps is not None


def select_sparsest(maps: torch.Tensor, finite: list[bool]) -> tuple[torch.Tensor | None, int]:
    """Pick the restart with the smallest max-over-maps L1 norm (nilearn's rule) and z-score its maps (ddof 0).

    ``maps``: ``(R, k, N)`` unit-variance maps; failed restarts are never chosen.
    """
    ok = torch.tensor(finite, dtype=torch.bool) & torch.isfinite(maps).flatten(1).all(-1).cpu()
    if not bool(ok.any()):
        return None, -1
    crit = maps.abs().sum(-1).amax(-1).double().cpu()
    crit[~ok] = float("inf")
    r = int(crit.argmin())
    m = maps[r].double()
    m = (m - m.mean(-1, keepdim=True)) / m.std(-1, correction=0, keepdim=True).clamp_min(1e-30)
    return m.float().cpu(), r


def _unit_rows(s: torch.Tensor) -> torch.Tensor:
    return s / s.std(-1, correction=0, keepdim=True).clamp_min(1e-30)


def ica_torch(
    blocks: list[PCABlock],
    *,
    temporal: bool,
    n_restarts: int,
    seed: int,
    fun: str,
    max_iter: int,
    tol: float,
    dtype: str = "float32",
    device: str = "cpu",
    solver: str = "picard-o",
) -> list[ICAOutcome]:
    """FastICA with restarts for several datasets at once: all restarts of all datasets iterate as one batch."""
    tdt = TORCH_DTYPES[dtype]
    k = blocks[0].u.shape[1]
    if temporal:
        x1 = torch.stack([b.x1 for b in blocks]).to(device=device, dtype=tdt)  # already white
    else:
        x1, _u, _d, _mean = whiten_features(torch.stack([b.u.mT for b in blocks]).to(device=device, dtype=tdt), k)
    n_data = x1.shape[0]
    w0 = torch.from_numpy(initial_unmixing(seed, n_restarts, k)).to(device=device, dtype=tdt)
    index = torch.arange(n_data, device=device).repeat_interleave(n_restarts)
    if solver == "picard-o":
        res = picard_orthogonal(x1, w0.repeat(n_data, 1, 1), index=index, fun=fun, max_iter=max_iter, tol=tol)
    elif solver == "fastica":
        res = fastica_parallel(
            x1, w0.repeat(n_data, 1, 1), index=index, fun=fun, max_iter=max_iter, tol=tol,
            decorrelation="eigh" if tdt == torch.float64 else "ns",
        )
    else:
        raise UserError(f"unknown ICA solver {solver!r}; choose picard-o or fastica")
    out: list[ICAOutcome] = []
    for i, b in enumerate(blocks):
        sl = slice(i * n_restarts, (i + 1) * n_restarts)
        w = res.w[sl]  # (R, k, k)
        if temporal:
            maps = w @ (b.d.to(device=device, dtype=tdt)[:, None] * b.u.to(device=device, dtype=tdt).mT)
        else:
            maps = w @ x1[i]  # spatial sources, one row per map
        finite = res.finite[sl].tolist()
        chosen_maps, r = select_sparsest(_unit_rows(maps), finite)
        out.append(ICAOutcome(chosen_maps, r, res.n_iter[sl].tolist(), res.converged[sl].tolist(), finite))
    return out


def ica_reference(
    blocks: list[PCABlock],
    *,
    temporal: bool,
    n_restarts: int,
    seed: int,
    fun: str,
    max_iter: int,
    tol: float,
    backend: str = "sklearn",
) -> list[ICAOutcome]:
    """Reference CPU solvers, one restart at a time: scikit-learn ``fastica`` (the reference code's call) or
    python-picard's Picard-O (``ortho=True``, extended; tanh density for ``logcosh``, else ``fun``)."""
    from sklearn.exceptions import ConvergenceWarning

    out: list[ICAOutcome] = []
    for b in blocks:
        k = b.u.shape[1]
        maps_r: list[np.ndarray] = []
        iters: list[int] = []
        conv: list[bool] = []
        fin: list[bool] = []
        w_inits = initial_unmixing(seed, n_restarts, k)
        for r, s in enumerate(restart_seeds(seed, n_restarts)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                try:
                    with np.errstate(over="ignore", invalid="ignore"):
                        _w, src, n_it = _solve_reference(b, temporal, s, w_inits[r], fun, max_iter, tol, backend)
                except (FloatingPointError, ValueError, np.linalg.LinAlgError):
                    src, n_it = None, max_iter
            if src is None or not np.isfinite(src).all():
                maps_r.append(np.full((k, b.u.shape[0]), np.nan))
                iters.append(int(n_it))
                conv.append(False)
                fin.append(False)
                continue
            maps_r.append(src)
            iters.append(int(n_it))
            conv.append(not any(issubclass(c.category, ConvergenceWarning) for c in caught))
            fin.append(True)
        maps = _unit_rows(torch.from_numpy(np.stack(maps_r)))
        chosen, r = select_sparsest(maps, fin)
        out.append(ICAOutcome(chosen, r, iters, conv, fin))
    return out


def _solve_reference(
    b: PCABlock, temporal: bool, seed: int, w_init: np.ndarray, fun: str, max_iter: int, tol: float, backend: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """One restart with a reference solver; returns ``(W, maps (k, N), n_iter)``."""
    u = b.u.double().numpy()
    if backend == "picard":
        from picard import picard

        pf = "tanh" if fun == "logcosh" else fun
        if temporal:
            x = b.x1.double().numpy()
            _k, w, _s, n_it = picard(x, fun=pf, ortho=True, extended=True, whiten=False, max_iter=max_iter,
                                     w_init=w_init, random_state=seed, return_n_iter=True)
        else:
            _k, w, s, n_it = picard(u.T, fun=pf, ortho=True, extended=True, whiten=True, max_iter=max_iter,
                                    w_init=w_init, random_state=seed, return_n_iter=True)
    else:
        from sklearn.decomposition import fastica

        if temporal:
            x = b.x1.double().numpy()
            _k, w, _s, n_it = fastica(x.T, whiten=False, fun=fun, max_iter=max_iter, tol=tol, w_init=w_init,
                                      random_state=seed, return_n_iter=True)
        else:  # exactly the reference call: fastica(U, whiten="unit-variance", fun="cube", random_state=seed_r)
            _k, _w, s_t, n_it = fastica(u, whiten="unit-variance", fun=fun, max_iter=max_iter, tol=tol,
                                        random_state=seed, return_n_iter=True)
            s = s_t.T
            w = _w
    if temporal:
        maps = w @ (b.d.double().numpy()[:, None] * u.T)
    else:
        maps = s
    return w, maps, int(n_it)


def decompose(
    blocks: list[PCABlock],
    *,
    temporal: bool,
    n_restarts: int,
    seed: int,
    fun: str,
    max_iter: int,
    tol: float,
    backend: str = "torch",
    dtype: str = "float32",
    device: str = "cpu",
    solver: str = "picard-o",
) -> list[ICAOutcome]:
    """ICA with restarts and sparsest-restart selection for every block, with the chosen backend."""
    if backend == "torch":  # one batch per data shape (layers of different widths cannot be stacked)
        shape_of = [tuple((b.x1 if temporal else b.u).shape) for b in blocks]
        out: list[ICAOutcome | None] = [None] * len(blocks)
        for shape in dict.fromkeys(shape_of):
            idx = [i for i, s in enumerate(shape_of) if s == shape]
            res = ica_torch([blocks[i] for i in idx], temporal=temporal, n_restarts=n_restarts, seed=seed, fun=fun,
                            max_iter=max_iter, tol=tol, dtype=dtype, device=device, solver=solver)
            for i, r in zip(idx, res, strict=True):
                out[i] = r
        return [o for o in out if o is not None]
    if backend in ("sklearn", "picard"):
        return ica_reference(blocks, temporal=temporal, n_restarts=n_restarts, seed=seed, fun=fun,
                             max_iter=max_iter, tol=tol, backend=backend)
    raise UserError(f"unknown ICA backend {backend!r}; choose torch, sklearn or picard")
