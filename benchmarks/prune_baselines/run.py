"""Every scorer x sparsity x compensation on one engine: SmolLM2-135M, WikiText-2 test perplexity.

Protocol (fixed, recorded in results.json):
* calibration: wikitext2-valid, 8192 tokens in 16 packed random windows of 512 tokens (seed 0), activations of
  every layer's down-projection input kept (position 0 of each window dropped);
* evaluation: token perplexity on the first 16,384 tokens of wikitext2-test, non-overlapping 512-token windows
  (32 windows, 16,352 predicted tokens), float32;
* pruning: uniform allocation (same width in every layer, no protected layers, round_to 8), mode ``mask``
  (identical logits to ``slice``, tested in tests/prune/test_ops.py), fraction of MLP neurons removed.

The dense model is loaded and calibrated once and deep-copied per cell, and each cell is scored, planned,
compensated and pruned by fbnprune's own stages (``benchmarks/runner.py``); cells that differ only in their
compensation share one scoring. Results are appended after every cell (the file is replaced whole, never left
half-written), and a rerun skips cells already in results.json (same protocol), so an interrupted run resumes.

    nice -n 10 .venv/bin/python benchmarks/prune_baselines/run.py [--scorers a,b] [--sparsities 0.2,0.3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the checkout's root, for benchmarks.runner

from benchmarks.runner import Bench, Protocol, now, read_json, record, share_scores, write_json  # noqa: E402
from fbnprune.prune import SCORERS, ScoreContext, count_params  # noqa: E402
from fbnprune.prune.gram import set_gram_cache_size  # noqa: E402
from fbnprune.recipe import Recipe  # noqa: E402

PROTOCOL = {
    "model": "smollm2-135m",
    "dtype": "float32",
    "calibration": {"source": "wikitext2-valid", "n_tokens": 8192, "seq_len": 512, "mode": "pack", "seed": 0,
                    "drop_first": 1},
    "evaluation": {"source": "wikitext2-test", "max_tokens": 16384, "seq_len": 512, "batch_size": 4},
    "plan": {"allocation": "uniform", "protected": [], "round_to": 8, "min_width": 8, "mode": "mask"},
    "refit_ridge": 1e-3,
    "obs_steps": 10,
    "taylor": {"variant": "param_first", "max_sequences": 16, "batch_size": 2},
    "seed": 0,
}
COMPENSATIONS = ("none", "bias", "refit")


def write_md(res: dict, path: Path) -> None:
    cells, m = res["cells"], res["machine"]
    spars = sorted({c["sparsity"] for c in cells})
    scorers = [s for s in res["scorers"] if any(c["scorer"] == s for c in cells)]
    lines = [
        "# Pruning baselines on one engine: SmolLM2-135M, WikiText-2 test perplexity",
        "",
        f"Command: `{res['command']}`  ",
        f"Date: {res['date']} (finished {res.get('finished', 'not yet')}), git {res['git_sha']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, {m['os']}, torch "
        f"{res['versions']['torch']}, load average at start {m['loadavg']} "
        f"({'busy: timings are upper bounds' if m['busy'] else 'not busy'})",
        "",
        "Protocol: calibration = 16 random 512-token windows of wikitext2-valid (8192 tokens, seed 0, position 0 "
        "dropped); perplexity = first 16,384 tokens of wikitext2-test in 32 non-overlapping 512-token windows, "
        "float32; uniform allocation (same width in every layer, nothing protected, widths multiple of 8), mask "
        "mode (same logits as slice). Sparsity = fraction of MLP neurons removed; the achieved fraction is in "
        "results.json (0.3 -> 1072 of 1536 kept = 30.2 %, nearest multiple of 8).",
        "",
        f"Dense perplexity: **{res['dense']['ppl']:.2f}**",
        "",
        "| scorer | " + " | ".join(f"{int(s * 100)}% {c}" for s in spars for c in COMPENSATIONS) + " |",
        "|---|" + "---|" * (len(spars) * len(COMPENSATIONS)),
    ]
    for sc in scorers:
        row = [sc]
        for s in spars:
            for c in COMPENSATIONS:
                hit = [x for x in cells if x["scorer"] == sc and x["sparsity"] == s and x["compensate"] == c]
                row.append(f"{hit[0]['ppl']:.2f}" if hit else "-")
        lines.append("| " + " | ".join(row) + " |")
    expected = len(res.get("grid", [])) or len(cells)
    if len(cells) < expected:
        lines += ["", f"**Partial: {len(cells)} of {expected} cells measured so far.** The script appends after every "
                  "cell and skips measured cells when rerun, so rerunning the command above completes the table."]
    lines += [
        "",
        "Reading the table: `random` and `magnitude` collapse because, with nothing protected, they prune "
        "layer 0's MLP, which on SmolLM2 produces the massive activations. In a side check (magnitude, 30 %, one "
        "layer pruned at a time, 512 test tokens in 256-token windows, dense 21.1) layer 0 alone gave 1029, the "
        "last layer 106, layers 1-3 about 21-22. Activation-aware scorers keep those neurons; "
        "`fbnprune.prune.protect.auto_protected_layers` finds such layers from data.",
        "",
        "Compensation: `bias` = FLAP-style W_down[:, pruned] E[h_pruned] added to the down bias; `refit` = ridge "
        "least-squares re-fit of the kept down columns + bias on the calibration activations (ridge 1e-3 x mean "
        "diagonal). `obs` scores by iterative structured OBS (10 rounds to the target) and is meant to be paired "
        "with `refit`. `taylor` = LLM-Pruner first-order |w * grad| summed over each neuron's group, gradients "
        "from the 16 calibration windows. Scoring and compensation use only the calibration windows.",
        "",
    ]
    path.write_text("\n".join(lines))


def bench_recipe() -> Recipe:
    """The protocol as a recipe: the model, its calibration, and the plan settings every cell shares (a cell sets
    its method, sparsity and compensation)."""
    pc = PROTOCOL["plan"]
    return Recipe.model_validate({
        "name": "prune-baselines", "seed": PROTOCOL["seed"],
        "model": {"source": PROTOCOL["model"], "dtype": PROTOCOL["dtype"]},
        "collect": {**PROTOCOL["calibration"], "keep_activations": True, "fallback": None},
        "prune": {"allocation": pc["allocation"], "protected_layers": pc["protected"], "round_to": pc["round_to"],
                  "min_width": pc["min_width"], "mode": pc["mode"], "ridge": PROTOCOL["refit_ridge"],
                  "seed": PROTOCOL["seed"]},
        "evaluate": None, "export": None})


def check_scoring_settings() -> None:
    """The plan stage scores with :class:`ScoreContext`'s own OBS and Taylor settings: the protocol must name
    those, or its record would describe a scoring that did not happen."""
    d = ScoreContext(model=None, adapter=None)
    used = {"obs_steps": d.obs_steps, "taylor": {"variant": d.taylor_variant, "max_sequences": d.taylor_max_sequences,
                                                 "batch_size": d.taylor_batch_size}}
    if used != {"obs_steps": PROTOCOL["obs_steps"], "taylor": PROTOCOL["taylor"]}:
        raise SystemExit(f"PROTOCOL's scoring settings differ from what fbnprune's plan stage uses: {used}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scorers", default=",".join(s for s in ["random", "magnitude", "wanda_sp", "flap", "taylor",
                                                              "obs", "fbn"] if s in SCORERS))
    ap.add_argument("--sparsities", default="0.3,0.2,0.5")
    ap.add_argument("--compensations", default=",".join(COMPENSATIONS))
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args()
    check_scoring_settings()
    scorers = args.scorers.split(",")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    comps = args.compensations.split(",")
    out = Path(args.out)
    res_file = out / "results.json"

    res = read_json(res_file)
    if res is None or res.get("protocol") != PROTOCOL:
        res = {"protocol": PROTOCOL, "cells": []}
    rec = record()
    res.update(command=rec["command"], date=rec["date"], git_sha=rec["versions"]["git_sha"], versions=rec["versions"],
               machine=rec["machine"], scorers=list(dict.fromkeys([*res.get("scorers", []), *scorers])))
    res.pop("finished", None)

    def save() -> None:
        write_json(res_file, res, indent=1)
        write_md(res, out / "results.md")

    e = PROTOCOL["evaluation"]
    bench = Bench(bench_recipe(), Protocol(seq_lens=(e["seq_len"],), ppl_source=e["source"], ppl_tokens=e["max_tokens"],
                                           batch_tokens=e["batch_size"] * e["seq_len"], progress=False),
                  command=rec["command"])
    set_gram_cache_size(len(bench.base.adapter.mlps(bench.dense)))
    share_scores()
    if "dense" not in res:
        r = bench.perplexity(bench.dense, e["seq_len"], "dense")
        res["dense"] = dict(r, params=count_params(bench.dense))
        save()
    print(f"dense ppl {res['dense']['ppl']:.3f}", flush=True)

    done = {(x["scorer"], x["sparsity"], x["compensate"]) for x in res["cells"]}
    # Priority order, so an interrupted run on a busy machine still has the most useful cells: every scorer
    # uncompensated (and obs with the re-fit it assumes), then FLAP with its bias and wanda_sp with refit,
    # then the other re-fits, then the other biases.
    cells: list[tuple[str, float, str]] = []
    for tier in range(4):
        for sp in sparsities:
            for sc in scorers:
                for cp in comps:
                    if cp == "none" or (sc, cp) == ("obs", "refit"):
                        t = 0
                    elif (sc, cp) in (("flap", "bias"), ("wanda_sp", "refit")):
                        t = 1
                    else:
                        t = 2 if cp == "refit" else 3
                    if t == tier and (sc, sp, cp) not in done:
                        cells.append((sc, sp, cp))
    res["grid"] = [list(c) for c in sorted(done | set(cells))]
    for sc, sp, cp in cells:
        if sc not in SCORERS:
            print(f"skip {sc}: not registered", flush=True)
            continue
        t0 = time.perf_counter()
        r = bench.prune(bench.recipe_with(method=sc, sparsity=sp, compensate=cp))
        assert r.plan is not None
        ppl = bench.perplexity(r.lm.model, e["seq_len"], f"{sc} {sp} {cp}")
        score_s = r.report["seconds"]["discover"] + r.report["seconds"]["plan"]
        cell = {"scorer": sc, "sparsity": sp, "compensate": cp, "ppl": ppl["ppl"], "nll": ppl["nll"],
                "achieved_sparsity": r.plan.sparsity, "kept_width": r.plan.kept_widths[0],
                "params_removed": r.plan.info.get("params_removed"), "score_seconds": round(score_s, 1),
                "seconds": round(time.perf_counter() - t0 - score_s, 1)}
        rep = r.report.get("compensation")
        if rep:
            lay = rep["layers"].values()
            cell["refit_rel_error_mean"] = {k: sum(x[k] for x in lay) / len(lay) for k in ("pruned", "refit")}
        res["cells"].append(cell)
        save()
        print(f"{sc:10s} {sp:.2f} {cp:6s} ppl {ppl['ppl']:9.3f}  ({cell['seconds']} s)", flush=True)
        del r
    res["finished"] = now()
    save()


if __name__ == "__main__":
    main()
