"""Neuron scorers: one function per method, higher score = more important (kept first).

Each scorer gets a :class:`ScoreContext` and returns one float tensor per layer. Baselines:

* ``random``: seeded uniform noise (the floor every method must beat).
* ``magnitude``: L2 norm of the neuron's input rows times its down column (weights only).
* ``wanda_sp``: ``||h_j||_2 * ||W_down[:, j]||_2`` (Wanda-sp: activation norm x output weight norm).
* ``flap``: ``Var(h_j) * ||W_down[:, j]||_2^2`` (FLAP's fluctuation metric).
* ``taylor`` (:mod:`fbnprune.prune.taylor`): first-order Taylor importance from calibration gradients, summed
  over the neuron's parameter group (LLM-Pruner's ``param_first``).
* ``obs`` (:mod:`fbnprune.prune.obs`): structured optimal-brain-surgeon selection (SlimGPT/ZipLM style), the
  natural partner of ``refit`` compensation.
* ``fbn`` (:mod:`fbnprune.prune.fbn`, from the discovery stage): functional-network scores, and its control
  ``corr_redundancy`` (:mod:`fbnprune.prune.redundancy`).

Statistics (``h`` = the down projection's input) are per token over the calibration rows of the store.
Add a scorer with :func:`register_scorer` in a module that ``fbnprune/prune/__init__.py`` imports (see
``docs/pruning.md``); code outside the package (the study in ``benchmarks/fbn_rules``) registers its own the same
way, and they exist only in the processes that import it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from fbnprune.arch.base import MLPAdapter
from fbnprune.collect.store import ActivationStore
from fbnprune.discover import DiscoverConfig, NetworkSet
from fbnprune.errors import UserError
from fbnprune.registry import Registry


@dataclass(frozen=True)
class Needs:
    """What a scorer or a compensation needs from the earlier stages; recipes are checked against it at load time,
    and the pipeline runs the discover stage only when something needs networks."""

    calibration: bool = False  # a collect stage: calibration statistics or sequences
    activations: bool = False  # the stored activations themselves (their Gram matrix), not only statistics
    networks: bool = False  # discovered functional networks (a discover stage)

    def __or__(self, other: Needs) -> Needs:
        return Needs(*(getattr(self, f.name) or getattr(other, f.name) for f in fields(self)))


NEEDS_NOTHING = Needs()


@dataclass
class ScoreContext:
    """What a scorer may use: the model, the calibration data, and the settings of the product's scorers.

    ``store`` holds calibration activations, ``sequences`` their token ids. Scorers registered outside the
    package read their own settings from ``extra``.

    Example:
        >>> ctx = ScoreContext(model, adapter, store, sparsity=0.3)  # doctest: +SKIP
        >>> scores = score_neurons("obs", ctx)  # doctest: +SKIP
    """

    model: Any
    adapter: MLPAdapter
    store: ActivationStore | None = None
    sequences: list[torch.Tensor] | None = None
    seed: int = 0
    #: the plan's target fraction of neurons removed: elimination scorers (obs, fbn's redundancy rule) stop there
    sparsity: float | None = None
    #: relative ridge of the least-squares fits inside elimination scorers (as in compensation)
    ridge: float = 1e-3
    #: the calibration covariance shrunk towards its diagonal by this fraction before it is read (little text)
    gram_shrink: float = 0.0
    progress: bool = True
    #: how fbn turns networks into scores (:data:`fbnprune.prune.fbn.FBN_RULES`); None: its default rule
    fbn_rule: str | None = None
    #: the networks fbn and its control use (a NetworkSet or its directory); None: discovered from ``store``
    networks: NetworkSet | str | Path | None = None
    #: discovery settings when ``networks`` is None (None: the defaults)
    discover: DiscoverConfig | Mapping[str, Any] | None = None
    obs_steps: int = 10  # elimination rounds of obs
    redundancy_steps: int = 4  # elimination rounds of fbn's redundancy rule and corr_redundancy
    taylor_variant: str = "param_first"
    taylor_max_sequences: int = 16
    taylor_batch_size: int = 2
    extra: dict[str, Any] = field(default_factory=dict)

    def require_store(self, scorer: str) -> ActivationStore:
        if self.store is None:
            raise UserError(f"scorer {scorer!r} needs calibration activations (a collect stage)")
        return self.store

    @property
    def options(self) -> Mapping[str, Any]:
        """Every setting by name (the typed ones and ``extra``), read-only, for code that keys a cache on them
        (``benchmarks/leaderboard/run.py`` shares scores between cells of equal fbn_rule, ridge and sparsity)."""
        data = ("model", "adapter", "store", "sequences", "seed", "extra")
        typed = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in data}
        return MappingProxyType({**typed, **self.extra})


ScoreFn = Callable[[ScoreContext], list[torch.Tensor]]


@dataclass(frozen=True)
class Scorer:
    """A registered scoring rule and what it needs."""

    fn: ScoreFn
    needs: Needs


SCORERS: Registry[Scorer] = Registry("scorer")


def register_scorer(name: str, *, needs: Needs = NEEDS_NOTHING, aliases: tuple[str, ...] = ()) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator registering a scoring function under ``name`` with what it ``needs``."""

    def deco(fn: ScoreFn) -> ScoreFn:
        SCORERS.add(name, Scorer(fn, needs), aliases=aliases)
        return fn

    return deco


