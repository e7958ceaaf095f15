"""The teacher's side of distillation: the dense model's outputs for a batch of training windows.

Either the dense model runs on every batch (its logits, and its MLP outputs / activations when an intermediate
loss needs them), or, with ``teacher_topk``, its top-k log-probabilities are computed once per training window
and served from memory afterwards, so from the second pass over the text on the teacher costs nothing. Cached
windows are computed in fixed chunks of the text's own order, whatever batch asked first, so the cache holds the
same numbers in an uninterrupted run and in one resumed from a checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fbnprune.arch import MLPAdapter
from fbnprune.models.load import autocast
from fbnprune.recover.losses import taps, teacher_topk


class Teacher:
    """Targets for the student, per batch of window indices (see module docstring).

    Example:
        >>> t = Teacher(dense, adapter, ids, chunk=8, topk=64)  # doctest: +SKIP
        >>> t(torch.tensor([3, 17]))["top_idx"].shape  # doctest: +SKIP
        torch.Size([2, 256, 64])
    """

    def __init__(self, model: nn.Module, adapter: MLPAdapter, ids: torch.Tensor, *, chunk: int,
                 topk: int | None = None, temperature: float = 1.0, mlp_out: bool = False, h: bool = False,
                 precision: str = "float32") -> None:
        self.model = model.eval()
        self.adapter = adapter
        self.ids = ids
        self.chunk = chunk
        self.topk = topk
        self.temperature = temperature
        self.mlp_out, self.h = mlp_out, h
        self.device = next(model.parameters()).device
        self.precision = precision
        self.forward_tokens = 0  # tokens the teacher has run on (the cost the cache saves)
        self.served_tokens = 0
        if topk is not None:
            n, length = ids.shape
            self._idx = torch.zeros(n, length, topk, dtype=torch.int32)
            self._logp = torch.zeros(n, length, topk, dtype=torch.float32)
            self._done = torch.zeros(-(-n // chunk), dtype=torch.bool)

    @torch.no_grad()
    def _run(self, x: torch.Tensor) -> dict[str, Any]:
        with taps(self.model, self.adapter, mlp_out=self.mlp_out, h=self.h) as got, autocast(self.device,
                                                                                           self.precision):
            logits = self.model(input_ids=x.to(self.device), use_cache=False).logits.float()
        self.forward_tokens += x.numel()
        return {"logits": logits, "mlp_out": list(got["mlp_out"]), "h": list(got["h"])}

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor) -> dict[str, Any]:
        """Targets for windows ``rows`` (indices into the training text)."""
        self.served_tokens += rows.numel() * self.ids.shape[1]
        if self.topk is None:
            return self._run(self.ids[rows])
        for c in sorted({int(r) // self.chunk for r in rows}):
            if not self._done[c]:
                sl = slice(c * self.chunk, (c + 1) * self.chunk)
                idx, logp = teacher_topk(self._run(self.ids[sl])["logits"], self.topk, self.temperature)
                self._idx[sl], self._logp[sl] = idx.cpu(), logp.cpu()
                self._done[c] = True
        return {"top_idx": self._idx[rows].to(self.device), "top_logp": self._logp[rows].to(self.device)}

    def info(self) -> dict[str, Any]:
        return {"topk": self.topk, "forward_tokens": self.forward_tokens, "served_tokens": self.served_tokens}
