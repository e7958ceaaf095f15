"""Which parameters recovery trains: peft LoRA adapters on chosen projections, or those projections' own weights.

Targets are resolved against the model itself before any training: a name that matches no projection of this
architecture is an error listing the ones it has. LoRA adapters are sized by peft from each layer's current
``in_features``/``out_features``, which slicing updates, so the adapters of a pruned MLP have the pruned shapes.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from fbnprune.arch import MLPAdapter
from fbnprune.errors import UserError


def _projections(module: nn.Module) -> dict[str, nn.Module]:
    """Linear (and GPT-2 Conv1D) modules under ``module``, by dotted name relative to it."""
    out = {}
    for name, m in module.named_modules():
        if name and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"):
            out[name] = m
    return out


def resolve_targets(model: nn.Module, adapter: MLPAdapter, names: list[str]) -> list[str]:
    """Full module names (as in ``model.named_modules()``) of the decoder-layer projections that ``names`` select.

    ``names`` holds projection names (``gate_proj``) or groups: ``mlp`` (the MLP's projections), ``attention``
    (every other projection of a layer) and ``all``.
    """
    chosen: list[str] = []
    seen: dict[str, int] = {name: 0 for name in names}
    have: set[str] = set()
    for i, layer in enumerate(adapter.layers(model)):
        prefix = f"{adapter.layers_path}.{i}."
        for rel, _ in _projections(layer).items():
            in_mlp = rel.split(".")[0] == adapter.mlp_attr
            leaf = rel.rsplit(".", 1)[-1]
            have.add(leaf)
            for name in names:
                if (name == "all" or (name == "mlp" and in_mlp) or (name == "attention" and not in_mlp)
                        or name == leaf):
                    seen[name] += 1
                    if prefix + rel not in chosen:
                        chosen.append(prefix + rel)
    missing = [n for n, k in seen.items() if k == 0]
    if missing:
        raise UserError(f"recover.target_modules {missing} match no projection of this {model.config.model_type} "
                        f"model; it has {sorted(have)} (or the groups mlp, attention, all)")
    return chosen


def lora_(model: nn.Module, targets: list[str], *, rank: int, alpha: float, dropout: float, seed: int) -> Any:
    """Wrap ``model`` with peft LoRA adapters on ``targets``; only the adapters train. Returns the peft model.

    ``lora_B`` starts at zero (peft's default), so the wrapped model computes exactly what the pruned model did.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # lora_A's initialisation
    conv1d = any(type(model.get_submodule(t)).__name__ == "Conv1D" for t in targets)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                     fan_in_fan_out=conv1d)
    with warnings.catch_warnings():  # peft probes deprecated transformers attributes on wrapping
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, cfg)


def full_(model: nn.Module, targets: list[str]) -> nn.Module:
    """Train the weights (and biases) of ``targets`` only; every other parameter is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for t in targets:
        for p in model.get_submodule(t).parameters():
            p.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that train, by name (what a checkpoint saves)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
