"""Where do functional networks help? fbn against the best baselines when calibration is scarce or off-domain.

Networks are a thresholded summary of the activation covariance, which OBS and the re-fit read in full; they can
only win where that covariance is unreliable. Two such regimes:

* ``budget``: little calibration text. wikitext2-valid, 256 / 512 / 1,024 / 2,048 / 8,192 tokens, three
  calibration seeds each (small budgets are noisy: the spread is reported), evaluated on WikiText-2 test;
* ``domain``: calibration from another domain than the use. 8,192 tokens of each calibration set (c4, wiki, code,
  technical, and wikitext2-valid for reference), evaluated on WikiText-2 test and on the held-out tail of every
  calibration set.

Every cell is one leaderboard grid recipe (``benchmarks/leaderboard/grid/<model>/<method>-<pct>.yaml``: its prune
and discover sections, so methods are exactly the leaderboard's) run by fbnprune's own stages on the calibration
the cell names; only the calibration differs between cells. Perplexity: 2,048-token windows (the leaderboard's
``ppl@2048``) on the first 8,192 tokens of WikiText-2 test, and on the last ``HELD_OUT`` tokens of each calibration
set; calibration windows are cut from the rest of that set only (never from evaluation text). Each window starts
the way the model's tokenizer starts a text (``<bos>`` for Gemma 3); calibration windows are ``min(512, budget)``
tokens.

    python benchmarks/fbn_rules/regimes.py --model smollm2-135m --regime budget      # resumable
    python benchmarks/fbn_rules/regimes.py --model smollm2-135m --regime domain
    python benchmarks/fbn_rules/regimes.py --model smollm2-135m --regime prior --tokens 1024 --seeds 0  # a slice
    python benchmarks/fbn_rules/regimes.py --summarize      # calibration_regimes.csv, regimes.md, figure

* ``prior``: a network prior for OBS + re-fit (``gram_prior.py``): the covariance it reads shrunk towards the
  recurring networks' block structure (``net``), against the same shrinkage with the network mask's neurons
  permuted (``rand``), towards the diagonal (``diag``) and plain ridge (``ridge``), each at three strengths.
  The strength is chosen on the held-out tail of wikitext2-valid (validation text, never a calibration window),
  and the chosen cell's WikiText-2 test perplexity is the one reported, so that a gain is the networks' and not
  the regularisation's. Budgets 256 / 1,024 / 8,192, three seeds.

Discovery on scarce text: the grid's settings (blocks of 2,048 rows, 128 components, four blocks at 8,192 tokens)
need 8,192 tokens; below that the text is cut into four blocks as well, of ``(tokens - windows) // 4`` rows (the
first position of every window is left out of discovery), with at most half as many components as rows
(:func:`discover_for`), so that recurrence across disjoint text is measured at every budget.

A method name ``BASE~KIND:STRENGTH`` (e.g. ``obs-refit~net:0.5``) is grid method ``BASE`` pruned with that Gram
prior; the prior's networks come from the fbn grid recipe's discovery settings on the cell's calibration.

One JSON per cell under ``regimes/<model>/<source>-<tokens>-s<seed>/<method>.json`` (and ``dense.json`` per
model: the dense perplexity on every evaluation set); a rerun skips finished cells and evaluations.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(HERE))  # gram_prior.py sits next to this script, which also runs loaded by path (tests)
import gram_prior  # noqa: E402

from benchmarks.runner import Bench, command_line, read_json, record, write_json  # noqa: E402
from fbnprune.collect import collect  # noqa: E402
from fbnprune.collect.sources import TokenBatch, pack_windows, tokenize_source  # noqa: E402
from fbnprune.discover import run_discovery  # noqa: E402
from fbnprune.evaluate.ppl import TokenStream, perplexity, token_stream  # noqa: E402
from fbnprune.models.feed import feed_info, start_tokens  # noqa: E402
from fbnprune.recipe import load_recipe  # noqa: E402
from fbnprune.run import say  # noqa: E402

OUT = HERE / "regimes"
GRID = ROOT / "benchmarks" / "leaderboard" / "grid"
METHODS = ("fbn", "obs-refit", "wanda_sp-refit", "corr_redundancy")
LABELS = {"fbn": "fbn", "obs-refit": "OBS + re-fit", "wanda_sp-refit": "Wanda-sp + re-fit",
          "corr_redundancy": "correlation control"}
TEST_SET = "wikitext2-test"  # evaluated on its first WIKITEXT_TOKENS tokens
VALID_SET = "wikitext2-valid"  # calibration text whose tail is held out for choosing a prior's strength
HELD_SETS = ("c4", "wiki", "code", "technical")
HELD_OUT = 8192  # tokens at the end of each calibration set kept for evaluation
EVAL_SEQ_LEN = 2048
CALIB_SEQ_LEN = 512  # calibration windows: this long, or the whole budget when it is smaller
WIKITEXT_TOKENS = 8192
REGIMES: dict[str, dict[str, Any]] = {
    "budget": {"sources": ["wikitext2-valid"], "tokens": [256, 512, 1024, 2048, 8192], "seeds": [0, 1, 2],
               "evals": [TEST_SET]},
    "domain": {"sources": ["wikitext2-valid", *HELD_SETS], "tokens": [8192], "seeds": [0],
               "evals": [TEST_SET, *HELD_SETS]},
    "prior": {"sources": ["wikitext2-valid"], "tokens": [256, 1024, 8192], "seeds": [0, 1, 2],
              "evals": [TEST_SET, VALID_SET],
              "methods": ["obs-refit", *(f"obs-refit~{k}:{s}" for k in ("net", "rand", "diag") for s in (0.2, 0.5, 0.8)),
                          *(f"obs-refit~ridge:{s}" for s in (0.01, 0.1, 1.0))]},
}


def parse_method(name: str) -> tuple[str, str | None, float]:
    """``BASE~KIND:STRENGTH`` -> (grid method, prior kind, strength); a plain grid method has no prior."""
    if "~" not in name:
        return name, None, 0.0
    base, prior = name.split("~", 1)
    kind, strength = prior.split(":")
    return base, kind, float(strength)


class Texts:
    """The model's token streams of every source, split into a calibration part and an evaluation part."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.start = start_tokens(tokenizer)
        self._ids: dict[str, Any] = {}

    def ids(self, source: str) -> Any:
        if source not in self._ids:
            self._ids[source] = (token_stream(self.tokenizer, source, WIKITEXT_TOKENS).ids if source == TEST_SET
                                 else tokenize_source(self.tokenizer, source))
        return self._ids[source]

    def calibration(self, source: str, n_tokens: int, seed: int) -> TokenBatch:
        """Seeded windows of ``source``, never from its held-out tail."""
        ids = self.ids(source)
        if source in HELD_SETS or source == VALID_SET:
            ids = ids[: len(ids) - HELD_OUT]
        return pack_windows(ids, self.start, n_tokens=n_tokens, seq_len=min(CALIB_SEQ_LEN, n_tokens), seed=seed,
                            source=f"{source}[calibration part]")

    def evaluation(self, source: str) -> TokenStream:
        """WikiText-2 test's first tokens, or a calibration set's held-out tail."""
        ids = self.ids(source)
        if source != TEST_SET and source != VALID_SET and source not in HELD_SETS:
            raise ValueError(f"{source!r} is not an evaluation set here")
        return TokenStream(ids if source == TEST_SET else ids[len(ids) - HELD_OUT:], tuple(self.start))


