"""Full evaluation suite, dense vs pruned, under the pinned protocol (docs/evaluation.md).

Three parts, so the dense and pruned runs can go in separate processes and a killed run resumes where it stopped
(every finished task / perplexity is saved at once into ``<out>/<part>.json``):

    python benchmarks/eval_suite/run_suite.py --part dense  --out benchmarks/eval_suite/results/smollm2-135m
    python benchmarks/eval_suite/run_suite.py --part pruned --out benchmarks/eval_suite/results/smollm2-135m
    python benchmarks/eval_suite/run_suite.py --part report --out benchmarks/eval_suite/results/smollm2-135m

The pruned model: ``wanda_sp`` scores, uniform allocation, slice, ``--sparsity`` of the MLP neurons, calibrated on
8192 tokens of wikitext2-valid (512-token windows, seed 0) — the quickstart recipe's pruning. The ``pruned`` part
also measures data-free retention (KL, top-1 vs dense on held-out C4 text) and size/speed of both models.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

SUITE = ["piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "openbookqa", "copa", "sciq", "blimp"]
# order of the steps: cheapest first (boolq's long passages are almost half of the suite's tokens)
STEPS = ["copa", "openbookqa", "winogrande", "arc_challenge", "arc_easy", "piqa", "sciq", "blimp", "ppl@128",
         "ppl@2048", "boolq"]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_avg_at_start": os.getloadavg()}


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def save(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def prune_copy(lm: Any, sparsity: float) -> tuple[Any, dict[str, Any]]:
    """The quickstart pruning: wanda_sp, uniform widths, slice; calibrated on wikitext2-valid (8192 tokens)."""
    from fbnprune.arch import get_adapter
    from fbnprune.collect import collect, make_sequences
    from fbnprune.prune import ScoreContext, apply_plan_, make_plan, score_neurons

    model = copy.deepcopy(lm.model)
    adapter = get_adapter(model)
    calib = make_sequences(lm.tokenizer, "wikitext2-valid", n_tokens=8192, seq_len=512, mode="pack", seed=0)
    store = collect(model, calib, model_info=lm.info, batch_size=4, keep_activations=True, drop_first=1)
    scores = score_neurons("wanda_sp", ScoreContext(model=model, adapter=adapter, store=store,
                                                     sequences=calib.sequences, seed=0))
    plan = make_plan(scores, sparsity=sparsity, param_fraction=None, model=model, adapter=adapter,
                     allocation="uniform", protected=[], min_width=8, round_to=8)
    apply_plan_(model, plan, mode="slice")
    info = {"method": "wanda_sp", "sparsity": plan.sparsity, "allocation": "uniform", "mode": "slice",
            "calibration": {"source": "wikitext2-valid", "tokens": calib.n_tokens, "seq_len": 512,
                            "sha256": calib.sha256}, "kept_widths": sorted(set(plan.kept_widths))}
    return model, info


def evaluate_part(part: str, args: argparse.Namespace, out: Path) -> None:
    from fbnprune.evaluate import perplexity
    from fbnprune.evaluate.harness import evaluate_tasks
    from fbnprune.evaluate.ppl import token_stream
    from fbnprune.models import load_model

    path = out / f"{part}.json"
    res = load(path) or {"part": part, "model": args.model, "tasks": {}, "task_settings": {}, "perplexity": {}}
    res.setdefault("runs", []).append({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                       "command": " ".join([sys.executable, *sys.argv]), "machine": machine(),
                                       "git_sha": git_sha()})
    lm = load_model(args.model)
    model = lm.model
    if part == "pruned":
        model, info = prune_copy(lm, args.sparsity)
        res["pruning"] = info
    model.eval()
    t_part = time.perf_counter()
    if part == "pruned" and "agreement" not in res:  # cheap steps first, so a partial run already has them
        from fbnprune.collect import make_sequences
        from fbnprune.evaluate import next_token_agreement

        held = make_sequences(lm.tokenizer, "c4", n_tokens=8192, seq_len=256, mode="pack", seed=1234)
        a = next_token_agreement(lm.model, model, held.sequences)
        a.update(source="c4 (held out: not the calibration text)", seq_len=256, sha256=held.sha256)
        res["agreement"] = a
        save(path, res)
    if part == "pruned" and "model_stats" not in res:
        from fbnprune.evaluate.speed import model_stats

        # interleave dense and pruned timings so a change in machine load hits both alike
        s = {"dense": model_stats(lm.model, lm.tokenizer), "pruned": model_stats(model, lm.tokenizer)}
        s2 = {"dense": model_stats(lm.model, lm.tokenizer), "pruned": model_stats(model, lm.tokenizer)}
        for k in s:
            g1, g2 = s[k]["generation"], s2[k]["generation"]
            s[k]["generation"] = g1 if g1["tokens_per_s"] >= g2["tokens_per_s"] else g2
            s[k]["generation"]["note"] = "better of two interleaved measurements (dense, pruned, dense, pruned)"
        res["model_stats"] = s
        save(path, res)
    for step in args.steps:
        if step.startswith("ppl@"):
            seq_len = int(step[4:])
            key = f"wikitext2-test@{seq_len}"
            if key in res["perplexity"]:
                continue
            toks = token_stream(lm.tokenizer, "wikitext2-test", args.ppl_max_tokens or None)
            r = perplexity(model, toks, seq_len=seq_len, batch_size=max(1, 4096 // seq_len), desc=f"ppl@{seq_len}")
            r["source"] = "wikitext2-test"
            r["max_tokens"] = args.ppl_max_tokens or None
            res["perplexity"][key] = r
            res.setdefault("step_seconds", {})[step] = r["seconds"]
            save(path, res)
            print(f"[suite] {part}: {key} ppl={r['ppl']:.3f} ({r['seconds']} s)", flush=True)
            continue
        task = step
        if task in res["tasks"]:
            print(f"[suite] {part}: {task} already done, skipping", flush=True)
            continue
        t0 = time.perf_counter()
        r = evaluate_tasks(model, lm.tokenizer, [task], limit=args.limit, batch_size=args.batch_size,
                           blimp_per_paradigm=args.blimp_per_paradigm)
        res["tasks"][task] = r["tasks"][task]
        res["task_settings"][task] = r["settings"]
        res.setdefault("step_seconds", {})[task] = round(time.perf_counter() - t0, 1)
        save(path, res)
        e = r["tasks"][task]
        print(f"[suite] {part}: {task} acc={e.get('acc')} acc_norm={e.get('acc_norm')} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    res["runs"][-1]["seconds"] = round(time.perf_counter() - t_part, 1)
    save(path, res)


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
    (out / "report.json").write_text(json.dumps(rep, indent=2, default=str))
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
