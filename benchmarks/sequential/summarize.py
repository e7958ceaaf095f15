"""Tables, ``results.json`` and the error-by-layer figure from the cells of ``run.py`` and ``memory.json``.

    python benchmarks/sequential/summarize.py

``results.json`` holds one row per measured cell (``model``, ``method``, ``compensate``, ``sparsity``, ``mode``,
``refit_target``, ``ppl2048``, ``dense_ppl2048``, ``ppl128``, ``kl``, ``top1``, ``peak_rss_mb`` where the memory
benchmark measured that model and mode, and for sequential rows ``peak_rss_onload_mb``: the same pruning with each
layer read from disk), the memory rows (the synthetic model's ``weights_mb`` and
``peak_rss_mb`` among them), and the commands and machines. ``results.md`` gives, per model and method, the
increase over dense of ppl@2048 and KL in each mode, and how much of the parallel increase sequential removes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from benchmarks.runner import record, write_json  # noqa: E402
from fbnprune.prune.sequential import SequentialOptions  # noqa: E402

MODE_NAMES = {"parallel": "parallel", "seq-dense": "sequential", "seq-layer": "sequential"}
TARGETS = {"parallel": None, "seq-dense": "dense", "seq-layer": "layer"}
# memory.py prunes with SequentialOptions' default re-fit target: its rows belong to the cells of that target
MEMORY_MODE = {"parallel": "parallel", f"seq-{SequentialOptions.refit_target}": "sequential"}


def load_cells() -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for d in sorted((HERE / "results").glob("*")):
        if d.is_dir():
            out[d.name] = {f.stem: json.loads(f.read_text()) for f in sorted(d.glob("*.json"))}
    return out


def rows(cells: dict[str, dict[str, dict[str, Any]]], memory: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for model, cs in cells.items():
        dense = cs.get("dense")
        if dense is None:
            continue
        mem = {r["mode"]: r for r in memory.get("runs", {}).get(model, {}).get("rows", [])}
        for name, c in cs.items():
            if name == "dense":
                continue
            e = c["eval"]
            measured_mem = c["grid_cell"] == "obs-refit-50" and c["mode"] in MEMORY_MODE
            out.append({
                "model": model, "cell": c["grid_cell"], "method": c["method"], "compensate": c["compensate"],
                "sparsity": round(c["sparsity"], 4), "mode": MODE_NAMES[c["mode"]],
                "refit_target": TARGETS[c["mode"]] if c["compensate"] == "refit" else None,
                "ppl2048": e["ppl2048"]["ppl"], "dense_ppl2048": dense["eval"]["ppl2048"]["ppl"],
                "ppl128": e["ppl128"]["ppl"], "dense_ppl128": dense["eval"]["ppl128"]["ppl"],
                "kl": e["retention"]["kl"], "top1": e["retention"]["top1_agreement"],
                "last_layer_hidden_error": c["layer_errors"]["hidden_error"][-1],
                "peak_rss_mb": (mem.get(MEMORY_MODE[c["mode"]]) or {}).get("peak_rss_mb") if measured_mem else None,
                "peak_rss_onload_mb": ((mem.get("sequential-onload") or {}).get("peak_rss_mb")
                                       if measured_mem and MEMORY_MODE[c["mode"]] == "sequential" else None),
                "prune_seconds": c["prune_seconds"], "command": c["command"], "machine": c["machine"],
            })
    return out


def _pair(r: dict[str, Any] | None) -> str:
    """A row's ppl@2048 and KL, as the tables print them."""
    return f"{r['ppl2048']:.2f} / {r['kl']:.3f}" if r else "-"


def table(rs: list[dict[str, Any]]) -> str:
    """Per model and grid cell: each mode's ppl@2048 and KL, and the share of the parallel mode's increase over
    dense that sequential mode removes (positive: sequential better)."""
    lines = []
    for model in sorted({r["model"] for r in rs}):
        m = [r for r in rs if r["model"] == model]
        dense = m[0]["dense_ppl2048"]
        lines += [f"### {model} (dense ppl@2048 {dense:.2f})", "",
                  "| cell | parallel: ppl@2048 / KL | sequential (layer target, default) | increase removed (ppl / KL) | "
                  "sequential, dense target | increase removed |", "|---|---|---|---|---|---|"]
        for cell in sorted({r["cell"] for r in m}, key=lambda c: (c.rsplit("-", 1)[0], int(c.rsplit("-", 1)[1]))):
            by = {(r["mode"], r["refit_target"]): r for r in m if r["cell"] == cell}
            par = by.get(("parallel", None))
            seql = by.get(("sequential", "layer")) or by.get(("sequential", None))
            seqd = by.get(("sequential", "dense"))

            def gain(r: dict[str, Any] | None, par: dict[str, Any] | None = par, dense: float = dense) -> str:
                if not (r and par):
                    return "-"
                return (f"{1 - (r['ppl2048'] - dense) / (par['ppl2048'] - dense):+.0%} / "
                        f"{1 - r['kl'] / par['kl']:+.0%}")

            lines.append(f"| {cell} | {_pair(par)} | {_pair(seql)} | {gain(seql)} | {_pair(seqd)} | {gain(seqd)} |")
        lines.append("")
    return "\n".join(lines)


