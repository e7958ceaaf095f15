"""Before / after recovery, as rows for the run's report, its retention Markdown and the model card.

"Before" is the pruned model as the prune stage left it, "after" the recovered model the evaluate stage measured
(the exported one). Perplexity and KL are measured on both; tasks only after (the evaluate stage's table), since
running them twice would double the evaluation. ``gap_closed`` is the fraction of the pruned model's gap to the
dense one that recovery closed: ``(before - after) / (before - dense)``.
"""

from __future__ import annotations

from typing import Any


def _closed(before: float, after: float, dense: float) -> float | None:
    gap = before - dense
    return round((before - after) / gap, 4) if gap else None


def before_after_rows(results: dict[str, Any], labels: dict[str, str]) -> list[dict[str, Any]]:
    """Rows ``{metric, dense, before, after, gap_closed}`` from a run's ``results`` (``dense``, ``pruned`` and
    ``recovery.before``); ``labels`` maps a perplexity key (``ppl_<source>_<seq_len>``) to its label."""
    rec = results.get("recovery") or {}
    before, after, dense = rec.get("before") or {}, results.get("pruned") or {}, results.get("dense") or {}
    rows = []
    for key, label in labels.items():
        if key in before and key in after and key in dense:
            d, b, a = dense[key]["ppl"], before[key]["ppl"], after[key]["ppl"]
            rows.append({"metric": f"perplexity {label}", "dense": d, "before": b, "after": a,
                         "gap_closed": _closed(b, a, d)})
    rb, ra = before.get("retention"), after.get("retention")
    if rb and ra:
        rows.append({"metric": "KL(dense‖model), nats/token", "dense": 0.0, "before": rb["kl"], "after": ra["kl"],
                     "gap_closed": _closed(rb["kl"], ra["kl"], 0.0)})
        rows.append({"metric": "top-1 agreement with dense", "dense": 1.0, "before": rb["top1_agreement"],
                     "after": ra["top1_agreement"],
                     "gap_closed": _closed(rb["top1_agreement"], ra["top1_agreement"], 1.0)})
    return rows


def spent(record: dict[str, Any]) -> dict[str, Any]:
    """The budget a recovery spent and on what (the part of its record that goes into results and the card)."""
    keys = ("method", "target_modules", "trainable_params", "budget", "stop", "steps", "tokens", "minutes",
            "tokens_per_s", "passes_over_text", "loss_start", "loss_end", "resumed_from_step")
    out = {k: record.get(k) for k in keys}
    out["data"] = [s["source"] for s in record["data"]["sources"]]
    return out


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def to_markdown(rows: list[dict[str, Any]], training: dict[str, Any]) -> str:
    """A before / after table and one line on the budget spent."""
    lines = ["| recovery | dense | before | after | gap closed |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        closed = "–" if r["gap_closed"] is None else f"{r['gap_closed']:.1%}"
        lines.append(f"| {r['metric']} | {_f(r['dense'])} | {_f(r['before'])} | {_f(r['after'])} | {closed} |")
    t = training
    budget = ", ".join(f"{k} {v}" for k, v in (t.get("budget") or {}).items() if v is not None)
    line = (f"Recovery: {t['method']} on {', '.join(t['target_modules'] or [])} ({t['trainable_params']:,} "
            f"trainable parameters), data {', '.join(t['data'])}; spent {t['steps']} steps, {t['tokens']:,} tokens, "
            f"{t['minutes']:.2f} min ({t['tokens_per_s']} tokens/s; budget {budget}; stopped by {t['stop']}); "
            f"loss {_f(t['loss_start'])} -> {_f(t['loss_end'])}. Tasks are measured after recovery only.")
    return ("\n".join(lines) + "\n\n" if rows else "") + line
