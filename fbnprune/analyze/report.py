"""``analysis.md``: the analysis numbers as tables, with a verdict per claim computed from them (not written by hand).

The verdict rules are deliberately simple and stated in the output, so a reader can disagree with them:

* recurrence holds when the median matched overlap is above the chance 99th percentile; partly when the observed
  match rate is above chance but the median is not;
* masking holds when zeroing the top networks hurts perplexity more than every random control for every n;
  partly when it does for some n;
* keep-only holds when some k keeps perplexity within 1.5x of the unmodified model while the random controls
  keeping as many neurons do not; partly when networks beat random at some k without reaching 1.5x;
* amplification holds when some gain lowers the unmodified model's perplexity, or raises its mean accuracy by more
  than two binomial standard errors (with 100 items at 65%, about 0.095; a one-item change is noise).

Re-render ``analysis.md`` from a saved ``analysis.json`` (e.g. after changing these rules)::

    python -m fbnprune.analyze.report docs/findings/smollm2-135m/analysis.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) >= 1000 else f"{x:.{nd}f}"
    return str(x)


def verdicts(report: dict[str, Any]) -> dict[str, str]:
    """One plain verdict per claim (holds / partly / does not hold), by the rules in the module docstring."""
    rec = report["recurrence"]
    s = report["summary"]
    base = s["baseline"].get("ppl")
    out: dict[str, str] = {}
    if rec["observed_median"] is not None and rec["chance_p99"] is not None:
        if rec["observed_median"] > rec["chance_p99"]:
            out["recurrence"] = "holds"
        elif (rec["observed_match_rate"] or 0) > (rec["chance_match_rate"] or 0):
            out["recurrence"] = "partly"
        else:
            out["recurrence"] = "does not hold"
    rows = [r for r in s.get("mask", []) if r.get("ppl")]
    if rows:
        worse = [r["ppl"]["network"] > (r["ppl"]["random_max"] or float("inf")) for r in rows]
        out["masking"] = "holds" if all(worse) else "partly" if any(worse) else "does not hold"
    rows = [r for r in s.get("keep", []) if r.get("ppl")]
    if rows and base:
        ok = [r["ppl"]["network"] <= 1.5 * base and (r["ppl"]["random_min"] or 0) > 1.5 * base for r in rows]
        better = [r["ppl"]["network"] < (r["ppl"]["random_min"] or 0) for r in rows]
        out["keep-only"] = "holds" if any(ok) else "partly" if any(better) else "does not hold"
    rows = s.get("amplify", [])
    if rows and base:
        acc0 = s["baseline"].get("mean_acc")
        margin = 2 * _acc_se(acc0, report.get("settings") or {}) if acc0 is not None else 0.0
        gain = any((r.get("ppl") or {}).get("network", float("inf")) < base
                   or (acc0 is not None and ((r.get("mean_acc") or {}).get("network") or 0) > acc0 + margin)
                   for r in rows)
        out["amplification"] = "holds" if gain else "does not hold"
    return out


def _acc_se(p: float, settings: dict[str, Any]) -> float:
    """Binomial standard error of a mean accuracy ``p`` over the scored items (subset x tasks; 0 if unknown)."""
    n = (settings.get("subset") or 0) * len(settings.get("tasks") or [])
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else 0.0


def _feed(report: dict[str, Any]) -> str:
    """How the sequences started (reports written before the feed was recorded say nothing)."""
    feed = report.get("feed")
    if feed is None:
        return ""
    return f" Every sequence starts with the tokenizer's start tokens {feed['start_tokens']} (bos: {feed['bos']})."


def to_markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    rec = report["recurrence"]
    metrics = [m for m in ("ppl", "mean_acc") if m in s["baseline"]]
    lines = [f"# Functional-network analysis: {report['model']}", "",
             f"Recipe `{report['recipe']}`; networks `{report['networks']['path']}` "
             f"({report['networks']['runs_ok']} runs on disjoint text, {report['networks']['params']['method']}, "
             f"k = {report['networks']['params']['n_components']}, tau = {report['networks']['params']['threshold']}). "
             f"{report['seconds']} s on {report['provenance']['machine']}.{_feed(report)}", "",
             "Unmodified model: " + ", ".join(f"{m} {_f(s['baseline'][m])}" for m in metrics), "",
             "## Verdicts (rules in fbnprune/analyze/report.py)", ""]
    lines += [f"- **{k}**: {v}" for k, v in verdicts(report).items()]
    lines += ["", "## Recurrence", "",
              f"Matched Jaccard overlap between runs: median {_f(rec['observed_median'])} observed vs "
              f"{_f(rec['chance_median'])} chance (99th percentile {_f(rec['chance_p99'])}); "
              f"networks matched at J >= {rec['match_threshold']}: {_f(rec['observed_match_rate'])} observed vs "
              f"{_f(rec['chance_match_rate'])} chance; {_f(rec['observed_above_chance_p99'])} of matches lie above "
              "the chance 99th percentile.", ""]
    names = {"mask": "Masking: zero the top-n networks of every layer",
             "keep": "Keep-only: zero everything outside the top-k networks of every layer",
             "amplify": "Amplification: multiply the top networks' neurons by a gain"}
    for exp, head in names.items():
        rows = s.get(exp) or []
        if not rows:
            continue
        lines += [f"## {head}", "", "| x | neurons touched | " + " | ".join(
            f"{m} network | {m} random mean ± sd [min, max]" for m in metrics) + " |",
            "|---|---|" + "---|---|" * len(metrics)]
        for r in rows:
            cells = []
            for m in metrics:
                v = r[m]
                cells += [_f(v["network"]), f"{_f(v['random_mean'])} ± {_f(v['random_std'])} "
                                            f"[{_f(v['random_min'])}, {_f(v['random_max'])}]"]
            lines.append(f"| {r['x']} | {r['fraction']:.1%} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Rewrite ``analysis.md`` next to each ``analysis.json`` given (verdicts recomputed by the current rules)."""
    paths = [Path(a) for a in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print("usage: python -m fbnprune.analyze.report ANALYSIS_JSON [...]", file=sys.stderr)
        return 2
    for p in paths:
        if not p.is_file():
            print(f"fbnprune: error: no such file: {p}", file=sys.stderr)
            return 2
        md = p.with_name("analysis.md")
        md.write_text(to_markdown(json.loads(p.read_text())))
        print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
