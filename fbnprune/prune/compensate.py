"""Training-free compensation of pruned neurons, applied to the full-width model BEFORE :func:`apply_plan_`.

* :func:`bias_compensation_` (FLAP's baseline bias): a pruned neuron ``j`` stops contributing
  ``W_down[:, j] * h_j``; its average contribution ``W_down[:, j] * E[h_j]`` is added to the down projection's
  bias, with ``E`` the per-token mean over the calibration rows (BOS/first positions dropped by the store).
* :func:`refit_compensation_`: a ridge least-squares re-fit of the kept down-projection columns plus a bias, so
  that ``H_keep W'^T + b`` reproduces the full layer output ``H W^T`` on the calibration activations. It needs the
  activations (their Gram matrix), not just statistics. Bias compensation is the special case that only fits
  the bias, so the re-fit never does worse on the calibration data (up to the ridge).

Both work per layer, one layer in memory at a time, with statistics from the dense model (one shot, as FLAP).
Both write only weights that the plan keeps plus the bias, so ``slice`` and ``mask`` give the same model.

Export: Llama's config has ``mlp_bias``, so the bias is stock-loadable and the config switch is set here.
Architectures whose stock config cannot hold a down-projection bias (Gemma 3, Qwen, Mistral, Phi-3) still get
the bias in memory (evaluation is correct), and the model is marked: :func:`check_exportable` raises a clear
:class:`UserError` at export time instead of silently dropping the bias.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm.auto import tqdm

from fbnprune.arch import get_adapter
from fbnprune.collect.store import ActivationStore
from fbnprune.errors import UserError
from fbnprune.prune.gram import augmented_gram, ridge_solve
from fbnprune.prune.plan import KeepPlan

log = logging.getLogger(__name__)

COMPENSATIONS = ("none", "bias", "refit", "anchored", "netrefit", "corrrefit")


def default_compensation(method: str, fbn_rule: str = "redundancy") -> str:
    """What a recipe's ``compensate: auto`` means: the rebuild a selection rule needs.

    The fbn ``redundancy`` rule removes the neurons the rest can rebuild, so it needs a rebuild. It gets ``refit``
    (the ridge re-fit of all kept down columns and a bias): once the calibration keeps the attention-sink position
    (``collect.drop_first: 0``), it beat the neighbour rebuilds ``corrrefit`` and ``netrefit`` after every selection
    rule measured, on both models (docs/fbn-study.md, session 6; before that, the re-fit looked like it over-fitted
    and ``corrrefit`` was the default). Its control ``corr_redundancy`` gets the same. Every other method is
    measured as its authors publish it without further options, i.e. with no compensation (ask for ``bias``,
    ``refit`` ... explicitly).
    """
    redundancy = (method == "fbn" and fbn_rule == "redundancy") or method == "corr_redundancy"
    return "refit" if redundancy else "none"
#: attribute set on a model whose down-projection bias its stock config cannot express
UNEXPORTABLE_ATTR = "fbnprune_unexportable_bias"


def _check(model: Any, plan: KeepPlan, store: ActivationStore | None) -> Any:
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


def _mark_bias(model: Any, adapter: Any, kind: str) -> None:
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
    _mark_bias(model, adapter, "bias")


@torch.no_grad()
def refit_compensation_(
    model: Any, plan: KeepPlan, store: ActivationStore | None, ridge: float = 1e-3, progress: bool = True
) -> dict[str, Any]:
    """Re-fit the kept down-projection columns and a bias by ridge least squares (in place, before pruning).

    Per layer with pruned neurons: ``min_{W', b} ||H W^T - (H_K W'^T + 1 b^T)||^2 + lam ||W'||^2`` with
    ``lam = ridge * mean(diag(H_K^T H_K))``; solved from the augmented Gram matrix of the stored activations.
    Returns per-layer relative output errors on the calibration data (before -> after), for reports.
    """
    adapter = _check(model, plan, store)
    assert store is not None
    if ridge < 0:
        raise UserError(f"ridge must be >= 0, got {ridge}")
    report: dict[str, Any] = {"ridge": ridge, "layers": {}}
    mlps = adapter.mlps(model)
    if store.n_rows < 2 * max(plan.widths):
        log.warning(
            "refit: %d calibration rows for layers of %d neurons; the least-squares fit is under-determined and "
            "may over-fit the calibration text (collect more tokens, e.g. >= 4x the MLP width, or raise ridge)",
            store.n_rows, max(plan.widths),
        )
        report["warning"] = "under-determined: fewer calibration rows than 2x the MLP width"
    for i in tqdm(range(len(mlps)), desc="refit compensation", unit="layer", disable=not progress):
        mlp = mlps[i]
        w = adapter.down_weight(mlp)
        pruned = plan.pruned(i)
        if not len(pruned):
            adapter.add_down_bias_(mlp, torch.zeros(w.shape[0], dtype=torch.float64))
            continue
        g = augmented_gram(store, i)
        width = plan.widths[i]
        keep = plan.keep[i]
        idx = torch.cat([keep, torch.tensor([width])])  # kept neurons + the bias input
        w64 = w.detach().double().cpu()  # (d, width)
        rhs = g[idx, :width] @ w64.T  # [H_K, 1]^T H W^T, (k+1, d)
        x = ridge_solve(g, rhs, idx, ridge)  # (k+1, d)
        new_w, delta = x[:-1].T, x[-1]
        report["layers"][i] = _rel_errors(g, w64, keep, new_w, delta)
        w[:, keep.to(w.device)] = new_w.to(dtype=w.dtype, device=w.device)
        adapter.add_down_bias_(mlp, delta)
    _mark_bias(model, adapter, "refit")
    return report


def _rel_errors(g: torch.Tensor, w: torch.Tensor, keep: torch.Tensor, new_w: torch.Tensor, b: torch.Tensor) -> dict:
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


def compensate_(model: Any, plan: KeepPlan, store: ActivationStore | None, kind: str, *, networks: Any = None,
                **kw: Any) -> Any:
    """Dispatch on a recipe's ``compensate`` value.

    ``none``, ``bias`` and ``refit`` live here; ``anchored``, ``netrefit`` and ``corrrefit`` come from the fbn study
    (:mod:`fbnprune.prune.fbn_variants`); the last two need the discovered ``networks``.
    """
    if kind == "none":
        return None
    if kind == "bias":
        return bias_compensation_(model, plan, store)
    if kind == "refit":
        return refit_compensation_(model, plan, store, **kw)
    if kind in ("anchored", "netrefit", "corrrefit"):
        from fbnprune.prune import fbn_variants as fv  # imports this module: import lazily

        if kind == "anchored":
            return fv.anchored_refit_compensation_(model, plan, store)
        if networks is None:
            raise UserError(f"compensation {kind!r} needs discovered networks (a discover stage)")
        fn = fv.network_refit_compensation_ if kind == "netrefit" else fv.correlation_refit_compensation_
        return fn(model, plan, store, networks, **kw)
    raise UserError(f"unknown compensation {kind!r}; choose one of {', '.join(COMPENSATIONS)}")
