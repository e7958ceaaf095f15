"""Parallel vs sequential pruning on the real models, under the leaderboard's protocol (perplexity, retention).

    python benchmarks/sequential/run.py --model smollm2-135m --cells 'obs-refit-50*' 'fbn-50*'
    python benchmarks/sequential/run.py --model gemma3-270m
    python benchmarks/sequential/summarize.py          # results.json, results.md, the error-by-layer figure

A cell is a leaderboard grid recipe (``benchmarks/leaderboard/grid/<model>/<method>-<sparsity>.yaml``) in one of
three modes: ``parallel`` (the recipe as it is: every layer scored and re-fitted on the dense model's
activations), ``seq-dense`` (``prune.sequential: true``, the re-fit aimed at the dense model's own MLP output) and
``seq-layer`` (sequential, the re-fit aimed at the dense weights' output on the pruned inputs). Cell names are
``<grid cell>@<mode>``. Each cell records ppl@128 and ppl@2048 on WikiText-2 test, KL and top-1 agreement with the
dense model on held-out c4 text (the leaderboard's retention column), and the error of every layer's MLP output and
residual stream against the dense model on the calibration tokens (:func:`fbnprune.prune.sequential.layer_errors`).
Tasks are left to the leaderboard cells of the winning variants. One JSON per cell in ``results/<model>/``; a rerun
skips finished cells. Peak memory is measured apart, one process per mode: ``memory.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.leaderboard.run import bench_protocol, protocol  # noqa: E402
from benchmarks.runner import Bench, CellDir  # noqa: E402
from fbnprune.provenance import machine  # noqa: E402
from fbnprune.prune.plan import count_params  # noqa: E402
from fbnprune.prune.sequential import layer_errors  # noqa: E402
from fbnprune.recipe import load_recipe  # noqa: E402
from fbnprune.run import say  # noqa: E402

GRID = ROOT / "benchmarks" / "leaderboard" / "grid"
MODES = {"parallel": [], "seq-dense": ["prune.sequential=true", "prune.refit_target=dense"],
         "seq-layer": ["prune.sequential=true", "prune.refit_target=layer"]}
#: the grid cells compared, most informative first (50 % is where errors compound)
DEFAULT_CELLS = ["obs-refit-50", "fbn-50", "obs-refit-30", "fbn-30", "obs-refit-20", "fbn-20", "obs-refit-10",
                 "fbn-10", "wanda_sp-refit-50", "wanda_sp-refit-30"]


def cells(model: str, patterns: list[str]) -> list[tuple[str, str, str]]:
    """(cell name, grid cell, mode) for every grid cell x mode matching ``patterns``, in the order of the first
    pattern each matches, then the default order."""
    out = []
    for base in DEFAULT_CELLS:
        if not (GRID / model / f"{base}.yaml").is_file():
            continue
        for mode in MODES:
            name = f"{base}@{mode}"
            hits = [i for i, p in enumerate(patterns) if fnmatch.fnmatch(name, p)]
            if hits:
                out.append((min(hits), len(out), (name, base, mode)))
    return [c for *_, c in sorted(out)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=sorted(p.name for p in GRID.iterdir() if p.is_dir()))
    ap.add_argument("--cells", nargs="*", default=["*"], help="glob patterns of '<grid cell>@<mode>' names")
    args = ap.parse_args(argv)
    proto = protocol()
    todo_all = cells(args.model, args.cells)
    if not todo_all:
        raise SystemExit(f"no cell matches {args.cells}")
    out = CellDir(HERE / "results" / args.model)
    todo = [c for c in todo_all if not out.done(c[0])]
    say(f"{args.model}: {len(todo_all)} cells selected, {len(todo)} to run")
    if not todo and out.done("dense"):
        return 0
    c = proto["calibration"]
    calib = [f"collect.source={c['source']}", f"collect.n_tokens={c['n_tokens']}", f"collect.seq_len={c['seq_len']}",
             f"collect.seed={c['seed']}", f"collect.drop_first={c['drop_first']}", "collect.keep_activations=true"]
    bench = Bench(load_recipe(GRID / args.model / f"{todo_all[0][1]}.yaml", calib),
                  dataclasses.replace(bench_protocol(proto), tasks=()))
    assert bench.base.calib is not None
    seqs = bench.base.calib.sequences
    if not out.done("dense"):
        t0 = time.perf_counter()
        out.write("dense", {"cell": "dense", "model": args.model, "eval": bench.evaluate(bench.dense, "dense"),
                            "params": count_params(bench.dense), "seconds": round(time.perf_counter() - t0, 1),
                            "machine": machine(), "command": bench.command, "provenance": bench.provenance()})
    for name, base, mode in todo:
        t0, started = time.perf_counter(), machine()
        say(f"cell {name}")
        recipe = load_recipe(GRID / args.model / f"{base}.yaml", calib + MODES[mode])
        r = bench.prune(recipe)
        prune_s = round(time.perf_counter() - t0, 1)
        res = bench.evaluate(r.lm.model, name)
        errors = layer_errors(bench.dense, r.lm.model, seqs, drop_first=c["drop_first"])
        assert r.plan is not None
        p = recipe.prune
        out.write(name, {
            "cell": name, "grid_cell": base, "model": args.model, "mode": mode, "method": p.method,
            "compensate": p.compensate, "sparsity": r.plan.sparsity, "target_sparsity": p.sparsity,
            "kept_widths": r.plan.kept_widths, "eval": res, "layer_errors": errors,
            "params": count_params(r.lm.model), "prune_seconds": prune_s,
            "seconds": round(time.perf_counter() - t0, 1), "machine": started,
            "loadavg_at_end": os.getloadavg(), "command": bench.command, "recipe": recipe.model_dump(mode="json"),
            "provenance": bench.provenance(recipe),
        })
        say(f"{name}: ppl@2048 {res['ppl2048']['ppl']:.2f}, KL {res['retention']['kl']:.4f}, last-layer hidden "
            f"error {errors['hidden_error'][-1]:.4f}")
        del r
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
