"""scikit-learn-shaped decomposers for one ``(tokens, neurons)`` matrix.

``__init__`` only stores arguments; :meth:`fit` validates them once (through :class:`DiscoverConfig`, so the
estimators and the recipe share one set of range checks) and sets attributes ending in ``_``. The pipeline
(:func:`fbnprune.discover.run_discovery`) uses the same functions, batched over layers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from fbnprune.discover.config import DiscoverConfig
from fbnprune.discover.decompose import decompose, pca_block, zscore_
from fbnprune.errors import UserError


class _ICABase:
    _method = "canica"

    def __init__(
        self,
        n_components: int = 128,
        *,
        n_restarts: int = 10,
        fun: str = "cube",
        max_iter: int = 300,
        tol: float = 1e-4,
        random_state: int = 327,
        backend: str = "torch",
        solver: str = "picard-o",
        dtype: str = "float32",
        device: str = "cpu",
        pca_iters: int = 4,
        ddof: int = 1,
    ) -> None:
        self.n_components = n_components
        self.n_restarts = n_restarts
        self.fun = fun
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.backend = backend
        self.solver = solver
        self.dtype = dtype
        self.device = device
        self.pca_iters = pca_iters
        self.ddof = ddof

    def get_params(self) -> dict[str, Any]:
        keys = ("n_components", "n_restarts", "fun", "max_iter", "tol", "random_state", "backend", "solver", "dtype",
                "device", "pca_iters", "ddof")
        return {k: getattr(self, k) for k in keys}

    def _config(self) -> DiscoverConfig:
        p = self.get_params()
        p["seed"] = p.pop("random_state")
        try:
            return DiscoverConfig(method=self._method, block_texts=None, **p)
        except ValidationError as e:
            msgs = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise UserError(f"{type(self).__name__}: invalid parameters: {msgs}") from None

    def fit(self, X: Any, y: Any = None) -> _ICABase:
        """Decompose ``X`` (``(T, N)``: tokens x neurons; numpy or torch). Returns ``self``."""
        cfg = self._config()
        x = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X).to(torch.float32).clone()
        if x.ndim != 2:
            raise UserError(f"{type(self).__name__}.fit expects a 2-D (tokens, neurons) matrix, got {tuple(x.shape)}")
        t, n = x.shape
        if cfg.n_components > min(t, n):
            raise UserError(
                f"n_components = {cfg.n_components} is larger than the neurons ({n}) or tokens ({t}) of X"
            )
        if not bool(torch.isfinite(x).all()):
            raise UserError(f"{type(self).__name__}.fit: X contains NaN or infinite values")
        zscore_(x, cfg.ddof)
        pca = pca_block(x, cfg.n_components, n_iter=cfg.pca_iters, seed=cfg.seed, temporal=self._method == "fastica")
        (out,) = decompose(
            [pca], temporal=self._method == "fastica", n_restarts=cfg.n_restarts, seed=cfg.seed, fun=cfg.fun,
            max_iter=cfg.max_iter, tol=cfg.tol, backend=cfg.backend, dtype=cfg.dtype, device=cfg.device,
            solver=cfg.solver,
        )
        if out.maps is None:
            raise RuntimeError(f"every FastICA restart overflowed (fun={cfg.fun!r}); try fun='logcosh'")
        self.components_ = out.maps  # (k, N) z-scored maps
        self.loadings_ = pca.u
        self.singular_values_ = pca.d
        self.chosen_restart_ = out.chosen
        self.n_iter_ = list(out.n_iter)
        self.converged_ = list(out.converged)
        self.n_features_in_ = n
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet; call fit(X) first")

    @property
    def scores_(self) -> torch.Tensor:
        """Per neuron: max |z| over components (the union rule's score)."""
        self._check_fitted()
        return self.components_.abs().amax(0)

    def networks(self, threshold: float = 3.6) -> torch.Tensor:
        """Boolean ``(k, N)``: neuron ``n`` belongs to network ``c`` when ``|z[c, n]| > threshold``."""
        self._check_fitted()
        if not threshold > 0:
            raise UserError(f"threshold must be > 0, got {threshold}")
        return self.components_.abs() > threshold


class CanICA(_ICABase):
    """Spatial CanICA as the reference pruning method runs it (defaults: k = 128, 10 restarts, cube, seed 327).

    Example:
        >>> X = np.random.default_rng(0).laplace(size=(400, 64))
        >>> CanICA(n_components=8, n_restarts=2).fit(X).components_.shape
        torch.Size([8, 64])
    """

    _method = "canica"


class TemporalICA(_ICABase):
    """Temporal FastICA (the first paper): sources are token time courses; maps are neuron loadings.

    Example:
        >>> X = np.random.default_rng(0).laplace(size=(400, 64))
        >>> TemporalICA(n_components=8, n_restarts=1).fit(X).components_.shape
        torch.Size([8, 64])
    """

    _method = "fastica"
