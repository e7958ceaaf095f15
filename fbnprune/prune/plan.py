"""Keep plans: which neurons of each layer survive, chosen from scores under an exact budget.

The budget is a number of MLP neurons to remove, derived from either a fraction of all MLP neurons
(``sparsity``) or a fraction of the model's total parameters (``param_fraction``, counted from the model, never
from constants). It is met exactly whenever the width constraints allow it; otherwise the plan takes the nearest
achievable count and records the gap (``info["budget_error"]``), so a result table never hides a rounding.

* ``uniform``: every prunable layer keeps the same width (stock-loadable). The achievable removals are multiples
  of ``n_prunable * round_to``.
* ``global``: one ranking across layers (scores normalised per layer, see ``normalize``) gives non-uniform
  widths. The achievable removals are multiples of ``round_to`` (exact for ``round_to=1``).

Within a layer the kept neurons are always the top-``k`` by the raw score, so normalisation only moves widths.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fbnprune.errors import UserError

NORMALIZE = ("mean", "zscore", "none")


@dataclass
class KeepPlan:
    """Kept neuron indices per layer (sorted, unique), plus the widths they came from.

    Example:
        >>> plan = KeepPlan(widths=[4, 4], keep=[torch.tensor([0, 2]), torch.tensor([1, 2, 3])])
        >>> plan.kept_widths, round(plan.sparsity, 3)
        ([2, 3], 0.375)
    """

    widths: list[int]
    keep: list[torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.keep):
            raise UserError(f"plan has {len(self.widths)} widths but {len(self.keep)} keep lists")
        fixed = []
        for i, (w, k) in enumerate(zip(self.widths, self.keep, strict=True)):
            k = torch.as_tensor(k, dtype=torch.long).flatten().sort().values
            if k.numel() and (int(k[0]) < 0 or int(k[-1]) >= w):
                raise UserError(f"plan layer {i}: kept indices out of range [0, {w})")
            if k.numel() != torch.unique(k).numel():
                raise UserError(f"plan layer {i}: duplicate kept indices")
            if k.numel() == 0:
                raise UserError(f"plan layer {i}: keeps no neuron (an MLP of width 0 is not supported)")
            fixed.append(k)
        self.keep = fixed
        self.widths = [int(w) for w in self.widths]

    @property
    def kept_widths(self) -> list[int]:
        return [len(k) for k in self.keep]

    @property
    def uniform(self) -> bool:
        return len(set(self.kept_widths)) == 1

    @property
    def sparsity(self) -> float:
        """Fraction of MLP neurons removed."""
        return 1.0 - sum(self.kept_widths) / sum(self.widths)

    @property
    def n_removed(self) -> int:
        return sum(self.widths) - sum(self.kept_widths)

    def pruned(self, layer: int) -> torch.Tensor:
        """Sorted indices of the neurons of ``layer`` that the plan removes."""
        mask = torch.ones(self.widths[layer], dtype=torch.bool)
        mask[self.keep[layer]] = False
        return mask.nonzero().flatten()

    def keep_mask(self, layer: int) -> torch.Tensor:
        """Boolean ``(width,)``: True for kept neurons of ``layer``."""
        mask = torch.zeros(self.widths[layer], dtype=torch.bool)
        mask[self.keep[layer]] = True
        return mask

    def to_json(self) -> dict[str, Any]:
        return {
            "widths": self.widths,
            "kept_widths": self.kept_widths,
            "sparsity": self.sparsity,
            "keep": [k.tolist() for k in self.keep],
            "info": self.info,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> KeepPlan:
        try:
            plan = KeepPlan(widths=list(d["widths"]), keep=[torch.tensor(k, dtype=torch.long) for k in d["keep"]],
                            info=dict(d.get("info", {})))
        except (KeyError, TypeError) as e:
            raise UserError(f"not a keep plan: missing or malformed field ({e})") from None
        if "kept_widths" in d and list(d["kept_widths"]) != plan.kept_widths:
            raise UserError("keep plan is inconsistent: kept_widths do not match the kept indices")
        return plan

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @staticmethod
    def load(path: str | Path) -> KeepPlan:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"keep plan not found: {p}")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"keep plan {p} is not valid JSON: {e}") from None
        return KeepPlan.from_json(d)


def params_per_neuron(model: Any, adapter: Any) -> int:
    """Parameters removed with one MLP neuron (input rows + down column + input biases), from the model."""
    mlp = adapter.mlps(model)[0]
    d = adapter.down_weight(mlp).shape[0]
    n_in = len(adapter.in_weights(mlp))
    biases = sum(1 for p in adapter.in_projs if getattr(getattr(mlp, p), "bias", None) is not None)
    if adapter.style == "fused_gated" and biases:
        biases = 2
    return n_in * d + d + biases


def count_params(model: Any) -> int:
    """Parameters of ``model``, tied weights counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def _allowed_widths(w: int, min_width: int, round_to: int) -> list[int]:
    """Kept widths a layer of width ``w`` may take: multiples of ``round_to`` >= ``min_width``, and ``w`` itself."""
    lo = math.ceil(min_width / round_to) * round_to
    out = list(range(lo, w + 1, round_to)) if lo <= w else []
    if not out or out[-1] != w:
        out.append(w)
    return out


