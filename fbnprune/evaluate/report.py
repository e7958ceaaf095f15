"""Retention report: dense vs pruned, per task and overall, with the protocol next to every number.

Per task one *primary* metric is compared (the convention of the LLM-Pruner/FLAP tables: ``acc_norm`` for
arc_challenge and openbookqa, ``acc`` elsewhere; every other metric stays in the JSON). Retention is
``pruned / dense``; its standard error uses the delta method with the two runs treated as independent, which
overstates it (both runs score the same items), so it is an upper bound. The mean retention is the unweighted
mean of the per-task ratios.
"""

from __future__ import annotations

import math
from typing import Any

PRIMARY_METRIC: dict[str, str] = {"arc_challenge": "acc_norm", "openbookqa": "acc_norm"}


def primary_metric(task: str, entry: dict[str, Any]) -> str:
    m = PRIMARY_METRIC.get(task, "acc")
    return m if entry.get(m) is not None else "acc"


def _ratio(p: float | None, d: float | None) -> float | None:
    if p is None or d is None or d == 0:
        return None
    return p / d


def _ratio_se(p: float, d: float, sp: float | None, sd: float | None) -> float | None:
    if sp is None or sd is None or p == 0 or d == 0:
        return None
    return (p / d) * math.sqrt((sp / p) ** 2 + (sd / d) ** 2)


def _tasks_of(results: dict[str, Any]) -> dict[str, Any]:
    return results.get("tasks", results)


