"""Build the leaderboard from the cell results: Markdown tables, ``results/summary.csv`` and PNG plots.

    python benchmarks/leaderboard/board.py

Reads ``results/<model>/*.json`` written by ``run.py``. Retention = pruned mean accuracy / dense mean accuracy
over the protocol's tasks (acc_norm for arc_challenge and openbookqa, acc elsewhere).
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
PRIMARY = {"arc_challenge": "acc_norm", "openbookqa": "acc_norm"}
# published baselines (any compensation); fbn's own variants and the no-network controls are not baselines
BASELINES = ("wanda_sp", "flap", "obs", "taylor", "magnitude", "random")
CSV_COLUMNS = ["model", "method", "sparsity", "allocation", "ppl128", "ppl2048", "kl", "top1", "mean_acc", "retention",
               "params"]


def load_cells(model_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(model_dir.glob("*.json"))]


def task_acc(cell: dict[str, Any], task: str, suffix: str = "") -> float | None:
    """The task's protocol metric (``suffix="_stderr"``: its standard error); None when the task is absent."""
    t = cell["eval_info"]["tasks"]["tasks"].get(task)
    if t is None:
        return None
    return t.get(PRIMARY.get(task, "acc") + suffix)


def method_label(ri: dict[str, Any]) -> str:
    """``fbn`` with its default rule, and every method with the compensation ``auto`` gives it, print bare; anything
    else says what it is: ``fbn(max_z)`` for another fbn rule, ``+<compensation>`` for another compensation,
    `` seq`` for sequential pruning."""
    from fbnprune.prune.compensate import default_compensation
    from fbnprune.prune.fbn import DEFAULT_RULE

    method = ri["method"]
    if method == "dense":
        return method
    rule = ri.get("fbn_rule") or (ri.get("recipe") or {}).get("prune", {}).get("fbn_rule") or DEFAULT_RULE
    label = method if method != "fbn" or rule == DEFAULT_RULE else f"fbn({rule})"
    comp = ri.get("compensate", "none")
    label = label if comp == default_compensation(method, rule) else f"{label}+{comp}"
    prune = (ri.get("recipe") or {}).get("prune", {})
    if prune.get("sequential"):  # layer by layer; the re-fit's target when it is not the default
        label += " seq" + ("" if comp != "refit" or prune.get("refit_target", "layer") == "layer" else "(dense)")
    return label


def row(cell: dict[str, Any], tasks: list[str], dense_mean: float | None) -> dict[str, Any]:
    ri, ev = cell["run_info"], cell["eval_info"]
    accs = [task_acc(cell, t) for t in tasks]
    mean = sum(accs) / len(accs) if accs and all(a is not None for a in accs) else None
    ses = [task_acc(cell, t, "_stderr") for t in tasks]
    mean_se = (sum(x * x for x in ses) ** 0.5 / len(ses)) if ses and all(x is not None for x in ses) else None
    method = method_label(ri)
    agreement = ev.get("retention") or {}
    dense_cell = ri["method"] == "dense"
    return {
        "cell": ri["cell"],
        "method": method,
        "sparsity": round(float(ri["sparsity"]), 4),
        "allocation": ri.get("allocation", "-"),
        "ppl128": ev["ppl128"]["ppl"],
        "ppl2048": ev["ppl2048"]["ppl"],
        "kl": 0.0 if dense_cell else agreement.get("kl"),
        "top1": 1.0 if dense_cell else agreement.get("top1_agreement"),
        "accs": accs,
        "mean_acc": mean,
        "mean_se": mean_se,
        "retention": (mean / dense_mean) if (mean is not None and dense_mean) else None,
        "params": ev["params"],
        "seconds": cell["meta_info"].get("seconds"),
        "carried": bool(cell["meta_info"].get("carried_from")),
        "carry_refused": bool(cell["meta_info"].get("carry_refused")),
    }


def shown_pct(r: dict[str, Any]) -> int:
    """The sparsity a row is shown and grouped under, in whole per cent (global allocation lands a few neurons
    off the uniform fraction: 0.2999 and 0.3008 are both 30 %)."""
    return round(r["sparsity"] * 100)


def fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:,.{nd}f}" if abs(x) < 1e5 else f"{x:.3g}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def plots(model: str, rows: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["method"] == "dense":
            continue
        key = r["method"] + ("" if r["allocation"] == "uniform" else f" ({r['allocation']})")
        by_method.setdefault(key, []).append(r)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    colors = plt.get_cmap("tab20").colors
    markers = "osD^vPX<>*"
    for metric, ylabel, log in (("retention", "mean-accuracy retention vs dense", False),
                                ("ppl128", "WikiText-2 perplexity (seq 128, log scale)", True),
                                ("ppl2048", "WikiText-2 perplexity (seq 2048, log scale)", True)):
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        # perplexity: the competitive methods live within a few times dense; the floors (random, magnitude,
        # the naive rule) would squeeze them into one line, so the axis stops at 5x dense and says who left it
        top = 5 * dense[metric] if dense and metric.startswith("ppl") else None
        for i, (m, rs) in enumerate(sorted(by_method.items())):
            rs = sorted((r for r in rs if r[metric] is not None), key=lambda r: r["sparsity"])
            if not rs:
                continue
            off = top is not None and all(r[metric] > top for r in rs)
            ax.plot([r["sparsity"] for r in rs], [r[metric] for r in rs], marker=markers[i % len(markers)],
                    color=colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                    lw=2.5 if m.startswith("fbn") and "(" not in m and "+" not in m else 1.2,
                    label=m + (" (off scale)" if off else ""))
        if top is not None:  # a perplexity plot with a dense reference
            ax.set_ylim(0.9 * dense[metric], top)
            ax.axhline(dense[metric], color="k", ls="--", lw=1, label="dense")
        if metric == "retention":
            ax.axhline(1.0, color="k", ls="--", lw=1, label="dense")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("fraction of MLP neurons removed")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{model}: {metric} vs sparsity (leaderboard protocol)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        name = f"{model}-{metric}.png"
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        files.append(name)
    return files


def pivot(rows: list[dict[str, Any]], key: str, title: str, low: bool = True, nd: int = 2) -> list[str]:
    """Method x sparsity table of one metric, so every method can be read across sparsities at a glance."""
    rows = [r for r in rows if r["method"] != "dense" and r[key] is not None]
    cols = sorted({shown_pct(r) for r in rows})
    if not rows:
        return []
    table: dict[str, dict[int, float]] = {}
    for r in rows:
        table.setdefault(r["method"] + ("" if r["allocation"] == "uniform" else f" ({r['allocation']})"), {})[
            shown_pct(r)] = r[key]
    best = {c: (min if low else max)(v[c] for v in table.values() if c in v) for c in cols}
    out = [f"**{title}**", "", "| method | " + " | ".join(f"{c}%" for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, vals in sorted(table.items()):
        cells = [("**" + fmt(vals[c], nd) + "**" if vals[c] == best[c] else fmt(vals[c], nd)) if c in vals else "-"
                 for c in cols]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def missing_cells(model: str, measured: list[dict[str, Any]]) -> tuple[list[str], int]:
    """Grid cells of ``model`` (``grid/<model>/*.yaml``) with no result yet, and how many there are in all, so the
    board says which part of the grid it does not show."""
    grid = [p.stem for p in sorted((HERE / "grid" / model).glob("*.yaml"))]
    done = {c["run_info"]["cell"] for c in measured}
    return sorted(n for n in grid if n not in done), len(grid)


def head_to_head(rows: list[dict[str, Any]], dense: dict[str, Any] | None) -> list[str]:
    """fbn (the default) against the best published baseline of each metric at each sparsity, uniform widths.

    Perplexity: the share of the baseline's increase over dense that fbn removes (positive: fbn better).
    Accuracy: the difference of the means with its standard error (independent subsets' errors combined), so a
    difference inside two standard errors reads as a tie."""
    if dense is None:
        return []
    uni = [r for r in rows if r["allocation"] == "uniform"]
    out = ["**fbn against the best published baseline at each sparsity** (uniform widths; baselines: "
           f"{', '.join(BASELINES)}, each with every compensation measured)", "",
           "| sparsity | metric | fbn | best baseline | its value | fbn vs it |", "|---|---|---|---|---|---|"]
    n = 0
    for s in sorted({r["sparsity"] for r in uni}):
        # the grid's fbn recipe's cell, whatever its label: cells measured before the default compensation
        # changed carry the old one in their label (e.g. fbn+corrrefit)
        fbn = next((r for r in uni if r["sparsity"] == s and re.fullmatch(r"fbn-\d+", r["cell"])), None)
        base = [r for r in uni if r["sparsity"] == s and r["method"].split("+")[0] in BASELINES]
        if fbn is None or not base:
            continue
        for key, name in (("ppl128", "ppl@128"), ("ppl2048", "ppl@2048")):
            b = min(base, key=lambda r: r[key])
            gain = 1 - (fbn[key] - dense[key]) / (b[key] - dense[key])
            tag = "" if fbn["method"] == "fbn" else f" ({fbn['method']})"
            out.append(f"| {s:.0%} | {name} | {fmt(fbn[key], 2)}{tag} | {b['method']} | {fmt(b[key], 2)} | "
                       f"{gain:+.1%} of the increase |")
        with_kl = [r for r in base if r["kl"] is not None]
        if fbn["kl"] is not None and with_kl:
            b = min(with_kl, key=lambda r: r["kl"])
            out.append(f"| {s:.0%} | KL to dense | {fmt(fbn['kl'], 4)} | {b['method']} | {fmt(b['kl'], 4)} | "
                       f"{1 - fbn['kl'] / b['kl']:+.1%} of the KL |")
        scored = [r for r in base if r["mean_acc"] is not None]
        if fbn["mean_acc"] is not None and scored:
            b = max(scored, key=lambda r: r["mean_acc"])
            diff = fbn["mean_acc"] - b["mean_acc"]
            se = ((fbn["mean_se"] or 0) ** 2 + (b["mean_se"] or 0) ** 2) ** 0.5
            verdict = "tie" if abs(diff) <= 2 * se else ("better" if diff > 0 else "worse")
            out.append(f"| {s:.0%} | mean acc | {fmt(fbn['mean_acc'])} | {b['method']} | {fmt(b['mean_acc'])} | "
                       f"{diff:+.3f} ± {se:.3f} ({verdict}) |")
        n += 1
    return out if n else []


#: archived protocol versions whose folder left the tree, and a commit that still holds it
REMOVED_VERSIONS = {1: "b912126d7d35"}


def earlier_version(v: int) -> str:
    """A link to archived version ``v``'s board, or, once its folder is gone, the commit that has it (the board
    must not link to a page that no longer exists)."""
    if (HERE / f"v{v}" / "README.md").is_file() or v not in REMOVED_VERSIONS:
        return f"[v{v}](v{v}/README.md)"
    sha = REMOVED_VERSIONS[v]
    return f"v{v} (in git at commit {sha}: `git show {sha}:benchmarks/leaderboard/v{v}/README.md`)"


def retention_sentence(proto: dict[str, Any]) -> str:
    rp = proto.get("retention")
    if not rp:
        return ""
    return (f"data-free retention: KL(dense‖pruned) in nats per token and top-1 agreement with dense on "
            f"{rp['n_tokens']:,} held-out tokens of {rp['source']} ({rp['seq_len']}-token windows, seed {rp['seed']}; "
            "neither calibration nor evaluation text); ")


def dense_warning(dense: dict[str, Any] | None) -> list[str]:
    """The perplexity report's guard, applied to the board's dense row: a short/long window perplexity ratio that
    no healthy model shows means the model is fed off its training distribution."""
    from fbnprune.evaluate.ppl import context_ratio_warning

    if dense is None:
        return []
    warning = context_ratio_warning({128: dense["ppl128"], 2048: dense["ppl2048"]})
    return [f"**Warning**: {warning}.", ""] if warning else []


def main() -> int:
    proto = yaml.safe_load((HERE / "protocol.yaml").read_text())
    tasks = proto["tasks"]
    results = HERE / "results"
    md = ["# fbnprune leaderboard", "",
          "Every method runs through the same engine, data and evaluation. Pinned protocol "
          f"(`protocol.yaml`, version {proto['version']}): calibration {proto['calibration']['n_tokens']} tokens of "
          f"{proto['calibration']['source']} (seed {proto['calibration']['seed']}"
          + (f", first {proto['calibration']['drop_first']} position(s) of each sequence left out"
             if proto["calibration"].get("drop_first") else ", every position kept, the attention sink's included")
          + "); every sequence starts the way the model's tokenizer starts a text ("
          + proto.get("feed", "no start tokens") + "); token perplexity on the first "
          f"{proto['perplexity']['max_tokens']:,} tokens of {proto['perplexity']['source']} in non-overlapping windows of "
          f"128 and 2048 text tokens (start tokens are context, never scored); "
          + retention_sentence(proto)
          + f"zero-shot accuracy on a fixed seeded subset of {proto['task_subset']['items']} items "
          f"(seed {proto['task_subset']['seed']}) of each of {', '.join(tasks)} ({proto['metric']}). "
          "Retention = pruned mean accuracy / dense mean accuracy. Subsets make the accuracies noisy "
          "(standard error about 0.05 per task, 0.02 on the mean): read small differences as ties.", "",
          "Labels: `fbn` is fbnprune's current default (`fbn_rule: redundancy` with the rebuild `compensate: auto` "
          "gives it, now the global `refit`); `fbn(<rule>)` another fbn rule, e.g. `fbn(max_z)`, the reference's "
          "naive rule; `+<name>` a compensation other than the method's default (baselines default to none: "
          "`obs+refit` and `wanda_sp+refit` get fbn's own rebuild, `flap+bias` is FLAP as published). Every grid "
          "recipe of a model (`grid/<model>/`) is a cell; cells not measured yet are absent. Rows: grouped by sparsity, best 2,048-token "
          "perplexity first. Earlier protocol versions, as measured: "
          + (", ".join(earlier_version(v) for v in range(1, int(proto["version"]))) or "none") + ".", "",
          "Regenerate: `python benchmarks/leaderboard/run.py --model <model>` (resumable), then "
          "`python benchmarks/leaderboard/board.py`.", "", *[f"- {n}" for n in proto.get("notes", [])], ""]
    csv_rows = []
    for model_dir in sorted(p for p in results.iterdir() if p.is_dir()):
        model = model_dir.name
        cells = load_cells(model_dir)
        if not cells:
            continue
        dense = next((c for c in cells if c["run_info"]["method"] == "dense"), None)
        dense_row = row(dense, tasks, None) if dense else None
        dense_mean = dense_row["mean_acc"] if dense_row else None
        rows = [row(c, tasks, dense_mean) for c in cells]
        # group by the sparsity shown, then rank by the headline perplexity
        rows.sort(key=lambda r: (shown_pct(r), r["method"] != "dense", r["ppl2048"], r["ppl128"]))
        meta = (dense or cells[0])["meta_info"]
        m = meta.get("machine", {})
        # cells of one model may come from several resumed runs: name every command and the dates they span
        commands = Counter(c["meta_info"].get("command", "?") for c in cells)
        dates = sorted(str(d) for c in cells if (d := c["meta_info"].get("provenance", {}).get("date")))
        busy = sum(bool(c["meta_info"].get("machine", {}).get("busy")) for c in cells)
        header = [f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('torch_threads')} torch threads "
                  f"(load average at start {m.get('loadavg')}).",
                  ("Command" if len(commands) == 1 else "Commands") + ": "
                  + "; ".join(f"`{cmd}` ({n} cell{'s' * (n != 1)})" for cmd, n in commands.items()) + "."]
        if dates:
            header.append(f"Dates: {dates[0]} to {dates[-1]}.")
        header.append(f"Cells measured: {len(cells)}" + (
            f", {busy} of them started with the 1-minute load average above half the cores (the run's own "
            "previous cell counts too; timings are upper bounds)." if busy else "."))
        md += [f"## {model}", "", " ".join(header), ""]
        missing, n_grid = missing_cells(model, cells)
        if missing:
            md += [f"Not measured yet ({len(missing)} of the {n_grid} grid cells; "
                   f"`run.py --model {model}` runs them): {', '.join(missing)}.", ""]
        carried = sum(r["carried"] for r in rows)
        if carried:
            md += [f"{carried} cells carry their perplexities and accuracies over from an archived version that fed "
                   "this model the same token sequences (each cell's `meta_info.carried_from` names its file); "
                   "their KL and top-1 columns were measured under this version, and the re-pruned model "
                   "reproduced the archived perplexity at the longest window (`meta_info.carry_check`).", ""]
        refused = [r["cell"] for r in rows if r["carry_refused"]]
        if refused:
            md += [f"{len(refused)} archived cells did not reproduce when pruned again (perplexity at the longest "
                   f"window off by more than 0.1 %; `meta_info.carry_refused`), so they were measured in full: "
                   f"{', '.join(refused)}.", ""]
        md += dense_warning(dense_row)
        head = ["method", "sparsity", "alloc", "ppl@128", "ppl@2048", "KL", "top-1", *tasks, "mean acc", "retention",
                "params"]
        md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            md.append("| " + " | ".join([r["method"], f"{shown_pct(r)}%",
                                         r["allocation"], fmt(r["ppl128"], 2), fmt(r["ppl2048"], 2),
                                         fmt(r["kl"], 4), fmt(r["top1"]),
                                         *[fmt(a) for a in r["accs"]], fmt(r["mean_acc"]), fmt(r["retention"]),
                                         fmt(r["params"])]) + " |")
            csv_rows.append({"model": model, "method": r["method"], "sparsity": r["sparsity"],
                             "allocation": r["allocation"], "ppl128": r["ppl128"], "ppl2048": r["ppl2048"],
                             "kl": r["kl"], "top1": r["top1"], "mean_acc": r["mean_acc"],
                             "retention": 1.0 if r["method"] == "dense" else r["retention"], "params": r["params"]})
        md += ["", *head_to_head(rows, dense_row), "",
               *pivot(rows, "ppl2048", "WikiText-2 perplexity @2048 (lower is better; best per column in bold)"),
               "", *pivot(rows, "kl", "KL(dense‖pruned) on held-out text, nats per token (lower is better)", nd=4),
               "", *pivot(rows, "mean_acc", "mean accuracy (noisy: 100 items per task)", low=False), ""]
        for f in plots(model, rows, results):
            md.append(f"![{f}](results/{f})")
        md.append("")
    (HERE / "README.md").write_text("\n".join(md) + "\n")
    with (results / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(csv_rows)
    print(f"wrote {HERE / 'README.md'} and {results / 'summary.csv'} ({len(csv_rows)} rows)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
