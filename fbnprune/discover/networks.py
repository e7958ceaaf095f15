"""Discovered networks on disk: per-neuron scores and recurrence, per-run networks, and their recurrence.

A ``networks/<key>/`` directory holds:

* ``networks.safetensors``: per layer ``l``
  * ``score.l`` (N, float32): max |z| over components and runs (the union rule: member of some network iff
    ``score > tau``);
  * ``recurrence.l`` (N, float32): fraction of successful runs in which the neuron is a member of some network;
  * ``membership.l`` (N, uint8): ``score > tau``;
  * ``run_scores.l`` (R, N, float32): the per-run max |z|;
  * ``net_members.l`` (R', n_net, ceil(N/8), uint8): bit-packed network memberships of the first R' runs;
  * ``net_recurrence.l`` (R', n_net, float32): for each of those networks, the fraction of the other runs that
    contain a matching network (Hungarian matching on Jaccard overlap, match when Jaccard >= ``match_threshold``).
* ``summary.json``: parameters, data hash, model, runs ok/failed/retried, timing, per-layer network counts, sizes
  and recurrence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from fbnprune.errors import UserError


def jaccard_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Jaccard overlap of the rows of two boolean matrices ``(n_a, N)`` and ``(n_b, N)``.

    Two empty sets have overlap 0 (an empty network matches nothing).
    """
    af, bf = a.float(), b.float()
    inter = af @ bf.mT
    union = af.sum(1)[:, None] + bf.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


def match_networks(a: torch.Tensor, b: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching of networks ``a`` to networks ``b`` maximising total Jaccard (Hungarian).

    Returns ``(rows, cols, jaccard)`` of the matched pairs.
    """
    from scipy.optimize import linear_sum_assignment

    j = jaccard_matrix(a, b).double().numpy()
    rows, cols = linear_sum_assignment(j, maximize=True)
    return rows, cols, j[rows, cols]


def network_recurrence(members: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """For each network of each run, the fraction of the other runs holding a Hungarian match with Jaccard
    >= ``threshold``. ``members``: one boolean ``(n_net, N)`` per run. Returns ``(R, n_net)`` (NaN if R = 1)."""
    r = len(members)
    n_net = members[0].shape[0]
    hits = torch.zeros(r, n_net, dtype=torch.float64)
    if r < 2:
        return torch.full((r, n_net), float("nan"))
    for i in range(r):
        for j in range(i + 1, r):
            rows, cols, jac = match_networks(members[i], members[j])
            good = jac >= threshold
            hits[i, torch.from_numpy(rows[good])] += 1
            hits[j, torch.from_numpy(cols[good])] += 1
    return (hits / (r - 1)).float()


def pack_bits(x: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor along its last axis (8 neurons per byte)."""
    return torch.from_numpy(np.packbits(x.numpy().astype(bool), axis=-1))


def unpack_bits(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(x.numpy(), axis=-1, count=n).astype(bool))


class NetworkSet:
    """Loaded discovery results (see module docstring for the files).

    Example:
        >>> nets = NetworkSet.load("~/.cache/fbnprune/networks/abc")  # doctest: +SKIP
        >>> nets.scores[3].shape, nets.summary["runs_ok"]  # doctest: +SKIP
    """

    FILE = "networks.safetensors"
    SUMMARY = "summary.json"

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], summary: dict[str, Any]) -> None:
        self.path = Path(path)
        self.summary = summary
        self._t = tensors
        self.n_layers = int(summary["layers"])
        self.widths: list[int] = list(summary["widths"])
        self.threshold = float(summary["params"]["threshold"])

    @classmethod
    def load(cls, path: str | Path) -> NetworkSet:
        p = Path(path).expanduser()
        if not (p / cls.SUMMARY).is_file() or not (p / cls.FILE).is_file():
            raise UserError(f"not a networks directory (needs {cls.FILE} and {cls.SUMMARY}): {p}")
        return cls(p, load_file(str(p / cls.FILE)), json.loads((p / cls.SUMMARY).read_text()))

    def _layers(self, name: str) -> list[torch.Tensor]:
        return [self._t[f"{name}.{i}"] for i in range(self.n_layers)]

    @property
    def scores(self) -> list[torch.Tensor]:
        """Per layer, per neuron: max |z| over components and runs."""
        return self._layers("score")

    @property
    def recurrence(self) -> list[torch.Tensor]:
        """Per layer, per neuron: fraction of successful runs in which the neuron is a member at tau."""
        return self._layers("recurrence")

    @property
    def membership(self) -> list[torch.Tensor]:
        """Per layer, boolean: member of some network in some run (``score > tau``)."""
        return [m.bool() for m in self._layers("membership")]

    @property
    def run_scores(self) -> list[torch.Tensor]:
        """Per layer ``(runs, N)``: each run's max |z|."""
        return self._layers("run_scores")

    def networks(self, layer: int, run: int = 0) -> torch.Tensor:
        """Boolean ``(n_net, N)``: the networks of one layer in one (matched) run."""
        packed = self._t[f"net_members.{layer}"][run]
        return unpack_bits(packed, self.widths[layer])

    def n_runs(self, layer: int) -> int:
        """How many (matched) runs hold networks of ``layer``."""
        return int(self._t[f"net_members.{layer}"].shape[0])

    def network_recurrence(self, layer: int) -> torch.Tensor:
        """``(runs, n_net)``: fraction of other runs in which each network recurs."""
        return self._t[f"net_recurrence.{layer}"]

    def keep_mask(self, threshold: float | None = None) -> list[torch.Tensor]:
        """Union rule at another threshold: ``score > threshold`` per layer."""
        t = self.threshold if threshold is None else threshold
        if t <= 0:
            raise UserError(f"threshold must be > 0, got {t}")
        return [s > t for s in self.scores]

    def __repr__(self) -> str:
        return (f"NetworkSet({self.path}, layers={self.n_layers}, runs_ok={self.summary.get('runs_ok')}, "
                f"tau={self.threshold})")