def _normalised(s: torch.Tensor, how: str) -> torch.Tensor:
    s = s.double()
    if how == "mean":
        return s / s.abs().mean().clamp_min(1e-30)
    if how == "zscore":  # FLAP's standardisation before its global (AL-AM) ranking
        return (s - s.mean()) / s.std().clamp_min(1e-30)
    return s


def make_plan(
    scores: list[torch.Tensor],
    *,
    sparsity: float | None = None,
    param_fraction: float | None = None,
    model: Any = None,
    adapter: Any = None,
    allocation: str = "uniform",
    protected: list[int] | None = None,
    min_width: int = 8,
    round_to: int = 8,
    normalize: str = "mean",
) -> KeepPlan:
    """Choose kept neurons from per-layer ``scores`` under an exact budget.

    Args:
        scores: per-layer importance (higher = keep); ties are broken by the lower index.
        sparsity: fraction of all MLP neurons (protected layers included) to remove.
        param_fraction: alternatively, fraction of total model parameters to remove (needs ``model``/``adapter``).
        allocation: ``uniform`` (same kept width in every prunable layer) or ``global``.
        protected: layer indices never pruned; the budget is taken from the other layers. Use
            :func:`fbnprune.prune.protect.auto_protected_layers` to derive them from calibration data.
        min_width: smallest width any layer may keep.
        round_to: kept widths are multiples of this (except where a layer is kept whole).
        normalize: how ``global`` makes scores comparable across layers: ``mean`` (divide by the layer's mean
            absolute score), ``zscore`` (FLAP) or ``none`` (scores already comparable, e.g. z-maps).
    """
    if not scores:
        raise UserError("no layer scores given")
    widths = [int(s.numel()) for s in scores]
    n_layers = len(widths)
    if isinstance(protected, str):
        raise UserError(
            f"protected={protected!r}: make_plan needs explicit layer indices; "
            "compute them with fbnprune.prune.protect.auto_protected_layers(model, sequences)"
        )
    protected = sorted({int(i) for i in (protected or [])})
    bad = [i for i in protected if not 0 <= i < n_layers]
    if bad:
        raise UserError(f"protected layers {bad} out of range (model has {n_layers} layers)")
    if (sparsity is None) == (param_fraction is None):
        raise UserError("give exactly one of sparsity or param_fraction")
    if round_to < 1 or min_width < 1:
        raise UserError("round_to and min_width must be >= 1")
    if normalize not in NORMALIZE:
        raise UserError(f"unknown normalize {normalize!r}; choose one of {', '.join(NORMALIZE)}")
    for i, s in enumerate(scores):
        if not torch.isfinite(s).all():
            raise UserError(f"layer {i} has non-finite scores; the scorer failed")
    if model is not None and adapter is not None:
        mw = [adapter.width(m) for m in adapter.mlps(model)]
        if mw != widths:
            raise UserError(f"scores have widths {sorted(set(widths))} per layer but the model has {sorted(set(mw))}")
    total = sum(widths)
    ppn = params_per_neuron(model, adapter) if model is not None and adapter is not None else None
    if sparsity is not None:
        if not 0.0 <= sparsity < 1.0:
            raise UserError(f"sparsity must be in [0, 1), got {sparsity}")
        target = sparsity * total
        budget = {"kind": "sparsity", "value": sparsity}
    else:
        assert param_fraction is not None
        if ppn is None:
            raise UserError("param_fraction needs the model (and its adapter) to count parameters")
        if not 0.0 <= param_fraction < 1.0:
            raise UserError(f"param_fraction must be in [0, 1), got {param_fraction}")
        n_params = count_params(model)
        target = param_fraction * n_params / ppn
        budget = {"kind": "param_fraction", "value": param_fraction, "model_params": n_params,
                  "params_per_neuron": ppn}
    prunable = [i for i in range(n_layers) if i not in protected]
    if not prunable:
        raise UserError("every layer is protected; nothing to prune")
    allowed = {i: _allowed_widths(widths[i], min_width, round_to) for i in prunable}
    cap = sum(widths[i] - allowed[i][0] for i in prunable)
    if round(target) > cap:
        raise UserError(
            f"budget removes {round(target)} neurons but the prunable layers can give at most {cap} "
            f"(min_width={min_width}, round_to={round_to}, protected={protected})"
        )

    if allocation == "uniform":
        if len({widths[i] for i in prunable}) != 1:
            raise UserError("uniform allocation needs equal widths in all prunable layers")
        w = widths[prunable[0]]
        opts = allowed[prunable[0]]
        # nearest achievable removal; on a tie keep more (never remove more than asked for a tie)
        k = min(opts, key=lambda kk: (abs(len(prunable) * (w - kk) - target), -kk))
        kept = {i: k for i in prunable}
    elif allocation == "global":
        kept = _global_widths(scores, prunable, target, allowed, normalize)
    else:
        raise UserError(f"unknown allocation {allocation!r}; choose 'uniform' or 'global'")

    keep = []
    for i, s in enumerate(scores):
        k = kept.get(i, widths[i])
        keep.append(top_k(s, k))
    plan = KeepPlan(widths=widths, keep=keep)
    removed = total - sum(plan.kept_widths)
    plan.info.update(
        allocation=allocation,
        protected=protected,
        budget=budget,
        requested_remove=round(target, 3),
        removed=removed,
        budget_error=round(removed - target, 3),
        min_width=min_width,
        round_to=round_to,
        normalize=normalize if allocation == "global" else None,
    )
    if ppn is not None:
        plan.info["params_removed"] = removed * ppn
    return plan


