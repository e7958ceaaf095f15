"""Full evaluation suite, dense vs pruned, under the pinned protocol (docs/evaluation.md).

Three parts, so the dense and pruned runs can go in separate processes and a killed run resumes where it stopped
(every finished task / perplexity is saved at once into ``<out>/<part>.json``):

    python benchmarks/eval_suite/run_suite.py --part dense  --out benchmarks/eval_suite/results/smollm2-135m
    python benchmarks/eval_suite/run_suite.py --part pruned --out benchmarks/eval_suite/results/smollm2-135m
    python benchmarks/eval_suite/run_suite.py --part report --out benchmarks/eval_suite/results/smollm2-135m

The pruned model: ``wanda_sp`` scores, uniform allocation, slice, ``--sparsity`` of the MLP neurons, calibrated on
8192 tokens of wikitext2-valid (512-token windows, seed 0, first position dropped): the quickstart recipe's pruning
when the committed results were measured. The ``pruned`` part also measures data-free retention (KL, top-1 vs
dense on held-out C4 text) and size/speed of both models. Loading, calibration, pruning and the measurements are
``benchmarks/runner.py``'s (fbnprune's own stages), shared with the other benchmarks.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the checkout's root, for benchmarks.runner

from benchmarks.runner import Bench, Protocol, read_json, record, write_json  # noqa: E402
from fbnprune.recipe import Recipe  # noqa: E402

SUITE = ["piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "openbookqa", "copa", "sciq", "blimp"]
# order of the steps: cheapest first (boolq's long passages are almost half of the suite's tokens)
STEPS = ["copa", "openbookqa", "winogrande", "arc_challenge", "arc_easy", "piqa", "sciq", "blimp", "ppl@128",
         "ppl@2048", "boolq"]


def load(path: Path) -> dict[str, Any]:
    return read_json(path) or {}


def suite_recipe(model: str, sparsity: float) -> Recipe:
    """The suite's pruning as a recipe: wanda_sp, uniform widths, slice, nothing protected, calibrated on 8192
    tokens of wikitext2-valid in packed 512-token windows (seed 0), the first position of each left out."""
    return Recipe.model_validate({
        "name": "eval-suite", "model": {"source": model},
        "collect": {"source": "wikitext2-valid", "n_tokens": 8192, "seq_len": 512, "mode": "pack", "seed": 0,
                    "batch_size": 4, "keep_activations": True, "drop_first": 1, "fallback": None},
        "prune": {"method": "wanda_sp", "sparsity": sparsity, "allocation": "uniform", "mode": "slice",
                  "protected_layers": [], "min_width": 8, "round_to": 8, "compensate": "none"},
        "evaluate": None, "export": None})


def evaluate_part(part: str, args: argparse.Namespace, out: Path) -> None:
    path = out / f"{part}.json"
    res = load(path) or {"part": part, "model": args.model, "tasks": {}, "task_settings": {}, "perplexity": {}}
    rec = record()
    res.setdefault("runs", []).append({"started": rec["date"], "command": rec["command"], "machine": rec["machine"],
                                       "git_sha": rec["versions"]["git_sha"], "versions": rec["versions"]})
    protocol = Protocol(ppl_source="wikitext2-test", ppl_tokens=args.ppl_max_tokens or None,
                        task_options={"limit": args.limit, "batch_size": args.batch_size,
                                      "blimp_per_paradigm": args.blimp_per_paradigm},
                        retention={"source": "c4", "n_tokens": 8192, "seq_len": 256, "seed": 1234, "mode": "pack"})
    # the dense part needs no calibration
    bench = Bench(suite_recipe(args.model, args.sparsity), protocol, calibrate=part == "pruned",
                  command=rec["command"])
    model, tok = bench.dense, bench.tokenizer
    if part == "pruned":
        pruned = bench.prune(bench.recipe)
        assert pruned.plan is not None and bench.base.calib is not None
        model = pruned.lm.model
        res["pruning"] = {"method": "wanda_sp", "sparsity": pruned.plan.sparsity, "allocation": "uniform", "mode": "slice",
                          "calibration": {"source": "wikitext2-valid", "tokens": bench.base.calib.n_tokens,
                                          "seq_len": 512, "sha256": bench.base.calib.sha256},
                          "kept_widths": sorted(set(pruned.plan.kept_widths))}
    t_part = time.perf_counter()
    if part == "pruned" and "agreement" not in res:  # cheap steps first, so a partial run already has them
        a = bench.retention(model)
        a.update(source="c4 (held out: not the calibration text)", seq_len=256)
        res["agreement"] = a
        write_json(path, res)
    if part == "pruned" and "model_stats" not in res:
        from fbnprune.evaluate.speed import model_stats

        # interleave dense and pruned timings so a change in machine load hits both alike
        s = {"dense": model_stats(bench.dense, tok), "pruned": model_stats(model, tok)}
        s2 = {"dense": model_stats(bench.dense, tok), "pruned": model_stats(model, tok)}
        for k in s:
            g1, g2 = s[k]["generation"], s2[k]["generation"]
            s[k]["generation"] = g1 if g1["tokens_per_s"] >= g2["tokens_per_s"] else g2
            s[k]["generation"]["note"] = "better of two interleaved measurements (dense, pruned, dense, pruned)"
        res["model_stats"] = s
        write_json(path, res)
    for step in args.steps:
        if step.startswith("ppl@"):
            seq_len = int(step[4:])
            key = f"wikitext2-test@{seq_len}"
            if key in res["perplexity"]:
                continue
            r = bench.perplexity(model, seq_len)
            r["source"] = "wikitext2-test"
            r["max_tokens"] = args.ppl_max_tokens or None
            res["perplexity"][key] = r
            res.setdefault("step_seconds", {})[step] = r["seconds"]
            write_json(path, res)
            print(f"[suite] {part}: {key} ppl={r['ppl']:.3f} ({r['seconds']} s)", flush=True)
            continue
        task = step
        if task in res["tasks"]:
            print(f"[suite] {part}: {task} already done, skipping", flush=True)
            continue
        t0 = time.perf_counter()
        r = bench.tasks(model, [task])
        res["tasks"][task] = r["tasks"][task]
        res["task_settings"][task] = r["settings"]
        res.setdefault("step_seconds", {})[task] = round(time.perf_counter() - t0, 1)
        write_json(path, res)
        e = r["tasks"][task]
        print(f"[suite] {part}: {task} acc={e.get('acc')} acc_norm={e.get('acc_norm')} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    res["runs"][-1]["seconds"] = round(time.perf_counter() - t_part, 1)
    write_json(path, res)


def report_part(out: Path) -> None:
    from fbnprune.evaluate.report import retention_report, to_markdown

    d, p = load(out / "dense.json"), load(out / "pruned.json")
    if not d or not p:
        raise SystemExit(f"need {out}/dense.json and {out}/pruned.json")
    stats = p.get("model_stats") or {}
    rep = retention_report({"tasks": d["tasks"], "settings": next(iter(d["task_settings"].values()), None)},
                           {"tasks": p["tasks"], "settings": next(iter(p["task_settings"].values()), None)},
                           stats.get("dense"), stats.get("pruned"), dense_ppl=d["perplexity"],
                           pruned_ppl=p["perplexity"], agreement=p.get("agreement"),
                           meta={"model": d["model"], "pruning": p.get("pruning"),
                                 "runs": {"dense": d["runs"], "pruned": p["runs"]}})
    todo = [st for st in STEPS for part in (d, p)
            if (st.startswith("ppl@") and f"wikitext2-test@{st[4:]}" not in part["perplexity"])
            or (not st.startswith("ppl@") and st not in part["tasks"])]
    rep["unfinished_steps"] = sorted(set(todo), key=STEPS.index)
    banner = (f"**Partial: steps not finished in both runs yet: {', '.join(rep['unfinished_steps'])}.**\n\n"
              if todo else "")
    write_json(out / "report.json", rep)
    md = to_markdown(rep)
    (out / "report.md").write_text(f"# Retention report: {d['model']}, dense vs pruned\n\n{banner}{md}")
    print(banner, end="")
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["dense", "pruned", "report"], required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--steps", default=",".join(STEPS),
                    help="tasks and ppl@<seq_len> entries, run in this order (cheap first, so partial runs are useful)")
    ap.add_argument("--limit", type=int, default=None, help="items per task: smoke tests only")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--blimp-per-paradigm", type=int, default=100)
    ap.add_argument("--ppl-max-tokens", type=int, default=65536,
                    help="first N tokens of the test set (default 65,536; 0 = the whole set, ~12 min per length "
                         "on 2 cores)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    args.steps = [t for t in args.steps.split(",") if t]
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part == "report":
        report_part(args.out)
    else:
        evaluate_part(args.part, args, args.out)


if __name__ == "__main__":
    main()
