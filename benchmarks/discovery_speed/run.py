"""Discovery speed: fbnprune's ICA vs a scikit-learn re-creation of the reference CPU CanICA, same activations.

Protocol (recorded in results.json):
* model ``smollm2-135m`` (30 layers x 1536 MLP neurons), float32 on CPU;
* activations: the down-projection input of every layer, wikitext2-valid in ``document`` mode (one text per
  sequence, truncated to 1024 tokens, texts under 16 tokens skipped), the first 120 texts collected once; the
  benchmark uses one run = the first block of 40 texts (the reference's ``sample_num``), position 0 of each text
  dropped;
* reference settings: k = 128 components, 10 restarts, fun = cube, max_iter = 300, tol = 1e-4, seed 327,
  z-score ddof 1;
* ``reference``: per layer, float64 z-score, ``sklearn.utils.extmath.randomized_svd(Z.T, 128, n_iter=4,
  random_state=327, transpose=True)``, then 10 ``sklearn.decomposition.fastica(U, whiten="unit-variance",
  fun="cube", max_iter=300, random_state=s_r)`` restarts one after the other (BLAS limited to the same thread count),
  sparsest restart (smallest max-over-maps L1), maps z-scored, score = max |z| per neuron;
* ``fbnprune``: ``discover_networks`` (torch backend) on the same rows, timing from load to scores;
* ``forward``: the forward passes over the same 40 texts (batch 4, right padding, no hooks), which is what the
  collect stage costs for one run;
* CPU seconds (``process_time``) are recorded next to wall seconds: on a shared machine they are the fairer
  comparison between phases run at different times;
* ``jaccard``: overlap of the neuron sets kept at the same budget (global top-N by score over all layers, as the
  reference's single global threshold does), at several kept fractions; the headline is 80 % kept.

Phases cache their outputs under ``$FBNPRUNE_CACHE/bench/discovery_speed`` and the reference resumes per layer,
so a long run on a shared machine can be interrupted. Run everything with::

    nice -n 5 .venv/bin/python benchmarks/discovery_speed/run.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's root, for benchmarks.runner

from benchmarks.runner import command_line, write_json  # noqa: E402
from fbnprune.collect import collect, make_sequences  # noqa: E402
from fbnprune.discover import DiscoverConfig, discover_networks  # noqa: E402
from fbnprune.discover.decompose import restart_seeds  # noqa: E402
from fbnprune.discover.discovery import block_ranges  # noqa: E402
from fbnprune.paths import cache_dir  # noqa: E402
from fbnprune.provenance import versions  # noqa: E402

HERE = Path(__file__).parent
N_TOKENS = 18_700  # about 120 texts: 3 blocks of 40
SEQ_LEN = 1024


def machine(threads: int) -> dict[str, Any]:
    from fbnprune.provenance import machine as shared_machine

    m = shared_machine()
    return {"cpu": m["cpu"], "cores": m["cores"], "threads_used": threads, "python": m["python"],
            "torch": torch.__version__, "platform": platform.platform()}


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def get_store(model_name: str):
    from fbnprune.models import load_model

    lm = load_model(model_name)
    batch = make_sequences(lm.tokenizer, "wikitext2-valid", n_tokens=N_TOKENS, seq_len=SEQ_LEN, mode="document")
    store = collect(lm.model, batch, model_info=lm.info, keep_activations=True)
    return lm, batch, store


def phase_forward(lm, batch, n_texts: int) -> dict[str, Any]:
    """Forward passes (no hooks) over the first block's texts, batch 4 with right padding, as collect runs them."""
    from fbnprune.collect.capture import pad_batch

    seqs = batch.sequences[:n_texts]
    model = lm.model
    with torch.no_grad():
        ids, mask = pad_batch(seqs[:2], 0)
        model(input_ids=ids, attention_mask=mask, use_cache=False)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        for b in range(0, len(seqs), 4):
            ids, mask = pad_batch(seqs[b : b + 4], 0)
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"forward_s": round(dt, 2), "forward_cpu_s": round(cpu, 2), "tokens": int(sum(len(s) for s in seqs)),
            "load_avg_after": load_avg()}