def top_k(s: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, sorted; ties go to the lower index (deterministic)."""
    if k >= s.numel():
        return torch.arange(s.numel())
    order = torch.sort(s.double(), descending=True, stable=True).indices
    return order[:k].sort().values.to(torch.long)


def _global_widths(
    scores: list[torch.Tensor],
    prunable: list[int],
    target_remove: float,
    allowed: dict[int, list[int]],
    normalize: str,
) -> dict[int, int]:
    """Per-layer kept widths from one ranking across layers, snapped to allowed widths, total kept exact.

    The unconstrained answer keeps the global top-n of the normalised scores. Each layer is snapped to its
    nearest allowed width, then whole steps are moved between layers, always taking the step whose neurons
    have the lowest mean normalised score (or giving back the best), until the total is as close to the budget
    as the steps allow.
    """
    srt = {i: torch.sort(_normalised(scores[i], normalize), descending=True).values for i in prunable}
    allv = torch.cat([srt[i] for i in prunable])
    owner = torch.cat([torch.full((srt[i].numel(),), i) for i in prunable])
    n_keep_target = allv.numel() - target_remove
    n_top = min(max(int(round(n_keep_target)), 0), allv.numel())
    top = torch.topk(allv, n_top).indices
    raw = {i: int((owner[top] == i).sum()) for i in prunable}
    pos = {i: min(range(len(allowed[i])), key=lambda j, i=i: abs(allowed[i][j] - raw[i])) for i in prunable}

    def width(i: int) -> int:
        return allowed[i][pos[i]]

    def drop_cost(i: int) -> float:  # mean normalised score of the neurons lost by one step down
        a, b = allowed[i][pos[i] - 1], width(i)
        return float(srt[i][a:b].mean())

    def add_gain(i: int) -> float:
        a, b = width(i), allowed[i][pos[i] + 1]
        return float(srt[i][a:b].mean())

    for _ in range(sum(len(a) for a in allowed.values()) + 1):
        diff = sum(width(i) for i in prunable) - n_keep_target
        downs = [i for i in prunable if pos[i] > 0]
        ups = [i for i in prunable if pos[i] < len(allowed[i]) - 1]
        if diff > 0 and downs:
            i = min(downs, key=drop_cost)
            step = width(i) - allowed[i][pos[i] - 1]
            if abs(diff - step) >= abs(diff):
                break
            pos[i] -= 1
        elif diff < 0 and ups:
            i = max(ups, key=add_gain)
            step = allowed[i][pos[i] + 1] - width(i)
            if abs(diff + step) > abs(diff):
                break
            pos[i] += 1
        else:
            break
    return {i: width(i) for i in prunable}
