"""The study's tables on leaderboard protocol v1, from ``leaderboard_v1_summary.csv`` next to this script.

    python benchmarks/fbn_rules/leaderboard_tables.py            # Markdown for docs/fbn-study.md

The CSV is the v1 leaderboard's ``results/summary.csv`` byte for byte: the v1 archive (cells, plots, README) left
the tree, and this one file is all the quoted tables need. The whole archive is in git at commit b912126d7d35
(``git show b912126d7d35:benchmarks/leaderboard/v1/README.md``).

Why a generator: ``docs/fbn-study.md`` quotes these cells and the share of the perplexity increase over dense that
fbn removes against each comparison; writing them by hand after every new cell is how numbers go stale. Rows are
fbn (the bundled fbn recipe, under whichever default rebuild it was measured), its no-network controls, then the
published baselines with and without their compensation; a cell not measured yet prints ``-``. The share is ``(ppl_other - ppl_fbn) / (ppl_other - ppl_dense)`` (positive: fbn better).
"""

from __future__ import annotations

import csv
from pathlib import Path

SUMMARY = Path(__file__).resolve().parent / "leaderboard_v1_summary.csv"
SPARSITIES = (0.2, 0.3, 0.5)
#: fbn's cells: the bundled fbn recipe is labelled ``fbn`` under today's default rebuild (refit) and ``fbn+corrrefit``
#: when it was measured under the former one (leaderboard protocol v1); its control likewise
FBN = ("fbn", "fbn+corrrefit")
ROWS = (*FBN, "corr_redundancy", "corr_redundancy+corrrefit", "wanda_sp+corrrefit", "wanda_sp+bias", "flap+bias",
        "obs+refit", "wanda_sp", "flap", "obs", "taylor")
NO_NETWORK = ("corr_redundancy", "corr_redundancy+corrrefit", "wanda_sp+corrrefit")
PUBLISHED = ("wanda_sp+bias", "flap+bias", "obs+refit", "wanda_sp", "flap", "obs", "taylor")


def load(path: Path = SUMMARY) -> dict[str, dict[tuple[str, float], dict[str, float]]]:
    """``{model: {(method, nominal sparsity): {ppl128, ppl2048, mean_acc}}}`` for uniform cells and dense."""
    out: dict[str, dict[tuple[str, float], dict[str, float]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            if row["allocation"] not in ("uniform", "-"):
                continue
            nominal = round(float(row["sparsity"]) * 10) / 10  # 0.1992 -> 0.2: widths are rounded to whole neurons
            out.setdefault(row["model"], {})[(row["method"], nominal)] = {
                k: float(row[k]) for k in ("ppl128", "ppl2048", "mean_acc")}
    return out


def share(fbn: float, other: float, dense: float) -> float:
    """Share of ``other``'s perplexity increase over dense that fbn removes."""
    return (other - fbn) / (other - dense)


def table(cells: dict[tuple[str, float], dict[str, float]]) -> list[str]:
    head = "| method | " + " | ".join(f"{round(s * 100)}%: ppl@2048 / @128 / acc" for s in SPARSITIES) + " |"
    lines = [head, "|---|" + "---|" * len(SPARSITIES)]
    for m in ROWS:
        vals = []
        for s in SPARSITIES:
            c = cells.get((m, s))
            vals.append("-" if c is None else f"{c['ppl2048']:.2f} / {c['ppl128']:.1f} / {c['mean_acc']:.3f}")
        if any(v != "-" for v in vals):
            lines.append(f"| {f'**{m}**' if m in FBN else m} | " + " | ".join(vals) + " |")
    return lines


def readings(cells: dict[tuple[str, float], dict[str, float]]) -> list[str]:
    """fbn against the best published cell and the best no-network cell, per sparsity and perplexity length."""
    dense = cells[("dense", 0.0)]
    lines = []
    for label, group in (("best published baseline (any compensation)", PUBLISHED), ("best no-network cell", NO_NETWORK)):
        for metric in ("ppl2048", "ppl128"):
            parts = []
            for s in SPARSITIES:
                f = next((cells[(m, s)] for m in FBN if (m, s) in cells), None)
                cand = [(cells[(m, s)][metric], m) for m in group if (m, s) in cells]
                if f is None or not cand:
                    parts.append(f"{round(s * 100)}%: -")
                    continue
                best, name = min(cand)
                parts.append(f"{round(s * 100)}%: {share(f[metric], best, dense[metric]) * 100:+.1f} % vs {name}")
            lines.append(f"* fbn vs {label}, {metric}: " + "; ".join(parts))
    return lines


def main() -> None:
    data = load()
    for model in sorted(data, reverse=True):  # smollm2 first
        cells = data[model]
        d = cells[("dense", 0.0)]
        print(f"{model} (dense: ppl@2048 {d['ppl2048']:.2f}, ppl@128 {d['ppl128']:.1f}, mean acc {d['mean_acc']:.3f}):\n")
        print("\n".join(table(cells)))
        print()
        print("\n".join(readings(cells)))
        print()


if __name__ == "__main__":
    main()
