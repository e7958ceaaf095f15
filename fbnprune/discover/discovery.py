"""Discovery over runs: disjoint blocks of calibration text, one decomposition per block, recurrence statistics.

Streaming: a run loads one layer (or one window of layers) of its block at a time, z-scores it, keeps only its
rank-k PCA (``N x k``, small) and frees the activations, then runs the ICA of all layers of the run as one batch.
Peak memory is one block of one window of activations plus a constant (PCA factors and ICA work buffers, which
do not grow with the token count).

Results are cached under ``cache_dir()/networks/<key>``; the key hashes the store's identity (model, data hash,
shape) and every parameter that changes results (not ``device``: CPU and GPU agree to rounding; nor the number of
processes: windows shared out over ranks give the same networks, to rounding).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fbnprune import distributed as dist
from fbnprune.collect.store import ActivationStore
from fbnprune.discover.config import DiscoverConfig
from fbnprune.discover.decompose import ICAOutcome, PCABlock, decompose, pca_block, zscore_
from fbnprune.discover.networks import NetworkSet, network_recurrence, pack_bits
from fbnprune.errors import UserError
from fbnprune.paths import cache_dir

log = logging.getLogger("fbnprune.discover")

FORMAT_VERSION = 1
MAX_MATCH_RUNS = 16  # network matching is pairwise (Hungarian per pair); the first 16 runs are matched
# ICA work-buffer budget (elements) per batch of (window, restart) problems. On CPU the solver's elementwise passes
# are memory-bound, so a batch that fits in the last-level cache (one SmolLM2 layer's 10 restarts) ran 25 % faster
# per layer than batches of 8 layers (measured on the 2-core EPYC); a GPU wants the bigger batches.
ICA_BATCH_ELEMS = {"cpu": 1 << 23, "cuda": 1 << 26}
RETRY_SEED_STEP = 100_003


def block_ranges(store: ActivationStore, cfg: DiscoverConfig) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Row indices of every run's block (disjoint, in store order) and a description of the split."""
    n = store.n_rows
    info: dict[str, Any] = {}
    if cfg.block_texts is not None:
        docs = store.rows()[:, 2]
        _, first = np.unique(docs, return_index=True)
        order = docs[np.sort(first)]  # distinct documents in order of appearance
        n_blocks = len(order) // cfg.block_texts
        info.update(unit="texts", per_block=cfg.block_texts, texts=len(order),
                    dropped_texts=len(order) - n_blocks * cfg.block_texts)
        if n_blocks == 0:
            raise UserError(
                f"the activation store holds {len(order)} texts, fewer than block_texts = {cfg.block_texts}; "
                "collect more text (collect.mode: document) or lower discover.block_texts"
            )
        group = {int(d): i // cfg.block_texts for i, d in enumerate(order[: n_blocks * cfg.block_texts])}
        gid = np.array([group.get(int(d), -1) for d in docs])
        blocks = [np.nonzero(gid == b)[0] for b in range(n_blocks)]
    elif cfg.block_rows is not None:
        n_blocks = n // cfg.block_rows
        info.update(unit="rows", per_block=cfg.block_rows, dropped_rows=n - n_blocks * cfg.block_rows)
        if n_blocks == 0:
            raise UserError(f"the activation store holds {n} rows, fewer than block_rows = {cfg.block_rows}")
        blocks = [np.arange(b * cfg.block_rows, (b + 1) * cfg.block_rows) for b in range(n_blocks)]
    else:
        blocks = [np.arange(n)]
        info.update(unit="all rows")
    dropped = int(store.meta.get("drop_first", 0) or 0)
    if cfg.skip_first > dropped:  # the store kept sink positions (for scorers and re-fits): ICA leaves them out
        pos = store.rows()[:, 1]
        blocks = [b[pos[b] >= cfg.skip_first] for b in blocks]
        info["skipped_first"] = cfg.skip_first
    if cfg.n_runs is not None:
        if cfg.n_runs > len(blocks):
            raise UserError(f"n_runs = {cfg.n_runs} but the store only has {len(blocks)} complete blocks")
        blocks = blocks[: cfg.n_runs]
    info["blocks"] = len(blocks)
    return blocks, info


def windows_of(n_layers: int, window: int) -> list[list[int]]:
    """Consecutive layer windows, stride 1 (``window = 1``: one window per layer)."""
    if window > n_layers:
        raise UserError(f"window = {window} is larger than the model's {n_layers} layers")
    return [list(range(s, s + window)) for s in range(n_layers - window + 1)]


def _load_block(store: ActivationStore, layers: list[int], rows: np.ndarray) -> torch.Tensor:
    """Activations of ``layers`` (concatenated along neurons) for ``rows``, as a fresh float32 tensor."""
    contiguous = rows.size > 0 and rows[-1] - rows[0] + 1 == rows.size
    parts = []
    for layer in layers:
        a = store.layer(layer)
        parts.append(np.array(a[rows[0] : rows[-1] + 1] if contiguous else a[rows], dtype=np.float32))
    return torch.from_numpy(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])


