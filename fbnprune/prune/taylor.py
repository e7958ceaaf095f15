"""``taylor`` scorer: first-order Taylor importance of each neuron's parameter group (as LLM-Pruner scores
MLP channels).

For a parameter ``w`` with calibration-loss gradient ``g``, removing it changes the loss by about ``-w * g``.
A neuron's group is its input rows (gate and up, or ``c_fc``), their biases, and its down-projection column.

* ``param_first`` (default, LLM-Pruner's element-wise first order): ``sum_group |w * g|``.
* ``vector``: ``|sum_group w * g|`` (the group removed as one vector).

Gradients are summed over calibration batches (mean token loss per batch); in a multi-process run each rank
takes its share of the batches and the gradients are all-reduced. Only MLP weights get gradients, so
embeddings and attention are not doubled in memory.

Settings (:class:`~fbnprune.prune.scorers.ScoreContext` fields): ``taylor_variant``, ``taylor_max_sequences``
(default 16), ``taylor_batch_size`` (default 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fbnprune import distributed as dist
from fbnprune.arch.base import MLPAdapter
from fbnprune.errors import UserError
from fbnprune.prune.scorers import Needs, ScoreContext, register_scorer

VARIANTS = ("param_first", "vector")


def group_params(adapter: MLPAdapter, mlp: nn.Module) -> list[nn.Parameter]:
    """Every parameter that holds part of some neuron of ``mlp`` (input weights/biases, down weight)."""
    out = []
    for p in adapter.in_projs:
        mod = getattr(mlp, p)
        out.append(mod.weight)
        if getattr(mod, "bias", None) is not None:
            out.append(mod.bias)
    out.append(adapter.down_module(mlp).weight)
    return out


def per_neuron_sum(adapter: MLPAdapter, mlp: nn.Module, elem: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sum ``elem(param)`` (an element-wise tensor of the parameter's shape) over each neuron's group."""
    width = adapter.width(mlp)
    total = torch.zeros(width, dtype=torch.float64)
    n_rows = 2 if adapter.style == "fused_gated" else 1
    for p in adapter.in_projs:
        mod = getattr(mlp, p)
        e = elem(mod.weight).double().cpu()
        if adapter.style == "conv1d":  # Conv1D stores (in, out)
            e = e.t()
        total += e.sum(1).view(n_rows, width).sum(0)
        if getattr(mod, "bias", None) is not None:
            total += elem(mod.bias).double().cpu().view(n_rows, width).sum(0)
    e = elem(adapter.down_module(mlp).weight).double().cpu()
    if adapter.style == "conv1d":
        e = e.t()
    total += e.sum(0)
    return total


@register_scorer("taylor", needs=Needs(calibration=True))
def taylor_scores(ctx: ScoreContext) -> list[torch.Tensor]:
    """LLM-Pruner-style first-order Taylor importance from gradients on the calibration sequences."""
    variant = ctx.taylor_variant
    if variant not in VARIANTS:
        raise UserError(f"unknown taylor_variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if not ctx.sequences:
        raise UserError("scorer 'taylor' needs calibration sequences (a collect stage) to compute gradients")
    n_max = int(ctx.taylor_max_sequences)
    bs = int(ctx.taylor_batch_size)
    seqs = list(ctx.sequences[:n_max])
    model: Any = ctx.model
    mlps = ctx.adapter.mlps(model)
    params = [p for m in mlps for p in group_params(ctx.adapter, m)]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    old_grads = {id(p): p.grad for p in model.parameters()}
    device = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in params:
            p.requires_grad_(True)
        starts = list(range(0, len(seqs), bs))
        with torch.enable_grad():
            for i in tqdm(dist.shard(len(starts)), desc="taylor gradients", unit="batch",
                          disable=not dist.progress_enabled(ctx.progress)):
                chunk = seqs[starts[i] : starts[i] + bs]
                n = min(len(s) for s in chunk)
                x = torch.stack([s[:n] for s in chunk]).to(device)
                out = model(input_ids=x, labels=x, use_cache=False)
                out.loss.backward()
        if dist.active():  # gradients are sums over batches: each rank's batches, then the sum over ranks
            for p in params:
                if p.grad is None:  # a rank that got no batch
                    p.grad = torch.zeros_like(p)
                dist.all_reduce_(p.grad, what="taylor gradients")
        scores = []
        for m in mlps:
            if variant == "param_first":
                s = per_neuron_sum(ctx.adapter, m, lambda p: (p.detach().double() * p.grad.double()).abs())
            else:
                s = per_neuron_sum(ctx.adapter, m, lambda p: p.detach().double() * p.grad.double()).abs()
            scores.append(s)
    finally:
        for p in model.parameters():
            p.grad = old_grads[id(p)]
            p.requires_grad_(flags[id(p)])
    return scores
