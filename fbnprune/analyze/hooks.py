"""Zero, keep or scale MLP neurons at run time, without touching a single weight.

The analysis experiments (masking, keep-only, amplification) need many variants of one model. Editing weights
would need a copy per variant and risks leaving a model half-edited; a forward pre-hook on each down projection
multiplies its input (the neuron activations) by a per-neuron gain instead, and is always removed on exit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from fbnprune.arch import MLPAdapter
from fbnprune.errors import UserError


@contextmanager
def neuron_gains(model: Any, adapter: MLPAdapter, gains: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Within the block, layer ``l``'s neuron activations are multiplied by ``gains[l]`` (shape ``(N_l,)``).

    A gain of 0 masks a neuron, 1 leaves it, >1 amplifies it. Layers not in ``gains`` are untouched. The hooks are
    removed when the block exits, also on an exception.

    Example:
        >>> with neuron_gains(model, adapter, {3: mask.float()}):  # doctest: +SKIP
        ...     logits = model(ids).logits
    """
    mlps = adapter.mlps(model)
    handles: list[Any] = []
    try:
        for layer, g in gains.items():
            if not 0 <= layer < len(mlps):
                raise UserError(f"layer {layer} does not exist (the model has {len(mlps)} MLP layers)")
            width = adapter.width(mlps[layer])
            if g.ndim != 1 or g.numel() != width:
                raise UserError(f"gain vector for layer {layer} has shape {tuple(g.shape)}; expected ({width},)")
            handles.append(adapter.down_module(mlps[layer]).register_forward_pre_hook(_scaler(g.detach().clone())))
        yield
    finally:
        for h in handles:
            h.remove()


def _scaler(g: torch.Tensor):  # noqa: ANN202 - a hook closure
    cache: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def hook(_mod: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        key = (x.dtype, x.device)
        if key not in cache:
            cache[key] = g.to(dtype=x.dtype, device=x.device)
        return (x * cache[key], *args[1:])

    return hook


def gains_from_masks(masks: Mapping[int, torch.Tensor], value: float = 0.0) -> dict[int, torch.Tensor]:
    """Gain vectors that set the neurons where ``masks[l]`` is true to ``value`` (0 = zero them) and leave the rest."""
    return {layer: torch.where(m.bool(), torch.tensor(float(value)), torch.tensor(1.0)) for layer, m in masks.items()}