def discover_for(recipe: Any, calib: TokenBatch) -> Any:
    """``recipe`` with discovery settings the calibration can hold: unchanged when it fills the recipe's blocks,
    else four blocks of what there is, with at most half as many ICA components as rows per block."""
    cfg = recipe.discover
    if cfg is None or cfg.block_rows is None:
        return recipe
    rows = calib.n_tokens - len(calib.sequences) * cfg.skip_first
    if rows >= 4 * cfg.block_rows:
        return recipe
    block = rows // 4
    small = cfg.model_copy(update={"block_rows": block, "n_components": min(cfg.n_components, block // 2)})
    return recipe.model_copy(update={"discover": small})


def cell_dir(model: str, source: str, tokens: int, seed: int) -> Path:
    return OUT / model / f"{source.replace('/', '_')}-{tokens}-s{seed}"


def ppl(model: Any, texts: Texts, source: str, label: str) -> dict[str, Any]:
    r = perplexity(model, texts.evaluation(source), seq_len=EVAL_SEQ_LEN, batch_size=1, desc=f"{label} {source}")
    return {k: r[k] for k in ("ppl", "nll", "tokens_scored", "windows", "seconds")}


def run(model: str, regime: str, methods: list[str] | None, sparsity: int, threads_note: str,
        tokens: list[int] | None = None, seeds: list[int] | None = None) -> None:
    """Every cell of ``regime`` not yet on disk; ``tokens`` / ``seeds`` restrict it to part of its grid (in the
    order given), so that a long regime can be run in slices."""
    spec = dict(REGIMES[regime])
    for key, part in (("tokens", tokens), ("seeds", seeds)):
        if part:
            if unknown := [v for v in part if v not in spec[key]]:
                raise SystemExit(f"--{key} {unknown} not in the {regime} regime's {key} {spec[key]}")
            spec[key] = part
    methods = methods or spec.get("methods", list(METHODS))
    bases = {parse_method(m)[0] for m in methods}
    if any(parse_method(m)[1] for m in methods):
        bases.add("fbn")  # the prior's networks: the fbn recipe's discovery settings
    recipes = {b: load_recipe(GRID / model / f"{b}-{sparsity}.yaml") for b in sorted(bases)}
    bench = Bench(next(iter(recipes.values())), calibrate=False, command=command_line())
    texts = Texts(bench.tokenizer)
    dense_file = OUT / model / "dense.json"
    dense = read_json(dense_file) or {"evals": {}}
    for ev in spec["evals"]:
        if ev not in dense["evals"]:
            dense["evals"][ev] = ppl(bench.dense, texts, ev, "dense")
            write_json(dense_file, {**dense, **record(bench.command), **feed_info(texts.start)})
    for source in spec["sources"]:
        for tokens in spec["tokens"]:
            for seed in spec["seeds"]:
                d = cell_dir(model, source, tokens, seed)
                done = {m: read_json(d / f"{m}.json") for m in methods}
                todo = {m: evs for m in methods
                        if (evs := [ev for ev in spec["evals"] if ev not in (done[m] or {}).get("evals", {})])}
                if not todo:
                    continue
                calib = texts.calibration(source, tokens, seed)
                say(f"calibration {source} {tokens} tokens seed {seed}: {len(calib.sequences)} windows of "
                    f"{len(calib.sequences[0])}")
                store = collect(bench.dense, calib, model_info=bench.base.lm.info, batch_size=4,
                                keep_activations=True, drop_first=0)
                bench.base.calib, bench.base.store = calib, store
                prior_nets = None  # one discovery serves every net / rand cell of this calibration
                for m, evs in todo.items():
                    t0 = time.perf_counter()
                    old = done[m]  # a cell that lacks some evaluations is pruned again
                    base, kind, strength = parse_method(m)
                    recipe = discover_for(recipes[base], calib)
                    if kind is None:
                        r = bench.prune(recipe)
                    else:
                        if kind in ("net", "rand") and prior_nets is None:
                            prior_nets = run_discovery(store, discover_for(recipes["fbn"], calib).discover)
                        nets = prior_nets if kind in ("net", "rand") else None
                        with gram_prior.applied(kind, strength, nets, seed=seed):
                            r = bench.prune(recipe)
                    evals = dict((old or {}).get("evals", {}))
                    # the record below names this run; the evaluations it keeps were made by earlier ones
                    earlier = (old or {}).get("earlier_runs", []) + ([provenance(old)] if old else [])
                    for ev in evs:
                        evals[ev] = ppl(r.lm.model, texts, ev, m)
                    net = r.networks.summary if r.networks is not None else None
                    write_json(d / f"{m}.json", {
                        "model": model, "method": m, "base_method": base, "prior": kind, "strength": strength,
                        "sparsity": sparsity / 100, "calib_source": source,
                        "calib_tokens": calib.n_tokens, "calib_seed": seed, "calib_sha256": calib.sha256,
                        "calib_windows": len(calib.sequences), **feed_info(calib.start),
                        "evals": evals, "networks": _net_summary(net), "kept_widths": r.plan.kept_widths,
                        "discover": recipe.discover.model_dump(mode="json") if recipe.discover else None,
                        "prune_seconds": r.report.get("seconds"), "seconds": round(time.perf_counter() - t0, 1),
                        "threads": threads_note, **record(bench.command), "earlier_runs": earlier})
                    say(f"{source}-{tokens}-s{seed} {m}: " + ", ".join(f"{ev} {evals[ev]['ppl']:.2f}" for ev in evs))
                    del r
                shutil.rmtree(store.path, ignore_errors=True)  # activations: GBs each, cheap to capture again


def provenance(cell: dict[str, Any]) -> dict[str, Any]:
    """Which evaluations of a cell one run made, and with what command, date and versions."""
    return {"evals": sorted(cell.get("evals", {})), **{k: cell[k] for k in ("command", "date", "versions") if k in cell}}


def _net_summary(summary: Any) -> Any:
    """The networks' per-model summary without per-layer detail (how many networks were found from this text)."""
    if not isinstance(summary, dict):
        return summary
    return {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}


# ------------------------------------------------------------------------------------------------ summary
def rows() -> list[dict[str, Any]]:
    out = []
    for model_dir in sorted(p for p in OUT.iterdir() if p.is_dir()) if OUT.is_dir() else []:
        dense = read_json(model_dir / "dense.json") or {"evals": {}}
        for f in sorted(model_dir.glob("*/*.json")):
            c = json.loads(f.read_text())
            for ev, r in sorted(c["evals"].items()):
                dp = dense["evals"].get(ev, {}).get("ppl")
                out.append({"model": c["model"], "method": c["method"], "sparsity": c["sparsity"],
                            "calib_source": c["calib_source"], "calib_tokens": c["calib_tokens"],
                            "calib_seed": c["calib_seed"], "eval_source": ev, "ppl": round(r["ppl"], 4),
                            "dense_ppl": round(dp, 4) if dp else None,
                            "increase": round(r["ppl"] - dp, 4) if dp else None})
    return out


def margins(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, calibration, evaluation) group: fbn's perplexity increase against the best baseline's, paired
    by calibration seed, as a share of the baseline's increase (positive: fbn better), mean and spread over seeds."""
    by: dict[tuple, dict[int, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in table:
        if r["increase"] is not None and r["method"] in METHODS:
            by[(r["model"], r["calib_source"], r["calib_tokens"], r["eval_source"])][r["calib_seed"]][r["method"]] = r["increase"]
    out = []
    for key, seeds in sorted(by.items()):
        methods = set.intersection(*(set(v) for v in seeds.values()))
        if "fbn" not in methods or len(methods) < 2:
            continue
        base = sorted(methods - {"fbn"}, key=lambda m: statistics.fmean(seeds[s][m] for s in seeds))
        best = base[0]
        shares = [(seeds[s][best] - seeds[s]["fbn"]) / seeds[s][best] for s in sorted(seeds)]
        means = {m: statistics.fmean(seeds[s][m] for s in seeds) for m in methods}
        sds = {m: statistics.stdev([seeds[s][m] for s in seeds]) if len(seeds) > 1 else 0.0 for m in methods}
        out.append({"model": key[0], "calib_source": key[1], "calib_tokens": key[2], "eval_source": key[3],
                    "seeds": len(seeds), "best_baseline": best, "means": means, "sds": sds,
                    "fbn_vs_best": statistics.fmean(shares),
                    "fbn_vs_best_sd": statistics.stdev(shares) if len(shares) > 1 else 0.0})
    return out


def prior_choices(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, calibration, seed, prior kind): the strength with the lowest validation perplexity and that
    cell's test perplexity increase (``none``: OBS + re-fit without a prior)."""
    cells: dict[tuple, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in table:
        base, kind, strength = parse_method(r["method"])
        if base != "obs-refit" or r["increase"] is None:
            continue
        key = (r["model"], r["calib_source"], r["calib_tokens"], r["calib_seed"], kind or "none")
        cells[key][str(strength)][r["eval_source"]] = r["ppl"] if r["eval_source"] == VALID_SET else r["increase"]
    out = []
    for key, by_strength in sorted(cells.items()):
        ok = {st: v for st, v in by_strength.items() if VALID_SET in v and TEST_SET in v}
        if not ok:
            continue
        best = min(ok, key=lambda st: ok[st][VALID_SET])
        out.append({"model": key[0], "calib_source": key[1], "calib_tokens": key[2], "calib_seed": key[3],
                    "prior": key[4], "strength": float(best), "valid_ppl": ok[best][VALID_SET],
                    "test_increase": ok[best][TEST_SET], "strengths_tried": len(ok)})
    return out


def prior_table(choices: list[dict[str, Any]]) -> list[str]:
    """Markdown: per model and budget, each prior's test increase at its validation-chosen strength (mean ± sd
    over seeds), and ``net`` against the best other prior, paired by seed (positive: the network prior better)."""
    groups: dict[tuple, dict[int, dict[str, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for c in choices:
        groups[(c["model"], c["calib_source"], c["calib_tokens"])][c["calib_seed"]][c["prior"]] = c
    kinds = ["none", *gram_prior.KINDS]
    md = ["## Network prior for OBS + re-fit", "",
          "Test perplexity increase (WikiText-2, 2,048-token windows) at the strength chosen on the held-out tail of "
          "wikitext2-valid (chosen strengths in brackets, per seed); `net vs best other`: `net` against the best "
          "other prior (`none` included), as a share of that prior's increase, paired by seed; `diag vs none`: "
          "what shrinking towards the diagonal (the product's `prune.gram_shrink`) removes of the increase.", "",
          "| model | tokens | seeds | " + " | ".join(kinds) + " | net vs best other | diag vs none |",
          "|" + "---|" * (5 + len(kinds))]
    for (model, _, tokens), seeds in sorted(groups.items()):
        common = [s for s in sorted(seeds) if set(kinds) <= set(seeds[s])]
        if not common:
            continue

        def stat(k: str, seeds: dict = seeds, common: list[int] = common) -> str:
            xs = [seeds[s][k]["test_increase"] for s in common]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            chosen = ", ".join(f"{seeds[s][k]['strength']:g}" for s in common)
            return f"{statistics.fmean(xs):.2f} ± {sd:.2f} ({chosen})"

        others = [k for k in kinds if k != "net"]
        best = min(others, key=lambda k: statistics.fmean(seeds[s][k]["test_increase"] for s in common))
        def gain(k: str, ref: str, seeds: dict = seeds, common: list[int] = common) -> str:
            xs = [(seeds[s][ref]["test_increase"] - seeds[s][k]["test_increase"]) / seeds[s][ref]["test_increase"]
                  for s in common]
            return f"{statistics.fmean(xs):+.1%} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1%}"

        md.append(f"| {model} | {tokens} | {len(common)} | " + " | ".join(stat(k) for k in kinds)
                  + f" | {gain('net', best)} vs {best} | {gain('diag', 'none')} |")
    return [*md, ""]


def domain_table(ms: list[dict[str, Any]]) -> list[str]:
    """Markdown: per model, fbn against the best baseline for every (calibration set, evaluation set) pair of the
    domain regime (its one calibration budget), so the off-diagonal (calibrated on one domain, used on another)
    reads at a glance next to the in-domain diagonal."""
    tokens = REGIMES["domain"]["tokens"][0]
    calibs = REGIMES["domain"]["sources"]
    evals = REGIMES["domain"]["evals"]
    md = [f"## Calibration from another domain ({tokens:,} tokens)", "",
          "fbn against the best baseline of each cell (its name in brackets), as a share of that baseline's "
          "perplexity increase over dense (positive: fbn better). Rows: calibration text; columns: evaluation "
          "text (WikiText-2 test, and the held-out tail of each calibration set). One calibration seed (the "
          "wikitext2-valid / WikiText-2 test cell: the mean of the budget regime's three); the seed spread of the "
          f"budget regime at {tokens:,} tokens is the yardstick.", ""]
    short = {"obs-refit": "OBS", "wanda_sp-refit": "Wanda", "corr_redundancy": "corr"}
    for model in sorted({m["model"] for m in ms}):
        cell = {(m["calib_source"], m["eval_source"]): m for m in ms
                if m["model"] == model and m["calib_tokens"] == tokens}
        if not any((c, e) in cell for c in calibs if c != VALID_SET for e in evals):
            continue
        md += [f"### {model}", "", "| calibration \\ evaluation | " + " | ".join(evals) + " |",
               "|---|" + "---|" * len(evals)]
        for c in calibs:
            vals = [f"{cell[(c, e)]['fbn_vs_best']:+.1%} ({short.get(cell[(c, e)]['best_baseline'], '?')})"
                    if (c, e) in cell else "—" for e in evals]
            md.append(f"| {c} | " + " | ".join(vals) + " |")
        md.append("")
    return md


def summarize() -> None:
    table = rows()
    if not table:
        raise SystemExit(f"no cells under {OUT}: run a regime first")
    with (HERE / "calibration_regimes.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    ms = margins(table)
    md = ["# Calibration regimes: does fbn win where calibration is scarce or off-domain?", "",
          "Generated by `python benchmarks/fbn_rules/regimes.py --summarize` from `regimes/`; protocol and commands "
          "in the script's docstring; every cell in `calibration_regimes.csv`. Perplexity increase over dense "
          "(2,048-token windows), mean ± sd over calibration seeds; last column: fbn's margin over the best "
          "baseline in that row, as a share of that baseline's increase, paired by seed (positive: fbn better; the "
          "target is +10 % beyond the seed spread).", ""]
    for model in sorted({m["model"] for m in ms}):
        md += [f"## {model}", "", "| calibration | tokens | evaluated on | seeds | "
               + " | ".join(LABELS[m] for m in METHODS) + " | best baseline | fbn vs best |",
               "|" + "---|" * (5 + len(METHODS) + 1)]
        for m in (x for x in ms if x["model"] == model):
            cells = [f"{m['means'][k]:.2f} ± {m['sds'][k]:.2f}" if k in m["means"] else "—" for k in METHODS]
            md.append(f"| {m['calib_source']} | {m['calib_tokens']} | {m['eval_source']} | {m['seeds']} | "
                      + " | ".join(cells) + f" | {LABELS[m['best_baseline']]} | "
                      f"{m['fbn_vs_best']:+.1%} ± {m['fbn_vs_best_sd']:.1%} |")
        md.append("")
    md += domain_table(ms)
    md += prior_table(prior_choices(table))
    (HERE / "regimes.md").write_text("\n".join(md))
    figure(ms)
    say(f"{len(table)} rows -> calibration_regimes.csv, regimes.md, regimes_budget.png")


def figure(ms: list[dict[str, Any]]) -> None:
    """Perplexity increase against calibration budget per method and model (WikiText-2 calibration and test;
    mean and sd over seeds, both axes logarithmic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({m["model"] for m in ms})
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(5.5 * max(len(models), 1), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        pts = sorted((m for m in ms if m["model"] == model and m["calib_source"] in REGIMES["budget"]["sources"]
                      and m["eval_source"] == TEST_SET), key=lambda m: m["calib_tokens"])
        positive = True
        for k in METHODS:
            xs = [m["calib_tokens"] for m in pts if k in m["means"]]
            ys = [m["means"][k] for m in pts if k in m["means"]]
            es = [m["sds"][k] for m in pts if k in m["means"]]
            if xs:  # on a log axis (increases span three decades) the lower bar stops short of zero
                low = [min(e, 0.9 * y) if y > 0 else e for e, y in zip(es, ys, strict=True)]
                ax.errorbar(xs, ys, yerr=[low, es], marker="o", capsize=3, label=LABELS[k])
                positive = positive and min(ys) > 0
        ax.set_xscale("log", base=2)
        ax.set_yscale("log" if positive else "linear")
        ax.set_xlabel("calibration tokens (wikitext2-valid)")
        ax.set_ylabel("ppl@2048 increase over dense (WikiText-2 test)")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "regimes_budget.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(p.name for p in GRID.iterdir() if p.is_dir()))
    ap.add_argument("--regime", choices=sorted(REGIMES))
    ap.add_argument("--methods", nargs="+", default=None,
                    help="grid methods, or BASE~KIND:STRENGTH with a Gram prior (default: the regime's)")
    ap.add_argument("--sparsity", type=int, default=30, help="per cent of MLP neurons removed (a grid sparsity)")
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="only these of the regime's budgets")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="only these of the regime's seeds")
    ap.add_argument("--summarize", action="store_true")
    args = ap.parse_args(argv)
    if args.summarize:
        summarize()
        return 0
    if not (args.model and args.regime):
        ap.error("--model and --regime are needed (or --summarize)")
    import torch

    run(args.model, args.regime, args.methods, args.sparsity, f"{torch.get_num_threads()} torch threads",
        tokens=args.tokens, seeds=args.seeds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
