"""fbn rule study: which use of functional networks prunes best; every variant through one engine, resumable.

Protocol (recorded in every cell):
* calibration: wikitext2-valid, 8192 tokens in 16 packed random 512-token windows (seed 0), the down-projection
  input of every layer kept, position 0 dropped (the store ``benchmarks/prune_baselines`` uses);
* networks: :func:`fbnprune.discover.run_discovery` on that store (cached), configurations in ``DISCOVER``;
* plan: sparsity = fraction of MLP neurons removed, all layers pruned, ``round_to`` 8, mask mode (same logits as
  slice); uniform widths unless the variant says ``global`` (then ``normalize: none``);
* compensation (:func:`fbnprune.prune.compensate_`): ``none``, ``bias``, ``refit`` (ridge 1e-3 x mean diagonal)
  or ``netrefit`` (the re-fit restricted to functional networks, with the variant's own networks, else the union
  over "runs4"), ``corrrefit`` (its correlation control) or ``anchored`` (ridge 0.1 toward the original kept
  columns);
* perplexity: the first ``--eval-tokens`` tokens of wikitext2-test in non-overlapping 512-token windows, float32;
* tasks (``--tasks``): fbnprune.evaluate.harness.evaluate_tasks with ``--limit`` items per task (a SUBSET).

Scorers: the product's, plus the study's own (``fbn_obs``, ``fbn_alloc``, ``obs_global``) that ``variants.py``
registers when this script imports it.

The model is loaded and calibrated once by ``benchmarks/runner.py`` (fbnprune's load and collect stages), and every
cell compensates and prunes a fresh copy of it with fbnprune's prune stage. Scores and keep plans are made here, not
by the plan stage: the variants are not recipes (their scorers take settings no recipe has, such as ``fbn_beta``,
and the global ones plan without normalisation).

Cells live in ``results/<model>/ppl<eval_tokens>[_tasks<limit>]/<variant>__<sparsity>__<compensate>.json``; a
rerun skips finished cells, so the grid can be extended later. ``summarize.py`` builds results.md from them.

    nice -n 10 .venv/bin/python benchmarks/fbn_rules/run.py --variants obs,fbn_obs_b1 --sparsities 0.3 \
        --compensations refit --eval-tokens 8192
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the checkout's root, for benchmarks.runner
sys.path.insert(0, str(HERE))  # variants.py sits next to this script, which also runs loaded by path (tests)
from variants import context  # noqa: E402  (importing it registers the study's scorers)

from benchmarks.runner import Bench, CellDir, Protocol, now  # noqa: E402
from fbnprune.collect import collect  # noqa: E402
from fbnprune.discover import DiscoverConfig, run_discovery  # noqa: E402
from fbnprune.provenance import machine, versions  # noqa: E402
from fbnprune.prune import COMPENSATIONS, count_params, make_plan, score_neurons  # noqa: E402
from fbnprune.prune.gram import set_gram_cache_size  # noqa: E402
from fbnprune.recipe import Recipe  # noqa: E402
from fbnprune.run import prune_stage  # noqa: E402

CALIB = {"source": "wikitext2-valid", "n_tokens": 8192, "seq_len": 512, "mode": "pack", "seed": 0, "drop_first": 1}
RIDGE = 1e-3
OBS_STEPS = 10

#: discovery configurations: "runs4" = 4 disjoint blocks of 2044 rows (4 windows), for recurrence; "all" = one run.
#: k = 64 and one restart (the prototype's naive setting): the reference's k = 128 with 10 restarts took ~30 min
#: per run on the shared 2-core machine, which this study could not afford.
DISCOVER: dict[str, dict[str, Any]] = {
    "runs4": {"n_components": 64, "n_restarts": 1, "block_texts": None, "block_rows": 2044, "vary_seed": True},
    "all": {"n_components": 64, "n_restarts": 1, "block_texts": None},
    # the reference setting the leaderboard's fbn cells use (k = 128, 10 restarts, blocks of 2048 rows)
    "ref": {"n_components": 128, "n_restarts": 10, "block_texts": None, "block_rows": 2048},
}

#: variant name -> scorer, options, allocation, discovery config (None = no networks needed)
VARIANTS: dict[str, dict[str, Any]] = {
    "random": {"scorer": "random"},
    "wanda_sp": {"scorer": "wanda_sp"},
    "wanda_sp_global": {"scorer": "wanda_sp", "allocation": "global", "normalize": "mean"},
    # the reference's fixed rule: first 3 and last 2 layers never pruned, uniform elsewhere (same total budget)
    "wanda_sp_edges": {"scorer": "wanda_sp", "protected": "edges"},
    "flap": {"scorer": "flap"},
    "obs": {"scorer": "obs"},
    "obs_global": {"scorer": "obs_global", "allocation": "global"},
    "fbn_maxz": {"scorer": "fbn", "discover": "all", "options": {"fbn_rule": "max_z"}},
    "fbn_maxz_runs4": {"scorer": "fbn", "discover": "runs4", "options": {"fbn_rule": "max_z"}},
    "fbn_recurrence": {"scorer": "fbn", "discover": "runs4", "options": {"fbn_rule": "recurrence"}},
    "fbn_obs_b1": {"scorer": "fbn_obs", "discover": "runs4", "options": {"fbn_beta": 1.0}},
    "fbn_obs_b4": {"scorer": "fbn_obs", "discover": "runs4", "options": {"fbn_beta": 4.0}},
    "fbn_obs_z1": {"scorer": "fbn_obs", "discover": "all", "options": {"fbn_beta": 1.0, "fbn_signal": "max_z"}},
    "fbn_alloc_p25": {"scorer": "fbn_alloc", "discover": "runs4", "allocation": "global",
                      "options": {"fbn_gamma": 0.25}},
    "fbn_alloc_m25": {"scorer": "fbn_alloc", "discover": "runs4", "allocation": "global",
                      "options": {"fbn_gamma": -0.25}},
    "fbn_alloc_p25_wanda": {"scorer": "fbn_alloc", "discover": "runs4", "allocation": "global",
                            "options": {"fbn_gamma": 0.25, "fbn_within": "wanda_sp"}},
    "fbn_alloc_m25_wanda": {"scorer": "fbn_alloc", "discover": "runs4", "allocation": "global",
                            "options": {"fbn_gamma": -0.25, "fbn_within": "wanda_sp"}},
    # remove what the networks can rebuild (fbnprune/prune/redundancy.py); pair with netrefit / corrrefit
    "fbn_redundancy": {"scorer": "fbn", "discover": "ref", "options": {"fbn_rule": "redundancy"}},
    "corr_redundancy": {"scorer": "corr_redundancy", "discover": "ref"},
    # wanda_sp / flap selection with the reference networks for netrefit / corrrefit
    "wanda_sp_refnets": {"scorer": "wanda_sp", "discover": "ref"},
    "flap_refnets": {"scorer": "flap", "discover": "ref"},
}


def cell_machine() -> dict[str, Any]:
    """:func:`fbnprune.provenance.machine` plus the names the study's cells have carried since the first one and
    ``summarize.py`` prints (platform, cpus, torch, note), so old and new cells read alike."""
    m = machine()
    return {**m, "platform": f"{platform.machine()} {m['os']}", "cpus": m["cores"], "torch": torch.__version__,
            "note": "load average above half the cores at the cell's end: timings are upper bounds" if m["busy"]
            else "load average below half the cores at the cell's end"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variants", default="obs,fbn_obs_b1")
    ap.add_argument("--sparsities", default="0.3")
    ap.add_argument("--compensations", default="none,refit")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--tasks", default="", help="comma-separated task names (evaluated on a --limit subset)")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--drop-first", type=int, default=CALIB["drop_first"],
                    help="calibration positions dropped per sequence (default 1: the attention-sink position); "
                         "other values write to a '_drop<N>' results folder")
    ap.add_argument("--calib-seed", type=int, default=CALIB["seed"],
                    help="seed of the calibration windows (default 0); other values write to a '_seed<N>' results "
                         "folder, to measure how much of a small margin is calibration noise")
    args = ap.parse_args()
    calib_cfg = dict(CALIB, drop_first=args.drop_first, seed=args.calib_seed)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    comps = args.compensations.split(",")
    tasks = [t for t in args.tasks.split(",") if t]
    sub = f"ppl{args.eval_tokens}" + (f"_tasks{args.limit}" if tasks else "") + \
        (f"_drop{args.drop_first}" if args.drop_first != CALIB["drop_first"] else "") + \
        (f"_seed{args.calib_seed}" if args.calib_seed != CALIB["seed"] else "")
    out = CellDir(Path(args.out) / args.model / sub)

    # the model and the calibration, once; every cell's prune section is set by the cell (mask mode: same logits
    # as slice, no surgery cost)
    recipe = Recipe.model_validate({
        "name": f"fbn-rules-{args.model}", "model": {"source": args.model, "dtype": "float32"},
        "collect": {**calib_cfg, "keep_activations": True, "fallback": None},
        "prune": {"mode": "mask", "ridge": RIDGE, "protected_layers": [], "min_width": 8, "round_to": 8},
        "evaluate": None, "export": None})
    bench = Bench(recipe, Protocol(seq_lens=(512,), ppl_tokens=args.eval_tokens, batch_tokens=4 * 512,
                                   tasks=tuple(tasks), task_options={"limit": args.limit}, progress=False))
    model, adapter, store, calib = bench.dense, bench.base.adapter, bench.base.store, bench.base.calib
    # networks always come from the store without the first position: its outliers (SmolLM2's attention sink reaches
    # 800x a normal token's MLP output) would dominate ICA's z-scores; scores and re-fits use ``store``
    disc_store = store if calib_cfg["drop_first"] == CALIB["drop_first"] else collect(
        model, calib, model_info=bench.base.lm.info, keep_activations=True, drop_first=CALIB["drop_first"])
    set_gram_cache_size(len(adapter.mlps(model)))
    protocol = {"model": args.model, "calibration": calib_cfg, "eval_tokens": args.eval_tokens, "seq_len": 512,
                "ridge": RIDGE, "obs_steps": OBS_STEPS, "round_to": 8, "mode": "mask",
                "tasks": tasks, "task_limit": args.limit if tasks else None}
    code = versions()  # the code this process imported: a commit made while it runs is not what it measures

    def evaluate(m: Any, desc: str) -> dict[str, Any]:
        r = bench.perplexity(m, 512, desc)
        res = {"ppl": r["ppl"], "nll": r["nll"], "ppl_seconds": r.get("seconds")}
        if tasks:
            t = bench.tasks(m)
            res["tasks"] = {k: {kk: vv for kk, vv in v.items() if isinstance(vv, (int, float, str))}
                            for k, v in t["tasks"].items()}
        return res

    def write(name: str, payload: dict[str, Any]) -> None:
        payload.update(command=bench.command, date=now(), git_sha=code["git_sha"], versions=code,
                       machine=cell_machine(), protocol=protocol)
        out.write(name, payload, indent=1)

    if not out.done("dense"):
        t0 = time.perf_counter()
        write("dense", {"variant": "dense", **evaluate(model, "dense"), "params": count_params(model),
                        "seconds": round(time.perf_counter() - t0, 1)})
    print(f"dense ppl {out.read('dense')['ppl']:.3f}", flush=True)

    nets_cache: dict[str, Any] = {}
    score_cache: dict[tuple, Any] = {}
    for sp in sparsities:
        for v in variants:
            for cp in comps:
                name = f"{v}__{sp:g}__{cp}"
                if out.done(name):
                    continue
                spec = VARIANTS[v]
                t0 = time.perf_counter()
                opts: dict[str, Any] = {"sparsity": sp, "obs_steps": OBS_STEPS, "ridge": RIDGE, "progress": False,
                                        **spec.get("options", {})}  # context fields, the rest go to its extra
                dkey = spec.get("discover")
                if dkey:
                    if dkey not in nets_cache:
                        nets_cache[dkey] = run_discovery(disc_store, DiscoverConfig(**DISCOVER[dkey]), progress=False)
                    opts["networks"] = nets_cache[dkey]
                key = (v, sp)
                if key not in score_cache:  # the study's scorers take settings no recipe has: scored here
                    ctx = context(model, adapter, store=store, sequences=calib.sequences, seed=0, **opts)
                    score_cache[key] = (score_neurons(spec["scorer"], ctx), round(time.perf_counter() - t0, 1))
                scores, score_s = score_cache[key]
                alloc = spec.get("allocation", "uniform")
                protected = [0, 1, 2, len(scores) - 2, len(scores) - 1] if spec.get("protected") == "edges" else []
                t1 = time.perf_counter()
                rule = spec.get("options", {}).get("fbn_rule")
                r = bench.cell(bench.recipe_with(method=spec["scorer"], sparsity=sp, allocation=alloc, compensate=cp,
                                                 protected_layers=protected, **({"fbn_rule": rule} if rule else {})))
                r.plan = make_plan(scores, sparsity=sp, model=r.lm.model, adapter=adapter, allocation=alloc,
                                   protected=protected, min_width=8, round_to=8,
                                   normalize=spec.get("normalize", "none" if alloc == "global" else "mean"))
                # netrefit / corrrefit use the variant's own networks, else the union over the runs of "runs4"
                nkey = dkey or "runs4"
                rebuild_from_nets = COMPENSATIONS.get(cp).needs.networks
                if rebuild_from_nets and nkey not in nets_cache:
                    nets_cache[nkey] = run_discovery(disc_store, DiscoverConfig(**DISCOVER[nkey]), progress=False)
                # anchored keeps its own ridge (0.1 x mean diagonal, toward the original kept columns)
                r.networks = nets_cache.get(nkey)
                prune_stage(r)
                rep = r.report.get("compensation")
                res = evaluate(r.lm.model, f"{v} {sp} {cp}")
                cell = {"variant": v, "scorer": spec["scorer"], "options": spec.get("options", {}),
                        "discover": DISCOVER.get(dkey) if dkey else None, "allocation": alloc, "sparsity": sp,
                        "compensate": cp, **res, "achieved_sparsity": r.plan.sparsity,
                        "kept_widths": r.plan.kept_widths, "score_seconds": score_s,
                        "seconds": round(time.perf_counter() - t1, 1),
                        "refit_networks": DISCOVER[nkey] if rebuild_from_nets else None}
                if rep:
                    lay = list(rep["layers"].values())
                    cell["refit_rel_error_mean"] = {k: sum(x[k] for x in lay) / len(lay) for k in ("pruned", "refit")}
                    if rebuild_from_nets:
                        cell["netrefit_alone_fraction"] = sum(x["alone"] for x in lay) / len(lay)
                write(name, cell)
                print(f"{v:16s} {sp:.2f} {cp:6s} ppl {res['ppl']:10.3f} ({cell['seconds']} s)", flush=True)
                del r


if __name__ == "__main__":
    main()
