"""On-disk activation store: one memory-mapped float32 ``.npy`` per layer plus float64 running statistics.

Layout of a store directory::

    meta.json            widths, row count, model and data provenance
    rows.npy             int32 (n_rows, 3): sequence index, position, document id of every row
    stats.safetensors    per layer: sum, sumsq, absmax (float64, one value per neuron) and the row count
    layer_000.npy ...    float32 (n_rows, width) activations (only when ``keep_activations``)

Readers open layers lazily (``np.load(mmap_mode="r")``), so a later stage touches one layer at a time.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


@dataclass
class LayerStats:
    """Per-neuron statistics of one layer's activations, over all kept rows (float64)."""

    count: int
    sum: torch.Tensor
    sumsq: torch.Tensor
    absmax: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance (ddof = 1)."""
        n = max(self.count, 2)
        return ((self.sumsq - self.sum**2 / max(self.count, 1)) / (n - 1)).clamp_min(0)

    @property
    def l2(self) -> torch.Tensor:
        """Euclidean norm of each neuron's activations over rows (Wanda's ``||X_j||_2``)."""
        return self.sumsq.sqrt()


class StoreWriter:
    """Accumulates rows into a store being built in ``tmp_dir``; :meth:`finish` renames it to ``path``.

    In a multi-process run every rank accumulates the statistics of its own rows and only rank 0 writes
    (``files=True``): :meth:`reduce` sums the statistics over ranks before rank 0 finishes the store.
    """

    def __init__(self, path: Path, widths: list[int], n_rows: int, keep_activations: bool, meta: dict[str, Any],
                 files: bool = True):
        self.path = Path(path)
        self.tmp = self.path.parent / f".{self.path.name}.partial"
        self.files = files
        if files:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir(parents=True)
        self.widths = widths
        self.n_rows = n_rows
        self.meta = dict(meta, widths=widths, n_rows=n_rows, keep_activations=keep_activations)
        self.sum = [torch.zeros(w, dtype=torch.float64) for w in widths]
        self.sumsq = [torch.zeros(w, dtype=torch.float64) for w in widths]
        self.absmax = [torch.zeros(w, dtype=torch.float64) for w in widths]
        self.count = [0] * len(widths)
        self.arrays = (
            [
                np.lib.format.open_memmap(self.tmp / f"layer_{i:03d}.npy", mode="w+", dtype=np.float32, shape=(n_rows, w))
                for i, w in enumerate(widths)
            ]
            if keep_activations and files
            else None
        )
        self.rows = np.zeros((n_rows, 3), dtype=np.int32)

    def add(self, layer: int, offset: int, h: torch.Tensor) -> None:
        """Add rows ``h`` (n, width) of ``layer`` starting at row ``offset``."""
        self.add_stats(layer, h)
        self.write_rows(layer, offset, h)

    def add_stats(self, layer: int, h: torch.Tensor) -> None:
        """Add rows ``h`` (n, width) of ``layer`` to the running statistics only."""
        h64 = h.detach().to(torch.float64)
        self.sum[layer] += h64.sum(0).cpu()
        self.sumsq[layer] += (h64 * h64).sum(0).cpu()
        if h.shape[0]:
            self.absmax[layer] = torch.maximum(self.absmax[layer], h64.abs().amax(0).cpu())
        self.count[layer] += h.shape[0]

    def write_rows(self, layer: int, offset: int, h: torch.Tensor) -> None:
        """Store rows ``h`` of ``layer`` at row ``offset`` (when the store keeps activations)."""
        if self.arrays is not None:
            self.arrays[layer][offset : offset + h.shape[0]] = h.detach().to(torch.float32).cpu().numpy()

    def reduce(self) -> None:
        """Sum counts, sums and sums of squares over ranks and take the maximum of absmax (no-op in one process);
        afterwards every rank holds the statistics of all rows."""
        from fbnprune import distributed as dist

        if not dist.active():
            return
        sums = dist.all_reduce_(torch.cat([*self.sum, *self.sumsq]), what="activation statistics")
        absmax = dist.all_reduce_(torch.cat(self.absmax), op="max", what="activation statistics")
        count = dist.all_reduce_(torch.tensor(self.count, dtype=torch.float64), what="activation statistics")
        n = len(self.widths)
        parts = [t.clone() for t in torch.split(sums, self.widths * 2)]  # own storage each (safetensors)
        self.sum, self.sumsq = parts[:n], parts[n:]
        self.absmax = [t.clone() for t in torch.split(absmax, self.widths)]
        self.count = [int(c) for c in count.tolist()]

    def finish(self) -> ActivationStore:
        if not self.files:
            raise RuntimeError("a writer without files (a rank other than 0) cannot finish the store")
        if any(c != self.n_rows for c in self.count):
            raise RuntimeError(f"store incomplete: rows per layer {self.count}, expected {self.n_rows}")
        tensors: dict[str, torch.Tensor] = {}
        for i in range(len(self.widths)):
            tensors[f"{i}.sum"] = self.sum[i]
            tensors[f"{i}.sumsq"] = self.sumsq[i]
            tensors[f"{i}.absmax"] = self.absmax[i]
        save_file(tensors, str(self.tmp / "stats.safetensors"))
        np.save(self.tmp / "rows.npy", self.rows)
        if self.arrays is not None:
            for a in self.arrays:
                a.flush()
            self.arrays = None
        (self.tmp / "meta.json").write_text(json.dumps(self.meta, indent=2, sort_keys=True))
        if self.path.exists():
            shutil.rmtree(self.path)
        self.tmp.rename(self.path)
        return ActivationStore(self.path)

    def abort(self) -> None:
        self.arrays = None
        if self.files:
            shutil.rmtree(self.tmp, ignore_errors=True)


class ActivationStore:
    """Read access to a finished store.

    Example:
        >>> store = ActivationStore("~/.cache/fbnprune/activations/abc123")  # doctest: +SKIP
        >>> store.stats(0).l2.shape, store.layer(0).shape  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"not an activation store (no meta.json): {self.path}")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        self._stats: dict[str, torch.Tensor] | None = None

    @property
    def n_layers(self) -> int:
        return len(self.meta["widths"])

    @property
    def widths(self) -> list[int]:
        return list(self.meta["widths"])

    @property
    def n_rows(self) -> int:
        return int(self.meta["n_rows"])

    @property
    def has_activations(self) -> bool:
        return bool(self.meta.get("keep_activations"))

    def stats(self, layer: int) -> LayerStats:
        if self._stats is None:
            self._stats = load_file(str(self.path / "stats.safetensors"))
        s = self._stats
        return LayerStats(self.n_rows, s[f"{layer}.sum"], s[f"{layer}.sumsq"], s[f"{layer}.absmax"])

    def layer(self, layer: int) -> np.ndarray:
        """Memory-mapped ``(n_rows, width)`` float32 activations of one layer (read-only)."""
        if not self.has_activations:
            raise RuntimeError(
                f"store {self.path} kept statistics only; re-collect with keep_activations=True"
            )
        return np.load(self.path / f"layer_{layer:03d}.npy", mmap_mode="r")

    def rows(self) -> np.ndarray:
        """int32 ``(n_rows, 3)``: sequence index, position, document id of every row."""
        return np.load(self.path / "rows.npy")