def retention_report(dense_results: dict[str, Any], pruned_results: dict[str, Any],
                     dense_model_stats: dict[str, Any] | None = None,
                     pruned_model_stats: dict[str, Any] | None = None, *,
                     dense_ppl: dict[str, Any] | None = None, pruned_ppl: dict[str, Any] | None = None,
                     agreement: dict[str, Any] | None = None, meta: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    """Combine two ``evaluate_tasks`` results (plus size/speed, perplexity, KL) into one report dict.

    ``dense_ppl``/``pruned_ppl`` map a label (e.g. ``wikitext2-test@128``) to a ``perplexity()`` result.
    """
    dt, pt = _tasks_of(dense_results), _tasks_of(pruned_results)
    missing = sorted(set(dt) ^ set(pt))
    rows = []
    for task in [t for t in dt if t in pt]:
        d, p = dt[task], pt[task]
        m = primary_metric(task, d)
        dv, pv = d.get(m), p.get(m)
        ds, ps = d.get(f"{m}_stderr"), p.get(f"{m}_stderr")
        r = _ratio(pv, dv)
        rows.append({"task": task, "metric": m, "items": d.get("items"), "dense": dv, "dense_stderr": ds,
                     "pruned": pv, "pruned_stderr": ps, "retention": r,
                     "retention_stderr": _ratio_se(pv, dv, ps, ds) if r is not None else None,
                     "all_metrics": {"dense": {k: v for k, v in d.items() if isinstance(v, (int, float))},
                                     "pruned": {k: v for k, v in p.items() if isinstance(v, (int, float))}}})
    rets = [r["retention"] for r in rows if r["retention"] is not None]
    summary: dict[str, Any] = {
        "tasks": len(rows),
        "mean_dense": _mean([r["dense"] for r in rows]),
        "mean_pruned": _mean([r["pruned"] for r in rows]),
        "mean_retention": _mean(rets),
    }
    ppl_rows = []
    for label in (dense_ppl or {}):
        if pruned_ppl and label in pruned_ppl:
            d, p = dense_ppl[label], pruned_ppl[label]  # type: ignore[index]
            ppl_rows.append({"label": label, "dense": d["ppl"], "pruned": p["ppl"], "ratio": p["ppl"] / d["ppl"],
                             "protocol": {k: d.get(k) for k in ("seq_len", "stride", "windows", "tokens_scored",
                                                                "bos", "dtype", "source")}})
    warnings = _context_warnings(dense_ppl or {})
    models: dict[str, Any] = {}
    if dense_model_stats and pruned_model_stats:
        models = {"dense": dense_model_stats, "pruned": pruned_model_stats,
                  "params_ratio": pruned_model_stats["params"] / dense_model_stats["params"],
                  "bytes_ratio": pruned_model_stats["param_bytes"] / dense_model_stats["param_bytes"]}
        dg, pg = dense_model_stats.get("generation"), pruned_model_stats.get("generation")
        paired = (pg or {}).get("vs_dense")
        if paired:  # timed in alternation (speed.paired_generation_speed): a busy machine voids the ratio
            models["speedup"] = paired["speedup"]
            models["cpu_speedup"] = None if paired["busy"] else paired["cpu_speedup"]
            if paired["busy"]:
                warnings.append(f"generation speed: {paired['warning']}; "
                                "the pruned / dense speed ratio is not a result")
        elif dg and pg:  # two separate measurements (benchmarks/eval_suite interleaves its own)
            models["speedup"] = pg["tokens_per_s"] / dg["tokens_per_s"]
    return {"summary": summary, "tasks": rows, "perplexity": ppl_rows, "agreement": agreement, "models": models,
            "settings": {"dense": dense_results.get("settings"), "pruned": pruned_results.get("settings")},
            "missing_tasks": missing, "warnings": warnings, "meta": meta or {}}


def _context_warnings(dense_ppl: dict[str, Any]) -> list[str]:
    """:func:`fbnprune.evaluate.ppl.context_warnings` on the dense perplexities (labels are ``source@seq_len``)."""
    from fbnprune.evaluate.ppl import context_warnings

    by_source: dict[str, dict[int, float]] = {}
    for label, res in dense_ppl.items():
        by_source.setdefault(label.rsplit("@", 1)[0], {})[int(res["seq_len"])] = float(res["ppl"])
    return context_warnings(by_source)


def _mean(xs: list[float | None]) -> float | None:
    v = [x for x in xs if x is not None]
    return sum(v) / len(v) if v else None


def _f(x: float | None, nd: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _pm(x: float | None, s: float | None, nd: int = 4) -> str:
    return _f(x, nd) + ("" if s is None else f" ± {s:.{nd}f}")


def to_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables (tasks, perplexity, agreement, size/speed) plus the settings that matter;
    a table with nothing measured is left out."""
    out = [f"**Warning**: {w}" for w in report.get("warnings") or []]
    lines = ["| task | metric | items | dense | pruned | retention |", "|---|---|---:|---:|---:|---:|"]
    for r in report["tasks"]:
        lines.append(f"| {r['task']} | {r['metric']} | {r['items'] if r['items'] is not None else ''} | "
                     f"{_pm(r['dense'], r['dense_stderr'])} | {_pm(r['pruned'], r['pruned_stderr'])} | "
                     f"{_pm(r['retention'], r['retention_stderr'], 3)} |")
    s = report["summary"]
    lines.append(f"| **mean ({s['tasks']} tasks)** | | | {_f(s['mean_dense'])} | {_f(s['mean_pruned'])} | "
                 f"**{_f(s['mean_retention'], 3)}** |")
    if report["tasks"]:
        out.append("\n".join(lines))
    if report.get("perplexity"):
        pl = ["| perplexity | seq_len | windows | tokens scored | bos | dtype | dense | pruned | ratio |",
              "|---|---:|---:|---:|---|---|---:|---:|---:|"]
        for r in report["perplexity"]:
            pr = r["protocol"]
            bos = {True: "yes", False: "no"}.get(pr.get("bos"), "?")
            pl.append(f"| {r['label']} | {pr['seq_len']} | {pr['windows']} | {pr['tokens_scored']} | {bos} | "
                      f"{pr['dtype']} | {r['dense']:.3f} | {r['pruned']:.3f} | {r['ratio']:.3f} |")
        out.append("\n".join(pl))
    a = report.get("agreement")
    if a:
        out.append("| data-free retention | value |\n|---|---:|\n"
                   f"| KL(dense‖pruned), nats/token | {a['kl']:.4f} |\n"
                   f"| top-1 agreement | {a['top1_agreement']:.4f} |\n"
                   f"| positions (source: {a.get('source', '?')}) | {a['positions']} |")
    mo = report.get("models")
    if mo:
        out.extend(_models_markdown(mo))
    st = (report.get("settings") or {}).get("pruned") or {}
    if st:
        out.append(f"Tasks: lm-eval {st.get('lm_eval')}, zero-shot, engine {st.get('engine')}, dtype {st.get('dtype')}, "
                   f"blimp subset {st.get('blimp_per_paradigm')} items per paradigm."
                   + (f" **{st['limit_note']}**" if st.get("limit_note") else ""))
    if report.get("missing_tasks"):
        out.append(f"Tasks in only one of the two runs (not compared): {', '.join(report['missing_tasks'])}")
    return "\n\n".join(out) + "\n"


def _models_markdown(mo: dict[str, Any]) -> list[str]:
    """Size and speed table plus the speed protocol. A speed ratio voided by a busy machine is shown as such,
    not as a number, so that nobody quotes it."""
    d, p = mo["dense"], mo["pruned"]
    dg, pg = d.get("generation") or {}, p.get("generation") or {}
    paired = pg.get("vs_dense")
    busy = bool(paired and paired["busy"])

    def ratio(key: str) -> str:
        return "not a result (machine busy)" if busy else _f(mo.get(key), 3)

    rows = ["| model | params | param bytes | generation tokens/s | tokens per CPU-second |",
            "|---|---:|---:|---:|---:|"]
    for name, st, g in (("dense", d, dg), ("pruned", p, pg)):
        rows.append(f"| {name} | {st['params']:,} | {st['param_bytes']:,} | {_f(g.get('tokens_per_s'), 1)} | "
                    f"{_f(g.get('tokens_per_cpu_s'), 1)} |")
    rows.append(f"| pruned / dense | {mo['params_ratio']:.3f} | {mo['bytes_ratio']:.3f} | {ratio('speedup')} | "
                f"{ratio('cpu_speedup')} |")
    out = ["\n".join(rows)]
    if dg:
        line = (f"Generation speed: {dg['decoding']}, batch {dg['batch']}, {dg['prompt_tokens']}-token prompt, "
                f"{dg['new_tokens']} new tokens, median of {dg['repeats']} runs, {dg['threads']} threads")
        if paired:
            ld = paired["load"]
            share = "" if paired["cpu_share"] is None else f", CPU share {paired['cpu_share']:.2f}"
            line += (f"; dense and pruned timed in alternation, speed-up = median ratio of adjacent runs; "
                     f"1-minute load average {ld['before'][0]:.2f} before and {ld['after'][0]:.2f} after, "
                     f"{ld['cores']} cores{share}")
        out.append(line + ".")
    return out


def print_report(report: dict[str, Any]) -> None:
    """Print the Markdown tables (the end-of-run summary)."""
    print(to_markdown(report), flush=True)
