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
* ``fbn`` (:mod:`fbnprune.prune.fbn`, from the discovery stage): functional-network scores.

Statistics (``h`` = the down projection's input) are per token over the calibration rows of the store.
Add a scorer by registering a function in this module or another (see ``docs/pruning.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fbnprune.arch.base import MLPAdapter
from fbnprune.collect.store import ActivationStore
from fbnprune.errors import UserError
from fbnprune.registry import Registry


@dataclass
class ScoreContext:
    """What a scorer may use. ``store`` holds calibration activations; ``sequences`` their token ids."""

    model: Any
    adapter: MLPAdapter
    store: ActivationStore | None = None
    sequences: list[torch.Tensor] | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    def require_store(self, scorer: str) -> ActivationStore:
        if self.store is None:
            raise UserError(f"scorer {scorer!r} needs calibration activations (a collect stage)")
        return self.store


Scorer = Callable[[ScoreContext], list[torch.Tensor]]
SCORERS: Registry[Scorer] = Registry("scorer")


def _down_col_norms(ctx: ScoreContext) -> list[torch.Tensor]:
    return [ctx.adapter.down_weight(m).detach().double().norm(dim=0).cpu() for m in ctx.adapter.mlps(ctx.model)]


@SCORERS.register("random")
def random_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(ctx.seed)
    return [torch.rand(ctx.adapter.width(m), generator=g, dtype=torch.float64) for m in ctx.adapter.mlps(ctx.model)]


def _store_stats(ctx: ScoreContext, scorer: str) -> ActivationStore:
    store = ctx.require_store(scorer)
    widths = [ctx.adapter.width(m) for m in ctx.adapter.mlps(ctx.model)]
    if store.widths != widths:
        raise UserError(f"scorer {scorer!r}: activation store widths do not match the model (collected on another model?)")
    return store


@SCORERS.register("magnitude")
def magnitude_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    """Product of the neuron's input-row norms and its down-column norm (data-free)."""
    out = []
    for m, dn in zip(ctx.adapter.mlps(ctx.model), _down_col_norms(ctx), strict=True):
        w_in = torch.stack([w.detach().double().norm(dim=1).cpu() for w in ctx.adapter.in_weights(m)]).prod(0)
        out.append(w_in * dn)
    return out


@SCORERS.register("wanda_sp", aliases=("wanda",))
def wanda_sp_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    """Wanda-sp: activation norm x down-projection column norm."""
    store = _store_stats(ctx, "wanda_sp")
    return [store.stats(i).l2 * dn for i, dn in enumerate(_down_col_norms(ctx))]


@SCORERS.register("flap")
def flap_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    """FLAP fluctuation: sample variance of the activation x squared down-projection column norm."""
    store = _store_stats(ctx, "flap")
    return [store.stats(i).var * dn**2 for i, dn in enumerate(_down_col_norms(ctx))]


def score_neurons(method: str, ctx: ScoreContext) -> list[torch.Tensor]:
    """Scores of every neuron in every layer under ``method`` (validated shapes, float64, on CPU)."""
    scores = SCORERS.get(method)(ctx)
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


NETWORK_SCORERS = ("corr_redundancy",)  # need networks without an fbn name (controls that borrow their sizes)


def needs_networks(method: str, compensate: str) -> bool:
    """Whether a prune configuration needs discovered networks (so the discover stage runs)."""
    return method.startswith("fbn") or method in NETWORK_SCORERS or compensate in ("netrefit", "corrrefit")
