"""Keep plans: which neurons of each layer survive, chosen from scores under an exact budget.

The budget is a number of MLP neurons to remove, derived from either a fraction of all MLP neurons
(``sparsity``) or a fraction of the model's total parameters (counted from the model, never from constants).
``uniform`` allocation gives every prunable layer the same width (stock-loadable); ``global`` ranks neurons across
layers (scores normalised per layer by their mean) and gives non-uniform widths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fbnprune.errors import UserError


@dataclass
class KeepPlan:
    """Kept neuron indices per layer (sorted), plus the widths they came from.

    Example:
        >>> plan = KeepPlan(widths=[4, 4], keep=[torch.tensor([0, 2]), torch.tensor([1, 2, 3])])
        >>> plan.kept_widths, round(plan.sparsity, 3)
        ([2, 3], 0.375)
    """

    widths: list[int]
    keep: list[torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)

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
        return KeepPlan(widths=list(d["widths"]), keep=[torch.tensor(k, dtype=torch.long) for k in d["keep"]],
                        info=dict(d.get("info", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()))

    @staticmethod
    def load(path: str | Path) -> KeepPlan:
        return KeepPlan.from_json(json.loads(Path(path).read_text()))


def _round_to(x: float, multiple: int) -> int:
    return int(round(x / multiple)) * multiple


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
) -> KeepPlan:
    """Choose kept neurons from per-layer ``scores`` under an exact budget.

    Args:
        scores: per-layer importance (higher = keep).
        sparsity: fraction of all MLP neurons to remove.
        param_fraction: alternatively, fraction of total model parameters to remove (needs ``model``/``adapter``).
        allocation: ``uniform`` (same kept width in every prunable layer) or ``global``.
        protected: layer indices never pruned; the budget is taken from the other layers.
        min_width: smallest width any layer may keep.
        round_to: kept widths are multiples of this (except where a layer is kept whole).
    """
    widths = [int(s.numel()) for s in scores]
    n_layers = len(widths)
    protected = sorted(set(protected or []))
    bad = [i for i in protected if not 0 <= i < n_layers]
    if bad:
        raise UserError(f"protected layers {bad} out of range (model has {n_layers} layers)")
    if (sparsity is None) == (param_fraction is None):
        raise UserError("give exactly one of sparsity or param_fraction")
    if round_to < 1 or min_width < 1:
        raise UserError("round_to and min_width must be >= 1")
    total = sum(widths)
    if sparsity is not None:
        if not 0.0 <= sparsity < 1.0:
            raise UserError(f"sparsity must be in [0, 1), got {sparsity}")
        n_remove = round(sparsity * total)
    else:
        assert param_fraction is not None
        if model is None or adapter is None:
            raise UserError("param_fraction needs the model to count parameters")
        if not 0.0 <= param_fraction < 1.0:
            raise UserError(f"param_fraction must be in [0, 1), got {param_fraction}")
        n_remove = round(param_fraction * count_params(model) / params_per_neuron(model, adapter))
    prunable = [i for i in range(n_layers) if i not in protected]
    if not prunable:
        raise UserError("every layer is protected; nothing to prune")
    cap = sum(widths[i] - min_width for i in prunable)
    if n_remove > cap:
        raise UserError(
            f"budget removes {n_remove} neurons but the prunable layers can give at most {cap} "
            f"(min_width={min_width}, protected={protected})"
        )

    if allocation == "uniform":
        if len({widths[i] for i in prunable}) != 1:
            raise UserError("uniform allocation needs equal widths in all prunable layers")
        w = widths[prunable[0]]
        per_layer = max(min(w - _round_to(n_remove / len(prunable), round_to), w), min_width)
        kept = {i: per_layer for i in prunable}
    elif allocation == "global":
        kept = _global_widths(scores, prunable, n_remove, min_width, round_to)
    else:
        raise UserError(f"unknown allocation {allocation!r}; choose 'uniform' or 'global'")

    keep = []
    for i, s in enumerate(scores):
        k = widths[i] if i not in kept else kept[i]
        top = torch.topk(s.double(), k, sorted=False).indices if k < widths[i] else torch.arange(widths[i])
        keep.append(top.sort().values.to(torch.long))
    plan = KeepPlan(widths=widths, keep=keep)
    plan.info.update(
        allocation=allocation,
        protected=protected,
        requested_remove=n_remove,
        removed=total - sum(plan.kept_widths),
        min_width=min_width,
        round_to=round_to,
    )
    return plan


def _global_widths(
    scores: list[torch.Tensor], prunable: list[int], n_remove: int, min_width: int, round_to: int
) -> dict[int, int]:
    """Per-layer kept widths from one ranking across layers, rounded to ``round_to`` with the total preserved."""
    normed = {i: scores[i].double() / scores[i].double().abs().mean().clamp_min(1e-30) for i in prunable}
    allv = torch.cat([normed[i] for i in prunable])
    owner = torch.cat([torch.full((normed[i].numel(),), i) for i in prunable])
    n_keep_total = allv.numel() - n_remove
    top = torch.topk(allv, n_keep_total).indices
    raw = {i: int((owner[top] == i).sum()) for i in prunable}
    widths = {i: scores[i].numel() for i in prunable}
    kept = {i: min(widths[i], max(min_width, _round_to(raw[i], round_to))) for i in prunable}
    # Fix the rounding drift one step of `round_to` at a time, taking from / giving to the layers whose
    # rounding moved them furthest, so the total removed is as close as possible to the budget.
    diff = sum(kept.values()) - n_keep_total
    step = round_to
    guard = 0
    while abs(diff) >= step and guard < 100000:
        guard += 1
        if diff > 0:
            cands = [i for i in prunable if kept[i] - step >= min_width]
            if not cands:
                break
            i = max(cands, key=lambda j: kept[j] - raw[j])
            kept[i] -= step
            diff -= step
        else:
            cands = [i for i in prunable if kept[i] + step <= widths[i]]
            if not cands:
                break
            i = min(cands, key=lambda j: kept[j] - raw[j])
            kept[i] += step
            diff += step
    return kept
