"""Which recovery settings to benchmark: a few candidates at one short token budget, judged on validation text.

The benchmark (``run.py``) measures on WikiText-2 *test*, so settings must not be chosen there. This probe starts
from the benchmark's pruned model (OBS + re-fit, the leaderboard's calibration), trains each candidate for the same
number of tokens on the benchmark's training text (c4 + technical) and reports perplexity on the first
``--tokens`` tokens of WikiText-2 *validation* (the split published for such choices) in windows of 256 tokens
(the training length) and 2,048 (the benchmark's length). Candidates change one thing from the defaults each:

* ``base``: full fine-tuning of the MLP, lr 1e-4, 8 windows of 256 tokens per step (the flagship's settings);
* ``seq2048``: one window of 2,048 tokens per step (same tokens per step), so training sees the positions that
  ppl@2048 scores;
* ``lr3e-4``: three times the learning rate;
* ``all``: every projection of the decoder layers trains, not only the MLP;
* ``lr3e-4+seq2048``: the two together;
* ``lr1e-3``: ten times the learning rate;
* ``lr3e-4+all``: three times the learning rate on every projection;
* ``lr3e-4+b2``: three times the learning rate with 2 windows per step, so the same tokens make four times
  as many optimizer steps;
* ``lr5e-4+all`` and ``lr3e-4+all+T2``: every projection at a rate between 3e-4 and 1e-3, or at 3e-4 with the
  KL taken at temperature 2 (softer teacher distributions);
* ``lr3e-4+all+lm0.5``: every projection at 3e-4 with the next-token loss on the training text added at half the
  KL's weight;
* ``b2x4+all+w4+lr1e-4`` and ``...+lr3e-5``: for Gemma 3, every projection at lr 1e-4 or 3e-5, eight windows a
  step as 2 x 4 micro-batches (its logits take four times the memory), the first four steps ramped.

    OMP_NUM_THREADS=1 python benchmarks/recovery/settings.py --model smollm2-135m --sparsity 0.3 --tokens-budget 43760

One row per candidate in ``settings.json`` (appended as each finishes; a rerun skips measured candidates).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from benchmarks.runner import Bench, Protocol, read_json, record, write_json  # noqa: E402
from fbnprune.recover import RecoverConfig, recover_  # noqa: E402
from fbnprune.recover.report import spent  # noqa: E402

CANDIDATES: dict[str, dict[str, Any]] = {
    "base": {},
    "seq2048": {"seq_len": 2048, "batch_size": 1},
    "lr3e-4": {"lr": 3e-4},
    "all": {"target_modules": ["all"]},
    "lr3e-4+seq2048": {"lr": 3e-4, "seq_len": 2048, "batch_size": 1},
    "lr1e-3": {"lr": 1e-3},
    "lr3e-4+all": {"lr": 3e-4, "target_modules": ["all"]},
    "lr3e-4+b2": {"lr": 3e-4, "batch_size": 2},
    "lr5e-4+all": {"lr": 5e-4, "target_modules": ["all"]},
    "lr3e-4+all+T2": {"lr": 3e-4, "target_modules": ["all"], "temperature": 2.0},
    "lr3e-4+all+lm0.5": {"lr": 3e-4, "target_modules": ["all"], "lm_weight": 0.5},
    # Gemma 3 (262k vocabulary: 2 windows x 4 micro-batches for memory, the same tokens a step), every projection,
    # the first 4 steps ramped: a 5-minute budget is 8 steps, and lr 3e-4 unramped broke the first step
    "b2x4+all+w4+lr1e-4": {"batch_size": 2, "grad_accum": 4, "target_modules": ["all"], "warmup_steps": 4},
    "b2x4+all+w4+lr3e-5": {"batch_size": 2, "grad_accum": 4, "target_modules": ["all"], "warmup_steps": 4,
                           "lr": 3e-5},
}


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    import run as bench_run  # the benchmark's recipe, next to this script

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--tokens-budget", type=int, default=43760, help="training tokens per candidate")
    ap.add_argument("--tokens", type=int, default=16384, help="validation tokens")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--seq-lens", default="256,2048", help="validation window lengths")
    ap.add_argument("--out", type=Path, default=HERE / "settings.json")
    args = ap.parse_args(argv)
    names = [c for c in args.candidates.split(",") if c]
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; known: {', '.join(CANDIDATES)}")
    out = args.out
    rec = record()
    rows = (read_json(out) or {"rows": []})["rows"]
    key = (Path(args.model).name, args.sparsity, args.tokens_budget)
    done = {r["candidate"] for r in rows if (r["model"], r["sparsity"], r["budget_tokens"]) == key}
    names = [c for c in names if c not in done]
    if not names:
        return 0
    proto = Protocol(seq_lens=tuple(int(n) for n in args.seq_lens.split(",")), ppl_source="wikitext2-valid",
                     ppl_tokens=args.tokens, progress=False)
    bench = Bench(bench_run.bench_recipe(args.model), proto, command=rec["command"])
    pruned = bench.prune(bench.recipe_with(sparsity=args.sparsity))

    def measure(model: Any) -> dict[str, float]:
        return {f"valid_ppl{n}": bench.perplexity(model, n)["ppl"] for n in proto.seq_lens}

    dense, before = measure(bench.dense), measure(pruned.lm.model)
    for name in names:
        cfg = RecoverConfig(method="full", data=["c4", "technical"], max_tokens=args.tokens_budget, max_minutes=None,
                            **CANDIDATES[name])
        student = copy.deepcopy(pruned.lm.model)
        trained = recover_(bench.dense, student, bench.tokenizer, cfg, progress=False)
        after = measure(student)
        row = {"model": key[0], "sparsity": args.sparsity, "budget_tokens": args.tokens_budget, "candidate": name,
               "settings": CANDIDATES[name], "dense": dense, "before": before, "after": after,
               "gap_closed": {k: (before[k] - after[k]) / (before[k] - dense[k]) for k in after},
               "training": spent(trained), **record(rec["command"])}
        rows = (read_json(out) or {"rows": []})["rows"] + [row]
        write_json(out, {"rows": rows}, indent=1)
        print(name, {k: round(v, 3) for k, v in row["gap_closed"].items()}, after, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