def reference_layer(x: np.ndarray, k: int, restarts: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The reference CPU CanICA of one layer, re-created with scikit-learn; returns max |z| per neuron."""
    from sklearn.decomposition import fastica
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.utils.extmath import randomized_svd

    z = x.astype(np.float64)
    z -= z.mean(0)
    std = z.std(0, ddof=1)
    std[std < np.finfo(np.float32).eps] = 1.0
    z /= std
    u, _s, _vt = randomized_svd(z.T, n_components=k, n_iter=4, random_state=seed, transpose=True)
    best, best_crit, iters, nonconv = None, np.inf, [], 0
    for s in restart_seeds(seed, restarts):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            try:
                with np.errstate(over="ignore", invalid="ignore"):
                    _k, _w, src, n_it = fastica(u, whiten="unit-variance", fun="cube", max_iter=300, tol=1e-4,
                                                random_state=s, return_n_iter=True)
            except (FloatingPointError, ValueError, np.linalg.LinAlgError):
                iters.append(300)
                continue
        iters.append(int(n_it))
        nonconv += any(issubclass(c.category, ConvergenceWarning) for c in caught)
        if not np.isfinite(src).all():
            continue
        maps = src.T
        crit = np.abs(maps).sum(1).max()
        if crit < best_crit:
            best, best_crit = maps, crit
    assert best is not None, "every reference restart failed"
    zmap = (best - best.mean(1, keepdims=True)) / best.std(1, keepdims=True)
    return np.abs(zmap).max(0), {"iterations": iters, "not_converged": nonconv}


def phase_reference(store, rows: np.ndarray, k: int, restarts: int, seed: int, threads: int, out: Path,
                    layers: list[int]) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "reference_state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"layers": {}}
    with threadpool_limits(threads):
        for layer in layers:
            if str(layer) in state["layers"]:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            x = np.array(store.layer(layer)[rows[0] : rows[-1] + 1])
            score, info = reference_layer(x, k, restarts, seed)
            info["seconds"] = round(time.perf_counter() - t0, 3)
            info["cpu_seconds"] = round(time.process_time() - c0, 3)
            info["load_avg"] = load_avg()
            np.save(out / f"reference_scores_{layer:03d}.npy", score.astype(np.float32))
            state["layers"][str(layer)] = info
            write_json(state_file, state, indent=1)
            print(f"reference layer {layer}: {info['seconds']} s, iterations {info['iterations']}", flush=True)
    return state


class LayerSubset:
    """A read-only view of an :class:`ActivationStore` holding only some layers (to benchmark a subset)."""

    def __init__(self, store, layers: list[int]) -> None:
        self._s, self._layers = store, layers
        self.path, self.meta, self.n_rows, self.has_activations = store.path, store.meta, store.n_rows, True
        self.widths = [store.widths[i] for i in layers]
        self.n_layers = len(layers)

    def layer(self, i: int) -> np.ndarray:
        return self._s.layer(self._layers[i])

    def rows(self) -> np.ndarray:
        return self._s.rows()


def phase_fbnprune(store, cfg: DiscoverConfig) -> tuple[list[np.ndarray], dict[str, Any]]:
    base = _rss_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (Linux)
        reset = True
    except OSError:
        reset = False
    t0, c0 = time.perf_counter(), time.process_time()
    tensors, summary = discover_networks(store, cfg, progress=False)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _rss_kib("VmHWM")
    scores = [tensors[f"score.{i}"].numpy() for i in range(store.n_layers)]
    att = summary["runs"][0]["attempts"][-1]
    return scores, {
        "fbnprune_s": round(dt, 2),
        "fbnprune_cpu_s": round(cpu, 2),
        "timing_s": summary["timing_s"],
        "iterations_mean": att["iterations_mean"],
        "iterations_max": att["iterations_max"],
        "restarts_not_converged": att["restarts_not_converged"],
        "restarts_nonfinite": att["restarts_nonfinite"],
        "peak_rss_mib": round(peak / 1024, 1) if reset else None,
        "rss_before_mib": round(base / 1024, 1),
        "load_avg_after": load_avg(),
    }


def _rss_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def kept_jaccard(a: list[np.ndarray], b: list[np.ndarray], keep: float) -> float:
    """Jaccard of the global top-``keep`` fraction of neurons by score (all layers pooled)."""
    sa, sb = np.concatenate(a), np.concatenate(b)
    n = int(round(keep * sa.size))
    ia = set(np.argsort(-sa, kind="stable")[:n].tolist())
    ib = set(np.argsort(-sb, kind="stable")[:n].tolist())
    return len(ia & ib) / len(ia | ib)


def _report(out: Path, n_layers: int, results: dict[str, Any]) -> dict[str, Any]:
    """Jaccard of kept sets on the layers every compared method has, and the speed ratios."""
    rep: dict[str, Any] = {}
    have = [i for i in range(n_layers)
            if (out / f"reference_scores_{i:03d}.npy").is_file() and (out / f"fbnprune_scores_{i:03d}.npy").is_file()]
    if not have:
        return rep
    ref = [np.load(out / f"reference_scores_{i:03d}.npy") for i in have]
    ours = [np.load(out / f"fbnprune_scores_{i:03d}.npy") for i in have]
    keeps = [0.5, 0.7, 0.8, 0.9]
    rep["jaccard_layers"] = have
    rep["jaccard_by_kept_fraction"] = {str(k): round(kept_jaccard(ours, ref, k), 4) for k in keeps}
    rep["jaccard"] = rep["jaccard_by_kept_fraction"]["0.8"]
    rep["jaccard_per_layer_80pct"] = [round(kept_jaccard([o], [r], 0.8), 4) for o, r in zip(ours, ref, strict=True)]
    seed2 = [out / f"fbnprune_seed2_scores_{i:03d}.npy" for i in have]
    if all(f.is_file() for f in seed2):
        other = [np.load(f) for f in seed2]
        rep["jaccard_fbnprune_seed_vs_seed"] = {
            str(k): round(kept_jaccard(ours, other, k), 4) for k in keeps}
    ref_state = json.loads((out / "reference_state.json").read_text())
    ref_s = sum(ref_state["layers"][str(i)]["seconds"] for i in have)
    ours_per_layer = results.get("fbnprune", {}).get("seconds_per_layer")
    if ours_per_layer:
        rep["speedup_vs_reference"] = round(ref_s / (ours_per_layer * len(have)), 2)
        rep["reference_s_per_layer"] = round(ref_s / len(have), 2)
        if "reference_s" not in results:
            rep["reference_s_extrapolated_all_layers"] = round(ref_s / len(have) * n_layers, 1)
        if "fbnprune_s" not in results:
            rep["fbnprune_s_extrapolated_all_layers"] = round(ours_per_layer * n_layers, 1)
    fb = results.get("fbnprune_s") or rep.get("fbnprune_s_extrapolated_all_layers")
    if fb and results.get("forward_s"):
        rep["fbnprune_over_forward"] = round(fb / results["forward_s"], 3)
    return rep


def _touched(phases: list[str]) -> set[str]:
    keys = {"model", "layers", "neurons_per_layer", "components", "restarts", "texts", "rows", "machine", "commands",
            "git_sha", "activation_bytes_one_layer_block"}
    if "forward" in phases:
        keys |= {"forward_s", "forward_cpu_s", "tokens", "forward_load_avg"}
    if "fbnprune" in phases:
        keys |= {"fbnprune", "fbnprune_s"}
    if "fbnprune_seed2" in phases:
        keys |= {"fbnprune_seed2"}
    if "reference" in phases:
        keys |= {"reference", "reference_s"}
    return keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--components", type=int, default=128)
    ap.add_argument("--restarts", type=int, default=10)
    ap.add_argument("--texts", type=int, default=40)
    ap.add_argument("--seed", type=int, default=327)
    ap.add_argument("--phases", default="forward,fbnprune,fbnprune_seed2,reference,report")
    ap.add_argument("--solver", default=None, help="fbnprune torch solver (default: DiscoverConfig's)")
    ap.add_argument("--layers", default=None,
                    help="comma list: run fbnprune and the reference on these layers only (default: all)")
    ap.add_argument("--seed2", type=int, default=328, help="second fbnprune seed (phase fbnprune_seed2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    phases = args.phases.split(",")
    out = cache_dir() / "bench" / "discovery_speed" / args.model
    out.mkdir(parents=True, exist_ok=True)
    lm, batch, store = get_store(args.model)
    extra = {"solver": args.solver} if args.solver else {}
    cfg = DiscoverConfig(n_components=args.components, n_restarts=args.restarts, block_texts=args.texts, n_runs=1,
                         seed=args.seed, fun="cube", max_iter=300, tol=1e-4, **extra)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(store.n_layers))
    sub = LayerSubset(store, layers)
    blocks, _ = block_ranges(store, cfg)
    rows = blocks[0]
    assert rows[-1] - rows[0] + 1 == rows.size, "block rows must be contiguous"
    res_file = HERE / "results.json"
    results: dict[str, Any] = json.loads(res_file.read_text()) if res_file.is_file() else {}
    results.update({
        "model": args.model, "layers": store.n_layers, "neurons_per_layer": store.widths[0],
        "components": args.components, "restarts": args.restarts, "texts": args.texts, "rows": int(rows.size),
        "machine": machine(args.threads),
        "commands": dict(results.get("commands", {}), **{args.phases: command_line()}),
        "git_sha": versions()["git_sha"],
        "activation_bytes_one_layer_block": int(rows.size * store.widths[0] * 4),
    })
    if "forward" in phases:
        r = phase_forward(lm, batch, args.texts)
        results.update(forward_s=r["forward_s"], forward_cpu_s=r["forward_cpu_s"], tokens=r["tokens"],
                       forward_load_avg=r["load_avg_after"])
        print("forward", r, flush=True)
    if "fbnprune" in phases:
        scores, r = phase_fbnprune(sub, cfg)
        for i, sc in zip(layers, scores, strict=True):
            np.save(out / f"fbnprune_scores_{i:03d}.npy", sc)
        r["layers"] = layers
        r["seconds_per_layer"] = round(r["fbnprune_s"] / len(layers), 3)
        results["fbnprune"] = r | {"config": cfg.model_dump()}
        if len(layers) == store.n_layers:
            results["fbnprune_s"] = r["fbnprune_s"]
        print("fbnprune", r, flush=True)
    if "fbnprune_seed2" in phases:
        cfg2 = cfg.model_copy(update={"seed": args.seed2})
        scores, r = phase_fbnprune(sub, cfg2)
        for i, sc in zip(layers, scores, strict=True):
            np.save(out / f"fbnprune_seed2_scores_{i:03d}.npy", sc)
        results["fbnprune_seed2"] = {"seed": args.seed2, "layers": layers, "fbnprune_s": r["fbnprune_s"]}
    if "reference" in phases:
        state = phase_reference(store, rows, args.components, args.restarts, args.seed, args.threads, out, layers)
        done = sorted(int(x) for x in state["layers"])
        results["reference"] = {
            "layers_done": len(done),
            "seconds_per_layer": [state["layers"][str(i)]["seconds"] for i in done],
            "iterations_mean": float(np.mean([i for d in state["layers"].values() for i in d["iterations"]])),
            "restarts_not_converged": int(sum(d["not_converged"] for d in state["layers"].values())),
        }
        if len(done) == store.n_layers:
            results["reference_s"] = round(sum(state["layers"][str(i)]["seconds"] for i in done), 2)
    # another phase may have finished while this one ran: merge into the file's current content
    current = json.loads(res_file.read_text()) if res_file.is_file() else {}
    results = current | {k: v for k, v in results.items() if k not in current or k in _touched(phases)}
    if "report" in phases:
        results.update(_report(out, store.n_layers, results))
    results["load_avg_at_end"] = load_avg()
    write_json(res_file, results)
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, (dict, list))}, indent=1))


if __name__ == "__main__":
    main()
