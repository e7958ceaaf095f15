"""Protected layers derived from data: the layers whose MLP the model can least afford to lose.

The reference code hard-codes "first 3 and last 2 layers" (method.md 8.1.6). Here each layer's MLP is removed
in turn (its output zeroed by a forward hook, nothing else changes) and the increase of the language-model loss
on a few calibration sequences is measured. Layers whose increase stands far above the typical layer
(``factor`` x the median) are protected, the worst first, at most ``max_layers`` of them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fbnprune import distributed as dist
from fbnprune.arch import get_adapter
from fbnprune.errors import UserError


@torch.no_grad()
def _loss(model: Any, seqs: list[torch.Tensor], batch_size: int) -> float:
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for b in range(0, len(seqs), batch_size):
        chunk = seqs[b : b + batch_size]
        n = min(len(s) for s in chunk)
        x = torch.stack([s[:n] for s in chunk]).to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
    return nll / max(count, 1)


@torch.no_grad()
def layer_sensitivity(
    model: Any, sequences: list[torch.Tensor], *, max_sequences: int = 8, batch_size: int = 4, progress: bool = True
) -> dict[str, Any]:
    """Calibration loss with each layer's MLP removed, minus the dense loss (nats/token), one value per layer."""
    if not sequences:
        raise UserError("layer sensitivity needs calibration sequences")
    adapter = get_adapter(model)
    seqs = list(sequences[:max_sequences])
    base = _loss(model, seqs, batch_size)
    mlps = adapter.mlps(model)
    mine: dict[int, float] = {}
    # layers are independent: layer i on rank i % world, the same computation as in one process
    for i in tqdm(dist.shard(len(mlps)), desc="layer sensitivity", unit="layer",
                  disable=not dist.progress_enabled(progress)):
        handle = mlps[i].register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
        try:
            mine[i] = _loss(model, seqs, batch_size) - base
        finally:
            handle.remove()
    found: dict[int, float] = {}
    for part in dist.all_gather_object(mine, what="layer sensitivity"):
        found.update(part)
    deltas = [found[i] for i in range(len(mlps))]
    return {"dense_loss": base, "delta": deltas, "tokens": sum(len(s) for s in seqs)}


def auto_protected_layers(
    model: Any,
    sequences: list[torch.Tensor],
    *,
    factor: float = 3.0,
    max_layers: int | None = None,
    max_sequences: int = 8,
    progress: bool = True,
) -> tuple[list[int], dict[str, Any]]:
    """Layers to protect (sorted) and the evidence (per-layer loss increase, threshold).

    Args:
        factor: protect a layer when removing its MLP raises the loss by more than ``factor`` x the median layer.
        max_layers: at most this many layers (default: 15 % of the layers, at least 1).
    """
    sens = layer_sensitivity(model, sequences, max_sequences=max_sequences, progress=progress)
    d = torch.tensor(sens["delta"], dtype=torch.float64)
    n = len(d)
    cap = max_layers if max_layers is not None else max(1, round(0.15 * n))
    thr = factor * float(d.median().clamp_min(1e-12))
    order = torch.argsort(d, descending=True).tolist()
    chosen = sorted(i for i in order[:cap] if d[i] > thr)
    return chosen, dict(sens, threshold=thr, factor=factor, max_layers=cap, protected=chosen)