def figure(cells: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    """Residual-stream error by layer, parallel vs sequential, for every 50 % cell measured both ways."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in cells if any("-50@seq" in k for k in cells[m])]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for name, c in sorted(cells[model].items()):
            if name == "dense" or not c["grid_cell"].endswith("-50"):
                continue
            err = c["layer_errors"]["hidden_error"]
            style = {"parallel": "-", "seq-dense": "--", "seq-layer": ":"}[c["mode"]]
            ax.plot(range(len(err)), err, style, label=name)
        ax.set_title(f"{model}, 50 % of MLP neurons")
        ax.set_xlabel("layer")
        ax.set_ylabel("relative error of the residual stream\n(calibration tokens, vs dense)")
        if model.startswith("smollm2"):  # the sink position's norm dominates the sum from layer 11 on
            ax.annotate("attention sink written (layer 11):\nits norm dominates the sum", (11, 2e-3), fontsize=7)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def memory_table(mem_rows: list[dict[str, Any]]) -> str:
    """Peak memory per model and mode (``memory.json``), as a share of the model's float32 weights."""
    if not mem_rows:
        return ""
    out = ["", "### Peak memory (memory.py: OBS + re-fit at 50 %, each mode in a fresh process)", "",
           "| model | weights | mode | peak RSS | peak / weights | seconds | threads | date |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(mem_rows, key=lambda r: (r["model"], r["mode"])):
        out.append(f"| {r['model']} | {r['weights_mb']:,.0f} MB | {r['mode']} | {r['peak_rss_mb']:,.0f} MB | "
                   f"{r['peak_rss_mb'] / r['weights_mb']:.0%} | {r['seconds']:,.0f} | "
                   f"{r.get('machine', {}).get('torch_threads', '?')} | {r.get('date', '?')[:10]} |")
    return "\n".join(out) + "\n"


def targets_table(rs: list[dict[str, Any]]) -> str:
    """The re-fit targets probed by ``targets.py`` beside the two modes' own, on the same cell."""
    f = HERE / "targets.json"
    probes = json.loads(f.read_text())["rows"] if f.is_file() else []
    if not probes:
        return ""
    out = ["", "### Other sequential re-fit targets (targets.py; SmolLM2, ppl@2048 / KL)", "",
           "| cell | parallel | seq, layer target | seq, dense target | probe | probe result |", "|---|---|---|---|---|---|"]
    for p in sorted(probes, key=lambda r: (r["cell"], r["variant"])):
        by = {(r["mode"], r["refit_target"]): r for r in rs if r["model"] == p["model"] and r["cell"] == p["cell"]}
        out.append(f"| {p['cell']} | {_pair(by.get(('parallel', None)))} | {_pair(by.get(('sequential', 'layer')))} "
                   f"| {_pair(by.get(('sequential', 'dense')))} | {p['variant']} | {_pair(p)} |")
    return "\n".join(out) + "\n"


def main() -> int:
    cells = load_cells()
    mem_file = HERE / "memory.json"
    memory = json.loads(mem_file.read_text()) if mem_file.is_file() else {"runs": {}}
    rs = rows(cells, memory)
    mem_rows = [r for run in memory.get("runs", {}).values() for r in run["rows"]]
    write_json(HERE / "results.json", {"rows": rs, "memory": mem_rows,
                                       "memory_runs": {k: {kk: vv for kk, vv in v.items() if kk != "rows"}
                                                       for k, v in memory.get("runs", {}).items()},
                                       "summarized": record()})
    (HERE / "results.md").write_text("# Parallel vs sequential pruning (generated by summarize.py)\n\n"
                                     + table(rs) + targets_table(rs) + memory_table(mem_rows))
    figure(cells, HERE / "layer_errors.png")
    print(table(rs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
