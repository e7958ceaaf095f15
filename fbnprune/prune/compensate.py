"""Training-free compensation of pruned neurons, applied to the full-width model BEFORE :func:`apply_plan_`.

Every compensation is registered in :data:`COMPENSATIONS` with what it needs, and :func:`compensate_` runs one by
name with the same settings for all (each uses those it needs), so the pipeline and the recipe schema know no
names:

* ``none``: nothing.
* ``bias`` (:func:`bias_compensation_`, FLAP's baseline bias): a pruned neuron ``j`` stops contributing
  ``W_down[:, j] * h_j``; its average contribution ``W_down[:, j] * E[h_j]`` is added to the down projection's
  bias, with ``E`` the per-token mean over the calibration rows of the store.
* ``refit`` (:func:`refit_compensation_`): a ridge least-squares re-fit of the kept down-projection columns plus a
  bias, so that ``H_keep W'^T + b`` reproduces the full layer output ``H W^T`` on the calibration activations. It
  needs the activations (their Gram matrix), not just statistics. Bias compensation is the special case that only
  fits the bias, so the re-fit never does worse on the calibration data (up to the ridge).
* ``anchored``, ``netrefit``, ``corrrefit``: re-fits with fewer free parameters (toward the original columns; from
  network neighbours only; from as many correlated neighbours), the answers to what looked like over-fitting of
  ``refit`` until the calibration kept the attention-sink position (docs/pruning.md); weaker than ``refit`` since.
* ``auto``: the rebuild the selection rule needs (:func:`default_compensation`); recipes resolve it when they load.

All work per layer, one layer in memory at a time, with statistics from the dense model (one shot, as FLAP). All
write only weights that the plan keeps plus the bias, so ``slice`` and ``mask`` give the same model. The math of
the re-fits is in :mod:`fbnprune.prune.refit`.

Export: Llama's config has ``mlp_bias``, so the bias is stock-loadable and the config switch is set here.
Architectures whose stock config cannot hold a down-projection bias (Gemma 3, Qwen, Mistral, Phi-3) still get
the bias in memory (evaluation is correct), and the model is marked: :func:`check_exportable` raises a clear
:class:`UserError` at export time instead of silently dropping the bias.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from fbnprune import distributed as dist
from fbnprune.arch import MLPAdapter, get_adapter
from fbnprune.collect.store import ActivationStore
from fbnprune.discover import NetworkSet
from fbnprune.errors import UserError
from fbnprune.prune.fbn import DEFAULT_RULE
from fbnprune.prune.gram import augmented_gram, shrink_to_diagonal
from fbnprune.prune.networks import network_neighbourhoods
from fbnprune.prune.plan import KeepPlan
from fbnprune.prune.refit import (
    anchored_refit,
    correlation_neighbourhoods,
    network_refit_weights,
    rel_errors,
    ridge_refit,
)
from fbnprune.prune.scorers import NEEDS_NOTHING, SCORERS, Needs
from fbnprune.registry import Registry

log = logging.getLogger(__name__)

#: attribute set on a model whose down-projection bias its stock config cannot express
UNEXPORTABLE_ATTR = "fbnprune_unexportable_bias"


@dataclass(frozen=True)
class CompensateOptions:
    """The settings every compensation is given; each uses those it needs."""

    ridge: float = 1e-3  # relative ridge of refit, netrefit and corrrefit (anchored has its own, see below)
    gram_shrink: float = 0.0  # the Gram's covariance shrunk towards its diagonal (fbnprune.prune.gram)
    networks: NetworkSet | None = None  # for netrefit and corrrefit
    progress: bool = True
    method: str | None = None  # the scorer that made the plan, and its fbn rule: what ``auto`` resolves with
    fbn_rule: str | None = None


CompensateFn = Callable[[Any, KeepPlan, ActivationStore | None, CompensateOptions], dict[str, Any] | None]


@dataclass(frozen=True)
class Compensation:
    """A registered compensation and what it needs."""

    fn: CompensateFn
    needs: Needs


COMPENSATIONS: Registry[Compensation] = Registry("compensation")
_STATS = Needs(calibration=True)
_GRAM = Needs(calibration=True, activations=True)
_NETS = Needs(calibration=True, activations=True, networks=True)


def register_compensation(name: str, *, needs: Needs = NEEDS_NOTHING) -> Callable[[CompensateFn], CompensateFn]:
    """Decorator registering ``fn(model, plan, store, options)`` under ``name`` with what it ``needs``."""

    def deco(fn: CompensateFn) -> CompensateFn:
        COMPENSATIONS.add(name, Compensation(fn, needs))
        return fn

    return deco


def default_compensation(method: str, fbn_rule: str = DEFAULT_RULE) -> str:
    """What a recipe's ``compensate: auto`` means: the rebuild a selection rule needs.

    The fbn ``redundancy`` rule removes the neurons the rest can rebuild, so it needs a rebuild. It gets ``refit``
    (the ridge re-fit of all kept down columns and a bias): once the calibration keeps the attention-sink position
    (``collect.drop_first: 0``), it beat the neighbour rebuilds ``corrrefit`` and ``netrefit`` after every selection
    rule measured, on both models (docs/fbn-study.md; without that position the re-fit looked like it over-fitted
    and ``corrrefit`` was chosen). Its control ``corr_redundancy`` gets the same. Every other method is measured as
    its authors publish it without further options, i.e. with no compensation (ask for ``bias``, ``refit`` ...
    explicitly).
    """
    redundancy = (method == "fbn" and fbn_rule == "redundancy") or method == "corr_redundancy"
    return "refit" if redundancy else "none"


def compensate_(model: Any, plan: KeepPlan, store: ActivationStore | None, kind: str, **options: Any) -> Any:
    """Run the compensation registered as ``kind``; ``options`` are :class:`CompensateOptions` fields.

    Returns its report (per-layer relative output errors for the re-fits) or None.
    """
    return COMPENSATIONS.get(kind).fn(model, plan, store, CompensateOptions(**options))


def _check(model: Any, plan: KeepPlan, store: ActivationStore | None) -> MLPAdapter:
    adapter = get_adapter(model)
    mlps = adapter.mlps(model)
    if store is None:
        raise UserError("compensation needs calibration activations (a collect stage)")
    widths = [adapter.width(m) for m in mlps]
    if widths != plan.widths:
        raise UserError(
            "compensation must run on the full-width model before apply_plan_ "
            f"(model widths {sorted(set(widths))}, plan widths {sorted(set(plan.widths))})"
        )
    if store.widths != plan.widths:
        raise UserError(f"activation store widths {sorted(set(store.widths))} do not match the plan")
    return adapter


def mark_bias(model: Any, adapter: MLPAdapter, kind: str) -> None:
    """Make the bias exportable (Llama ``mlp_bias``) or mark the model so export refuses clearly."""
    if adapter.can_export_bias():
        adapter.enable_config_bias(model.config)
    else:
        msg = (
            f"{kind} compensation added a down-projection bias, which a stock {adapter.name!r} config cannot "
            "express: the in-memory model is correct, but a stock-loadable export would silently drop it"
        )
        log.warning(msg)
        setattr(model, UNEXPORTABLE_ATTR, msg)
    info = getattr(model.config, "fbnprune_compensation", None)
    model.config.fbnprune_compensation = kind if info in (None, kind) else f"{info}+{kind}"


def check_exportable(model: Any) -> None:
    """Raise :class:`UserError` if the model holds a compensation bias its stock config cannot express.

    Call this at the start of any stock-config export (``export_hf``).
    """
    msg = getattr(model, UNEXPORTABLE_ATTR, None)
    if msg:
        raise UserError(
            f"{msg}. Export with compensate: none, or use an architecture with an MLP-bias switch (Llama's "
            "mlp_bias), or evaluate in memory only (export.enabled: false)."
        )


@torch.no_grad()
def bias_compensation_(model: Any, plan: KeepPlan, store: ActivationStore | None) -> None:
    """Add ``W_down[:, pruned] @ E[h_pruned]`` to each layer's down bias (in place, before pruning).

    Every layer gets a bias (zero where nothing is pruned), so a checkpoint with ``mlp_bias`` is complete.
    """
    adapter = _check(model, plan, store)
    assert store is not None
    for i, mlp in enumerate(adapter.mlps(model)):
        pruned = plan.pruned(i)
        w = adapter.down_weight(mlp)
        delta = torch.zeros(w.shape[0], dtype=torch.float64)
        if len(pruned):
            mean = store.stats(i).mean.double()
            delta = w.detach()[:, pruned.to(w.device)].double().cpu() @ mean[pruned]
        adapter.add_down_bias_(mlp, delta)
    mark_bias(model, adapter, "bias")


#: ``solve(layer, gram, down_weight_f64, keep) -> (new kept columns (d, k), bias delta (d,), extra report fields)``
LayerSolve = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]


def _refit_layers_(model: Any, plan: KeepPlan, store: ActivationStore | None, ridge: float, solve: LayerSolve,
                   progress: bool = False, report: dict[str, Any] | None = None, errors: bool = True,
                   gram_shrink: float = 0.0) -> dict[str, Any]:
    """The per-layer loop every re-fit shares: ``solve`` gives a layer's new kept columns and bias, written here in
    place; a layer with nothing pruned gets a zero bias. Returns the report with per-layer relative errors, on the
    measured activations (``solve`` sees the Gram shrunk by ``gram_shrink``)."""
    adapter = _check(model, plan, store)
    assert store is not None
    report = {"ridge": ridge, **({"gram_shrink": gram_shrink} if gram_shrink else {}), "layers": {},
              **(report or {})}
    mlps = adapter.mlps(model)
    by_layer = dist.sharding_layers(len(mlps))  # several processes: each layer solved on one rank, Gram included

    def one(i: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None:
        w = adapter.down_weight(mlps[i])
        keep = plan.keep[i]
        if len(keep) == plan.widths[i]:
            return None
        g = augmented_gram(store, i, reduce=not by_layer)
        w64 = w.detach().double().cpu()  # (d, width)
        cols, delta, extra = solve(i, shrink_to_diagonal(g, gram_shrink), w64, keep)
        info = {**(rel_errors(g, w64, keep, cols, delta) if errors else {}), **extra}
        return cols.to(dtype=w.dtype, device="cpu"), delta, info  # the columns as the model stores them

    for i, res in tqdm(dist.layer_results(len(mlps), one, "refit compensation"), total=len(mlps),
                       desc="refit compensation", unit="layer", disable=not progress):
        mlp = mlps[i]
        w = adapter.down_weight(mlp)
        if res is None:  # nothing pruned in this layer
            adapter.add_down_bias_(mlp, torch.zeros(w.shape[0], dtype=torch.float64))
            continue
        cols, delta, report["layers"][i] = res
        w[:, plan.keep[i].to(w.device)] = cols.to(w.device)
        adapter.add_down_bias_(mlp, delta)
    mark_bias(model, adapter, "refit")
    return report


@torch.no_grad()
def refit_compensation_(
    model: Any, plan: KeepPlan, store: ActivationStore | None, ridge: float = 1e-3, progress: bool = True,
    cross: dict[int, torch.Tensor] | None = None, gram_shrink: float = 0.0,
) -> dict[str, Any]:
    """Re-fit the kept down-projection columns and a bias by ridge least squares (in place, before pruning).

    Per layer with pruned neurons: ``min_{W', b} ||H W^T - (H_K W'^T + 1 b^T)||^2 + lam ||W'||^2`` with
    ``lam = ridge * mean(diag(H_K^T H_K))``; solved from the augmented Gram matrix of the stored activations.
    Returns per-layer relative output errors on the calibration data (before -> after), for reports.
    ``cross[i]`` (:func:`fbnprune.prune.refit.ridge_refit`) re-targets layer ``i`` at other activations' output
    (sequential pruning's dense target); its errors are then measured by the caller, not reported here.
    ``gram_shrink``: the calibration covariance shrunk towards its diagonal first (for little calibration text).
    """
    _check(model, plan, store)
    assert store is not None
    if ridge < 0:
        raise UserError(f"ridge must be >= 0, got {ridge}")
    report: dict[str, Any] = {}
    if store.n_rows < 2 * max(plan.widths) and not gram_shrink:
        log.warning(
            "refit: %d calibration rows for layers of %d neurons; the least-squares fit is under-determined and "
            "may over-fit the calibration text (collect more tokens, e.g. >= 4x the MLP width, or shrink the "
            "covariance: prune.gram_shrink 0.5)", store.n_rows, max(plan.widths),
        )
        report["warning"] = "under-determined: fewer calibration rows than 2x the MLP width"

    def solve(i: int, g: torch.Tensor, w64: torch.Tensor, keep: torch.Tensor) -> tuple[Any, Any, dict[str, Any]]:
        return (*ridge_refit(g, w64, keep, ridge, None if cross is None else cross.get(i)), {})

    return _refit_layers_(model, plan, store, ridge, solve, progress, report, errors=cross is None,
                          gram_shrink=gram_shrink)


@torch.no_grad()
def anchored_refit_compensation_(model: Any, plan: KeepPlan, store: ActivationStore | None, ridge: float = 0.1,
                                 gram_shrink: float = 0.0) -> dict[str, Any]:
    """Re-fit whose ridge shrinks toward the ORIGINAL kept columns, not toward zero (in place, before pruning;
    :func:`fbnprune.prune.refit.anchored_refit`). Returns per-layer relative output errors (calibration)."""
    if ridge <= 0:
        raise UserError(f"anchored refit: ridge must be > 0, got {ridge}")

    def solve(i: int, g: torch.Tensor, w64: torch.Tensor, keep: torch.Tensor) -> tuple[Any, Any, dict[str, Any]]:
        return (*anchored_refit(g, w64, keep, ridge), {})

    return _refit_layers_(model, plan, store, ridge, solve, gram_shrink=gram_shrink)


Neighbourhoods = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer, gram, keep mask) -> (N, N)


def _neighbourhood_refit_(model: Any, plan: KeepPlan, store: ActivationStore | None, ridge: float,
                          neighbours: Neighbourhoods, gram_shrink: float = 0.0) -> dict[str, Any]:
    """The network re-fit and its correlation control, which differ only in the neighbourhoods."""

    def solve(i: int, g: torch.Tensor, w64: torch.Tensor, keep: torch.Tensor) -> tuple[Any, Any, dict[str, Any]]:
        km = plan.keep_mask(i)
        new_w, delta, n_alone = network_refit_weights(g, w64, km, neighbours(i, g, km), ridge)
        return new_w[:, keep], delta, {"alone": n_alone / (plan.widths[i] - len(keep))}

    return _refit_layers_(model, plan, store, ridge, solve, gram_shrink=gram_shrink)


@torch.no_grad()
def network_refit_compensation_(model: Any, plan: KeepPlan, store: ActivationStore | None, nets: NetworkSet,
                                ridge: float = 1e-3, run: int | None = None, gram_shrink: float = 0.0
                                ) -> dict[str, Any]:
    """Re-fit restricted to functional networks (in place, before pruning).

    Each pruned neuron ``p`` is rebuilt, by ridge least squares on the calibration activations, from the kept
    neurons that share a network with it (of ``run``, or of any run), plus a constant: ``h_p ~ H_{N(p)} a_p + c_p``,
    and its down column is folded into theirs (``W'_{N(p)} += W_p a_p^T``, bias ``+= W_p c_p``). A pruned neuron in
    no network gets only the constant (FLAP's mean). It has far fewer free parameters than the global re-fit.
    Returns per-layer relative output errors (calibration) and the fraction of pruned neurons with no neighbour.
    """
    return _neighbourhood_refit_(model, plan, store, ridge, lambda i, g, km: network_neighbourhoods(nets, i, run),
                                 gram_shrink)


@torch.no_grad()
def correlation_refit_compensation_(model: Any, plan: KeepPlan, store: ActivationStore | None, nets: NetworkSet,
                                    ridge: float = 1e-3, gram_shrink: float = 0.0) -> dict[str, Any]:
    """Control for :func:`network_refit_compensation_`: same neighbourhood sizes, neighbours by correlation."""
    return _neighbourhood_refit_(model, plan, store, ridge, lambda i, g, km: correlation_neighbourhoods(
        g, km, network_neighbourhoods(nets, i)), gram_shrink)


def _networks(kind: str, o: CompensateOptions) -> NetworkSet:
    if o.networks is None:
        raise UserError(f"compensation {kind!r} needs discovered networks (a discover stage)")
    return o.networks


# ------------------------------------------------------------------------------------------ the registry
@register_compensation("none")
def _none(model: Any, plan: KeepPlan, store: ActivationStore | None, o: CompensateOptions) -> None:
    return None


@register_compensation("bias", needs=_STATS)
def _bias(model: Any, plan: KeepPlan, store: ActivationStore | None, o: CompensateOptions) -> None:
    return bias_compensation_(model, plan, store)


@register_compensation("refit", needs=_GRAM)
def _refit(model: Any, plan: KeepPlan, store: ActivationStore | None, o: CompensateOptions) -> dict[str, Any]:
    return refit_compensation_(model, plan, store, ridge=o.ridge, progress=o.progress, gram_shrink=o.gram_shrink)


@register_compensation("anchored", needs=_GRAM)
def _anchored(model: Any, plan: KeepPlan, store: ActivationStore | None, o: CompensateOptions) -> dict[str, Any]:
    # its own ridge (0.1 of the mean diagonal): it pulls toward the original columns, so the re-fit's 1e-3
    # (toward zero) would be a different rebuild, close to the plain re-fit
    return anchored_refit_compensation_(model, plan, store, gram_shrink=o.gram_shrink)


@register_compensation("netrefit", needs=_NETS)
def _netrefit(model: Any, plan: KeepPlan, store: ActivationStore | None, o: CompensateOptions) -> dict[str, Any]:
    return network_refit_compensation_(model, plan, store, _networks("netrefit", o), ridge=o.ridge,
                                       gram_shrink=o.gram_shrink)


@register_compensation("corrrefit", needs=_NETS)
def _corrrefit(model: Any, plan: KeepPlan, store: ActivationStore | None, o: CompensateOptions) -> dict[str, Any]:
    return correlation_refit_compensation_(model, plan, store, _networks("corrrefit", o), ridge=o.ridge,
                                           gram_shrink=o.gram_shrink)


@register_compensation("auto")
def _auto(model: Any, plan: KeepPlan, store: ActivationStore | None, o: CompensateOptions) -> Any:
    if o.method is None:
        raise UserError("compensation 'auto' needs the scorer that made the plan (method=...)")
    kind = default_compensation(SCORERS.canonical(o.method), o.fbn_rule or DEFAULT_RULE)
    return COMPENSATIONS.get(kind).fn(model, plan, store, o)