def _down_col_norms(ctx: ScoreContext) -> list[torch.Tensor]:
    return [ctx.adapter.down_weight(m).detach().double().norm(dim=0).cpu() for m in ctx.adapter.mlps(ctx.model)]


@register_scorer("random")
def random_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(ctx.seed)
    return [torch.rand(ctx.adapter.width(m), generator=g, dtype=torch.float64) for m in ctx.adapter.mlps(ctx.model)]


def _store_stats(ctx: ScoreContext, scorer: str) -> ActivationStore:
    store = ctx.require_store(scorer)
    widths = [ctx.adapter.width(m) for m in ctx.adapter.mlps(ctx.model)]
    if store.widths != widths:
        raise UserError(f"scorer {scorer!r}: activation store widths do not match the model (collected on another model?)")
    return store


@register_scorer("magnitude")
def magnitude_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    """Product of the neuron's input-row norms and its down-column norm (data-free)."""
    out = []
    for m, dn in zip(ctx.adapter.mlps(ctx.model), _down_col_norms(ctx), strict=True):
        w_in = torch.stack([w.detach().double().norm(dim=1).cpu() for w in ctx.adapter.in_weights(m)]).prod(0)
        out.append(w_in * dn)
    return out


@register_scorer("wanda_sp", needs=Needs(calibration=True), aliases=("wanda",))
def wanda_sp_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    """Wanda-sp: activation norm x down-projection column norm."""
    store = _store_stats(ctx, "wanda_sp")
    return [store.stats(i).l2 * dn for i, dn in enumerate(_down_col_norms(ctx))]


@register_scorer("flap", needs=Needs(calibration=True))
def flap_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    """FLAP fluctuation: sample variance of the activation x squared down-projection column norm."""
    store = _store_stats(ctx, "flap")
    return [store.stats(i).var * dn**2 for i, dn in enumerate(_down_col_norms(ctx))]


def score_neurons(method: str, ctx: ScoreContext) -> list[torch.Tensor]:
    """Scores of every neuron in every layer under ``method`` (validated shapes, float64, on CPU)."""
    scores = SCORERS.get(method).fn(ctx)
    if not isinstance(scores, (list, tuple)):
        raise RuntimeError(f"scorer {method!r} returned {type(scores).__name__}, expected a list of tensors")
    widths = [ctx.adapter.width(m) for m in ctx.adapter.mlps(ctx.model)]
    if len(scores) != len(widths) or any(s.shape != (w,) for s, w in zip(scores, widths, strict=True)):
        raise RuntimeError(f"scorer {method!r} returned shapes {[tuple(s.shape) for s in scores]}, expected {widths}")
    out = [s.detach().double().cpu() for s in scores]
    for i, s in enumerate(out):
        if not torch.isfinite(s).all():
            raise RuntimeError(f"scorer {method!r} returned non-finite scores in layer {i}")
    return out