def cache_key(store: ActivationStore, cfg: DiscoverConfig) -> str:
    m = store.meta
    model = m.get("model") or {}
    blob = {
        "store": {
            "data": m.get("data_sha256"),
            "model": model.get("sha256") or model.get("source") if isinstance(model, dict) else model,
            "dtype": model.get("dtype") if isinstance(model, dict) else None,
            "widths": m.get("widths"),
            "rows": m.get("n_rows"),
            "drop_first": m.get("drop_first"),
        },
        # skip_first at its default is left out so that networks cached before the field existed stay valid
        "cfg": cfg.model_dump(exclude={"device"} | ({"skip_first"} if cfg.skip_first == 1 else set())),
        "v": FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _decompose_run(pcas: list[PCABlock], cfg: DiscoverConfig, seed: int) -> list[ICAOutcome]:
    """ICA of every window of one run, in batches that respect the work-buffer budget."""
    k, n = pcas[0].u.shape[1], (pcas[0].x1.shape[1] if cfg.method == "fastica" else pcas[0].u.shape[0])
    budget = ICA_BATCH_ELEMS["cpu" if str(cfg.device).startswith("cpu") else "cuda"]
    per_chunk = max(1, budget // (4 * k * max(n, k) * cfg.n_restarts))
    outs: list[ICAOutcome] = []
    for c in range(0, len(pcas), per_chunk):
        outs += decompose(
            pcas[c : c + per_chunk], temporal=cfg.method == "fastica", n_restarts=cfg.n_restarts, seed=seed,
            fun=cfg.fun, max_iter=cfg.max_iter, tol=cfg.tol, backend=cfg.backend, dtype=cfg.dtype,
            device=cfg.device, solver=cfg.solver,
        )
    return outs


def _layer_tensors(run_scores: list[torch.Tensor], run_nets: list[torch.Tensor], tau: float, match: float, layer: int
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One layer's share of the artifact (see :mod:`fbnprune.discover.networks`) from its per-run scores and
    networks, and its row of the summary."""
    rs = torch.stack(run_scores)  # (R, N)
    score = rs.amax(0)
    recur = (rs > tau).float().mean(0)
    nets = run_nets[:MAX_MATCH_RUNS]
    net_rec = network_recurrence(nets, match)
    sizes = torch.stack([n.sum(1) for n in nets]).float()  # (R', n_net)
    nonempty = sizes > 0
    tensors = {
        f"score.{layer}": score.float().contiguous(),
        f"recurrence.{layer}": recur.contiguous(),
        f"membership.{layer}": (score > tau).to(torch.uint8),
        f"run_scores.{layer}": rs.float().contiguous(),
        f"net_members.{layer}": pack_bits(torch.stack(nets)),
        f"net_recurrence.{layer}": net_rec.contiguous(),
    }
    rec_ne = net_rec[nonempty]
    info = {
        "layer": layer,
        "members": int((score > tau).sum()),
        "member_fraction": round(float((score > tau).float().mean()), 4),
        "networks_per_run": round(float(nonempty.float().sum(1).mean()), 2),
        "network_size_median": float(sizes[nonempty].median()) if bool(nonempty.any()) else 0.0,
        "network_size_max": int(sizes.max()),
        "network_recurrence_mean": None if len(nets) < 2 or rec_ne.numel() == 0 else round(float(rec_ne.mean()), 4),
        "networks_recurring_half": None if len(nets) < 2 else round(float((rec_ne >= 0.5).float().mean()), 4)
        if rec_ne.numel() else 0.0,
        "neuron_recurrence_mean_members": round(float(recur[score > tau].mean()), 4) if bool((score > tau).any()) else 0.0,
    }
    return tensors, info


def discover_networks(
    store: ActivationStore, cfg: DiscoverConfig, *, progress: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run every block's decomposition and aggregate; returns the tensors and summary (nothing is written).

    In a multi-process run (:mod:`fbnprune.distributed`) window ``w`` of every run is loaded, reduced and
    decomposed on rank ``w % world`` and layer ``l`` is aggregated on rank ``l % world``. A window that fails makes
    every rank retry the whole run with the next seed, as one process does, so the retries and seeds are the
    same. Every rank returns the whole result.
    """
    if not store.has_activations:
        raise UserError(f"store {store.path} kept statistics only; discovery needs collect.keep_activations: true")
    widths = store.widths
    wins = windows_of(len(widths), cfg.window)
    blocks, split = block_ranges(store, cfg)
    min_rows = min(len(b) for b in blocks)
    for w in wins:
        n_feat = sum(widths[i] for i in w)
        if cfg.n_components > min(n_feat, min_rows):
            raise UserError(
                f"n_components = {cfg.n_components} is larger than the neurons ({n_feat}) or tokens ({min_rows}) "
                "of a block; lower discover.n_components or use bigger blocks"
            )
    temporal = cfg.method == "fastica"
    tau = cfg.threshold
    my_wins = dist.shard(len(wins))
    my_layers = dist.shard(len(widths))
    run_scores: dict[int, list[torch.Tensor]] = {layer: [] for layer in my_layers}  # per layer, per ok run
    run_nets: dict[int, list[torch.Tensor]] = {layer: [] for layer in my_layers}
    runs: list[dict[str, Any]] = []
    timing = {"load_s": 0.0, "pca_s": 0.0, "ica_s": 0.0}
    bar = tqdm(total=len(blocks) * len(my_wins), desc="discover networks", unit="window",
               disable=not dist.progress_enabled(progress))
    for r, rows in enumerate(blocks):
        base_seed = cfg.seed + (r if cfg.vary_seed else 0)
        pcas: list[PCABlock] = []
        offsets: dict[int, list[int]] = {}
        for wi in my_wins:
            w = wins[wi]
            t0 = time.perf_counter()
            x = _load_block(store, w, rows).to(cfg.device if cfg.backend == "torch" else "cpu")
            t1 = time.perf_counter()
            zscore_(x, cfg.ddof)
            pcas.append(pca_block(x, cfg.n_components, n_iter=cfg.pca_iters, seed=cfg.seed, temporal=temporal))
            del x
            timing["load_s"] += t1 - t0
            timing["pca_s"] += time.perf_counter() - t1
            offsets[wi] = list(np.cumsum([0] + [widths[i] for i in w]))
            bar.update(1)
        rec: dict[str, Any] = {"run": r, "rows": int(len(rows)), "attempts": []}
        outs: list[ICAOutcome] | None = None
        for attempt in range(cfg.max_retries + 1):
            seed = base_seed + attempt * RETRY_SEED_STEP
            t0 = time.perf_counter()
            cand = _decompose_run(pcas, cfg, seed) if pcas else []
            timing["ica_s"] += time.perf_counter() - t0
            # every rank's windows, in window order: the attempt's record and whether it failed anywhere
            mine = {wi: (o.ok, o.n_iter, o.converged, o.finite) for wi, o in zip(my_wins, cand, strict=True)}
            every: dict[int, Any] = {}
            for part in dist.all_gather_object(mine, what=f"discovery run {r}"):
                every.update(part)
            per_win = [every[wi] for wi in range(len(wins))]
            failed = [wi for wi, o in enumerate(per_win) if not o[0]]
            n_it = [i for o in per_win for i in o[1]]
            conv = [c for o in per_win for c in o[2]]
            fin = [f for o in per_win for f in o[3]]
            rec["attempts"].append({
                "seed": seed, "failed_windows": failed, "restarts_nonfinite": int(len(fin) - sum(fin)),
                "restarts_not_converged": int(len(conv) - sum(conv)),
                "iterations_mean": float(np.mean(n_it)), "iterations_max": int(np.max(n_it)),
            })
            if not failed:
                outs = cand
                break
            log.warning("discovery run %d failed in windows %s with seed %d; retrying", r, failed, seed)
        rec["ok"] = outs is not None
        runs.append(rec)
        if outs is None:
            continue
        # slices of each layer's maps, from every window containing it, to the rank aggregating the layer
        slices: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for wi, o in zip(my_wins, outs, strict=True):
            assert o.maps is not None
            off = offsets[wi]
            for j, layer in enumerate(wins[wi]):
                slices.setdefault(layer, []).append((wi, o.maps[:, off[j] : off[j + 1]]))
        if dist.active() and cfg.window > 1:  # a layer's windows may lie on several ranks
            away = {layer: v for layer, v in slices.items() if dist.owner(layer) != dist.rank()}
            slices = {layer: v for layer, v in slices.items() if dist.owner(layer) == dist.rank()}
            for part in dist.all_gather_object(away, what=f"discovery run {r} maps"):
                for layer, v in part.items():
                    if dist.owner(layer) == dist.rank():
                        slices.setdefault(layer, []).extend(v)
        for layer in my_layers:
            z = torch.cat([m for _, m in sorted(slices[layer], key=lambda t: t[0])], 0).abs()  # (n_net, N)
            run_scores[layer].append(z.amax(0))
            run_nets[layer].append(z > tau)
    bar.close()
    ok = [r for r in runs if r["ok"]]
    if not ok:
        raise RuntimeError(f"every discovery run failed after {cfg.max_retries} retries: {runs}")
    mine_t: dict[str, torch.Tensor] = {}
    mine_info: dict[int, dict[str, Any]] = {}
    for layer in my_layers:
        t, info = _layer_tensors(run_scores[layer], run_nets[layer], tau, cfg.match_threshold, layer)
        mine_t.update(t)
        mine_info[layer] = info
    tensors: dict[str, torch.Tensor] = {}
    infos: dict[int, dict[str, Any]] = {}
    parts = dist.all_gather_object((mine_t, mine_info, timing), what="discovery results")
    for part_t, part_i, _ in parts:
        tensors.update(part_t)
        infos.update(part_i)
    timing = {k: sum(part[2][k] for part in parts) for k in timing}  # seconds of work, summed over the ranks
    tensors = {f"{name}.{layer}": tensors[f"{name}.{layer}"] for layer in range(len(widths))
               for name in ("score", "recurrence", "membership", "run_scores", "net_members", "net_recurrence")}
    layer_info = [infos[layer] for layer in range(len(widths))]
    summary: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "params": cfg.model_dump(),
        "store": str(store.path),
        "data_sha256": store.meta.get("data_sha256"),
        "model": store.meta.get("model"),
        "source": store.meta.get("source"),
        "layers": len(widths),
        "widths": widths,
        "windows": len(wins),
        "split": split,
        "runs_total": len(runs),
        "runs_ok": len(ok),
        "runs_failed": len(runs) - len(ok),
        "runs_retried": sum(1 for r in runs if len(r["attempts"]) > 1),
        "matched_runs": min(len(ok), MAX_MATCH_RUNS),
        "runs": runs,
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
        "per_layer": layer_info,
        "machine": f"{platform.machine()} {platform.system()}, torch threads {torch.get_num_threads()}, "
                   f"device {cfg.device}" + (f", {dist.world()} processes" if dist.active() else ""),
    }
    return tensors, summary


def run_discovery(
    store: ActivationStore, cfg: DiscoverConfig, *, root: Path | None = None, progress: bool = True,
    reuse: bool = True,
) -> NetworkSet:
    """Find the functional networks of ``store`` (cached: an identical earlier call is loaded, not recomputed).

    Example:
        >>> nets = run_discovery(store, DiscoverConfig(n_components=64))  # doctest: +SKIP
        >>> nets.summary["runs_ok"], nets.scores[0].shape  # doctest: +SKIP
    """
    root = Path(root) if root is not None else cache_dir() / "networks"
    path = root / cache_key(store, cfg)
    # rank 0 decides and alone writes (see fbnprune.distributed); the others load what it wrote
    if dist.broadcast_object(reuse and (path / NetworkSet.SUMMARY).is_file(), what="networks cache lookup"):
        return NetworkSet.load(path)
    t0 = time.perf_counter()
    tensors, summary = discover_networks(store, cfg, progress=progress)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    if dist.is_main():
        _write_networks(root, path, tensors, summary)
    dist.barrier("networks written")
    return NetworkSet.load(path)


def _write_networks(root: Path, path: Path, tensors: dict[str, torch.Tensor], summary: dict[str, Any]) -> None:
    """The artifact under a temporary name, renamed into place when complete."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / NetworkSet.FILE))
        (tmp / NetworkSet.SUMMARY).write_text(json.dumps(summary, indent=2, default=str))
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
