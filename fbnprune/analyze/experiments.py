"""The first paper's three claims as experiments on one model: recurrence, masking / keep-only, amplification.

Networks are per layer (single-layer ICA, one run per disjoint block of calibration text). "The top-n networks"
means, in every layer, the union of the n networks of one run that recur most often across the other runs (ties:
larger first), so each condition touches every layer, like the paper's multi-layer components. Every network
condition is paired with random-neuron controls that touch exactly as many neurons in every layer.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fbnprune.analyze.hooks import neuron_gains
from fbnprune.arch import MLPAdapter
from fbnprune.discover.networks import NetworkSet, match_networks
from fbnprune.errors import UserError

Masks = dict[int, torch.Tensor]  # layer -> boolean (N,)
HIST_BINS = 40


# ------------------------------------------------------------------------------------------------ networks
def ranked_networks(nets: NetworkSet, layer: int, run: int = 0) -> torch.Tensor:
    """Boolean ``(n, N)``: the non-empty networks of ``run`` in ``layer``, most recurrent first (ties: larger)."""
    members = nets.networks(layer, run)
    sizes = members.sum(1)
    rec = torch.nan_to_num(nets.network_recurrence(layer)[run].float(), nan=0.0)
    order = sorted((i for i in range(members.shape[0]) if sizes[i] > 0),
                   key=lambda i: (-float(rec[i]), -int(sizes[i]), i))
    return members[order] if order else members[:0]


def top_networks(nets: NetworkSet, n: int, run: int = 0) -> Masks:
    """Per layer, the union of its top-``n`` networks (fewer where the layer has fewer)."""
    out: Masks = {}
    for layer in range(nets.n_layers):
        r = ranked_networks(nets, layer, run)[:n]
        out[layer] = r.any(0) if r.shape[0] else torch.zeros(nets.widths[layer], dtype=torch.bool)
    return out


def random_like(masks: Masks, seed: int) -> Masks:
    """Random neurons, as many per layer as ``masks`` holds (the control for every network condition)."""
    g = torch.Generator().manual_seed(seed)
    out: Masks = {}
    for layer, m in masks.items():
        pick = torch.randperm(m.numel(), generator=g)[: int(m.sum())]
        r = torch.zeros(m.numel(), dtype=torch.bool)
        r[pick] = True
        out[layer] = r
    return out


def fraction(masks: Masks) -> float:
    """Fraction of all MLP neurons that ``masks`` selects."""
    return float(sum(int(m.sum()) for m in masks.values()) / max(1, sum(m.numel() for m in masks.values())))


# ------------------------------------------------------------------------------------------------ recurrence
def recurrence_analysis(nets: NetworkSet, shuffles: int = 20, seed: int = 0) -> dict[str, Any]:
    """Matched overlap of networks between runs on disjoint text, against a shuffled-neuron chance level.

    For every layer and pair of runs, non-empty networks are matched one-to-one (Hungarian, max Jaccard). The
    chance level repeats the matching after randomly relabelling the neurons of the second run, which keeps every
    network's size and the overlaps inside a run but breaks any correspondence between runs.
    """
    runs = int(nets.summary.get("matched_runs") or 0)
    if runs < 2:
        raise UserError("recurrence needs at least two discovery runs (blocks of text); use more calibration "
                        "tokens or smaller discover.block_rows / block_texts")
    g = torch.Generator().manual_seed(seed)
    observed: list[float] = []
    chance: list[float] = []
    per_layer: list[dict[str, Any]] = []
    thr = float(nets.summary["params"]["match_threshold"])
    for layer in tqdm(range(nets.n_layers), desc="recurrence", unit="layer"):
        members = [nets.networks(layer, r) for r in range(runs)]
        members = [m[m.sum(1) > 0] for m in members]
        obs_l: list[float] = []
        ch_l: list[float] = []
        for i in range(runs):
            for j in range(i + 1, runs):
                a, b = members[i], members[j]
                if not (a.shape[0] and b.shape[0]):
                    continue
                obs_l.extend(match_networks(a, b)[2].tolist())
                for _ in range(shuffles):
                    perm = torch.randperm(b.shape[1], generator=g)
                    ch_l.extend(match_networks(a, b[:, perm])[2].tolist())
        observed += obs_l
        chance += ch_l
        per_layer.append({
            "layer": layer,
            "observed_median": float(np.median(obs_l)) if obs_l else None,
            "chance_median": float(np.median(ch_l)) if ch_l else None,
            "observed_match_rate": float(np.mean(np.asarray(obs_l) >= thr)) if obs_l else None,
            "chance_match_rate": float(np.mean(np.asarray(ch_l) >= thr)) if ch_l else None,
        })
    obs_a, ch_a = np.asarray(observed), np.asarray(chance)
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    return {
        "runs": runs,
        "match_threshold": thr,
        "shuffles": shuffles,
        "observed": obs_a.round(4).tolist(),
        "hist_edges": edges.round(4).tolist(),  # the chance sample is large: kept as a histogram only
        "chance_hist": np.histogram(ch_a, bins=edges)[0].tolist(),
        "chance_n": int(ch_a.size),
        "observed_median": float(np.median(obs_a)) if obs_a.size else None,
        "chance_median": float(np.median(ch_a)) if ch_a.size else None,
        "chance_p99": float(np.quantile(ch_a, 0.99)) if ch_a.size else None,
        "observed_above_chance_p99": float(np.mean(obs_a > np.quantile(ch_a, 0.99))) if obs_a.size and ch_a.size
        else None,
        "observed_match_rate": float(np.mean(obs_a >= thr)) if obs_a.size else None,
        "chance_match_rate": float(np.mean(ch_a >= thr)) if ch_a.size else None,
        "per_layer": per_layer,
    }


# ------------------------------------------------------------------------------------------------ interventions
Probe = Callable[[], dict[str, Any]]  # measures the model as it is now (hooks included)


def _measure(model: Any, adapter: MLPAdapter, probe: Probe, gains: dict[int, torch.Tensor]) -> dict[str, Any]:
    with neuron_gains(model, adapter, gains):
        return probe()


def _zero(masks: Masks) -> dict[int, torch.Tensor]:
    return {layer: (~m).float() for layer, m in masks.items()}


def _scale(masks: Masks, gain: float) -> dict[int, torch.Tensor]:
    return {layer: torch.where(m, torch.tensor(float(gain)), torch.tensor(1.0)) for layer, m in masks.items()}


def intervention_plan(nets: NetworkSet, *, mask_top: list[int], keep_top: list[int], amplify_top: int,
                      gains: list[float], random_seeds: int, run: int = 0) -> list[dict[str, Any]]:
    """Every condition to measure, as ``{experiment, kind, x, seed, masks, gains}`` (gains = what the hooks apply).

    Random controls use seeds ``1000 * x_index + s`` so each condition's control is reproducible on its own.
    """
    plan: list[dict[str, Any]] = [{"experiment": "baseline", "kind": "none", "x": 0, "seed": None, "gains": {},
                                   "fraction": 0.0}]
    for xi, n in enumerate(mask_top):
        m = top_networks(nets, n, run)
        plan.append({"experiment": "mask", "kind": "network", "x": n, "seed": None, "gains": _zero(m),
                     "fraction": fraction(m)})
        for s in range(random_seeds):
            r = random_like(m, 1000 * xi + s)
            plan.append({"experiment": "mask", "kind": "random", "x": n, "seed": 1000 * xi + s, "gains": _zero(r),
                         "fraction": fraction(r)})
    for xi, k in enumerate(keep_top):
        keep = top_networks(nets, k, run)
        drop = {layer: ~m for layer, m in keep.items()}
        plan.append({"experiment": "keep", "kind": "network", "x": k, "seed": None, "gains": _zero(drop),
                     "fraction": fraction(keep)})
        for s in range(random_seeds):
            seed = 5000 + 1000 * xi + s
            r = random_like(keep, seed)
            plan.append({"experiment": "keep", "kind": "random", "x": k, "seed": seed,
                         "gains": _zero({layer: ~m for layer, m in r.items()}), "fraction": fraction(r)})
    amp = top_networks(nets, amplify_top, run)
    for xi, gain in enumerate(gains):
        plan.append({"experiment": "amplify", "kind": "network", "x": gain, "seed": None, "gains": _scale(amp, gain),
                     "fraction": fraction(amp)})
        for s in range(random_seeds):
            seed = 9000 + 1000 * xi + s
            r = random_like(amp, seed)
            plan.append({"experiment": "amplify", "kind": "random", "x": gain, "seed": seed,
                         "gains": _scale(r, gain), "fraction": fraction(r)})
    return plan


def run_interventions(model: Any, adapter: MLPAdapter, probe: Probe, plan: list[dict[str, Any]],
                      progress: bool = True, cache: Path | None = None, cache_salt: str = "") -> list[dict[str, Any]]:
    """Measure every condition of ``plan`` with ``probe``; returns one row per condition (no tensors).

    With ``cache`` (a directory), each measured row is stored under a hash of ``cache_salt`` (what identifies the
    model, the networks and the probe) and the condition, so an interrupted or extended analysis re-measures only
    the conditions it has not seen.
    """
    rows = []
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    for cond in tqdm(plan, desc="interventions", unit="condition", disable=not progress):
        meta = {k: v for k, v in cond.items() if k != "gains"}
        path = None
        if cache is not None:
            key = json.dumps([cache_salt, meta["experiment"], meta["kind"], meta["x"], meta["seed"]], default=str)
            path = cache / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
            if path.is_file():
                rows.append(json.loads(path.read_text()))
                continue
        row = meta | _measure(model, adapter, probe, cond["gains"])
        if path is not None:
            tmp = path.with_suffix(f".partial-{os.getpid()}")
            tmp.write_text(json.dumps(row, default=str))
            tmp.replace(path)
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]], metrics: list[str]) -> dict[str, Any]:
    """Per experiment and x: the network value and the random controls' mean, std, min and max, per metric."""
    out: dict[str, Any] = {}
    for exp in ("mask", "keep", "amplify"):
        xs = sorted({r["x"] for r in rows if r["experiment"] == exp})
        table = []
        for x in xs:
            net = [r for r in rows if r["experiment"] == exp and r["x"] == x and r["kind"] == "network"]
            rnd = [r for r in rows if r["experiment"] == exp and r["x"] == x and r["kind"] == "random"]
            entry: dict[str, Any] = {"x": x, "fraction": net[0]["fraction"] if net else None}
            for m in metrics:
                vals = np.asarray([r[m] for r in rnd if r.get(m) is not None], dtype=float)
                entry[m] = {"network": net[0].get(m) if net else None,
                            "random_mean": float(vals.mean()) if vals.size else None,
                            "random_std": float(vals.std(ddof=1)) if vals.size > 1 else None,
                            "random_min": float(vals.min()) if vals.size else None,
                            "random_max": float(vals.max()) if vals.size else None}
            table.append(entry)
        out[exp] = table
    base = [r for r in rows if r["experiment"] == "baseline"]
    out["baseline"] = {m: base[0].get(m) for m in metrics} if base else {}
    return out
