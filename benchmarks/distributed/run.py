"""One recipe run with 1, 2, ... processes: wall time, and whether the results equal the single-process run's.

    python benchmarks/distributed/run.py                                  # quickstart (SmolLM2-135M), 1 and 2
    python benchmarks/distributed/run.py --processes 1 2 4 --launcher accelerate
    python benchmarks/distributed/run.py --recipe my.yaml --set prune.sparsity=0.3 --out /tmp/results.json

Each process count runs the whole command line in a fresh cache directory (nothing reused from another count):
``python -m fbnprune run RECIPE`` for one process, ``torchrun --standalone --nproc_per_node P -m fbnprune run
RECIPE`` (or ``accelerate launch --multi_gpu --num_processes P``) for more. Each process gets ``cores // P``
threads (``--threads``), so every count uses the same cores. ``wall_s`` is the command's wall time, interpreter
start and model load included.

A run equals the single-process one when its keep plan is the same file, every perplexity NLL and the retention
numbers are equal to the last bit, the networks' per-layer summary is the same, and every exported tensor agrees
to float rounding (relative 1e-5: statistics, Grams and gradients are sums reduced over ranks in another order).
``details`` says which of these held.

Rows go to ``benchmarks/distributed/results.json`` (``--out``): ``processes``, ``wall_s``, ``equal_to_single``,
``details``, ``launcher``, ``threads_per_process``, and the command, date, machine and versions of
:func:`benchmarks.runner.record`. ``generation speed`` is off by default (``evaluate.speed=false``): it is timed on
rank 0 alone, a fixed cost that would hide how the rest scales.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.runner import command_line, record, write_json  # noqa: E402

DEFAULT_SET = ("evaluate.speed=false",)
LAUNCHERS = ("torchrun", "accelerate")


def command(recipe: str, overrides: list[str], out: Path, processes: int, launcher: str) -> list[str]:
    """The command line a user would type for this process count."""
    run = ["-m", "fbnprune", "run", recipe, *overrides, "-o", str(out)]
    if processes == 1:
        return [sys.executable, *run]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                *run]
    # accelerate's CPU multi-process launch goes through mpirun; --multi_gpu is its torchrun path, and fbnprune picks
    # gloo or NCCL from the recipe's model.device
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *run]


def run_once(recipe: str, overrides: list[str], work: Path, processes: int, launcher: str, threads: int,
             timeout: float) -> dict[str, Any]:
    """One command in a fresh cache directory; its wall time and where its outputs are."""
    out, cache = work / f"p{processes}" / "out", work / f"p{processes}" / "cache"
    shutil.rmtree(out.parent, ignore_errors=True)
    cmd = command(recipe, overrides, out, processes, launcher)
    env = dict(os.environ, FBNPRUNE_CACHE=str(cache), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    print(f"[distributed bench] {processes} process(es): {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=ROOT, timeout=timeout, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out.parent / "log.txt").parent.mkdir(parents=True, exist_ok=True)
    (out.parent / "log.txt").write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed (exit {p.returncode}); log: {out.parent / 'log.txt'}\n"
                         f"{p.stderr[-2000:]}")
    shown = f"OMP_NUM_THREADS={threads} {Path(sys.executable).name} {' '.join(cmd[1:])}".replace(str(out), "OUT")
    return {"out": out, "wall_s": round(wall, 1), "command": shown}


def compare(single: Path, other: Path) -> dict[str, bool]:
    """Which results of ``other`` equal the single-process run's (see module doc)."""
    def report(d: Path) -> dict[str, Any]:
        return json.loads((d / "report.json").read_text())

    a, b = report(single), report(other)
    res_a, res_b = a.get("results", {}), b.get("results", {})
    ppl = [(label, k) for label in ("dense", "pruned") for k in res_a.get(label, {}) if k.startswith("ppl_")]
    details = {
        "keep_plan": (single / "keep_plan.json").read_text() == (other / "keep_plan.json").read_text(),
        "perplexity": all(res_a[lab][k]["nll"] == res_b.get(lab, {}).get(k, {}).get("nll") for lab, k in ppl),
        "retention": (res_a.get("pruned", {}).get("retention") == res_b.get("pruned", {}).get("retention")),
        "networks": (a.get("networks", {}).get("per_layer") == b.get("networks", {}).get("per_layer")),
    }
    weights = sorted(single.glob("*/*.safetensors"))
    if weights:
        import torch
        from safetensors.torch import load_file

        same = True
        for f in weights:
            g = other / f.relative_to(single)
            if not g.is_file():
                same = False
                break
            x, y = load_file(str(f)), load_file(str(g))
            same = same and set(x) == set(y) and all(
                torch.allclose(x[k].float(), y[k].float(), rtol=1e-5, atol=1e-6) for k in x)
        details["export"] = same
    return details


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="quickstart", help="recipe file or bundled name (default: quickstart)")
    ap.add_argument("--set", dest="overrides", action="append", default=None, metavar="key=value",
                    help=f"recipe override, repeatable (default: {' '.join(DEFAULT_SET)})")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--launcher", choices=LAUNCHERS, default="torchrun")
    ap.add_argument("--threads", type=int, default=None, help="threads per process (default: cores // processes)")
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    ap.add_argument("--work", type=Path, default=None, help="where runs write (default: a temporary directory)")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per command")
    args = ap.parse_args(argv)
    counts = sorted(set(args.processes))
    if counts[0] != 1:
        counts = [1, *counts]  # the reference every other count is compared with
    overrides = list(DEFAULT_SET if args.overrides is None else args.overrides)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    work = args.work or Path(tempfile.mkdtemp(prefix="fbnprune-dist-bench-"))
    rows = []
    try:
        runs = {}
        for n in counts:
            threads = args.threads or max(1, cores // n)
            runs[n] = run_once(args.recipe, overrides, work, n, args.launcher, threads, args.timeout)
            details = compare(runs[1]["out"], runs[n]["out"]) if n > 1 else {}
            rows.append({"processes": n, "wall_s": runs[n]["wall_s"],
                         "equal_to_single": all(details.values()) if n > 1 else True, "details": details,
                         "launcher": None if n == 1 else args.launcher, "threads_per_process": threads,
                         **record(runs[n]["command"])})
            print(f"[distributed bench] {n} process(es): {runs[n]['wall_s']} s"
                  + (f", equal to single: {rows[-1]['equal_to_single']} {details}" if n > 1 else ""), flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    write_json(args.out, {"recipe": args.recipe, "overrides": overrides, "rows": rows,
                          "benchmark": record(command_line(sys.argv if argv is None else [sys.argv[0], *argv]))})
    print(f"[distributed bench] wrote {args.out}", flush=True)
    return 0 if all(r["equal_to_single"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
