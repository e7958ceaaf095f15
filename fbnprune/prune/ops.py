"""Apply a :class:`KeepPlan`: ``slice`` (physically smaller tensors, config rewritten) or ``mask`` (zeros).

Both are in place and keep every tensor's dtype and device. Everything is validated before the first tensor
changes, so a bad plan never leaves a half-pruned model.
"""

from __future__ import annotations

import logging
from typing import Any

from fbnprune.arch import get_adapter
from fbnprune.errors import UserError
from fbnprune.prune.plan import KeepPlan

log = logging.getLogger(__name__)

MODES = ("slice", "mask")


def apply_plan_(model: Any, plan: KeepPlan, mode: str = "slice") -> None:
    """Prune ``model`` in place.

    ``slice`` with a uniform plan rewrites ``config.<width_key>``; with a non-uniform plan the config keeps the
    original width and ``config.fbnprune_layer_widths`` lists the real ones (export turns that into per-layer
    overrides). ``mask`` leaves every shape as it is (for experiments: no compression).
    """
    if mode not in MODES:
        raise UserError(f"unknown prune mode {mode!r}; choose 'slice' or 'mask'")
    adapter = get_adapter(model)
    mlps = adapter.mlps(model)
    if len(mlps) != len(plan.keep):
        raise UserError(f"plan has {len(plan.keep)} layers, model has {len(mlps)}")
    for i, (mlp, w) in enumerate(zip(mlps, plan.widths, strict=True)):
        if adapter.width(mlp) != w:
            raise UserError(
                f"plan was made for width {w} in layer {i}, but the layer has width {adapter.width(mlp)} "
                "(already pruned, or a plan for another model)"
            )
    for mlp, w, keep in zip(mlps, plan.widths, plan.keep, strict=True):
        if len(keep) == w:
            continue
        if mode == "slice":
            adapter.slice_(mlp, keep)
        else:
            adapter.mask_(mlp, keep)
    if mode == "slice":
        old = adapter.config_width(model.config)
        if plan.uniform:
            adapter.set_config_width(model.config, plan.kept_widths[0])
            log.info("config %s: %d -> %d", adapter.width_key, old, plan.kept_widths[0])
        else:
            model.config.fbnprune_layer_widths = plan.kept_widths
