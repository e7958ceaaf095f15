"""``python -m fbnprune analyze RECIPE``: do the first paper's claims hold on this model?

Reads the recipe's model, collect and discover sections (so it reuses the networks a pruning run of the same
recipe cached), then measures: recurrence of networks across disjoint text blocks against chance; masking the
top-n networks vs as many random neurons; keeping only the top-k networks vs as many random neurons; amplifying
the top networks vs random neurons. Writes ``analysis.json``, ``analysis.md`` and PNG figures, atomically.
See ``docs/findings.md`` for what came out on the built-in models.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import fbnprune.run as pipeline  # as a module: tests replace pipeline.load to catch a load before the checks
from fbnprune.analyze.experiments import (
    intervention_plan,
    ranked_networks,
    recurrence_analysis,
    run_interventions,
    summarize,
    top_networks,
)
from fbnprune.analyze.figures import brain_map, intervention_curves, recurrence_hist
from fbnprune.analyze.hooks import gains_from_masks, neuron_gains
from fbnprune.analyze.report import to_markdown
from fbnprune.discover import DiscoverConfig, run_discovery
from fbnprune.errors import UserError
from fbnprune.evaluate.harness import evaluate_tasks
from fbnprune.evaluate.ppl import perplexity, token_stream
from fbnprune.evaluate.report import primary_metric
from fbnprune.export.hf import atomic_dir
from fbnprune.models.feed import feed_info, start_tokens
from fbnprune.outputs import check_output_dir
from fbnprune.paths import cache_dir
from fbnprune.recipe.schema import AnalyzeConfig, Recipe

__all__ = ["analyze", "neuron_gains", "gains_from_masks", "ranked_networks", "top_networks", "recurrence_analysis",
           "intervention_plan", "run_interventions", "summarize"]


def make_probe(model: Any, tokenizer: Any, cfg: AnalyzeConfig, tokens: Any) -> Any:
    """The one measurement every condition gets: perplexity on a fixed slice and accuracy on fixed task subsets."""
    def probe() -> dict[str, Any]:
        out: dict[str, Any] = {}
        if tokens is not None:
            pc = cfg.perplexity
            out["ppl"] = perplexity(model, tokens, seq_len=pc.seq_len, batch_size=pc.batch_size, progress=False)["ppl"]
        if cfg.tasks:
            res = evaluate_tasks(model, tokenizer, cfg.tasks, batch_size=cfg.batch_size, subset=cfg.subset,
                                 subset_seed=cfg.subset_seed, progress=False)
            accs = []
            for task, entry in res["tasks"].items():
                out[task] = entry.get(primary_metric(task, entry))
                accs.append(out[task])
            out["mean_acc"] = float(np.mean([a for a in accs if a is not None])) if accs else None
        return out

    return probe


def analyze(recipe: Recipe, output_dir: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run every analysis of ``recipe.analyze`` (defaults when absent); returns the report written to disk.

    The output directory is checked before the model loads, as in :func:`fbnprune.run.run`: an earlier
    analysis there is replaced only with ``overwrite``.
    """
    cfg = recipe.analyze or AnalyzeConfig()
    if recipe.collect is None or not recipe.collect.keep_activations:
        raise UserError("analyze needs stored activations: a collect section with keep_activations: true")
    t0 = time.perf_counter()
    out = check_output_dir(output_dir or recipe.output_dir or f"outputs/{recipe.name}", overwrite=overwrite)
    r = pipeline.load(recipe)
    pipeline.collect_stage(r)
    assert r.store is not None
    dcfg = recipe.discover or DiscoverConfig(block_texts=None, block_rows=2048)
    nets = run_discovery(r.store, dcfg)
    pipeline.say(f"networks: {nets.summary.get('runs_ok')} run(s) -> {nets.path}")
    if cfg.run >= int(nets.summary.get("matched_runs") or 1):
        raise UserError(f"analyze.run = {cfg.run}, but only {nets.summary.get('matched_runs')} run(s) are stored")
    title = recipe.model.source
    pipeline.say("recurrence across disjoint text blocks")
    rec = recurrence_analysis(nets, shuffles=cfg.shuffles, seed=recipe.seed)
    pc = cfg.perplexity
    tokens = None
    if not pipeline.needs_data(pc.source) or r.have_data:
        tokens = token_stream(r.lm.tokenizer, pc.source, pc.max_tokens)
    elif not cfg.tasks:
        raise UserError(f"analyze needs the data directory for {pc.source!r} (or some tasks)")
    probe = make_probe(r.lm.model, r.lm.tokenizer, cfg, tokens)
    plan = intervention_plan(nets, mask_top=cfg.mask_top, keep_top=cfg.keep_top, amplify_top=cfg.amplify_top,
                             gains=cfg.gains, random_seeds=cfg.random_seeds, run=cfg.run)
    pipeline.say(f"{len(plan)} conditions, each measured with hooks (weights untouched)")
    salt = json.dumps([r.lm.info.get("sha256") or recipe.model.source, recipe.model.dtype, nets.path.name, cfg.run,
                       cfg.perplexity.model_dump(), cfg.tasks, cfg.subset, cfg.subset_seed,
                       r.have_data, tokens is not None], default=str)
    rows = run_interventions(r.lm.model, r.adapter, probe, plan, cache=cache_dir() / "analysis", cache_salt=salt)
    metrics = [m for m in ("ppl", "mean_acc", *cfg.tasks) if any(row.get(m) is not None for row in rows)]
    summary = summarize(rows, metrics)
    report = {
        "recipe": recipe.name, "model": recipe.model.source, "settings": cfg.model_dump(mode="json"),
        "feed": feed_info(start_tokens(r.lm.tokenizer)),  # how every probe, calibration and task sequence started
        "networks": {"path": str(nets.path), "params": nets.summary["params"], "runs_ok": nets.summary["runs_ok"],
                     "matched_runs": nets.summary.get("matched_runs"), "per_layer": nets.summary["per_layer"]},
        "recurrence": rec, "summary": summary, "rows": rows,
        "provenance": pipeline.provenance(recipe, r.lm.info), "seconds": round(time.perf_counter() - t0, 1),
    }

    def write(tmp: Path) -> None:
        brain_map(nets, tmp / "brain_map.png", title, run=cfg.run)
        recurrence_hist(rec, tmp / "recurrence.png", title)
        intervention_curves(summary, [m for m in ("ppl", "mean_acc") if m in metrics], tmp / "interventions.png",
                            title)
        (tmp / "analysis.json").write_text(json.dumps(report, indent=1, default=str))
        (tmp / "analysis.md").write_text(to_markdown(report))

    atomic_dir(out, write)
    pipeline.say(f"wrote {out}/ (analysis.json, analysis.md, brain_map.png, recurrence.png, interventions.png) "
        f"in {report['seconds']} s")
    return report
