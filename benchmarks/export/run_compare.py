"""Benchmark: dense vs 30%-MLP-pruned slim export of a built-in model, measured in fresh processes.

Writes ``benchmarks/export/<model>-compare.json``. Which neurons are removed does not change size or speed, so the
cheap data-free ``magnitude`` scorer is used with ``uniform`` allocation (stock-loadable). For Llama models an f16
GGUF of the slim model is also written and verified through transformers' GGUF loader.

    nice .venv/bin/python benchmarks/export/run_compare.py smollm2-135m [--threads 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the checkout's root, for benchmarks.runner

from benchmarks.runner import command_line, write_json  # noqa: E402
from fbnprune.arch import get_adapter  # noqa: E402
from fbnprune.export import export_hf  # noqa: E402
from fbnprune.export.compare import compare, machine  # noqa: E402
from fbnprune.models import load_model  # noqa: E402
from fbnprune.prune import ScoreContext, apply_plan_, make_plan, score_neurons  # noqa: E402


def export_pair(a: argparse.Namespace, dense_dir: Path, slim_dir: Path) -> None:
    """Export the dense model and its 30%-pruned slim version (plus a verified f16 GGUF for Llama)."""
    lm = load_model(a.model)
    model, tok = lm.model, lm.tokenizer
    adapter = get_adapter(model)
    prov = {"seed": 0, "model": lm.info}
    export_hf(model, tok, dense_dir, provenance=prov)
    scores = score_neurons("magnitude", ScoreContext(model=model, adapter=adapter))
    plan = make_plan(scores, sparsity=a.sparsity, allocation="uniform")
    plan.info["method"] = "magnitude"
    apply_plan_(model, plan, mode="slice")
    gguf = None if (a.no_gguf or model.config.model_type != "llama") else "f16"
    export_hf(model, tok, slim_dir, plan=plan, provenance=prov, gguf=gguf)
    gguf_check = None
    if gguf:
        from fbnprune.export.gguf import verify_gguf

        ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
        gguf_check = verify_gguf(model, slim_dir / f"model-{gguf}.gguf", ids, dtype=gguf)
        gguf_check.update(file=f"model-{gguf}.gguf", bytes=(slim_dir / f"model-{gguf}.gguf").stat().st_size,
                          tolerance="f16-rounded in-memory model vs transformers' GGUF loader, same prompt")
        print(f"[bench] GGUF round trip: {gguf_check}", flush=True)
    info = {"method": "magnitude", "sparsity": a.sparsity, "allocation": "uniform",
            "kept_width": plan.kept_widths[0], "dense_width": plan.widths[0]}
    (slim_dir / "bench_plan.json").write_text(json.dumps({"pruning": info, "gguf_check": gguf_check}, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--work", default="outputs/export-bench")
    ap.add_argument("--no-gguf", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="measure existing exports from an earlier run of this script")
    a = ap.parse_args()
    torch.manual_seed(0)
    work = Path(a.work) / a.model
    t0 = time.time()
    dense_dir, slim_dir = work / "dense", work / "slim"
    if not (a.reuse and (slim_dir / "bench_plan.json").is_file() and (dense_dir / "config.json").is_file()):
        export_pair(a, dense_dir, slim_dir)
    saved = json.loads((slim_dir / "bench_plan.json").read_text())
    plan_info, gguf_check = saved["pruning"], saved["gguf_check"]
    rep = compare(dense_dir, slim_dir, threads=a.threads, new_tokens=a.new_tokens, rounds=a.rounds, runs=a.runs)
    rep = {
        "model": a.model,
        "command": command_line(),
        "pruning": plan_info,
        **rep,
        "gguf_check": gguf_check,
        "wall_s": round(time.time() - t0, 1),
    }
    out = HERE / f"{a.model}-compare.json"
    write_json(out, rep)
    print(f"[bench] speed-up {rep['speedup']} (target {rep['target_speedup']}, met={rep['target_met']}); "
          f"wrote {out}; machine {machine()['loadavg']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
