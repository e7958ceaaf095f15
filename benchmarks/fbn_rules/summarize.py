"""Build benchmarks/fbn_rules/results.md from the per-cell JSONs written by run.py (all models and slices).

    .venv/bin/python benchmarks/fbn_rules/summarize.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent
ORDER = ["random", "wanda_sp", "flap", "obs", "obs_global", "fbn_maxz", "fbn_maxz_runs4", "fbn_recurrence",
         "fbn_obs_b1", "fbn_obs_b4", "fbn_obs_z1", "fbn_alloc_p25", "fbn_alloc_m25"]
#: column order within a sparsity: no compensation, then the cheapest to the most specialised rebuild
COMPENSATIONS = ["none", "bias", "refit", "netrefit", "corrrefit", "anchored"]


def comp_order(c: str) -> tuple[int, str]:
    """A fixed place for every compensation (a set's order changes from run to run with string hashing)."""
    return (COMPENSATIONS.index(c) if c in COMPENSATIONS else len(COMPENSATIONS), c)


def table(d: Path) -> list[str]:
    dense = json.loads((d / "dense.json").read_text()) if (d / "dense.json").is_file() else None
    cells = [json.loads(p.read_text()) for p in sorted(d.glob("*__*.json"))]
    if not cells:
        return []
    cols = sorted({(c["sparsity"], c["compensate"]) for c in cells}, key=lambda x: (x[0], comp_order(x[1])))
    variants = sorted({c["variant"] for c in cells}, key=lambda v: (ORDER.index(v) if v in ORDER else 99, v))
    first = cells[0]
    m = first["machine"]
    lines = [
        f"### {first['protocol']['model']}, perplexity on the first {first['protocol']['eval_tokens']:,} tokens of "
        "wikitext2-test" + (f", tasks on {first['protocol']['task_limit']}-item subsets" if first["protocol"].get(
            "tasks") else "") + ("; calibration keeps the first position of each sequence (the attention sink)"
                                 if first["protocol"]["calibration"].get("drop_first") == 0 else
                                 "; calibration leaves the first position out")
        + f", calibration seed {first['protocol']['calibration'].get('seed', 0)}",
        "",
        f"Dense perplexity: **{dense['ppl']:.2f}**" if dense else "Dense perplexity: (not measured)",
        "",
        f"Commands (per cell in the JSON): e.g. `{first['command']}`; machine {m['platform']}, {m['cpus']} CPUs, "
        f"torch {m['torch']}, load average {m['loadavg']} at the first cell ({m['note']}).",
        "",
        "| variant | " + " | ".join(f"{int(round(s * 100))}% {c}" for s, c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for v in variants:
        row = [v]
        for s, c in cols:
            hit = [x for x in cells if x["variant"] == v and x["sparsity"] == s and x["compensate"] == c]
            row.append(f"{hit[0]['ppl']:.2f}" if hit else "-")
        lines.append("| " + " | ".join(row) + " |")
    tasks = [c for c in cells if c.get("tasks")]
    if tasks:
        names = sorted({t for c in tasks for t in c["tasks"]})
        lines += ["", "Task accuracy (acc, SUBSET of items per task; mean = unweighted mean over tasks):", "",
                  "| variant | sparsity | comp | " + " | ".join(names) + " | mean |",
                  "|---|---|---|" + "---|" * (len(names) + 1)]
        for c in [*([dense] if dense and dense.get("tasks") else []), *tasks]:
            accs = [c["tasks"][n].get("acc", float("nan")) for n in names]
            lines.append(f"| {c['variant']} | {c.get('sparsity', 0)} | {c.get('compensate', '-')} | "
                         + " | ".join(f"{a:.3f}" for a in accs) + f" | {sum(accs) / len(accs):.3f} |")
    return lines + [""]


def seed_table(model_dir: Path, base: str = "ppl8192_drop0") -> list[str]:
    """Cells measured under several calibration seeds: per-seed perplexity and each margin's mean and spread.

    Why: the rules differ by about 1 %, so whether a margin is a property of the rule or of the calibration
    windows decides what may be claimed; the margins are paired (same windows for every variant of a seed).
    """
    dirs = [model_dir / base, *sorted(model_dir.glob(f"{base}_seed*"))]
    runs: dict[int, dict[tuple[str, float, str], float]] = {}
    for d in dirs:
        for p in d.glob("*__*.json"):
            c = json.loads(p.read_text())
            runs.setdefault(c["protocol"]["calibration"].get("seed", 0), {})[
                (c["variant"], c["sparsity"], c["compensate"])] = c["ppl"]
    if len(runs) < 2:
        return []
    common = sorted(set.intersection(*(set(r) for r in runs.values())),
                    key=lambda k: (k[1], ORDER.index(k[0]) if k[0] in ORDER else 99, k[0], comp_order(k[2])))
    if len(common) < 2:
        return []
    seeds = sorted(runs)
    name = [f"{v} {int(round(sp * 100))}% {cp}" for v, sp, cp in common]
    lines = [f"### {model_dir.name}: calibration seeds {', '.join(map(str, seeds))} ({base}; the variants every seed "
             "has)", "", "| seed | " + " | ".join(name) + " |", "|---|" + "---|" * len(common)]
    lines += [f"| {s} | " + " | ".join(f"{runs[s][k]:.2f}" for k in common) + " |" for s in seeds]
    # margins against fbnprune's rule where it was measured: "is fbn ahead?" is the question asked of them
    ref = next((k for k in common if k[0] == "fbn_redundancy"), common[0])
    lines += ["", f"Paired margins against `{name[common.index(ref)]}` (perplexity difference, same windows; mean ± sample standard "
              "deviation over seeds, standard error of the mean; negative: the variant is better; and in how many seeds "
              "it was better):", "", "| variant | mean | sd | se | better in |", "|---|---|---|---|---|"]
    for k, n in zip(common, name, strict=True):
        if k == ref:
            continue
        diffs = [runs[s][k] - runs[s][ref] for s in seeds]
        mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
        lines.append(f"| {n} | {mean:+.2f} | {sd:.2f} | {sd / len(diffs) ** 0.5:.2f} | "
                     f"{sum(x < 0 for x in diffs)} of {len(diffs)} |")
    return lines + [""]


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    out = ["# fbn rule study: results (generated by summarize.py from results/**.json)", "",
           "See docs/fbn-study.md for the variants, the protocol and the conclusions.", ""]
    for d in sorted((HERE / "results").glob("*/*")):
        if d.is_dir():
            out += table(d)
    for m in sorted(p for p in (HERE / "results").iterdir() if p.is_dir()):
        out += seed_table(m)
    (HERE / "results.md").write_text("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    main()
